"""The training job's inputs as Ray Data datasets (dataset URIs and their checks: `sources.py`).

Ray Data reads and decodes on CPU workers with the timm transforms from `cfvit.transforms` (`preprocess.py`,
which the task workers import; or, with `data.decode: device`, only reads: the training workers decode,
jobs/train/device_augment.py).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import ray.data
from ray.data import FileShuffleConfig

from cfvit.data import load_fashion_mnist
from cfvit_common.storage import IMAGE_EXTENSIONS, resolve

from .preprocess import folder_rows, preprocess, raw_rows, webdataset_rows
from .sources import Source, builtin_split, check_uri, describe  # noqa: F401  (the module's public names)

BUILTIN_BLOCK_ROWS = 2000  # rows per Ray Data block of the built-in set (30 blocks for its 60k images)
MAP_BATCH = 250  # images per preprocess call


def remote_args(resources: dict | None) -> dict:
    """Ray remote args of the read and preprocess tasks from `data.preprocess_resources`: `CPU` becomes
    `num_cpus` (default 1), every other key a custom resource (e.g. `cpu_node`, which only the CPU worker
    groups of infra/ declare, so decoding runs there and streams to the GPU workers). {} for none."""
    if not resources:
        return {}
    custom = {k: float(v) for k, v in resources.items() if k != "CPU"}
    return {"num_cpus": float(resources.get("CPU", 1)), **({"resources": custom} if custom else {})}


def builtin_arrays(src: Source, role: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The built-in set's uint8 images and labels (the model's class indices: `Source.matched_to`)."""
    images, labels = load_fashion_mnist(builtin_split(src.uri, "train" if role == "train" else "test"))
    if limit:
        images, labels = images[:limit], labels[:limit]
    if src.labels is not None:
        labels = np.asarray(src.labels, dtype=np.int64)[labels]
    return images, labels


def read(src: Source, *, role: str, limit: int | None = None, seed: int = 0, ray_args: dict | None = None):
    """Raw rows: `image` (uint8 array, builtin) or `bytes` + `label` (int). `ray_args` (from `remote_args`)
    go to the read tasks and the row-building map, so they fuse with the preprocess stage."""
    ray_args = ray_args or {}

    if src.kind == "builtin":
        images, labels = builtin_arrays(src, role, limit)
        # Many small blocks, not one: a map task's output reaches the workers block by block, so a single
        # 60k-row block kept them waiting until the whole epoch was preprocessed (docs/MAIN_JOB.md).
        step = BUILTIN_BLOCK_ROWS
        return ray.data.from_pandas([pd.DataFrame({"image": list(images[i:i + step]), "label": labels[i:i + step]})
                                     for i in range(0, len(images), step)])
    fs, root = resolve(src.uri)
    shuffle = FileShuffleConfig(seed=seed) if role == "train" else None  # a new seeded order each epoch
    if src.kind == "webdataset":
        ds = ray.data.read_webdataset(src.files or root, filesystem=fs, decoder=None, file_extensions=["tar"],
                                      shuffle=shuffle, ray_remote_args=ray_args)
        ds = ds.map_batches(webdataset_rows, fn_kwargs={"labels": src.labels}, batch_format="pandas", **ray_args)
    else:
        ds = ray.data.read_binary_files(root, filesystem=fs, include_paths=True, shuffle=shuffle,
                                        file_extensions=list(IMAGE_EXTENSIONS) + [e.upper() for e in IMAGE_EXTENSIONS],
                                        ray_remote_args=ray_args)
        ds = ds.map_batches(folder_rows, fn_kwargs={"index": folder_index(src)}, batch_format="pandas", **ray_args)
    return ds.limit(limit) if limit else ds


def folder_index(src: Source) -> dict[str, int]:
    """ImageFolder class folder → label: the model's index of the class (Source.matched_to), else its
    position among the sorted folders."""
    return {c: src.label_of(i) for i, c in enumerate(src.classes)}


def train_augment(cfg) -> dict:
    """The job's training augmentation as `build_transform` (and device_augment) take it."""
    aug = cfg.augment
    return dict(auto_augment=aug.auto_augment, scale=tuple(aug.scale), hflip=aug.hflip, re_prob=aug.re_prob,
                color_jitter=aug.color_jitter or None)


def build_datasets(cfg, data_config: dict, train_src: Source, val_src: Source) -> dict:
    """The `datasets=` of the TorchTrainer: preprocessed (data.decode=cpu) or raw rows (device), streaming."""
    train_aug = train_augment(cfg)
    n = len(train_src.classes)
    on_device = cfg.data.decode == "device"  # checked against the model in driver.prepare
    ray_args = remote_args(cfg.data.preprocess_resources)
    out = {}
    for role, src, limit in (("train", train_src, cfg.data.train_limit), ("val", val_src, cfg.data.val_limit)):
        ds = read(src, role=role, limit=limit, seed=cfg.seed, ray_args=ray_args)
        kw = dict(data_config_json=json.dumps(data_config), is_training=role == "train",
                  aug_json=json.dumps(train_aug), num_classes=n)
        fn, kw = (raw_rows, {"num_classes": n}) if on_device else (preprocess, kw)
        out[role] = ds.map_batches(fn, fn_kwargs=kw, batch_size=MAP_BATCH, batch_format="numpy", **ray_args)
    return out
