"""Versioned shard sets: nothing half-written is ever read.

`cfvit shards` writes each run under a fresh version, ``DST/versions/<version>/shard-*.tar``, and only
then, last, publishes ``DST/manifests/<version>.json``: the class names and every shard's name, size,
sha256 and sample count. Readers take the newest manifest whose shards are all there at their recorded
sizes. A run interrupted before its manifest leaves a version nobody reads; the previous version stays
whole and readable. A manifest is one object (a single PUT on S3, a rename on a local disk), so it is
either there complete or not at all.

Version names sort by time (``20260101T120000.123456Z-1a2b3c4d``: UTC to the microsecond, then random), so
"newest" is the largest name — also for two runs within one second, which a name to the second alone left
to the random part.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from pyarrow import fs as pafs

logger = logging.getLogger(__name__)

MANIFESTS_DIR = "manifests"
VERSIONS_DIR = "versions"
FORMAT = "cfvit-shards/1"


@dataclass
class ShardEntry:
    name: str  # relative to the data set's root: versions/<version>/shard-000000.tar
    size: int
    sha256: str
    samples: int


@dataclass
class Manifest:
    version: str
    classes: List[str]
    shards: List[ShardEntry]
    created: str = ""
    format: str = FORMAT
    extra: Dict[str, object] = field(default_factory=dict)  # how the set was made (source, shard size, …)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def paths(self, root: str) -> List[str]:
        return [posixpath.join(root, s.name) for s in self.shards]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        raw = json.loads(data)
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {raw.get('format')!r}")
        shards = [ShardEntry(**s) for s in raw.pop("shards")]
        return cls(shards=shards, **raw)


def new_version() -> str:
    now = time.time()
    return (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z-"
            + uuid.uuid4().hex[:8])


def version_dir(root: str, version: str) -> str:
    return posixpath.join(root, VERSIONS_DIR, version)


class _Hashing(io.RawIOBase):
    """A read-through stream that hashes and counts what passes."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.size += n
        return n


def describe_shard(filesystem, root: str, name: str) -> ShardEntry:
    """Size, sha256 and sample count (`.cls` members) of one shard, in one streaming pass."""
    with filesystem.open_input_stream(posixpath.join(root, name)) as f:
        hashing = _Hashing(f)
        with tarfile.open(fileobj=io.BufferedReader(hashing), mode="r|") as tar:
            samples = sum(1 for member in tar if member.name.endswith(".cls"))
        while hashing.read(1 << 20):  # the tar's end padding, so the digest covers the whole file
            pass
    return ShardEntry(name=name, size=hashing.size, sha256=hashing.sha.hexdigest(), samples=samples)


def publish(filesystem, root: str, manifest: Manifest) -> str:
    """Write the manifest (the last step of a write): one PUT on S3; locally a temporary file renamed into
    place. Returns its path."""
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    folder = posixpath.join(root, MANIFESTS_DIR)
    path = posixpath.join(folder, f"{manifest.version}.json")
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(folder, recursive=True)
        tmp = posixpath.join(folder, f".{manifest.version}.json.part")
        with filesystem.open_output_stream(tmp) as f:
            f.write(manifest.to_json())
        filesystem.move(tmp, path)
    else:
        with filesystem.open_output_stream(path) as f:
            f.write(manifest.to_json())
    return path


def manifest_versions(filesystem, root: str) -> List[str]:
    """Versions that have a manifest, oldest first."""
    folder = posixpath.join(root, MANIFESTS_DIR)
    if filesystem.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    entries = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(e.base_name[:-len(".json")] for e in entries
                  if e.type == pafs.FileType.File and e.base_name.endswith(".json") and not e.base_name.startswith("."))


def read_manifest(filesystem, root: str, version: str) -> Manifest:
    with filesystem.open_input_stream(posixpath.join(root, MANIFESTS_DIR, f"{version}.json")) as f:
        return Manifest.from_json(f.read())


def missing_shards(filesystem, root: str, manifest: Manifest) -> List[str]:
    """The manifest's shards that are absent or not at their recorded size (one listing per version)."""
    folders = {posixpath.dirname(s.name) for s in manifest.shards}
    found = {}
    for folder in folders:
        path = posixpath.join(root, folder)
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            for e in filesystem.get_file_info(pafs.FileSelector(path, recursive=False)):
                found[posixpath.join(folder, e.base_name)] = e.size
    return [s.name for s in manifest.shards if found.get(s.name) != s.size]


def newest_manifest(filesystem, root: str) -> Optional[Manifest]:
    """The newest manifest under `root` whose shards are all present at their recorded sizes, else None
    (no manifest at all: an older layout, or nothing published yet)."""
    versions = manifest_versions(filesystem, root)
    problems = []
    for version in reversed(versions):
        try:
            manifest = read_manifest(filesystem, root, version)
        except (OSError, ValueError, TypeError, KeyError) as e:
            problems.append(f"{version}: unreadable manifest ({e})")
            continue
        missing = missing_shards(filesystem, root, manifest)
        if not missing:
            if problems:
                logger.warning("%s: reading shard set %s; newer ones are not whole: %s", root, version,
                               "; ".join(problems))
            return manifest
        problems.append(f"{version}: {len(missing)} shard(s) missing or of another size, e.g. {missing[0]}")
    if versions:
        raise ValueError(f"{root}: no complete shard set among {len(versions)} manifest(s): {'; '.join(problems)}")
    return None
