"""Decode and augment a training worker's batch on its own device (`data.decode: device`): Ray Data hands over
the encoded bytes, JPEGs are decoded in one batched `torchvision.io.decode_jpeg` call (nvjpeg on a GPU) and the
timm transform runs on the device (crop-and-resize per image, the rest batched). On a CPU-only worker the
same code runs on the CPU.

The random parameters are drawn on the CPU from a seeded `torch.Generator` before anything touches the device,
so a GPU and the CPU fallback see the same crops, flips and jitter; their outputs differ only by the decoders
(nvjpeg vs libjpeg) and float rounding. The distributions are timm's (jobs/train/batch_transforms.py says
more): `RandomResizedCropAndInterpolation` (10 tries of scale × log-uniform aspect, then the centre crop),
horizontal flip, `ColorJitter` brightness / contrast / saturation in a random order per image, `Normalize`,
`RandomErasing` (const mode, one box). Resampling is `interpolate(antialias=True)`, PIL's filter on tensors,
rounded to uint8 levels as PIL's output is; the jitter stays in floats. RandAugment is not available here.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from cfvit import transforms as cf_transforms  # MAX_IMAGE_PIXELS read at each call: a setting
from cfvit.transforms import ImageDecodeError, to_8bit
from cfvit.transforms import decode_image as pil_decode

from .batch_transforms import RATIO  # timm's RandomResizedCrop aspect range (one copy)

ERASE_AREA, ERASE_ASPECT = (0.02, 1 / 3), (0.3, 1 / 0.3)  # timm's RandomErasing defaults
JPEG_MAGIC = b"\xff\xd8\xff"
GRAY = (19595 / 65536, 38470 / 65536, 7471 / 65536)  # PIL's "L" weights, exact in float32
INTERPOLATIONS = ("bilinear", "bicubic")


def check(data_config: dict, aug: dict | None) -> None:
    """Raise ValueError naming the setting when the device path cannot do what the timm transform would."""
    if aug and aug.get("auto_augment"):
        raise ValueError(f"augment.auto_augment ({aug['auto_augment']!r}): RandAugment runs only with "
                         "data.decode=cpu")
    c, h, w = data_config["input_size"]
    if c not in (1, 3):
        raise ValueError(f"model input_size {data_config['input_size']}: 1 or 3 channels only with data.decode=device")
    if data_config.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise ValueError(f"model interpolation {data_config.get('interpolation')!r}: one of {INTERPOLATIONS} "
                         "with data.decode=device")
    if h != w or data_config.get("crop_mode", "center") != "center" or data_config.get("crop_pct", 1.0) > 1:
        raise ValueError("model data_config: data.decode=device evaluates square inputs with a centre crop and "
                         f"crop_pct <= 1 only (got {data_config})")


# ------------------------------------------------------------------ decode
def decode_batch(blobs, device, channels: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encoded images (or uint8 HW / HWC arrays) → uint8 (channels, H, W) tensors on `device` and a bool mask of
    the readable ones; an unreadable item gets a 1×1 black placeholder, never an error."""
    device = torch.device(device)
    out: list = [None] * len(blobs)
    jpegs = []
    for i, b in enumerate(blobs):
        if _is_pixels(b):
            a = torch.tensor(b)  # a copy: Ray's batches are read-only
            out[i] = (a[None] if a.ndim == 2 else a.permute(2, 0, 1)).to(device)
        elif isinstance(b, (bytes, bytearray, memoryview)) and len(b) and not _too_large(b):
            data = torch.frombuffer(bytearray(b), dtype=torch.uint8)
            if bytes(b[:3]) == JPEG_MAGIC:
                jpegs.append((i, data))
            else:  # PNG etc.: no device decoder
                out[i] = _decode_other(b, data, device)
    for i, img in zip([i for i, _ in jpegs], _decode_jpegs([d for _, d in jpegs], device)):
        out[i] = img
    valid = torch.tensor([x is not None for x in out], dtype=torch.bool)
    blank = torch.zeros(channels, 1, 1, dtype=torch.uint8, device=device)
    return [_channels(x, channels) if x is not None else blank for x in out], valid


def _decode_other(b, data: torch.Tensor, device: torch.device):
    """Not a JPEG: torchvision's CPU decoder; what it cannot read as 8-bit (BMP, TIFF, 16-bit PNG) with PIL,
    as the CPU path reads it; None when neither can."""
    img = _try(lambda: decode_image(data, mode=ImageReadMode.RGB))
    if img is None or img.dtype != torch.uint8:

        try:
            img = torch.from_numpy(np.array(to_8bit(pil_decode(bytes(b))).convert("RGB"))).permute(2, 0, 1)
        except (ImageDecodeError, OSError, ValueError):
            return None
    return img.to(device)


