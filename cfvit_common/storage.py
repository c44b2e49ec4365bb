"""Where the jobs and the server read and write: one S3 filesystem, one S3 client, one cache.

Every S3 access in the project goes through here, so one set of AWS variables applies everywhere:
credentials from the environment or the instance profile, `AWS_REGION`/`AWS_DEFAULT_REGION`, and
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for S3-compatible stores (MinIO, moto).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional
from urllib.parse import urlparse

import boto3
import pyarrow.fs as pafs
from botocore.config import Config

# Image files the readers and the shard writer take (any case).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
# botocore retries: a paused or flaky S3 endpoint is retried with backoff instead of failing the job.
S3_RETRIES = {"max_attempts": 10, "mode": "adaptive"}
# pyarrow (Ray Data's reads, Ray Train's checkpoint uploads): a request may stall this long before it fails.
# The AWS SDK's default (3 s without a byte) turned a 20-s S3 outage into a failed job (`cfvit bench
# train-failover`). The timeouts travel with the pickled filesystem to Ray's workers and Train controller;
# the retry strategy does not (pyarrow 25 drops it when pickling: remote processes retry 3 times), so the
# timeout is what carries an outage.
S3_REQUEST_TIMEOUT_S, S3_CONNECT_TIMEOUT_S = 60.0, 10.0


def s3_endpoint() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem():
    """pyarrow S3 filesystem from the AWS variables (pyarrow does not read the endpoint ones itself).

    Explicit keys are passed only when the environment has them, so Ray workers on a machine without
    those variables (and without an instance profile) still authenticate as the driver does."""
    kw: Dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRIES["max_attempts"]),
                          "request_timeout": S3_REQUEST_TIMEOUT_S, "connect_timeout": S3_CONNECT_TIMEOUT_S}
    endpoint = s3_endpoint()
    if endpoint:
        u = urlparse(endpoint)
        kw.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                  session_token=os.environ.get("AWS_SESSION_TOKEN"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def s3_client(max_attempts: Optional[int] = None):
    """boto3 S3 client with the same endpoint and botocore's adaptive retries (`max_attempts=1` for the
    up-front checks, which should fail fast instead of riding out an outage)."""
    retries = {**S3_RETRIES, **({"max_attempts": max_attempts} if max_attempts else {})}
    return boto3.client("s3", endpoint_url=s3_endpoint(), config=Config(retries=retries))


def resolve(uri: str):
    """URI → (pyarrow filesystem, path inside it), for a local path or `s3://bucket/prefix`."""
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"{uri!r} names no bucket (expected s3://bucket/prefix)")
        return s3_filesystem(), path
    if "://" in uri:
        raise ValueError(f"unsupported location {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def run_storage(uri: str) -> dict:
    """`RunConfig(storage_path=..., storage_filesystem=...)` arguments for a local or s3:// location."""
    if uri.startswith("s3://"):
        return {"storage_path": uri[len("s3://"):].rstrip("/"), "storage_filesystem": s3_filesystem()}
    return {"storage_path": os.path.abspath(os.path.expanduser(uri))}


# ---------------------------------------------------------------------------------------------- cache
def cache_dir(kind: str) -> Path:
    """`$CFVIT_CACHE/<kind>` (default ~/.cache/cfvit/<kind>): downloaded checkpoints, shared by the CLI and
    every Serve replica on a node."""
    return Path(os.environ.get("CFVIT_CACHE", Path.home() / ".cache" / "cfvit")) / kind


def fill_once(dest: Path, fill: Callable[[Path], None], ready: str) -> Path:
    """`dest`, unless `dest/ready` exists already: filled by `fill(tmp)` into a private folder beside it,
    then renamed into place. Processes starting together (Serve replicas on one node) may race: the
    loser drops its copy and uses the winner's."""
    if (dest / ready).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".part-"))
    try:
        fill(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race
            if not (dest / ready).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
