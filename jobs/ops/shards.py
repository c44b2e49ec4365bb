"""ImageFolder tree → WebDataset ``.tar`` shards, as a Ray Data job (local paths or ``s3://``).

    cfvit shards s3://my-bucket/imagenet/train s3://my-bucket/imagenet-wds/train --shard-size 1000
    python -m cfvit_cli shards /data/imagenet/val /data/imagenet-wds/val

Source layout (torchvision ``ImageFolder``): one folder per class directly under ``SRC``; images at any
depth inside it (``.jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm``, any case). Class names are
the folder names sorted, and a class's label is its index in that order (as ImageFolder does).

Output (what ``jobs``' WebDataset reader expects): each run is a new version of the data set in ``DST``,
published only once complete (``cfvit_common/manifests.py``):

* ``versions/<version>/shard-000000.tar``, ``shard-000001.tar``, … — plain (uncompressed) tar files.
  Every shard except possibly the last holds exactly ``--shard-size`` samples. Input files are shuffled
  (seeded) before sharding so each shard mixes classes, which streaming readers rely on.
* ``manifests/<version>.json`` — written last: the class names in label order and every shard's name,
  size, sha256 and sample count. Readers take the newest manifest whose shards are all there; a run
  interrupted before its manifest leaves the previous version whole and the one it was writing unread.
  ``--keep N`` versions stay (the new one included); older ones are deleted after the new manifest is up.
  An older layout (shards and ``classes.json`` directly in ``DST``) is still read where no manifest is.
* Each sample is two tar members sharing a key: ``{key}.jpg`` or ``{key}.png`` (the original encoded
  bytes; the extension comes from the bytes' magic number, other formats are re-encoded to PNG) and
  ``{key}.cls`` (the integer label as ASCII text, e.g. ``b"3"``). ``key`` is the path relative to
  ``SRC`` without extension, with every character other than ``[A-Za-z0-9_-]`` replaced by ``_`` (so
  it contains no dot or slash).
* ``--max-side N``: an image whose longer side exceeds N pixels is downscaled to N on that side (aspect
  ratio kept, Lanczos) and re-encoded as JPEG at quality ``JPEG_QUALITY``; smaller images stay as they
  are. Decode and RandomResizedCrop then cost less per image (benchmarks/data.py), but the crop sees a
  lower-resolution source — the FFCV trade-off; see docs/SCALING.md for the accuracy caveat.

S3 uses pyarrow's S3 filesystem with the standard AWS configuration: credentials from the environment
or the instance profile, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for S3-compatible endpoints (MinIO, moto). The conversion runs on the Ray cluster
found by ``ray.init()`` (``RAY_ADDRESS``) or a local one.
"""
from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import ray
from PIL import Image
from pyarrow import fs
from ray.data import FileShuffleConfig, SaveMode
from ray.data.datasource import FilenameProvider

from cfvit.transforms import to_8bit
from cfvit_common.manifests import (
    MANIFESTS_DIR,
    VERSIONS_DIR,
    Manifest,
    ShardEntry,
    describe_shard,
    manifest_versions,
    new_version,
    publish,
    version_dir,
)
from cfvit_common.storage import IMAGE_EXTENSIONS as _EXTS
from cfvit_common.storage import resolve as _resolve
from cfvit_common.storage import s3_client

IMAGE_EXTENSIONS = list(_EXTS)

SHARD_PATTERN = "shard-{index:06d}.tar"
JPEG_QUALITY = 90  # re-encoding quality of --max-side downscaled images (FFCV's default too)
CLASSES_FILE = "classes.json"  # the class list of the older layout (no manifest)


class ShardError(Exception):
    """A user-facing error (bad source tree, occupied destination, undecodable image)."""


@dataclass
class ShardReport:
    src: str
    dst: str
    classes: List[str]
    num_samples: int
    shards: List[str]  # paths relative to dst: versions/<version>/shard-….tar
    version: str = ""
    pruned: List[str] = field(default_factory=list)  # older versions deleted


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


def files_under(filesystem, root: str) -> List[str]:
    """Names (relative to ``root``) of every file below it; [] when it does not exist."""
    if filesystem.get_file_info(root).type != fs.FileType.Directory:
        return []
    entries = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    return sorted(e.path[len(root):].lstrip("/") for e in entries if e.type == fs.FileType.File)


