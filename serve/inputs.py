"""Reading and checking what clients send to POST /v1/classify: bodies, images, η / budget.

Everything here raises `APIError` (status, error, detail); the ingress turns it into a JSON 4xx.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torchvision import transforms as T

from cfvit.transforms import ImageDecodeError, build_transform, decode_image

from .schemas import ClassifyJSON
from .settings import ETA_MAX, ETA_MIN

RAW_TYPES = ("image/", "application/octet-stream")
# What Pillow may decode here (any other format is a 415); MPO is the JPEG that phone cameras write.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP")


class APIError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def finite(x: Any) -> Any:
    """JSON has no NaN/inf: such client values are echoed back as strings (in error details)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


async def read_body(receive_stream, content_length: Optional[str], limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise APIError(400, "invalid Content-Length header", content_length) from None
        if declared > limit:
            raise APIError(413, "request body too large", {"limit_bytes": limit, "content_length": declared})
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise APIError(413, "request body too large", {"limit_bytes": limit})
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_json_body(body: bytes, max_images: int) -> Tuple[List[bytes], Dict[str, Any]]:
    """`{"images": [base64...], "eta"?, "budget_gflops"?}` → image files and parameters."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # incl. a number of more than 4,300 digits
        raise APIError(400, "malformed JSON", str(e)) from None
    except RecursionError:  # `[[[[…` deeper than the parser's recursion limit
        raise APIError(400, "malformed JSON", "nested too deeply") from None
    if isinstance(raw, dict) and isinstance(raw.get("images"), list) and len(raw["images"]) > max_images:
        raise APIError(413, "too many images", {"max_images": max_images, "got": len(raw["images"])})
    try:
        req = ClassifyJSON.model_validate(raw)
    except ValidationError as e:
        raise APIError(422, "invalid JSON request", _pydantic_errors(e)) from None
    if not req.images:
        raise APIError(422, "no images", "`images` must hold at least one base64-encoded image")
    files = []
    for i, s in enumerate(req.images):
        if s.startswith("data:"):
            s = s.partition(",")[2]
        try:
            files.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError) as e:
            raise APIError(400, "invalid base64", {"index": i, "message": str(e)}) from None
    return files, {"eta": req.eta, "budget_gflops": req.budget_gflops}


def _pydantic_errors(e) -> list:
    return [{"loc": list(err.get("loc", ())), "msg": err.get("msg")} for err in e.errors()]


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise APIError(422, "no images", "the request carries no image")
    if n > max_images:
        raise APIError(413, "too many images", {"max_images": max_images, "got": n})


class PixelTransform:
    """The model's eval transform cut in two: the PIL part (mode, resize, crop) runs per image in the
    ingress and yields uint8 C×H×W pixels (what crosses the object store); `normalise` (ToTensor's /255
    and Normalize, the same float maths) runs on a whole batch inside the stage replicas."""

    def __init__(self, data_config: Dict[str, Any]):
        steps = _flatten(build_transform(data_config, is_training=False))
        cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        rest = steps[cut + 1:]
        if len(rest) != 1 or not isinstance(rest[0], T.Normalize):
            raise ValueError(f"unexpected eval transform tail {rest!r}: expected one Normalize")
        self.pil = T.Compose(steps[:cut])
        self.mean, self.std = tuple(rest[0].mean), tuple(rest[0].std)

    def pixels(self, img):
        """PIL image → uint8 tensor C×H×W at the model's input size."""

        a = np.asarray(self.pil(img), dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))


def _flatten(tf) -> list:
    inner = getattr(tf, "transforms", None)
    return [t for x in inner for t in _flatten(x)] if inner is not None else [tf]


def normalise(x, mean: Sequence[float], std: Sequence[float]):
    """uint8 (…, C, H, W) → float32, exactly as torchvision's ToTensor + Normalize compute it."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div(255).sub_(m).div_(s)


def image_sizes(files: Sequence[bytes], max_pixels: int, max_request_pixels: int) -> List[Tuple[int, int]]:
    """(width, height) of every file from its header alone, before anything is decoded: a small PNG can
    decode to gigabytes. 415 for a format outside IMAGE_FORMATS, 413 for an image over `max_pixels` or
    all of them together over `max_request_pixels`; (0, 0) for bytes Pillow cannot read (decoding says why)."""
    sizes, total = [], 0
    for i, data in enumerate(files):
        if not data:
            raise APIError(400, "invalid image", {"index": i, "message": "empty file"})
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h, fmt = *probe.size, probe.format
        except Exception:  # noqa: BLE001 - decode_image gives the precise message
            w = h = 0
            fmt = None
        if fmt is not None and fmt not in IMAGE_FORMATS:
            raise APIError(415, "unsupported image format",
                           {"index": i, "format": fmt, "accepted": list(IMAGE_FORMATS)})
        if w * h > max_pixels:
            raise APIError(413, "image too large", {"index": i, "width": w, "height": h, "max_pixels": max_pixels})
        total += w * h
        if total > max_request_pixels:
            raise APIError(413, "too many pixels in the request",
                           {"index": i, "pixels_so_far": total, "max_request_pixels": max_request_pixels})
        sizes.append((w, h))
    return sizes


def decode_to_pixels(files: Sequence[bytes], transform: PixelTransform, max_pixels: int,
                     max_request_pixels: int):
    """Decode every file (PNG/JPEG/WebP, any size, grey or colour) and bring it to the model's input size,
    once all their sizes fit the budgets."""
    image_sizes(files, max_pixels, max_request_pixels)
    tensors = []
    for i, data in enumerate(files):
        try:
            tensors.append(transform.pixels(decode_image(data)))
        except ImageDecodeError as e:
            raise APIError(400, "invalid image", {"index": i, "message": str(e)}) from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise APIError(400, "invalid image", {"index": i, "message": f"{type(e).__name__}: {e}"}) from None
    return tensors


def eta_from_table(table: Optional[Sequence[Dict[str, float]]], budget: float) -> float:
    """η of the most accurate calibrated point whose expected GFLOPs fit in `budget`."""
    if not table:
        raise APIError(422, "budget_gflops unavailable", "this model's checkpoint carries no calibrated η table; pass eta")
    fits = [p for p in table if p["gflops"] <= budget + 1e-9]
    if not fits:
        lo = min(p["gflops"] for p in table)
        raise APIError(422, "budget infeasible",
                       {"budget_gflops": budget, "min_gflops": lo,
                        "message": f"the cheapest calibrated point costs {lo:.4g} GFLOPs per image"})
    best = max(fits, key=lambda p: (p.get("accuracy", 0.0), p["gflops"]))
    return float(best["eta"])


def resolve_eta(eta: Optional[float], budget: Optional[float], default: float,
                table: Optional[Sequence[Dict[str, float]]]) -> float:
    if eta is not None and budget is not None:
        raise APIError(422, "give eta or budget_gflops, not both", {"eta": eta, "budget_gflops": budget})
    if budget is not None:
        if not (budget > 0 and math.isfinite(budget)):
            raise APIError(422, "budget_gflops out of range", {"budget_gflops": budget, "min_exclusive": 0})
        return eta_from_table(table, budget)
    if eta is None:
        return default
    if not (ETA_MIN <= eta <= ETA_MAX):
        raise APIError(422, "eta out of range", {"eta": eta, "min": ETA_MIN, "max": ETA_MAX})
    return float(eta)
