"""Training input throughput (what `cfvit bench data` prints): can the CPUs keep a GPU fed?

Generated ImageNet-sized JPEGs (500×375 and 375×500, ~110 KB, a smooth colour field with texture and
noise so that they compress like photos) go through the DeiT recipe's training transform of
jobs/configs/imagenet_deit_s.yaml (decode, RandomResizedCrop 224, RandAugment m9, hflip, random erasing
0.25: timm `create_transform` via `cfvit.transforms.build_transform`), measured two ways:

* per core: one process, one torch thread, a timing loop over the encoded bytes (decode alone, then
  decode + transform): the cost that sizes a cluster, least disturbed by other load;
* pipeline: the training job's own Ray Data path (`jobs.train.data.read` + `preprocess`) reading from
  an S3 server (moto, or any endpoint) or a local folder, ImageFolder and WebDataset shards (made by
  `cfvit shards`), delivering batches to a consumer in the driver.

Both for the original images and, with `--max-side N`, for shards downscaled by `cfvit shards --max-side`.
Cores per GPU = the CF-ViT DeiT-S training step rate on one H100 (docs/BENCHMARKS.md) ÷ img/s per core.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import torch
import yaml
from moto.server import ThreadedMotoServer
from PIL import Image
from ray.data import DataContext

from cfvit.transforms import build_transform, decode_image
from cfvit_common.ray_env import free_port
from cfvit_common.storage import resolve, s3_client
from jobs.ops.shards import convert, downscale
from jobs.train.data import describe, preprocess, read

# CF-ViT DeiT-S, bf16, batch 256, ZeRO-1 on one H100: 3,322 img/s (docs/BENCHMARKS.md, training step)
GPU_STEP_RATE = 3300
CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "imagenet_deit_s.yaml"
DEIT_DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
                    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CLASSES = [f"n{i:08d}" for i in range(4)]


def deit_augment() -> dict:
    """The training augmentation of the shipped ImageNet config, as build_datasets passes it."""
    aug = yaml.safe_load(CONFIG.read_text())["augment"]
    return dict(auto_augment=aug["auto_augment"], scale=tuple(aug["scale"]), hflip=aug["hflip"],
                re_prob=aug["re_prob"])


# ------------------------------------------------------------------ images
def synth_jpeg(rng: np.random.Generator, w: int = 500, h: int = 375, noise: float = 25.0) -> bytes:
    """A photo-like JPEG: low-frequency colour + mid-frequency texture + noise, quality 90 (~110 KB)."""
    low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    mid = Image.fromarray((rng.random((h // 8, w // 8)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(low, np.float32) * 0.7 + np.asarray(mid, np.float32)[..., None] * 0.3
    a += rng.normal(0, noise, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_images(n: int, seed: int = 0) -> dict[str, bytes]:
    """{`class/name.JPEG`: bytes}: n images over 4 classes, one in four portrait (375×500)."""
    rng = np.random.default_rng(seed)
    return {f"{CLASSES[i % len(CLASSES)]}/img_{i:05d}.JPEG":
            synth_jpeg(rng, *((375, 500) if i % 4 == 3 else (500, 375))) for i in range(n)}


def write_folder(images: dict[str, bytes], uri: str) -> None:
    """Write the images as an ImageFolder under a local path or s3:// prefix."""
    fs, root = resolve(uri)
    for rel, data in images.items():
        path = posixpath.join(root, rel)
        if not uri.startswith("s3://"):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def downscaled(images: dict[str, bytes], max_side: int) -> dict[str, bytes]:
    """The bytes `cfvit shards --max-side` stores for each image."""
    return {k: (downscale(v, k, max_side) or ("jpg", v))[1] for k, v in images.items()}


