"""`cfvit shards`: ImageFolder → WebDataset shards with Ray Data, to a local folder and to S3 (moto)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cfvit_common.manifests import Manifest
from jobs.ops import shards
from jobs.ops.cli import app as ops_app

CLASSES = ["cat", "dog", "fish"]  # sorted → labels 0, 1, 2


def _s3_keys(s3, bucket: str, prefix: str) -> set:
    return {o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def _app() -> typer.Typer:
    return ops_app


def make_image_folder(root: Path) -> dict[str, int]:
    """3 classes × 4 images: PNG, JPEG (upper-case .JPEG as in ImageNet), one BMP, one in a sub-folder.

    Returns {expected sample key: label}; each image's red channel encodes its label so the test can
    check that image and label travel together.
    """
    expected = {}
    for label, name in enumerate(CLASSES):
        (root / name / "sub").mkdir(parents=True)
        color = (80 * label, 7, 200)
        files = {
            f"{name}/a.png": "PNG",
            f"{name}/b.v2.JPEG": "JPEG",
            f"{name}/c.bmp": "BMP",
            f"{name}/sub/d.png": "PNG",
        }
        for rel, fmt in files.items():
            Image.new("RGB", (12, 10), color).save(root / rel, format=fmt)
            expected[shards.sample_key(rel)] = label
    (root / "README.txt").write_text("not a class folder\n")  # ignored: not inside a class folder
    (root / "cat" / "notes.txt").write_text("not an image\n")  # ignored: not an image extension
    return expected


def read_shards(files: dict[str, bytes]) -> dict[str, tuple[int, str, tuple]]:
    """{key: (label, ext, first pixel)} from shard bytes, checking each sample is complete."""
    samples: dict[str, dict[str, bytes]] = {}
    for data in files.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    out = {}
    for key, parts in samples.items():
        assert set(parts) in ({"jpg", "cls"}, {"png", "cls"}), (key, set(parts))
        ext = "jpg" if "jpg" in parts else "png"
        pixel = Image.open(io.BytesIO(parts[ext])).convert("RGB").getpixel((0, 0))
        out[key] = (int(parts["cls"].decode()), ext, pixel)
    return out


def published(dst: Path) -> tuple[dict[str, bytes], Manifest]:
    """The newest published version in a local destination: {shard file name: bytes} and its manifest,
    whose sizes and sha256 must be the files'."""
    manifests = sorted((dst / "manifests").glob("*.json"))
    assert manifests, sorted(p.name for p in dst.rglob("*"))
    manifest = Manifest.from_json(manifests[-1].read_bytes())
    files = {Path(s.name).name: (dst / s.name).read_bytes() for s in manifest.shards}
    for s in manifest.shards:
        data = files[Path(s.name).name]
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert s.name.startswith(f"versions/{manifest.version}/")
    return files, manifest