def _too_large(b) -> bool:
    """More pixels than the CPU path accepts (cfvit.transforms.MAX_IMAGE_PIXELS), read from the header alone
    (PIL opens lazily): a decompression bomb is refused before any decoder allocates it."""



    try:
        with Image.open(io.BytesIO(bytes(b))) as img:
            return img.width * img.height > cf_transforms.MAX_IMAGE_PIXELS
    except Image.DecompressionBombError:
        return True
    except Exception:  # a header PIL cannot read: the decoders below decide
        return False


def _is_pixels(b) -> bool:
    """A decoded uint8 image: HW, or HWC with 1, 3 or 4 channels (the built-in set's rows)."""
    return (isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.size > 0
            and (b.ndim == 2 or (b.ndim == 3 and b.shape[2] in (1, 3, 4))))


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list:
    """One batched call; when it fails (one bad file fails all), each alone, then on the CPU, else None."""
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for d in data:
        img = _try(lambda: decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        if img is None and device.type != "cpu":  # a JPEG flavour nvjpeg lacks
            img = _try(lambda: decode_jpeg(d, mode=ImageReadMode.RGB).to(device))
        out.append(img)
    return out


def _try(fn):
    try:
        return fn()
    except (RuntimeError, ValueError):
        return None


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (C, H, W) floats in [0, 255] → the same with one channel (PIL's "L" weights)."""
    if x.shape[-3] == 1:
        return x
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x[..., :3, :, :] * w).sum(-3, keepdim=True)


def _channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """uint8 (1|3|4, H, W) → (c, H, W): gray as PIL converts to "L", gray repeated to RGB, alpha dropped."""
    if x.shape[0] == c:
        return x
    if c == 3:
        return x[:3] if x.shape[0] == 4 else x.expand(3, -1, -1).contiguous()
    return torch.floor(_gray(x.float()) + 0.5).to(torch.uint8)  # exact: PIL's (sum + 2^15) >> 16


# ------------------------------------------------------------------ random parameters (CPU, seeded)
def _tries(g: torch.Generator, n: int, area: torch.Tensor, scale, ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """10 tries per image of (width, height) for a box of `scale` × area and log-uniform `ratio` (timm's draw)."""
    a = area[:, None] * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, generator=g, dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, 10, generator=g, dtype=torch.float64))
    return torch.round(torch.sqrt(a * r)), torch.round(torch.sqrt(a / r))


