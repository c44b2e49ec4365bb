"""Turn a checkpoint reference (local dir, s3:// URI, MLflow model URI) into a local directory."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jobs.tracking import cache_dir, fill_once

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def cache_root() -> Path:
    return cache_dir("checkpoints")


def resolve_checkpoint(uri: str) -> Path:
    """Local directory holding `config.json` + `model.safetensors` for `uri`."""
    uri = str(uri)
    if uri.startswith(MLFLOW_SCHEMES):
        from jobs.tracking import download_model  # the training side owns MLflow access

        return Path(download_model(uri))
    if uri.startswith("s3://"):
        return _download_s3(uri)
    path = Path(uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
    return path


def _download_s3(uri: str) -> Path:
    import boto3

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None)
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        objects += [(obj["Key"], obj.get("ETag", ""), obj.get("Size", 0)) for obj in page.get("Contents", [])]
    if not objects:
        raise FileNotFoundError(f"nothing stored under {uri}")
    # The cache is keyed on the listing (keys, ETags, sizes) as well as the URI, so a checkpoint rewritten
    # in place (e.g. `cfvit calibrate s3://…` writing a new η table) is fetched again, never served stale.
    fingerprint = hashlib.sha256("\n".join([uri, *map(repr, sorted(objects))]).encode()).hexdigest()[:16]
    dest = cache_root() / fingerprint

    def fill(tmp: Path) -> None:
        for key, _, _ in objects:
            rel = key[len(prefix):].lstrip("/") if prefix else key
            if not rel or rel.endswith("/"):
                continue
            target = (tmp / rel).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise ValueError(f"refusing S3 key {key!r}: it would be written outside the checkpoint folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))

    return fill_once(dest, fill, ready="config.json")
