"""ImageFolder tree → WebDataset ``.tar`` shards, as a Ray Data job (local paths or ``s3://``).

    cfvit shards s3://my-bucket/imagenet/train s3://my-bucket/imagenet-wds/train --shard-size 1000
    python -m cfvit_cli shards /data/imagenet/val /data/imagenet-wds/val

Source layout (torchvision ``ImageFolder``): one folder per class directly under ``SRC``; images at any
depth inside it (``.jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm``, any case). Class names are
the folder names sorted, and a class's label is its index in that order (as ImageFolder does).

Output format (what ``jobs``' WebDataset reader expects), in ``DST``:

* ``shard-000000.tar``, ``shard-000001.tar``, … — plain (uncompressed) tar files. Every shard except
  possibly the last holds exactly ``--shard-size`` samples. Input files are shuffled (seeded) before
  sharding so each shard mixes classes, which streaming readers rely on.
* Each sample is two tar members sharing a key: ``{key}.jpg`` or ``{key}.png`` (the original encoded
  bytes; the extension comes from the bytes' magic number, other formats are re-encoded to PNG) and
  ``{key}.cls`` (the integer label as ASCII text, e.g. ``b"3"``). ``key`` is the path relative to
  ``SRC`` without extension, with every character other than ``[A-Za-z0-9_-]`` replaced by ``_`` (so
  it contains no dot or slash).
* ``--max-side N``: an image whose longer side exceeds N pixels is downscaled to N on that side (aspect
  ratio kept, Lanczos) and re-encoded as JPEG at quality ``JPEG_QUALITY``; smaller images stay as they
  are. Decode and RandomResizedCrop then cost less per image (benchmarks/data.py), but the crop sees a
  lower-resolution source — the FFCV trade-off; see docs/SCALING.md for the accuracy caveat.
* ``classes.json`` — a JSON list of the class names in label order; written last, so its presence
  marks a complete conversion.

S3 uses pyarrow's S3 filesystem with the standard AWS configuration: credentials from the environment
or the instance profile, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for S3-compatible endpoints (MinIO, moto). The conversion runs on the Ray cluster
found by ``ray.init()`` (``RAY_ADDRESS``) or a local one.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import ray
from PIL import Image
from pyarrow import fs
from ray.data import FileShuffleConfig, SaveMode
from ray.data.datasource import FilenameProvider

from cfvit.transforms import to_8bit
from cfvit_common.storage import IMAGE_EXTENSIONS as _EXTS
from cfvit_common.storage import resolve as _resolve
from cfvit_common.storage import s3_client

IMAGE_EXTENSIONS = list(_EXTS)

SHARD_PATTERN = "shard-{index:06d}.tar"
JPEG_QUALITY = 90  # re-encoding quality of --max-side downscaled images (FFCV's default too)
CLASSES_FILE = "classes.json"


class ShardError(Exception):
    """A user-facing error (bad source tree, occupied destination, undecodable image)."""


@dataclass
class ShardReport:
    src: str
    dst: str
    classes: List[str]
    num_samples: int
    shards: List[str]


# --------------------------------------------------------------------------- filesystems


def resolve(uri: str):
    """``(filesystem, path)`` for a local path or ``s3://bucket/prefix``."""
    try:
        return _resolve(uri)
    except ValueError as e:
        raise ShardError(str(e)) from None


def list_classes(filesystem, root: str) -> List[str]:
    """Sorted class-folder names directly under ``root``."""
    info = filesystem.get_file_info(root)
    if info.type != fs.FileType.Directory:
        raise ShardError(f"source {root!r} is not a directory")
    entries = filesystem.get_file_info(fs.FileSelector(root, recursive=False))
    classes = sorted(e.base_name for e in entries if e.type == fs.FileType.Directory and not e.base_name.startswith("."))
    if not classes:
        raise ShardError(f"source {root!r} has no class folders (expected SRC/<class>/<image>)")
    return classes


def existing_shards(filesystem, root: str) -> Dict[str, Any]:
    """``{name: mtime}`` of the ``.tar`` files and ``classes.json`` directly under ``root``."""
    if filesystem.get_file_info(root).type != fs.FileType.Directory:
        return {}
    entries = filesystem.get_file_info(fs.FileSelector(root, recursive=False))
    return {
        e.base_name: e.mtime
        for e in entries
        if e.type == fs.FileType.File and (e.base_name.endswith(".tar") or e.base_name == CLASSES_FILE)
    }


