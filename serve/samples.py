"""Sample images for the page at `/`, so that there is something to click.

- A model with Fashion-MNIST's ten classes (the main job's): one image per class from the end of the
  Fashion-MNIST test split (calibration reads the first test images, so these are held out).
- An ImageNet-1k model (an imported CF-ViT of the paper, say): the photographs scikit-image ships in its
  wheel (offline), with their ImageNet class where one fits.
Any other model gets none (the page then offers upload and drag and drop only). Samples are PNG/JPEG data
URLs, read once when the ingress starts.
"""
from __future__ import annotations

import base64
import io
import logging
from importlib import resources
from typing import List, Optional

from PIL import Image

from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

from .schemas import Sample

HELD_OUT_FROM = 9000  # first test index considered (calibration reads the first ones)
# scikit-image's bundled photographs → the ImageNet-1k class index that fits them (None: no single class)
PHOTOS = {"chelsea.png": 281, "coffee.png": 967, "astronaut.png": None, "rocket.jpg": None,
          "motorcycle_left.png": 670, "horse.png": None}
IMAGENET_CLASSES = 1000
logger = logging.getLogger("ray.serve")


def sample_images(class_names: List[str]) -> List[Sample]:
    if list(class_names) == list(FASHION_MNIST_CLASSES):
        return _fashion_mnist(class_names)
    if len(class_names) == IMAGENET_CLASSES:
        return _photos(class_names)
    return []


def _data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _fashion_mnist(class_names: List[str]) -> List[Sample]:
    try:
        images, labels = load_fashion_mnist("test")
    except Exception as e:  # noqa: BLE001 - not installed or unreadable here: the page just shows no samples
        logger.warning("no sample images: %s: %s", type(e).__name__, e)
        return []
    out = []
    for label, name in enumerate(class_names):
        idx = next((i for i in range(HELD_OUT_FROM, len(labels)) if labels[i] == label), None)
        if idx is not None:
            out.append(Sample(label=label, class_name=name, index=idx, image=_data_url(Image.fromarray(images[idx]))))
    return out


def _photos(class_names: List[str], side: int = 256) -> List[Sample]:
    try:
        folder = resources.files("skimage") / "data"
    except ModuleNotFoundError:
        logger.warning("no sample photographs: scikit-image is not installed")
        return []
    out = []
    for i, (file, label) in enumerate(PHOTOS.items()):
        try:
            with resources.as_file(folder / file) as path, Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((side, side))  # the page's thumbnail; the model gets its own resize and crop
                out.append(Sample(label=label, class_name=_name(class_names, label, file), index=i,
                                  image=_data_url(img, "JPEG")))
        except OSError as e:
            logger.warning("sample photograph %s unreadable: %s", file, e)
    return out


def _name(class_names: List[str], label: Optional[int], file: str) -> str:
    return class_names[label] if label is not None else file.rsplit(".", 1)[0]
