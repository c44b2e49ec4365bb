"""Datasets as URIs: `fashion-mnist[:split]`, `s3://bucket/prefix` or a local path, each in ImageFolder layout
(one folder per class) or WebDataset `.tar` shards (image entry + `cls` entry): the newest complete version
`cfvit shards` published (its manifest names the shards and classes; cfvit_common/manifests.py), or, in the
older layout, the shards with `classes.json` beside them. Here: reading what a URI holds (its layout,
class names and shard files, from listings) and checking up front that it can be read; the reading itself
is `data.py`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence
from urllib.parse import urlparse

import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

from cfvit_common.errors import ConfigError
from cfvit_common.manifests import MANIFESTS_DIR, VERSIONS_DIR, newest_manifest
from cfvit_common.storage import resolve, s3_client, s3_endpoint

from .classes import match_classes


def is_builtin(uri: str) -> bool:
    return uri.split(":", 1)[0] == "fashion-mnist" and not uri.startswith("fashion-mnist/")


def builtin_split(uri: str, default: str) -> str:
    split = uri.split(":", 1)[1] if ":" in uri else default
    if split not in ("train", "test"):
        raise ValueError(f"{uri!r}: the fashion-mnist split must be 'train' or 'test'")
    return split


# ------------------------------------------------------------------ up-front checks
def check_uri(uri: str, key: str, need_objects: bool = True) -> None:
    """Raise ConfigError naming `key` when `uri` cannot be read."""
    if is_builtin(uri):
        # `cfvit` (torch, timm: seconds) only for the built-in set: `cfvit submit` checks configs without it
        from cfvit.data import load_fashion_mnist

        try:
            load_fashion_mnist(builtin_split(uri, "train"))
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
    files: Optional[List[str]] = None  # a published shard set's files (paths in the URI's filesystem)
    version: Optional[str] = None  # … and its version
    # the model's index of each of `classes` (`matched_to`); None: the data's own order
    labels: Optional[tuple[int, ...]] = None
    matched: str = ""  # how the classes were matched to the model's, for a person ("" when not matched)

    def matched_to(self, class_names: Optional[Sequence[str]], num_classes: int, model_name: str = "the model",
                   class_ids: Optional[Sequence[str]] = None) -> "Source":
        """This source with its labels as the model's class indices (`jobs.train.classes`; `class_ids`: the
        model's class identifiers, e.g. WordNet IDs); raises ClassMismatch (a ValueError), with both class
        lists, when they cannot be matched."""
        m = match_classes(self.classes, class_names, num_classes, data_name=self.uri, model_name=model_name,
                          class_ids=class_ids)
        return replace(self, labels=None if m.identity else m.labels, matched=m.how)

    def label_of(self, i: int) -> int:
        return i if self.labels is None else self.labels[i]


def describe(uri: str, fmt: str = "auto") -> Source:
    """Find the layout and class names of a dataset URI (listing only, no image reads)."""
    if is_builtin(uri):
        from cfvit.data import FASHION_MNIST_CLASSES  # see check_uri

        return Source(uri, "builtin", list(FASHION_MNIST_CLASSES))
    fs, root = resolve(uri)
    if fmt in ("auto", "webdataset"):
        manifest = newest_manifest(fs, root)
        if manifest is not None:
            return Source(uri, "webdataset", [str(c) for c in manifest.classes], manifest.paths(root), manifest.version)
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
    if VERSIONS_DIR in classes and MANIFESTS_DIR not in classes:
        raise ValueError(f"{uri}: shard versions but no published manifest (a `cfvit shards` run that did not finish)")
    if not classes:
        raise ValueError(f"{uri}: no class folders (ImageFolder layout) and no .tar shards (WebDataset) found")
    return Source(uri, kind, classes)