def count_samples(filesystem, shard_path: str) -> int:
    """Number of samples (``.cls`` members) in one shard."""
    with filesystem.open_input_stream(shard_path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return sum(1 for member in tar if member.name.endswith(".cls"))


def delete_files(filesystem, root: str, names: List[str]) -> None:
    """Delete ``root/name`` for each name. On S3 through boto3: pyarrow's delete_file leaves an empty
    ``prefix/`` folder-marker object behind, which S3 listings (and some readers) then show as a file."""
    if not names:
        return

    if isinstance(filesystem, fs.S3FileSystem):
        bucket, _, prefix = root.partition("/")
        client = s3_client()
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            keys = [{"Key": posixpath.join(prefix, n) if prefix else n} for n in names[i:i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    else:
        for name in names:
            filesystem.delete_file(posixpath.join(root, name))


def promote(filesystem, staging: str, root: str, names: List[str]) -> None:
    """Move ``staging/name`` to ``root/name`` (a rename locally, a server-side copy + delete on S3)."""
    if isinstance(filesystem, fs.S3FileSystem):
        client = s3_client()
        for name in names:
            src_bucket, _, src_key = posixpath.join(staging, name).partition("/")
            bucket, _, key = posixpath.join(root, name).partition("/")
            client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key})
        delete_files(filesystem, staging, names)
    else:
        for name in names:
            filesystem.move(posixpath.join(staging, name), posixpath.join(root, name))
        filesystem.delete_dir(staging)


def discard(filesystem, staging: str) -> None:
    """Best-effort removal of a failed run's staging folder."""
    try:
        delete_files(filesystem, staging, sorted(existing_shards(filesystem, staging)))
        if not isinstance(filesystem, fs.S3FileSystem):
            filesystem.delete_dir(staging)
    except OSError:
        pass


# --------------------------------------------------------------------------- per-sample work


def sample_key(relative_path: str) -> str:
    stem = posixpath.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def image_entry(data: bytes, path: str) -> Tuple[str, bytes]:
    """``(extension, bytes)``: JPEG/PNG kept byte for byte, anything else decoded and re-encoded as PNG."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg", data
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", data

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            out = io.BytesIO()
            img.save(out, format="PNG")
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ShardError(f"cannot decode image {path} ({type(exc).__name__})") from None
    return "png", out.getvalue()


def downscale(data: bytes, path: str, max_side: int) -> Optional[Tuple[str, bytes]]:
    """``("jpg", bytes)`` of the image shrunk so its longer side is ``max_side`` (aspect ratio kept), or
    None when it is already that small (the caller keeps the original bytes)."""

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if max(w, h) <= max_side:
                return None
            scale = max_side / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img.draft("RGB", size)  # JPEG: decode at the nearest DCT scale ≥ size (much cheaper)
            img = to_8bit(img)  # 16-bit greyscale scaled to 8 bits (Pillow's convert would clip it)
            rgb = img.convert("L" if img.mode in ("L", "1") else "RGB")
            small = rgb.resize(size, Image.LANCZOS, reducing_gap=3.0)
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ShardError(f"cannot decode image {path} ({type(exc).__name__})") from None
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", out.getvalue()


class _ToSamples:
    """Ray Data UDF: rows ``{bytes, path}`` → ``{__key__, ext, image, cls}``."""
    def __init__(self, root: str, classes: List[str], max_side: Optional[int] = None):
        self.root = root.rstrip("/") + "/"
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.max_side = max_side

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        keys, exts, images, labels = [], [], [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            path = str(path)
            relative = path[len(self.root):] if path.startswith(self.root) else path.lstrip("/")
            small = downscale(bytes(data), path, self.max_side) if self.max_side else None
            ext, payload = small or image_entry(bytes(data), path)
            keys.append(sample_key(relative))
            exts.append(ext)
            images.append(payload)
            labels.append(self.class_to_idx[relative.split("/", 1)[0]])
        return {"__key__": keys, "ext": exts, "image": images, "cls": labels}


def encode_sample(sample: Dict[str, Any]) -> Dict[str, Any]:
    """WebDataset encoder: the image under its own extension, the label as text."""
    return {"__key__": sample["__key__"], sample["ext"]: bytes(sample["image"]), "cls": str(int(sample["cls"]))}


def _find_shard_error(exc: BaseException) -> Optional[str]:
    """Our ShardError's message inside a Ray task error (as the cause, or in its rendered text)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ShardError):
            return str(exc).strip().splitlines()[-1]
        text = str(exc)  # Ray ships the remote traceback as text: the last "…ShardError: msg" line
        found = re.findall(r"^\S*ShardError: (.+)$", text, flags=re.M)
        if found:
            return found[-1].strip()
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------- the job


def convert(
    src: str,
    dst: str,
    shard_size: int = 1000,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    max_side: Optional[int] = None,
) -> ShardReport:
    """Write ``src`` (ImageFolder) as WebDataset shards to ``dst``; see the module docstring."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ShardError(f"--max-side must be at least 1 pixel, got {max_side}")
    src_fs, src_root = resolve(src)
    dst_fs, dst_root = resolve(dst)
    classes = list_classes(src_fs, src_root)
    occupied = existing_shards(dst_fs, dst_root)
    if occupied and not overwrite:
        first = sorted(occupied)[0]
        raise ShardError(f"destination {dst!r} already has {first} (and {len(occupied) - 1} more); pass --overwrite")

    # Written to a staging folder first and promoted only once complete, so a failed (or --overwrite)
    # run never leaves DST without its old shards or with a mix of old and new ones.
    staging = posixpath.join(dst_root, f"_staging-{uuid.uuid4().hex[:12]}")
    _write_staged(src, dst, src_fs, src_root, dst_fs, staging, classes, shard_size, shuffle, seed, max_side)
    shards = sorted(n for n in existing_shards(dst_fs, staging) if n.endswith(".tar"))
    if not shards:
        discard(dst_fs, staging)
        raise ShardError(f"no images found under {src!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    # only our own files: DST may hold other data
    delete_files(dst_fs, dst_root, sorted(n for n in occupied if n not in shards and n != CLASSES_FILE))
    promote(dst_fs, staging, dst_root, shards)
    with dst_fs.open_output_stream(posixpath.join(dst_root, CLASSES_FILE)) as f:
        f.write(json.dumps(classes, indent=1).encode())
    # Count from the files rather than ds.count(), which would re-run the whole read.
    num_samples = (len(shards) - 1) * shard_size + count_samples(dst_fs, posixpath.join(dst_root, shards[-1]))
    return ShardReport(src=src, dst=dst, classes=classes, num_samples=num_samples, shards=shards)


def _write_staged(src, dst, src_fs, src_root, dst_fs, staging, classes, shard_size, shuffle, seed,
                  max_side=None) -> None:
    """The Ray Data job: read the class folders, encode samples, write `shard_size`-sample tar files."""
    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return SHARD_PATTERN.format(index=task_index)

    try:
        ds = ray.data.read_binary_files(
            [posixpath.join(src_root, name) for name in classes],
            include_paths=True,
            filesystem=src_fs,
            file_extensions=IMAGE_EXTENSIONS,
            shuffle=FileShuffleConfig(seed=seed) if shuffle else None,
        )
        ds = ds.map_batches(_ToSamples(src_root, classes, max_side), batch_format="numpy")
        # Strict repartition: every block but the last has exactly shard_size rows, one block per file.
        ds = ds.repartition(target_num_rows_per_block=shard_size, strict=True)
        ds.write_webdataset(
            staging,
            filesystem=dst_fs,
            try_create_dir=not dst.startswith("s3://"),  # S3 has no folders: no empty marker objects
            encoder=encode_sample,
            min_rows_per_file=shard_size,
            filename_provider=ShardNames(),
            mode=SaveMode.APPEND,
        )
    except Exception as exc:  # Ray wraps UDF errors in long task tracebacks: surface ours as one line
        discard(dst_fs, staging)
        ours = _find_shard_error(exc)
        if ours:
            raise ShardError(ours) from None
        if "No input files found" in str(exc):
            raise ShardError(f"no images under {src!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})") from None
        raise
