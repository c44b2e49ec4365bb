"""`cfvit bench serve`: closed-loop load (HTTP or gRPC) at rising concurrency against several deployments
of one checkpoint on the same machine (by default the split and fused CF-ViT topologies and the
single-stage backbone), one after the other, with where each request's time went (the app's
`Server-Timing`), the CPU each request cost the whole machine, the offline `infer_stream` figures of the
same checkpoint at the same exit rate and batch size as the target, and (`--floor`) Ray Serve's own
no-op paths under the same load, for each request-path profile (serve/request_path.py) asked for."""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import httpx
import numpy as np
import ray
import torch
import yaml
from PIL import Image
from ray import serve
from ray.serve.config import gRPCOptions

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.streaming import infer_stream
from cfvit.transforms import decode_image
from cfvit_common.checkpoints import resolve_checkpoint
from cfvit_common.machine import cpu_name
from cfvit_common.ray_env import free_port
from serve.app import build_app
from serve.grpc_api import SERVICER_FUNCTION
from serve.inputs import PixelTransform, normalise
from serve.request_path import PROFILES, apply_profile, direct_ingress, ingress_addresses
from serve.runner import start_ray

from .floor import FLOOR_SYSTEMS, floor_app
from .load import LoadSpec, closed_loop
from .throughput import eta_for_exit_fraction

# Each system: a topology (`stages`) then optional `key=value` overrides of the app arguments (YAML
# values, dotted keys into a stage block), e.g. "split wire_dtype=float32 handoff=ingress".
DEFAULT_SYSTEMS = ("split", "fused", "backbone")


def png_files(arrays) -> List[bytes]:
    """uint8 arrays (H×W or H×W×3) as PNG files, as users send them."""
    files = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files


def bench_images(model_cfg: Dict[str, Any], n: int, seed: int = 0) -> List[bytes]:
    """PNG files as users have them: Fashion-MNIST test images for the fmnist model, else noise."""
    c, h, w = model_cfg["input_size"]
    arrays = None
    if c == 1 and "fmnist" in str(model_cfg.get("name", "")):
        try:
            arrays = load_fashion_mnist("test")[0][:n]
        except FileNotFoundError:
            arrays = None
    if arrays is None:
        rng = np.random.default_rng(seed)
        arrays = rng.integers(0, 256, size=(n, h, w) if c == 1 else (n, h, w, 3), dtype=np.uint8)
    return png_files(arrays)


def ratio_at_equal_p99(cf: List[Dict[str, Any]], base: List[Dict[str, Any]]) -> List[Dict[str, float]]:
    """CF-ViT / backbone throughput at the same p99, interpolating each curve (throughput vs p99)
    at every measured p99 that lies inside both curves' ranges."""
    def curve(rows):
        pts = sorted((r["p99_ms"], r["throughput"]) for r in rows if np.isfinite(r["p99_ms"]))
        return np.array([p for p, _ in pts]), np.array([t for _, t in pts])

    cp, ct = curve(cf)
    bp, bt = curve(base)
    if len(cp) == 0 or len(bp) == 0:
        return []
    lo, hi = max(cp.min(), bp.min()), min(cp.max(), bp.max())
    out = []
    for p in sorted(set(np.concatenate([cp, bp]).tolist())):
        if lo <= p <= hi:
            c, b = float(np.interp(p, cp, ct)), float(np.interp(p, bp, bt))
            out.append({"p99_ms": p, "cfvit_rps": c, "backbone_rps": b, "ratio": c / b if b else float("nan")})
    return out


