"""The functions Ray Data's CPU tasks run on each batch: decode + timm transform (`preprocess`), or, with
`data.decode: device`, only the label check (`raw_rows`); and the rows a read of files becomes
(`folder_rows`, `webdataset_rows`). A corrupt image becomes a row with `valid=False`
(counted and dropped by the train loop), never an error.

Task workers import this module, so its own imports stay light (numpy): PIL and timm load only where a
batch of files needs them.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd

from cfvit_common.storage import IMAGE_EXTENSIONS

from . import batch_transforms


@functools.lru_cache(maxsize=8)
def _transform(data_config_json: str, is_training: bool, aug_json: str):
    from cfvit.transforms import build_transform  # timm: see `preprocess`

    aug = json.loads(aug_json) if is_training else {}
    return build_transform(json.loads(data_config_json), is_training=is_training, **aug)


def preprocess(batch: dict, data_config_json: str, is_training: bool, aug_json: str, num_classes: int) -> dict:
    """Decode + timm transform on a Ray Data CPU task → `image` (C,H,W float32), `label`, `valid`.

    A stateless task (not an actor pool) so that it never holds CPUs the train workers need."""
    data_config, aug = json.loads(data_config_json), json.loads(aug_json)
    raw = batch["image"] if "image" in batch else batch["bytes"]
    labels = np.asarray(batch["label"], dtype=np.int64)
    valid = (labels >= 0) & (labels < num_classes)
    if "image" in batch and valid.all() and batch_transforms.supports(raw, data_config, is_training, aug):
        # in-memory uint8 arrays (the built-in set): the same transform for the whole batch in tensor ops
        return {"image": batch_transforms.transform(raw, data_config, is_training, aug), "label": labels,
                "valid": valid}
    # PIL and timm only here, for files: a task worker on the built-in set never pays their import (seconds)
    from PIL import Image

    from cfvit.transforms import ImageDecodeError, decode_image  # (timm: see above)

    tf = _transform(data_config_json, is_training, aug_json)
    shape = tuple(data_config["input_size"])
    out = np.zeros((len(raw), *shape), dtype=np.float32)
    for i, item in enumerate(raw):
        if not valid[i]:
            continue
        try:
            img = Image.fromarray(np.asarray(item, dtype=np.uint8)) if "image" in batch else decode_image(item)
            out[i] = tf(img).numpy()
        except (ImageDecodeError, OSError, ValueError, TypeError):
            valid[i] = False  # skipped and counted downstream, never fatal
    return {"image": out, "label": np.where(valid, labels, 0), "valid": valid}


def raw_rows(batch: dict, num_classes: int) -> dict:
    """data.decode=device: no decoding here, the labels checked only → `bytes` (encoded images) or `pixels`
    (the built-in set's uint8 arrays), `label`, `valid`; the training workers decode (jobs/train/device_augment.py)."""
    labels = np.asarray(batch["label"], dtype=np.int64)
    valid = (labels >= 0) & (labels < num_classes)
    raw = {"pixels": batch["image"]} if "image" in batch else {"bytes": batch["bytes"]}
    return {**raw, "label": np.where(valid, labels, 0), "valid": valid}


def folder_rows(df, index):
    """ImageFolder files → `bytes`, `label` (-1 for a folder that is not a class)."""
    labels = [index.get(p.replace("\\", "/").split("/")[-2], -1) for p in df["path"]]
    return pd.DataFrame({"bytes": df["bytes"], "label": np.asarray(labels, dtype=np.int64)})


def webdataset_rows(df, labels=None):
    """WebDataset samples → `bytes` (whichever image entry a sample has), `label` (-1 when missing or bad).
    `labels`: the model's index of each `classes.json` position (jobs/train/classes.py), None to keep them."""
    img_cols = [c for c in df.columns if c.lower() in IMAGE_EXTENSIONS]
    if not img_cols:
        raise ValueError(f"WebDataset samples have no image entry (columns: {list(df.columns)})")
    # Samples may differ in extension (`.jpg` here, `.png` there): each row takes whichever it has.
    images = df[img_cols[0]]
    for c in img_cols[1:]:
        images = images.combine_first(df[c])  # column-wise, not a Python loop over rows
    images = images.where(images.notna(), b"")  # no image at all: empty bytes, skipped as unreadable
    found = []
    for v in (df["cls"] if "cls" in df.columns else [None] * len(df)):
        try:
            found.append(int(v.decode() if isinstance(v, bytes) else v))
        except (TypeError, ValueError):
            found.append(-1)  # no/bad label: skipped and counted like an unreadable image
    out = np.asarray(found, dtype=np.int64)
    if labels is not None and len(out):
        known = (out >= 0) & (out < len(labels))
        out = np.where(known, np.asarray(labels, dtype=np.int64)[np.where(known, out, 0)], -1)
    return pd.DataFrame({"bytes": images, "label": out})
