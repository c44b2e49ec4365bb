"""Turn a checkpoint reference (local dir, s3:// URI, MLflow model URI) into a local directory."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def cache_root() -> Path:
    return Path(os.environ.get("CFVIT_CACHE", Path.home() / ".cache" / "cfvit")) / "checkpoints"


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
    dest = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / "config.json").exists():
        return dest
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    if not keys:
        raise FileNotFoundError(f"nothing stored under {uri}")
    # Several replicas on one node may race: download into a private dir, then rename into place.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".part-"))
    try:
        for key in keys:
            rel = key[len(prefix):].lstrip("/") if prefix else key
            if not rel or rel.endswith("/"):
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
        try:
            tmp.rename(dest)
        except OSError:  # another replica won the race
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