def pixels_and_confidences(model, files: List[bytes], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The files as the model's normalised input, and each one's coarse-stage confidence (top softmax)."""
    pt = PixelTransform(model.data_config)
    x = normalise(torch.stack([pt.pixels(decode_image(f)) for f in files]), pt.mean, pt.std)
    with torch.inference_mode():
        conf = torch.cat([model.coarse_stage(b).logits.float().softmax(-1).amax(-1) for b in x.split(batch_size)])
    return x, conf


def offline_reference(checkpoint: str, files: List[bytes], batch_size: int, n_batches: int,
                      eta: Optional[float], exit_rate: Optional[float], threads: int) -> Dict[str, Any]:
    """The same images through the library in this process: coarse confidences (→ η for `exit_rate`),
    then backbone and `infer_stream` images/s over `n_batches` batches of `batch_size`."""



    torch.set_num_threads(threads)
    model = cfvit.load(str(resolve_checkpoint(checkpoint))).eval()
    x, conf = pixels_and_confidences(model, files, batch_size)
    if exit_rate is not None:
        eta = eta_for_exit_fraction(conf, exit_rate)
    batches = [x[(i * batch_size) % len(x):][:batch_size] for i in range(n_batches)]
    batches = [b for b in batches if len(b) == batch_size] or [x[:batch_size]]

    def timed(fn) -> float:
        fn(batches[:1])  # warm-up
        t0 = time.perf_counter()
        fn(batches)
        return sum(len(b) for b in batches) / (time.perf_counter() - t0)

    with torch.inference_mode():
        backbone = timed(lambda bs: [model.vit(b) for b in bs])
        cf = timed(lambda bs: list(infer_stream(model, bs, eta)))
    return {"eta": float(eta), "exit_rate": float((conf >= eta).float().mean()), "batch_size": batch_size,
            "n_batches": len(batches), "threads": threads, "backbone_ips": backbone, "cfvit_ips": cf,
            "ratio": cf / backbone}


def system_args(spec: str, checkpoint: str, eta: float, replicas: int, batch_size: int) -> Dict[str, Any]:
    """App arguments of one system: the same CPU for every topology (2 × `replicas` model replicas, one
    torch thread each, nothing reserved), fixed replica counts, then the spec's overrides."""
    stages, *overrides = strip_label(spec).split()
    stage = {"num_cpus": 0, "torch_threads": 1, "autoscaling_config": None, "max_batch_size": batch_size}
    args: Dict[str, Any] = {"checkpoint": checkpoint, "eta": eta, "stages": stages, "ingress_num_cpus": 0,
                            "ingress_autoscaling_config": None}
    if stages == "split":
        args.update(coarse={**stage, "num_replicas": replicas}, fine={**stage, "num_replicas": replicas})
    elif stages == "fused":
        args["fused"] = {**stage, "num_replicas": 2 * replicas, "fine_batch_size": batch_size}
    else:
        args["coarse"] = {**stage, "num_replicas": 2 * replicas}
    for item in overrides:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = args
        for p in path:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return args


def _deploy(args: Dict[str, Any], name: str, port: int) -> Dict[str, Any]:
    serve.run(build_app(args), name=name, route_prefix="/")
    return httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()


def _model_cfg(checkpoint: str) -> Dict[str, Any]:
    return json.loads((resolve_checkpoint(checkpoint) / "config.json").read_text())


def random_checkpoint(model: str, folder: Optional[str] = None) -> str:
    """A registered model with random weights, saved for serving (`--model`)."""
    out = Path(folder or tempfile.mkdtemp(prefix="cfvit-bench-")) / model
    torch.manual_seed(0)
    cfvit.save(cfvit.create_model(model), out)
    return str(out)


def noise_pngs(px: int, n: int, seed: int = 0) -> List[bytes]:
    """`n` RGB noise PNGs of `px`×`px` (incompressible: 224 px ≈ 151 KB), the body of `--image-px`."""
    rng = np.random.default_rng(seed)
    return png_files(rng.integers(0, 256, size=(n, px, px, 3), dtype=np.uint8))


@dataclass
class ServeBenchSettings:
    """One `cfvit bench serve` run: for each request-path profile, a fresh Ray with that profile's
    environment; in it the floor systems (with `floor`) and the app's systems, one after the other, each
    under the same closed-loop load."""

    checkpoint: str
    levels: List[int] = field(default_factory=lambda: [1, 4, 16, 32])  # closed-loop client counts
    duration_s: float = 10.0
    warmup_s: float = 2.0
    eta: float = 0.5
    exit_rate: Optional[float] = None  # pick η so this share of the bench images exits (offline)
    n_images: int = 256
    replicas: int = 1
    port: int = 8123
    grpc_port: int = 9123
    systems: Sequence[str] = DEFAULT_SYSTEMS
    batch_size: int = 16
    offline_batches: int = 6
    per_request: int = 1
    transport: str = "http"  # or "grpc" (serve/proto/cfvit.proto)
    floor: bool = False  # also Ray Serve's own no-op paths (benchmarks/floor.py)
    profiles: Sequence[str] = ("default",)  # request-path settings (serve/request_path.py)
    image_px: Optional[int] = None  # send px×px RGB noise PNGs instead of the model's own test images
    offline: bool = True


def _files(s: ServeBenchSettings) -> List[bytes]:
    if s.image_px:
        return noise_pngs(s.image_px, min(s.n_images, 64))
    cfg = _model_cfg(s.checkpoint)
    return bench_images({"name": cfg.get("name") or cfg.get("model_name"),
                         "input_size": cfg["data_config"]["input_size"]}, s.n_images)


def _targets(s: ServeBenchSettings, app_name: str, profile: str) -> List[str]:
    """Where the clients connect: each ingress replica's own port with direct ingress and no HAProxy,
    else the proxy's (Ray's Python proxy, or HAProxy)."""
    env = PROFILES[profile]
    if direct_ingress(env) and env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        # the replicas listen on the HTTP host the bench gave Serve (loopback) of this one machine
        found = [f"127.0.0.1:{a.rpartition(':')[2]}" for a in ingress_addresses(app_name)[s.transport]]
        if found:
            return found
    return [f"127.0.0.1:{s.grpc_port if s.transport == 'grpc' else s.port}"]


def _wait_ready(s: ServeBenchSettings, targets: List[str], files: List[bytes]) -> None:
    """Until a request through the bench's own client path succeeds (HAProxy may lag a deploy)."""
    spec = LoadSpec(s.transport, targets, files[:1], 1)
    deadline = time.time() + 60
    while time.time() < deadline:
        if closed_loop(spec, 1, 0.0, 0.3)["errors"] == 0:
            return
        time.sleep(0.5)


def _measure(s: ServeBenchSettings, app, name: str, profile: str, files: List[bytes],
             eta: Optional[float]) -> List[Dict[str, Any]]:
    serve.run(app, name=name, route_prefix="/")
    targets = _targets(s, name, profile)
    _wait_ready(s, targets, files)
    spec = LoadSpec(s.transport, targets, files, s.per_request, eta)
    rows = [{**closed_loop(spec, c, s.warmup_s, s.duration_s), "targets": targets} for c in s.levels]
    serve.delete(name)
    return rows


def _profile_run(s: ServeBenchSettings, profile: str, files: List[bytes], eta: float) -> Dict[str, Any]:
    env = apply_profile(profile, free_port)
    out: Dict[str, Any] = {"env": env, "floor": {}, "systems": {}}
    start_ray(None)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": s.port},
                    grpc_options=gRPCOptions(port=s.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]))
        if s.floor:
            for system in FLOOR_SYSTEMS:
                out["floor"][system] = _measure(s, floor_app(system), "floor", profile, files, None)
        for i, spec in enumerate(s.systems):
            args = system_args(spec, s.checkpoint, eta, s.replicas, s.batch_size)
            out["systems"][spec] = _measure(s, build_app(args), f"bench-{i}", profile, files, eta)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def run_bench(s: ServeBenchSettings) -> Dict[str, Any]:
    """Every profile's floor and systems; `systems`/`floor` at the top are the first profile's."""
    if ray.is_initialized():
        raise RuntimeError("cfvit bench serve starts its own Ray for each request-path profile")
    files = _files(s)
    # Offline first, alone on the machine: all its CPUs for one process, as `cfvit bench throughput`.
    offline = (offline_reference(s.checkpoint, files, s.batch_size, s.offline_batches, s.eta, s.exit_rate,
                                 threads=os.cpu_count() or 1) if s.offline else {"eta": s.eta})
    eta = offline["eta"]
    cfg = _model_cfg(s.checkpoint)
    result: Dict[str, Any] = {
        "checkpoint": s.checkpoint, "model": cfg.get("name") or cfg.get("model_name"), "eta": eta,
        "exit_rate_target": s.exit_rate, "duration_s": s.duration_s, "replicas": s.replicas, "cpus": os.cpu_count(),
        "cpu": cpu_name(), "batch_size": s.batch_size, "images_per_request": s.per_request,
        "transport": s.transport, "body_bytes": int(np.mean([len(f) for f in files])), "offline": offline,
        "load_at_start": os.getloadavg()[0], "profiles": {}}
    for profile in s.profiles:
        result["profiles"][profile] = _profile_run(s, profile, files, eta)
    first = result["profiles"][s.profiles[0]]
    result["systems"], result["floor"] = first["systems"], first["floor"]
    return result


def label(spec: str) -> str:
    """`NAME:topology k=v …` → NAME; otherwise the spec itself."""
    head = spec.split()[0]
    return head.split(":", 1)[0] if ":" in head else spec


def strip_label(spec: str) -> str:
    head, *rest = spec.split()
    return " ".join([head.split(":", 1)[1] if ":" in head else head, *rest])