# ------------------------------------------------------------------ per core
def per_core(images: list[bytes], repeats: int = 1) -> dict:
    """ms per image for decode alone and decode + DeiT training transform, one thread, this process."""
    torch.set_num_threads(1)
    tf = build_transform(DEIT_DATA_CONFIG, is_training=True, **deit_augment())
    tf(decode_image(images[0]))  # warm-up (imports, first-call costs)
    timings = {}
    for name, fn in (("decode", decode_image), ("decode+augment", lambda b: tf(decode_image(b)))):
        failed, t0, c0 = 0, time.perf_counter(), time.process_time()
        for _ in range(repeats):
            for data in images:
                try:
                    fn(data)
                except ValueError:  # as `preprocess` does: the image is dropped (see failed_ops below)
                    failed += 1
        n = repeats * len(images)
        timings[name] = {"ms": 1000 * (time.perf_counter() - t0) / n,
                         "cpu_ms": 1000 * (time.process_time() - c0) / n, "failed": failed}
    return timings


# ------------------------------------------------------------------ pipeline
@dataclass
class PipelineResult:
    images: int
    total_s: float
    first_batch_s: float
    # after the first batch: the rate a consumer sees once the pipeline streams (None: one batch, no rate)
    steady_img_s: Optional[float]

    @property
    def img_s(self) -> float:
        return self.images / self.total_s


def pipeline(uri: str, batch_size: int = 32, map_batch: int = 32) -> PipelineResult:
    """Images/s of the training job's Ray Data path (read → decode → augment → batches to the driver)."""
    src = describe(uri)
    kw = dict(data_config_json=json.dumps(DEIT_DATA_CONFIG), is_training=True,
              aug_json=json.dumps(deit_augment()), num_classes=len(src.classes))
    ds = read(src, role="train").map_batches(preprocess, fn_kwargs=kw, batch_size=map_batch,
                                              batch_format="numpy")
    n, first, t0 = 0, None, time.perf_counter()
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if first is None:
            first, n_first = time.perf_counter() - t0, len(batch["label"])
        n += int(batch["valid"].sum())
    total = time.perf_counter() - t0
    steady = (n - n_first) / (total - first) if total > first and n > n_first else None
    return PipelineResult(n, total, first, steady)


@dataclass
class Store:
    """Where the bench writes its data: a local temp folder, an S3 endpoint, or a moto server it starts."""
    root: str
    label: str
    _server: object = field(default=None, repr=False)

    def close(self):
        if self._server is not None:
            self._server.stop()


def open_store(endpoint: str | None, bucket: str = "cfvit-bench") -> Store:
    if not endpoint:
        return Store(tempfile.mkdtemp(prefix="cfvit-bench-data-"), "local folder")
    server = None
    if endpoint == "moto":



        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
    os.environ["AWS_ENDPOINT_URL"] = endpoint

    client = s3_client()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return Store(f"s3://{bucket}/bench-{os.getpid()}", f"S3 at {endpoint}" + (" (moto, in this process)"
                                                                                if server else ""), server)


# ------------------------------------------------------------------ the bench
def run_bench(n_images: int = 256, endpoint: str | None = "moto", max_side: int | None = 256, num_cpus: int = 2,
              per_core_images: int = 128, repeats: int = 1, shard_size: int = 64, seed: int = 0) -> dict:
    """Per-core timings and pipeline rates; returns the figures `print_report` prints."""
    if n_images < 8 or per_core_images < 1 or num_cpus < 1:
        raise ValueError("need --images ≥ 8, --per-core-images ≥ 1 and --cpus ≥ 1")
    if max_side is not None and max_side < 1:
        raise ValueError(f"--max-side must be at least 1 pixel, got {max_side}")
    load_before = os.getloadavg()[0]
    images = make_images(n_images, seed)
    variants = {"original": images}
    if max_side:
        variants[f"max-side {max_side}"] = downscaled(images, max_side)
    sizes = {name: float(np.mean([len(b) for b in v.values()])) for name, v in variants.items()}
    sample = list(images)[:per_core_images]
    cores = {name: per_core([v[k] for k in sample], repeats) for name, v in variants.items()}
    store = open_store(endpoint)
    try:
        runs = _pipelines(store, images, max_side, num_cpus, shard_size)
    finally:
        store.close()
    return {"images": n_images, "mean_bytes": sizes, "per_core": cores, "pipeline": runs, "num_cpus": num_cpus,
            "store": store.label, "gpu_step_rate": GPU_STEP_RATE, "max_side": max_side,
            "load_avg": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count()}


