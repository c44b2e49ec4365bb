"""timm's train and eval transforms for a whole batch of in-memory grayscale images at once (the built-in
Fashion-MNIST set), as a few numpy array ops instead of a PIL round trip per image (and without importing torch or
timm into Ray Data's task workers).

Measured on this 2-core machine (process CPU time, 1 thread, the main job's 32 px model; docs/MAIN_JOB.md):
timm per image ~12,000 train / ~16,000 eval images/s per core; this 3-5x more
(`python -m benchmarks.builtin_transforms`), and a task worker that
runs it never imports torch or timm. The distributions are timm's: `RandomResizedCropAndInterpolation` (10 tries of
scale × log-uniform aspect ratio, then the centre crop), horizontal flip, `ColorJitter` brightness and
contrast in a random order (saturation does nothing to one channel), bilinear resampling on pixel centres
with the edges clamped as PIL does, rounding to uint8 steps as PIL's output would, `Normalize`. The eval
transform (crop_pct 1.0) is a plain bilinear resize, the same as the PIL one that serving uses.

`supports(...)` says when a job's settings fall inside that; anything else takes the per-image timm path.
"""
from __future__ import annotations

import math

import numpy as np

RATIO = (3 / 4, 4 / 3)  # timm's default aspect-ratio range


def supports(images, data_config: dict, is_training: bool, aug: dict) -> bool:
    arr = np.asarray(images[0]) if len(images) else None
    if is_training:  # no RandAugment, no random erasing, one jitter factor for all
        simple = not (aug.get("auto_augment") or aug.get("re_prob")) and \
            isinstance(aug.get("color_jitter", 0.4), (int, float, type(None)))
    else:  # a plain resize
        simple = float(data_config.get("crop_pct", 1.0)) == 1.0
    # upsampling only: PIL's bilinear filter widens its support (antialiases) when it shrinks an image
    upsampling = arr is not None and arr.ndim == 2 and min(data_config["input_size"][1:]) >= max(arr.shape)
    return (upsampling and arr.dtype == np.uint8 and simple
            and data_config["input_size"][0] == 1 and data_config.get("interpolation", "bilinear") == "bilinear")


def _crop_boxes(rng, n: int, h: int, w: int, scale) -> np.ndarray:
    """(n, 4) boxes (top, left, height, width) drawn as timm's RandomResizedCrop.get_params draws them."""
    area = rng.uniform(scale[0], scale[1], (n, 10)) * h * w
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), (n, 10)))
    tw, th = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    ok = (tw <= w) & (th <= h)
    first = ok.argmax(1)
    rows = np.arange(n)
    bw = np.where(ok.any(1), tw[rows, first], w)  # fallback for a square image: the whole image
    bh = np.where(ok.any(1), th[rows, first], h)
    top = np.floor(rng.uniform(0, 1, n) * (h - bh + 1))
    left = np.floor(rng.uniform(0, 1, n) * (w - bw + 1))
    return np.stack([top, left, bh, bw], 1)


def _resample(x: np.ndarray, boxes: np.ndarray, flip: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear crop-and-resize of (n, H, W) floats to `size`, per-image boxes, optional mirror; sample points
    on pixel centres, clamped at the edges (PIL's and grid_sample's align_corners=False, border padding)."""
    n, h, w = x.shape
    top, left, bh, bw = (boxes[:, k:k + 1] for k in range(4))

    def axis(out: int, start, extent, limit: int, mirror=None):
        g = (np.arange(out) + 0.5) / out  # output pixel centres in [0, 1]
        if mirror is not None:
            g = np.where(mirror[:, None], 1 - g, g)
        c = np.clip(start + g * extent - 0.5, 0, limit - 1)
        lo = np.floor(c).astype(np.int64)
        return lo, np.minimum(lo + 1, limit - 1), (c - lo).astype(np.float32)

    y0, y1, wy = axis(size[0], top, bh, h)
    x0, x1, wx = axis(size[1], left, bw, w, flip)
    rows = np.arange(n)[:, None, None]
    ya, yb, xa, xb = y0[:, :, None], y1[:, :, None], x0[:, None, :], x1[:, None, :]
    wy, wx = wy[:, :, None], wx[:, None, :]
    top_row = x[rows, ya, xa] * (1 - wx) + x[rows, ya, xb] * wx
    bottom_row = x[rows, yb, xa] * (1 - wx) + x[rows, yb, xb] * wx
    return np.rint(top_row * (1 - wy) + bottom_row * wy)


def _jitter(rng, x: np.ndarray, jitter: float) -> np.ndarray:
    """ColorJitter(brightness=jitter, contrast=jitter) on [0, 255] grayscale, each image its own order."""
    n = x.shape[0]
    b = rng.uniform(max(0.0, 1 - jitter), 1 + jitter, (n, 1, 1)).astype(np.float32)
    c = rng.uniform(max(0.0, 1 - jitter), 1 + jitter, (n, 1, 1)).astype(np.float32)
    contrast_first = (rng.uniform(0, 1, n) < 0.5)[:, None, None]

    def brightness(t):
        return np.rint(np.clip(t * b, 0, 255))

    def contrast(t):
        mean = np.rint(t.mean(axis=(1, 2), keepdims=True))
        return np.rint(np.clip((t - mean) * c + mean, 0, 255))

    return np.where(contrast_first, brightness(contrast(x)), contrast(brightness(x)))


def transform(images, data_config: dict, is_training: bool, aug: dict, rng=None) -> np.ndarray:
    """(n, H, W) uint8 → (n, 1, S, S) float32, normalised, as the timm transform of `data_config` would."""
    rng = rng or np.random.default_rng()
    x = np.stack([np.asarray(i, dtype=np.uint8) for i in images]).astype(np.float32)
    n, h, w = x.shape
    size = tuple(data_config["input_size"][1:])
    if is_training:
        boxes = _crop_boxes(rng, n, h, w, aug.get("scale") or (0.08, 1.0))
        x = _resample(x, boxes, rng.uniform(0, 1, n) < aug.get("hflip", 0.5), size)
        jitter = aug.get("color_jitter", 0.4)  # timm's default when not given
        x = _jitter(rng, x, float(jitter)) if jitter else x
    else:
        x = _resample(x, np.tile([0.0, 0.0, h, w], (n, 1)), np.zeros(n, bool), size)
    mean, std = data_config["mean"][0], data_config["std"][0]
    return ((x[:, None] / 255.0 - mean) / std).astype(np.float32)
