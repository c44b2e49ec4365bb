"""Sample images for the page at `/`: the model's own test images where the server has them.

For a model with Fashion-MNIST's ten classes (the main job's), one image per class from the end of the
Fashion-MNIST test split — the calibration step uses the first test images, so these are held out — as
PNG data URLs. Any other model gets none (the page then offers upload and drag and drop only)."""
from __future__ import annotations

import base64
import io
import logging
from typing import List

from PIL import Image

from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

from .schemas import Sample

HELD_OUT_FROM = 9000  # first test index considered (calibration reads the first ones)


def sample_images(class_names: List[str]) -> List[Sample]:
    if list(class_names) != list(FASHION_MNIST_CLASSES):
        return []
    try:
        images, labels = load_fashion_mnist("test")
    except Exception as e:  # noqa: BLE001 - not installed or unreadable here: the page just shows no samples
        logging.getLogger("ray.serve").warning("no sample images: %s: %s", type(e).__name__, e)
        return []

    out = []
    for label, name in enumerate(class_names):
        idx = next((i for i in range(HELD_OUT_FROM, len(labels)) if labels[i] == label), None)
        if idx is None:
            continue
        buf = io.BytesIO()
        Image.fromarray(images[idx]).save(buf, format="PNG")
        out.append(Sample(label=label, class_name=name, index=idx,
                          image="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()))
    return out
