"""One checkpoint resolver: a local folder, `s3://bucket/prefix` or an MLflow model URI → a local folder
holding `config.json` + `model.safetensors` (what `cfvit.load` takes). Remote checkpoints are downloaded
once per node into the cache (`storage.cache_dir`)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional

from .storage import cache_dir, fill_once, s3_client
from .tracking import download_model, pin_model_uri

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def checkpoint_kind(uri: str) -> str:
    """local | s3 | mlflow."""
    uri = str(uri)
    return "mlflow" if uri.startswith(MLFLOW_SCHEMES) else "s3" if uri.startswith("s3://") else "local"


def resolve_checkpoint(uri: str, tracking_uri: Optional[str] = None) -> Path:
    """Local directory holding `config.json` + `model.safetensors` for a local path, an `s3://bucket/prefix`
    or an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/cfvit_model`).
    Remote checkpoints are downloaded once per node into the cache; a registered version is checked
    against the sha256 recorded when it was registered (tracking.ModelIntegrityError)."""
    uri = str(uri)
    kind = checkpoint_kind(uri)
    if kind == "mlflow":
        return Path(download_model(uri, tracking=tracking_uri))
    if kind == "s3":
        return _download_s3(uri)
    path = Path(uri).expanduser()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "is not a cfvit checkpoint directory"
        raise FileNotFoundError(f"checkpoint {uri!r} {what} (config.json missing)")
    return path


def pin_checkpoint(uri: str, tracking_uri: Optional[str] = None) -> str:
    """The checkpoint as one fixed version: `models:/NAME@ALIAS` → `models:/NAME/VERSION` (the alias read
    once, now); any other URI as given."""
    return pin_model_uri(str(uri), tracking_uri) if checkpoint_kind(uri) == "mlflow" else str(uri)


def upload_checkpoint(local: Path, uri: str) -> None:
    """Copy a checkpoint directory's files to `s3://bucket/prefix`."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    s3 = s3_client()
    for f in sorted(Path(local).iterdir()):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix.strip('/')}/{f.name}".lstrip("/"))


def _download_s3(uri: str) -> Path:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    s3 = s3_client()
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        objects += [(obj["Key"], obj.get("ETag", ""), obj.get("Size", 0)) for obj in page.get("Contents", [])]
    if not objects:
        raise FileNotFoundError(f"nothing stored under {uri}")
    # The cache is keyed on the listing (keys, ETags, sizes) as well as the URI, so a checkpoint rewritten
    # in place (e.g. `cfvit calibrate s3://…` writing a new η table) is fetched again, never served stale.
    fingerprint = hashlib.sha256("\n".join([uri, *map(repr, sorted(objects))]).encode()).hexdigest()[:16]

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

    path = fill_once(cache_dir("checkpoints") / fingerprint, fill, ready="config.json")
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        raise FileNotFoundError(f"{uri}: no config.json there (not a cfvit checkpoint)")
    return path