def _pipelines(store: Store, images: dict, max_side: int | None, num_cpus: int, shard_size: int) -> dict:
    folder, wds = f"{store.root}/imagefolder", f"{store.root}/wds"
    write_folder(images, folder)

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per dataset otherwise
    # The workers inherit this process's AWS_* through the Ray it starts: no credential in a runtime_env.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        DataContext.get_current().enable_progress_bars = False
        uris = {"imagefolder": folder, "webdataset": wds}
        convert(folder, wds, shard_size=shard_size)
        if max_side:
            uris[f"webdataset max-side {max_side}"] = f"{wds}-max{max_side}"
            convert(folder, uris[f"webdataset max-side {max_side}"], shard_size=shard_size, max_side=max_side)
        pipeline(wds)  # warm-up: worker processes and imports, not counted
        return {name: pipeline(uri).__dict__ for name, uri in uris.items()}
    finally:
        ray.shutdown()


def print_report(r: dict, echo=print) -> None:
    """An 80-column table: per-core cost, pipeline rates, and the cores a GPU needs at each."""
    rate = r["gpu_step_rate"]
    sizes = ", ".join(f"{k} {v / 1000:.0f} KB" for k, v in r["mean_bytes"].items())
    echo(f"Training input, the DeiT recipe of {CONFIG.name}:")
    echo("RandomResizedCrop 224, RandAugment m9, hflip, random erasing;")
    echo(f"{r['images']} generated JPEGs 500x375/375x500")
    echo(f"mean file size: {sizes}"[:80])
    echo(f"GPU step rate {rate:,} img/s (CF-ViT DeiT-S, bf16, one H100)")
    echo(f"cores/GPU = {rate:,} / (img/s per core)")
    echo("")
    echo("per core: img/s/core = 1000 / CPU ms (this process's CPU time, 1 thread);")
    echo("wall ms also counts the time other processes held the core")
    echo(f"{'per core (1 process, 1 thread)':<38}{'wall ms':>8}{'CPU ms':>8}{'img/s/core':>12}{'cores/GPU':>11}")
    for variant, stages in r["per_core"].items():
        for stage, t in stages.items():
            per_s = 1000 / t["cpu_ms"]
            echo(f"  {variant + ', ' + stage:<36}{t['ms']:>8.1f}{t['cpu_ms']:>8.1f}{per_s:>12.0f}{rate / per_s:>11.1f}")
    echo("")
    n = r["num_cpus"]
    echo(f"Ray Data pipeline, {n} CPUs, {r['store']}"[:80])
    echo(f"{'  source → batches of 32':<38}{'img/s':>8}{'1st s':>8}{'img/s/CPU':>12}{'cores/GPU':>11}")
    for name, p in r["pipeline"].items():
        if p["steady_img_s"] is None:  # everything came in the first batch: nothing to take a rate from
            echo(f"  {name:<36}{'-':>8}{p['first_batch_s']:>8.1f}{'-':>12}{'-':>11}")
            continue
        per_cpu = p["steady_img_s"] / n
        cores = f"{rate / per_cpu:.1f}" if per_cpu else "-"
        echo(f"  {name:<36}{p['steady_img_s']:>8.1f}{p['first_batch_s']:>8.1f}{per_cpu:>12.1f}{cores:>11}")
    lo, hi = r["load_avg"]
    echo(f"(wall-clock img/s after the first batch; load average {lo:.1f} → {hi:.1f} on {r['cpu_count']} cores)")