def check_output(files: dict[str, bytes], classes: list, expected: dict[str, int], shard_size: int):
    assert classes == CLASSES
    names = sorted(files)
    assert names == [f"shard-{i:06d}.tar" for i in range(len(names))]
    sizes = [len([m for m in tarfile.open(fileobj=io.BytesIO(files[n])).getnames() if m.endswith(".cls")]) for n in names]
    total = len(expected)
    assert sizes == [shard_size] * (total // shard_size) + ([total % shard_size] if total % shard_size else [])
    samples = read_shards(files)
    assert {k: v[0] for k, v in samples.items()} == expected
    for key, (label, ext, pixel) in samples.items():
        assert abs(pixel[0] - 80 * label) <= 8, (key, pixel)  # JPEG is lossy, slightly
        assert ext == ("jpg" if key.endswith("_b_v2") else "png")  # JPEG kept as is, BMP re-encoded
    # Shuffled before sharding: the first shard does not hold a single class.
    first = read_shards({names[0]: files[names[0]]})
    assert len({v[0] for v in first.values()}) > 1


@pytest.mark.e2e
def test_local_image_folder_to_local_shards(ray_session, tmp_path):
    expected = make_image_folder(tmp_path / "src")
    dst = tmp_path / "wds"
    result = CliRunner().invoke(_app(), ["shards", str(tmp_path / "src"), str(dst), "--shard-size", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote 12 images of 3 classes as 3 shards" in result.stdout and "manifest published last" in result.stdout
    files, manifest = published(dst)
    check_output(files, manifest.classes, expected, shard_size=5)
    assert manifest.num_samples == 12 and [s.samples for s in manifest.shards] == [5, 5, 2]

    # A second run does not publish over an existing set unless asked to.
    again = CliRunner().invoke(_app(), ["shards", str(tmp_path / "src"), str(dst), "--shard-size", "5"])
    assert again.exit_code == 1
    assert "already holds a shard set" in again.stderr and "--overwrite" in again.stderr

    # Class folders without images, and an undecodable image: one-line errors naming the cause.
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no images here\n")
    empty = CliRunner().invoke(_app(), ["shards", str(tmp_path / "empty"), str(tmp_path / "out1")])
    # (Ray Data logs the task failure on stderr first; our message is the last line.)
    assert empty.exit_code == 1 and empty.stderr.strip().splitlines()[-1].startswith("error: no images under")
    (tmp_path / "corrupt" / "a").mkdir(parents=True)
    (tmp_path / "corrupt" / "a" / "broken.jpg").write_bytes(b"\x00not a jpeg at all")
    corrupt = CliRunner().invoke(_app(), ["shards", str(tmp_path / "corrupt"), str(tmp_path / "out2")])
    assert corrupt.exit_code == 1, corrupt.output
    last = corrupt.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot decode image {tmp_path / 'corrupt' / 'a' / 'broken.jpg'} (UnidentifiedImageError)"

    # --overwrite from a source that fails half-way leaves the published set as it was, nothing else behind ...
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    failed = CliRunner().invoke(_app(), ["shards", str(tmp_path / "corrupt"), str(dst), "--overwrite"])
    assert failed.exit_code == 1, failed.output
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    # ... and successful ones publish new versions (fewer, larger shards: only the new version's are read);
    # with --keep 2 the first version is deleted when the third is published.
    first = manifest.version
    for _ in range(2):
        redo = CliRunner().invoke(_app(), ["shards", str(tmp_path / "src"), str(dst), "--shard-size", "12",
                                           "--overwrite", "--keep", "2"])
        assert redo.exit_code == 0, redo.output
    assert f"deleted older version(s) {first}" in redo.stdout
    files, manifest = published(dst)
    assert list(files) == ["shard-000000.tar"]
    check_output(files, manifest.classes, expected, shard_size=12)
    assert len(list((dst / "manifests").glob("*.json"))) == 2 and len(list((dst / "versions").iterdir())) == 2


@pytest.mark.e2e
def test_s3_image_folder_to_s3_shards(ray_session, s3_server, tmp_path):
    expected = make_image_folder(tmp_path / "src")
    s3 = s3_server.client()
    s3.create_bucket(Bucket="cfvit-shards-test")
    for path in (tmp_path / "src").rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "cfvit-shards-test", "imagefolder/train/" + path.relative_to(tmp_path / "src").as_posix())

    report = shards.convert("s3://cfvit-shards-test/imagefolder/train", "s3://cfvit-shards-test/wds/train", shard_size=4)
    assert report.num_samples == 12 and report.classes == CLASSES and len(report.shards) == 3

    v = report.version
    keys = _s3_keys(s3, "cfvit-shards-test", "wds/train/")
    assert keys == {f"manifests/{v}.json", *(f"versions/{v}/shard-00000{i}.tar" for i in range(3))}
    get = lambda name: s3.get_object(Bucket="cfvit-shards-test", Key=f"wds/train/{name}")["Body"].read()  # noqa: E731
    manifest = Manifest.from_json(get(f"manifests/{v}.json"))
    files = {Path(s.name).name: get(s.name) for s in manifest.shards}
    assert all(hashlib.sha256(files[Path(s.name).name]).hexdigest() == s.sha256 for s in manifest.shards)
    check_output(files, manifest.classes, expected, shard_size=4)

    # --overwrite publishes a new version: 2 shards of 6 read now; the first version stays (--keep 2).
    report = shards.convert("s3://cfvit-shards-test/imagefolder/train", "s3://cfvit-shards-test/wds/train",
                            shard_size=6, overwrite=True)
    manifest = Manifest.from_json(get(f"manifests/{report.version}.json"))
    assert report.num_samples == 12 and len(manifest.shards) == 2
    check_output({Path(s.name).name: get(s.name) for s in manifest.shards}, manifest.classes, expected, shard_size=6)
    assert {k for k in _s3_keys(s3, "cfvit-shards-test", "wds/train/") if k.startswith("manifests/")} == {
        f"manifests/{v}.json", f"manifests/{report.version}.json"}


def test_bad_sources_are_clear_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(_app(), ["shards", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert missing.exit_code == 1 and "is not a directory" in missing.stderr
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    flat = runner.invoke(_app(), ["shards", str(tmp_path / "flat"), str(tmp_path / "out")])
    assert flat.exit_code == 1 and "no class folders" in flat.stderr
    bad_size = runner.invoke(_app(), ["shards", str(tmp_path / "flat"), str(tmp_path / "out"), "--shard-size", "0"])
    assert bad_size.exit_code == 1 and "--shard-size must be at least 1" in bad_size.stderr
    scheme = runner.invoke(_app(), ["shards", "gs://bucket/x", str(tmp_path / "out")])
    assert scheme.exit_code == 1 and "unsupported location" in scheme.stderr


def test_sample_keys_and_image_entries():
    assert shards.sample_key("n01440764/n01440764_10026.JPEG") == "n01440764_n01440764_10026"
    assert shards.sample_key("a b/c.d.png") == "a_b_c_d"
    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, format="GIF")
    ext, data = shards.image_entry(buf.getvalue(), "x.gif")
    assert ext == "png" and data.startswith(b"\x89PNG")
    with pytest.raises(shards.ShardError, match=r"cannot decode image broken.jpg \(UnidentifiedImageError\)"):
        shards.image_entry(b"definitely not an image", "broken.jpg")


@pytest.mark.e2e
def test_training_reader_takes_mixed_extension_shards(ray_session, tmp_path):
    """The training/calibration reader over `cfvit shards` output (JPEG and PNG samples side by side) plus
    a shard from another tool holding a corrupt image and an unlabelled sample: both skipped, not fatal."""
    from jobs.train.data import describe, preprocess, read

    make_image_folder(tmp_path / "src")
    shards.convert(str(tmp_path / "src"), str(tmp_path / "new"), shard_size=5)
    # the older layout (no manifest): shards and classes.json directly in the folder
    files, manifest = published(tmp_path / "new")
    (tmp_path / "wds").mkdir()
    for name, data in files.items():
        (tmp_path / "wds" / name).write_bytes(data)
    (tmp_path / "wds" / "classes.json").write_text(json.dumps(manifest.classes))
    png = io.BytesIO()
    Image.new("RGB", (12, 10), (80, 7, 200)).save(png, format="PNG")
    with tarfile.open(tmp_path / "wds" / "extra.tar", "w") as tar:
        for name, data in (("bad.jpg", b"\xff\xd8\xffnot really a jpeg"), ("bad.cls", b"1"),
                           ("nolabel.png", png.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    src = describe(str(tmp_path / "wds"))
    assert src.kind == "webdataset" and src.classes == CLASSES and src.files is None
    dc = {"input_size": (3, 16, 16), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    rows = read(src, role="val").map_batches(
        preprocess, fn_kwargs=dict(data_config_json=json.dumps(dc), is_training=False, aug_json="{}", num_classes=3),
        batch_format="numpy").take_all()
    valid = [r for r in rows if r["valid"]]
    assert len(rows) == 14 and len(valid) == 12
    assert sorted(int(r["label"]) for r in valid) == [0] * 4 + [1] * 4 + [2] * 4
    for r in valid:  # image and label travel together: the red channel encodes the label
        assert r["image"].shape == (3, 16, 16) and abs(float(r["image"][0].mean()) - 80 * int(r["label"]) / 255) < 0.04


def _encoded(size, fmt="JPEG", mode="RGB", color=(200, 7, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else (*color, 128)).save(buf, format=fmt)
    return buf.getvalue()


def test_max_side_downscale_keeps_aspect_and_small_images():
    """`--max-side`: larger images shrink to N on the longer side as JPEG; smaller ones keep their bytes."""
    to_samples = shards._ToSamples("/src", CLASSES, max_side=16)
    small = _encoded((10, 8), "PNG")
    batch = {"bytes": [_encoded((40, 30)), _encoded((30, 40), "PNG", "RGBA"), small, _encoded((16, 9))],
             "path": ["/src/cat/wide.jpg", "/src/dog/tall.png", "/src/fish/small.png", "/src/fish/edge.jpg"]}
    out = to_samples(batch)
    assert out["cls"] == [0, 1, 2, 2] and out["ext"] == ["jpg", "jpg", "png", "jpg"]
    sizes = [Image.open(io.BytesIO(b)).size for b in out["image"]]
    assert sizes == [(16, 12), (12, 16), (10, 8), (16, 9)]  # aspect ratio kept; at most 16 px
    assert out["image"][2] == small and out["image"][3] == batch["bytes"][3]  # not larger: untouched bytes
    assert Image.open(io.BytesIO(out["image"][1])).mode == "RGB"  # RGBA PNG → RGB JPEG
    with pytest.raises(shards.ShardError, match=r"cannot decode image bad.jpg"):
        shards.downscale(b"\xff\xd8\xffbroken", "bad.jpg", 16)
    with pytest.raises(shards.ShardError, match="--max-side must be at least 1 pixel, got 0"):
        shards.convert("/nonexistent", "/nonexistent-out", max_side=0)


@pytest.mark.e2e
def test_max_side_shards_decode_to_the_same_labels(ray_session, tmp_path):
    expected = make_image_folder(tmp_path / "src")  # 12×10 images
    dst = tmp_path / "wds-max8"
    result = CliRunner().invoke(_app(), ["shards", str(tmp_path / "src"), str(dst), "--shard-size", "5",
                                         "--max-side", "8"])
    assert result.exit_code == 0, result.output
    files, _ = published(dst)
    samples = read_shards(files)
    assert {k: v[0] for k, v in samples.items()} == expected  # same keys, same labels
    for key, (label, ext, pixel) in samples.items():
        assert ext == "jpg" and abs(pixel[0] - 80 * label) <= 10, (key, pixel)  # image and label together
    for data in files.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    assert Image.open(tar.extractfile(m)).size == (8, 7)  # 12×10 → 8×7: at most 8, aspect kept
    bad = CliRunner().invoke(_app(), ["shards", str(tmp_path / "src"), str(tmp_path / "x"), "--max-side", "0"])
    assert bad.exit_code == 1 and "--max-side must be at least 1 pixel" in bad.stderr


@pytest.mark.e2e
def test_a_write_killed_midway_leaves_the_previous_set_whole_and_training_reads_it(ray_session, s3_server, tmp_path):
    """`cfvit shards --overwrite` against the S3 server, killed (SIGKILL) as soon as its first new shard is
    stored: its version is never published, the previous one is whole, and the training job's datasets
    (`build_datasets`, what the trainer consumes) read exactly the previous samples. The next run publishes
    and clears the dead run's folder."""
    import os
    import subprocess
    import sys
    import time

    from jobs.train.config import JobConfig
    from jobs.train.data import build_datasets, describe

    expected = make_image_folder(tmp_path / "src")
    for i in range(40):  # more images, one shard each: the killed run has many objects to write
        Image.new("RGB", (12, 10), (80 * (i % 3), 7, 200)).save(tmp_path / "src" / CLASSES[i % 3] / f"more{i}.png")
    s3 = s3_server.client()
    bucket = "cfvit-shards-kill"
    s3.create_bucket(Bucket=bucket)
    for path in (tmp_path / "src").rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, "src/" + path.relative_to(tmp_path / "src").as_posix())
    first = shards.convert(f"s3://{bucket}/src", f"s3://{bucket}/wds", shard_size=4)
    assert first.num_samples == 52
    before = {k: s3.get_object(Bucket=bucket, Key="wds/" + k)["Body"].read() for k in _s3_keys(s3, bucket, "wds/")}

    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "cfvit_cli", "shards", f"s3://{bucket}/src", f"s3://{bucket}/wds",
                             "--shard-size", "1", "--overwrite"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        new = set()
        while not new and proc.poll() is None and time.monotonic() < deadline:
            new = {k for k in _s3_keys(s3, bucket, "wds/versions/") if not k.startswith(first.version)}
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.kill()
        output = proc.communicate()[0]
    assert new, output[-3000:]  # killed mid-write: new shards were stored ...
    after = _s3_keys(s3, bucket, "wds/")
    assert {k for k in after if k.startswith("manifests/")} == {f"manifests/{first.version}.json"}  # ... unpublished
    assert {k: s3.get_object(Bucket=bucket, Key="wds/" + k)["Body"].read() for k in before} == before

    src = describe(f"s3://{bucket}/wds")
    assert src.version == first.version and src.classes == CLASSES and len(src.files) == 13
    cfg = JobConfig.model_validate({"data": {"train": src.uri, "val": src.uri, "check_uris": False}})
    dc = {"input_size": (3, 16, 16), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    rows = build_datasets(cfg, dc, src, src)["train"].take_all()
    assert len(rows) == 52 and all(r["valid"] for r in rows)
    labels = sorted(int(r["label"]) for r in rows)
    assert labels == sorted(list(expected.values()) + [i % 3 for i in range(40)])

    again = shards.convert(f"s3://{bucket}/src", f"s3://{bucket}/wds", shard_size=4, overwrite=True)
    left = {k.split("/")[0] for k in _s3_keys(s3, bucket, "wds/versions/")}
    assert left == {first.version, again.version}  # the killed run's folder is gone
