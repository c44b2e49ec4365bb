"""Datasets as URIs for Ray Data: `fashion-mnist[:split]`, `s3://bucket/prefix` or a local path, each in
ImageFolder layout (one folder per class) or WebDataset `.tar` shards (image entry + `cls` entry, with
`classes.json` beside the shards).

Ray Data reads and decodes on CPU workers with the timm transforms from `cfvit.transforms` (or, with
`data.decode: device`, only reads: the training workers decode, jobs/train/device_augment.py); a corrupt
image becomes a row with `valid=False` (counted and dropped by the train loop), never an error.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

from jobs.common.storage import IMAGE_EXTENSIONS, resolve, s3_client, s3_endpoint

BUILTIN_BLOCK_ROWS = 2000  # rows per Ray Data block of the built-in set (30 blocks for its 60k images)
MAP_BATCH = 250  # images per preprocess call



def _is_builtin(uri: str) -> bool:
    return uri.split(":", 1)[0] == "fashion-mnist" and not uri.startswith("fashion-mnist/")


def _builtin_split(uri: str, default: str) -> str:
    split = uri.split(":", 1)[1] if ":" in uri else default
    if split not in ("train", "test"):
        raise ValueError(f"{uri!r}: the fashion-mnist split must be 'train' or 'test'")
    return split


# ------------------------------------------------------------------ up-front checks
def check_uri(uri: str, key: str, need_objects: bool = True) -> None:
    """Raise ConfigError naming `key` when `uri` cannot be read."""
    from .config import ConfigError

    if _is_builtin(uri):
        from cfvit.data import load_fashion_mnist

        try:
            load_fashion_mnist(_builtin_split(uri, "train"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    if uri.startswith("s3://"):
        _check_s3(uri, key, need_objects)
        return
    if "://" in uri:
        raise ConfigError(f"{key}: unsupported URI scheme in {uri!r} (use s3://, a local path or fashion-mnist)")
    if not os.path.exists(os.path.expanduser(uri)):
        raise ConfigError(f"{key}: local path {uri!r} does not exist")


def _check_s3(uri: str, key: str, need_objects: bool) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from .config import ConfigError

    u = urlparse(uri)
    bucket, prefix = u.netloc, u.path.lstrip("/")
    if not bucket:
        raise ConfigError(f"{key}: {uri!r} names no bucket (expected s3://bucket/prefix)")
    endpoint = s3_endpoint() or "AWS S3"
    try:
        resp = s3_client(max_attempts=2).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise ConfigError(f"{key}: cannot read {uri} at {endpoint}: {code or e}") from None
    except BotoCoreError as e:
        raise ConfigError(f"{key}: cannot reach {uri} at {endpoint}: {e}") from None
    if need_objects and not resp.get("KeyCount"):
        raise ConfigError(f"{key}: no objects under {uri} at {endpoint}")


# ------------------------------------------------------------------ layout
@dataclass
class Source:
    uri: str
    kind: str  # builtin | imagefolder | webdataset
    classes: list[str]


def describe(uri: str, fmt: str = "auto") -> Source:
    """Find the layout and class names of a dataset URI (listing only, no image reads)."""
    if _is_builtin(uri):
        from cfvit.data import FASHION_MNIST_CLASSES

        return Source(uri, "builtin", list(FASHION_MNIST_CLASSES))
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    shards = [e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".tar")]
    kind = fmt if fmt != "auto" else ("webdataset" if shards else "imagefolder")
    if kind == "webdataset":
        if not shards:
            raise ValueError(f"{uri}: no .tar shards found")
        try:
            with fs.open_input_stream(f"{root}/classes.json") as f:
                classes = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise ValueError(f"{uri}: classes.json (a JSON list of class names) is missing or bad: {e}") from None
        return Source(uri, kind, [str(c) for c in classes])
    classes = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
    if not classes:
        raise ValueError(f"{uri}: no class folders (ImageFolder layout) and no .tar shards (WebDataset) found")
    return Source(uri, kind, classes)


# ------------------------------------------------------------------ Ray Data
def remote_args(resources: dict | None) -> dict:
    """Ray remote args of the read and preprocess tasks from `data.preprocess_resources`: `CPU` becomes
    `num_cpus` (default 1), every other key a custom resource (e.g. `cpu_node`, which only the CPU worker
    groups of infra/ declare, so decoding runs there and streams to the GPU workers). {} for none."""
    if not resources:
        return {}
    custom = {k: float(v) for k, v in resources.items() if k != "CPU"}
    return {"num_cpus": float(resources.get("CPU", 1)), **({"resources": custom} if custom else {})}


def read(src: Source, *, role: str, limit: int | None = None, seed: int = 0, ray_args: dict | None = None):
    """Raw rows: `image` (uint8 array, builtin) or `bytes` + `label` (int). `ray_args` (from `remote_args`)
    go to the read tasks and the row-building map, so they fuse with the preprocess stage."""
    import ray.data

    ray_args = ray_args or {}

    if src.kind == "builtin":
        import pandas as pd

        from cfvit.data import load_fashion_mnist

        images, labels = load_fashion_mnist(_builtin_split(src.uri, "train" if role == "train" else "test"))
        if limit:
            images, labels = images[:limit], labels[:limit]
        # Many small blocks, not one: a map task's output reaches the workers block by block, so a single
        # 60k-row block kept them waiting until the whole epoch was preprocessed (docs/MAIN_JOB.md).
        step = BUILTIN_BLOCK_ROWS
        return ray.data.from_pandas([pd.DataFrame({"image": list(images[i:i + step]), "label": labels[i:i + step]})
                                     for i in range(0, len(images), step)])
    fs, root = resolve(src.uri)
    from ray.data import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=seed) if role == "train" else None  # a new seeded order each epoch
    if src.kind == "webdataset":
        ds = ray.data.read_webdataset(root, filesystem=fs, decoder=None, file_extensions=["tar"], shuffle=shuffle,
                                      ray_remote_args=ray_args)
        ds = ds.map_batches(_webdataset_rows, batch_format="pandas", **ray_args)
    else:
        ds = ray.data.read_binary_files(root, filesystem=fs, include_paths=True, shuffle=shuffle,
                                        file_extensions=list(IMAGE_EXTENSIONS) + [e.upper() for e in IMAGE_EXTENSIONS],
                                        ray_remote_args=ray_args)
        index = {c: i for i, c in enumerate(src.classes)}
        ds = ds.map_batches(_folder_rows, fn_kwargs={"index": index}, batch_format="pandas", **ray_args)
    return ds.limit(limit) if limit else ds


def _folder_rows(df, index):
    import pandas as pd

    labels = [index.get(p.replace("\\", "/").split("/")[-2], -1) for p in df["path"]]
    return pd.DataFrame({"bytes": df["bytes"], "label": np.asarray(labels, dtype=np.int64)})


def _webdataset_rows(df):
    import pandas as pd

    img_cols = [c for c in df.columns if c.lower() in IMAGE_EXTENSIONS]
    if not img_cols:
        raise ValueError(f"WebDataset samples have no image entry (columns: {list(df.columns)})")
    # Samples may differ in extension (`.jpg` here, `.png` there): each row takes whichever it has.
    images = df[img_cols[0]]
    for c in img_cols[1:]:
        images = images.combine_first(df[c])  # column-wise, not a Python loop over rows
    images = images.where(images.notna(), b"")  # no image at all: empty bytes, skipped as unreadable
    labels = []
    for v in (df["cls"] if "cls" in df.columns else [None] * len(df)):
        try:
            labels.append(int(v.decode() if isinstance(v, bytes) else v))
        except (TypeError, ValueError):
            labels.append(-1)  # no/bad label: skipped and counted like an unreadable image
    return pd.DataFrame({"bytes": images, "label": np.asarray(labels, dtype=np.int64)})


@functools.lru_cache(maxsize=8)
def _transform(data_config_json: str, is_training: bool, aug_json: str):
    from cfvit.transforms import build_transform

    aug = json.loads(aug_json) if is_training else {}
    return build_transform(json.loads(data_config_json), is_training=is_training, **aug)


def preprocess(batch: dict, data_config_json: str, is_training: bool, aug_json: str, num_classes: int) -> dict:
    """Decode + timm transform on a Ray Data CPU task → `image` (C,H,W float32), `label`, `valid`.

    A stateless task (not an actor pool) so that it never holds CPUs the train workers need."""
    from . import batch_transforms  # numpy only: the PIL/timm imports below cost seconds per task worker

    data_config, aug = json.loads(data_config_json), json.loads(aug_json)
    raw = batch["image"] if "image" in batch else batch["bytes"]
    labels = np.asarray(batch["label"], dtype=np.int64)
    valid = (labels >= 0) & (labels < num_classes)
    if "image" in batch and valid.all() and batch_transforms.supports(raw, data_config, is_training, aug):
        # in-memory uint8 arrays (the built-in set): the same transform for the whole batch in tensor ops
        return {"image": batch_transforms.transform(raw, data_config, is_training, aug), "label": labels,
                "valid": valid}
    from PIL import Image

    from cfvit.transforms import ImageDecodeError, decode_image

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