def remove_folder(filesystem, root: str) -> None:
    """Delete ``root`` and everything below it (S3: its objects, leaving no folder markers)."""
    delete_files(filesystem, root, files_under(filesystem, root))
    if not isinstance(filesystem, fs.S3FileSystem) and filesystem.get_file_info(root).type == fs.FileType.Directory:
        filesystem.delete_dir(root)


def discard(filesystem, folder: str) -> None:
    """Best-effort removal of a failed run's version folder (unpublished: no reader can have it)."""
    try:
        remove_folder(filesystem, folder)
    except OSError:
        pass


def prune(filesystem, root: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` published versions: each one's manifest first (so no reader picks
    it up any more), then its shards; and unpublished version folders older than the newest published one
    (runs that were interrupted; two runs writing to one destination at once are not supported). Returns
    the versions deleted."""
    published = manifest_versions(filesystem, root)
    kept = published[-keep:]
    doomed = [v for v in published if v not in kept]
    delete_files(filesystem, posixpath.join(root, MANIFESTS_DIR), [f"{v}.json" for v in doomed])
    folder = posixpath.join(root, VERSIONS_DIR)
    if filesystem.get_file_info(folder).type == fs.FileType.Directory:
        present = [e.base_name for e in filesystem.get_file_info(fs.FileSelector(folder, recursive=False))
                   if e.type == fs.FileType.Directory]
        doomed += [v for v in present if v not in published and kept and v < kept[-1]]
    for v in doomed:
        remove_folder(filesystem, version_dir(root, v))
    return sorted(set(doomed))


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
    keep: int = 2,
) -> ShardReport:
    """Write ``src`` (ImageFolder) as WebDataset shards to ``dst``; see the module docstring."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ShardError(f"--max-side must be at least 1 pixel, got {max_side}")
    if keep < 1:
        raise ShardError(f"--keep must be at least 1, got {keep}")
    src_fs, src_root = resolve(src)
    dst_fs, dst_root = resolve(dst)
    classes = list_classes(src_fs, src_root)
    published = manifest_versions(dst_fs, dst_root)
    legacy = existing_shards(dst_fs, dst_root)  # the older layout: shards directly in DST
    if (published or legacy) and not overwrite:
        held = f"version {published[-1]}" if published else f"{sorted(legacy)[0]} (and {len(legacy) - 1} more)"
        raise ShardError(f"destination {dst!r} already holds a shard set ({held}); pass --overwrite to publish "
                         f"a new version (the current one stays readable until then)")

    # A new version folder nobody reads until its manifest is published: a failed or killed run never
    # leaves DST without its previous set, or with old and new shards mixed.
    version = new_version()
    folder = version_dir(dst_root, version)
    _write_staged(src, dst, src_fs, src_root, dst_fs, folder, classes, shard_size, shuffle, seed, max_side)
    names = [f"{VERSIONS_DIR}/{version}/{n}" for n in sorted(existing_shards(dst_fs, folder)) if n.endswith(".tar")]
    if not names:
        discard(dst_fs, folder)
        raise ShardError(f"no images found under {src!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    manifest = Manifest(version=version, classes=classes, shards=describe_shards(dst_fs, dst_root, names),
                        extra={"source": src, "shard_size": shard_size, "shuffle": shuffle, "seed": seed,
                               "max_side": max_side})
    publish(dst_fs, dst_root, manifest)
    pruned = prune(dst_fs, dst_root, keep)
    return ShardReport(src=src, dst=dst, classes=classes, num_samples=manifest.num_samples, shards=names,
                       version=version, pruned=pruned)


def _describe_row(row: Dict[str, Any], filesystem, root: str) -> Dict[str, Any]:
    entry = describe_shard(filesystem, root, row["name"])
    return {"name": entry.name, "size": entry.size, "sha256": entry.sha256, "samples": entry.samples}


def describe_shards(filesystem, root: str, names: List[str]) -> List[ShardEntry]:
    """Size, sha256 and samples of every written shard, read back from storage in parallel (Ray Data)."""
    rows = ray.data.from_items([{"name": n} for n in names]).map(
        _describe_row, fn_kwargs={"filesystem": filesystem, "root": root}).take_all()
    return sorted((ShardEntry(**r) for r in rows), key=lambda e: e.name)


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