def _first(ok: torch.Tensor, v: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per row: `v` at the first try that fits, else `fallback`."""
    return torch.where(ok.any(1), v.gather(1, ok.int().argmax(1, keepdim=True))[:, 0], fallback)


def train_params(n: int, sizes, aug: dict, generator: torch.Generator, out_size=None) -> dict:
    """Per-image random parameters on the CPU: crop box (top, left, height, width), flip, jitter factors and
    order, erasing box. `sizes`: (H, W) per image; `out_size` (H, W) is needed for random erasing only."""
    g = generator
    hw = torch.tensor([tuple(s) for s in sizes], dtype=torch.float64).view(n, 2)
    h, w = hw[:, 0], hw[:, 1]
    tw, th = _tries(g, n, h * w, aug.get("scale") or (0.08, 1.0), RATIO)
    ok = (tw <= w[:, None]) & (th <= h[:, None])
    # fallback: the centre crop of the widest allowed aspect (timm's, for images outside RATIO)
    fw = torch.where(w / h > RATIO[1], torch.round(h * RATIO[1]), w)
    fh = torch.where(w / h < RATIO[0], torch.round(w / RATIO[0]), h)
    bw, bh = _first(ok, tw, fw).clamp(min=1), _first(ok, th, fh).clamp(min=1)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.where(ok.any(1), torch.floor(u[:, 0] * (h - bh + 1)), torch.floor((h - bh) / 2))
    left = torch.where(ok.any(1), torch.floor(u[:, 1] * (w - bw + 1)), torch.floor((w - bw) / 2))
    p = {"box": torch.stack([top, left, bh, bw], 1).long(),
         "flip": torch.rand(n, generator=g) < aug.get("hflip", 0.5)}
    j = aug.get("color_jitter", 0.4)  # timm's default when not given
    if j:
        p["jitter"] = max(0.0, 1 - j) + (1 + j - max(0.0, 1 - j)) * torch.rand(n, 3, generator=g)
        p["order"] = torch.rand(n, 3, generator=g).argsort(1)  # a random order of the three per image
    if aug.get("re_prob"):
        p["erase"] = _erase_params(g, n, out_size, aug["re_prob"])
    return p


def _erase_params(g: torch.Generator, n: int, out_size, prob: float) -> torch.Tensor:
    """(n, 4) boxes (top, left, height, width) of timm's RandomErasing on the output; height 0: none."""
    if out_size is None:
        raise ValueError("train_params: out_size is needed for random erasing (augment.re_prob)")
    h, w = (torch.full((n,), float(s), dtype=torch.float64) for s in out_size)
    ew, eh = _tries(g, n, h * w, ERASE_AREA, ERASE_ASPECT)
    ok = (ew < w[:, None]) & (eh < h[:, None])
    zero = torch.zeros(n, dtype=torch.float64)
    bw, bh = _first(ok, ew, zero), _first(ok, eh, zero)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    bh = torch.where(u[:, 2] < prob, bh, zero)
    return torch.stack([torch.floor(u[:, 0] * (h - bh + 1)), torch.floor(u[:, 1] * (w - bw + 1)), bh, bw], 1).long()


# ------------------------------------------------------------------ transform
def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """uint8/float (C, h, w) → float (C, *size) in [0, 255] on uint8 steps, as PIL's resize gives."""
    y = F.interpolate(x[None].float(), size=tuple(size), mode=mode, antialias=True, align_corners=False)[0]
    return y.clamp_(0, 255).round_()


def _eval_one(x: torch.Tensor, size: int, crop_pct: float, mode: str) -> torch.Tensor:
    """timm's eval transform: the shorter side to floor(size / crop_pct) (torchvision's Resize(int)), centre crop."""
    h, w = x.shape[1:]
    short = math.floor(size / crop_pct)
    rh, rw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    y = _resize(x, (rh, rw), mode) if (rh, rw) != (h, w) else x.float()
    top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
    return y[:, top:top + size, left:left + size]


def _jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter on (N, C, H, W) in [0, 255]: each op blends with its own 'degenerate' image (black, the
    grey mean, the grey image), in each image's own order; saturation is a no-op on one channel."""
    n = x.shape[0]
    for k in range(3):
        op = order[:, k].view(n, 1, 1, 1)
        gray = _gray(x)
        other = torch.where(op == 0, 0.0, torch.where(op == 1, gray.mean((1, 2, 3), keepdim=True), gray))
        f = factors.gather(1, order[:, k:k + 1]).view(n, 1, 1, 1)
        x = (f * x + (1 - f) * other).clamp_(0, 255)
    return x


def _erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    top, left, bh, bw = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    rows = torch.arange(x.shape[2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[3], device=x.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return x.masked_fill(inside[:, None], 0.0)


def augment_batch(images, params: dict | None, data_config: dict, device) -> torch.Tensor:
    """uint8 (C, H, W) images → normalised float (N, C, *input_size) on `device`: the train transform with
    `params` (from `train_params`), the eval transform (resize, centre crop) when `params` is None."""
    device = torch.device(device)
    size = tuple(data_config["input_size"][1:])
    mode = data_config.get("interpolation", "bilinear")
    if params is None:
        crop_pct = data_config.get("crop_pct", 1.0) or 0.875  # timm's default when None
        x = torch.stack([_eval_one(im.to(device), size[0], crop_pct, mode) for im in images])
    else:
        boxes = params["box"].tolist()
        x = torch.stack([_resize(im.to(device)[:, t:t + h, l:l + w], size, mode)
                         for im, (t, l, h, w) in zip(images, boxes)])
        x = torch.where(params["flip"].to(device).view(-1, 1, 1, 1), x.flip(-1), x)
        if "jitter" in params:
            x = _jitter(x, params["jitter"].to(device), params["order"].to(device))
    c = x.shape[1]
    mean = torch.tensor(data_config["mean"][:c], dtype=x.dtype, device=device).view(1, c, 1, 1)
    std = torch.tensor(data_config["std"][:c], dtype=x.dtype, device=device).view(1, c, 1, 1)
    x = (x / 255 - mean) / std
    return _erase(x, params["erase"].to(device)) if params is not None and "erase" in params else x


# ------------------------------------------------------------------ a training worker's batches
def to_batch(batch: dict, data_config: dict, aug: dict | None, device, generator=None) -> dict:
    """A numpy batch of raw rows (`bytes` or the built-in set's `pixels`, `label`, `valid`) → the dict that
    `iter_torch_batches` gives with data.decode=cpu: `image` (on `device`), `label`, `valid`. `aug` None: eval."""
    raw = batch["bytes"] if "bytes" in batch else batch["pixels"]
    images, readable = decode_batch(list(raw), device, data_config["input_size"][0])
    params = None
    if aug is not None:
        out_size = tuple(data_config["input_size"][1:])
        params = train_params(len(images), [im.shape[1:] for im in images], aug, generator, out_size)
    valid = torch.as_tensor(np.asarray(batch["valid"], dtype=bool)) & readable
    x = augment_batch(images, params, data_config, device)
    x[~valid.to(x.device)] = 0.0
    label = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
    return {"image": x, "label": torch.where(valid, label, 0), "valid": valid}


def batches(numpy_batches, data_config: dict, aug: dict | None, device, seed: tuple[int, ...] = (0,)):
    """`to_batch` over Ray Data's numpy batches; step k's generator is seeded from (*seed, k): reproducible."""
    for step, batch in enumerate(numpy_batches):
        state = np.random.SeedSequence([s % 2**64 for s in (*seed, step)]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state) >> 1)  # manual_seed wants < 2^63
        yield to_batch(batch, data_config, aug, device, g)
