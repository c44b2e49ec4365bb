"""Pre-processing shared by training, validation and serving (timm transforms), and safe image decoding."""
import io

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torchvision import transforms as T

# Refuse decompression bombs well below PIL's default warning size.
MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image."""


def decode_image(data: bytes) -> Image.Image:
    """Decode JPEG/PNG/... bytes fully (so a truncated file fails here, not later)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(f"image of {img.width}x{img.height} pixels is larger than allowed")
        img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image: unrecognised or corrupt image data") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"not a readable image: {e}") from None
    return img


# Greyscale with more than 8 bits per pixel: 16-bit PNG/TIFF ("I;16…"), or 32-bit integers ("I", how some
# Pillow versions open 16-bit PNGs).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img: Image.Image) -> Image.Image:
    """A wide greyscale image scaled to 8-bit "L" (value / 257: 65535 → 255, the 16-bit range assumed for
    "I" too); any other image unchanged. Pillow's own `convert("L")` clips such values at 255 instead, which
    turns a 16-bit photo nearly white."""
    if img.mode not in WIDE_GREY_MODES:
        return img
    a = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_model_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Grayscale or colour, any mode (16-bit greyscale scaled, not clipped) → what the model was trained on
    ('L' for 1 channel, else 'RGB')."""
    mode = "L" if in_chans == 1 else "RGB"
    img = to_8bit(img)
    return img if img.mode == mode else img.convert(mode)


class _ToMode:
    def __init__(self, in_chans: int):
        self.in_chans = in_chans

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        return to_model_mode(img, self.in_chans)


def build_transform(data_config: dict, is_training: bool = False, **aug):
    """timm's transform for `data_config` (from `model.data_config`), preceded by the mode conversion.

    Training augmentation options (auto_augment, re_prob, scale, hflip, ...) pass through to
    `timm.data.create_transform`. The eval transform is the one serving uses.
    """
    in_chans, size = data_config["input_size"][0], data_config["input_size"][1:]
    kwargs = dict(input_size=(in_chans, *size), mean=data_config["mean"], std=data_config["std"],
                  interpolation=data_config.get("interpolation", "bilinear"))
    if is_training:
        kwargs.update(aug)
    else:
        kwargs.update(crop_pct=data_config.get("crop_pct", 1.0), crop_mode=data_config.get("crop_mode", "center"))
    tf = create_transform(is_training=is_training, **kwargs)
    return T.Compose([_ToMode(in_chans), tf])
