"""`cfvit bench serve`: closed-loop HTTP load at rising concurrency against several deployments of one
checkpoint on the same machine (by default the split and fused CF-ViT topologies and the single-stage
backbone), one after the other, with where each request's time went (the app's `Server-Timing`
header) and the offline `infer_stream` figures of the same checkpoint at the same exit rate and batch
size as the target."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import httpx
import numpy as np
import ray
import torch
import yaml
from PIL import Image
from ray import serve
from rich import box
from rich.console import Console
from rich.table import Table

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.streaming import infer_stream
from cfvit.transforms import decode_image
from cfvit_common.checkpoints import resolve_checkpoint
from serve.app import build_app
from serve.inputs import PixelTransform, normalise
from serve.runner import start_ray
from serve.timing import parse_server_timing

from .failures import MAX_DISTINCT, ErrorLog, describe
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


def _summary(lat: List[float], stages: List[str], timings: List[Dict[str, float]], clients: int,
             errors: int, duration_s: float, per_request: int = 1) -> Dict[str, Any]:
    lat_ms = np.array(lat) * 1000
    keys = sorted({k for t in timings for k in t})
    breakdown = {k: float(np.mean([t[k] for t in timings if k in t])) for k in keys}
    if timings and "app" in breakdown:
        breakdown["proxy"] = float(np.mean([ms - t["app"] for ms, t in zip(lat_ms, timings) if "app" in t]))
    return {
        "concurrency": clients,
        "requests": len(lat),
        "errors": errors,
        "images_per_request": per_request,
        "throughput": len(lat) * per_request / duration_s,  # images/s
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else float("nan"),
        "exit_rate": (stages.count("coarse") / len(stages)) if stages else float("nan"),
        "breakdown": breakdown,
    }


def _request_body(files: List[bytes], i: int, per_request: int) -> Dict[str, Any]:
    """One image as a raw PNG body, or `per_request` images as the JSON batch form (base64)."""
    if per_request == 1:
        return {"content": files[i % len(files)], "headers": {"content-type": "image/png"}}
    batch = [base64.b64encode(files[(i + j) % len(files)]).decode() for j in range(per_request)]
    return {"json": {"images": batch}}


async def _closed_loop(url: str, files: List[bytes], clients: int, warmup_s: float, duration_s: float,
                       per_request: int = 1) -> Dict[str, Any]:
    lat, stages, timings, errors, failed = [], [], [], 0, ErrorLog()
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker(k: int):
            nonlocal errors
            i = k
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await client.post(url, **_request_body(files, i * per_request, per_request))
                    ok = r.status_code == 200
                    body = r.json() if ok else None
                    if not ok:
                        failed.add(r.status_code, r.text)
                except httpx.HTTPError as e:
                    ok, body, r = False, None, None
                    failed.add(0, f"{type(e).__name__}: {e}")
                t1 = time.perf_counter()
                if t0 >= t_start and t1 <= t_end:  # only requests wholly inside the window count
                    if ok:
                        lat.append(t1 - t0)
                        stages.extend([p["stage"] for p in body["predictions"]] if per_request > 1 else [body["stage"]])
                        timings.append(parse_server_timing(r.headers.get("server-timing", "")))
                    else:
                        errors += 1
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    # failures of the warm-up too: a system that fails there fails in the window as well
    return {**_summary(lat, stages, timings, clients, errors, duration_s, per_request),
            "failed_total": failed.total, "error_samples": failed.samples()}


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


def offline_reference(checkpoint: str, files: List[bytes], batch_size: int, n_batches: int,
                      eta: Optional[float], exit_rate: Optional[float], threads: int) -> Dict[str, Any]:
    """The same images through the library in this process: coarse confidences (→ η for `exit_rate`),
    then backbone and `infer_stream` images/s over `n_batches` batches of `batch_size`."""



    torch.set_num_threads(threads)
    model = cfvit.load(str(resolve_checkpoint(checkpoint))).eval()
    pt = PixelTransform(model.data_config)
    x = normalise(torch.stack([pt.pixels(decode_image(f)) for f in files]), pt.mean, pt.std)
    with torch.inference_mode():
        conf = torch.cat([model.coarse_stage(b).logits.float().softmax(-1).amax(-1) for b in x.split(batch_size)])
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


@dataclass
class ServeBenchSettings:
    """One `cfvit bench serve` run: the systems deployed one after the other and the load sent to each."""

    checkpoint: str
    levels: List[int] = field(default_factory=lambda: [1, 4, 16, 32])  # closed-loop client counts
    duration_s: float = 10.0
    warmup_s: float = 2.0
    eta: float = 0.5
    exit_rate: Optional[float] = None  # pick η so this share of the bench images exits (offline)
    n_images: int = 256
    replicas: int = 1
    port: int = 8123
    systems: Sequence[str] = DEFAULT_SYSTEMS
    batch_size: int = 16
    offline_batches: int = 6
    per_request: int = 1


def run_bench(s: ServeBenchSettings) -> Dict[str, Any]:
    checkpoint, levels, duration_s, warmup_s, exit_rate = s.checkpoint, s.levels, s.duration_s, s.warmup_s, s.exit_rate
    replicas, port, systems, batch_size, per_request = s.replicas, s.port, s.systems, s.batch_size, s.per_request
    n_images, offline_batches, eta = s.n_images, s.offline_batches, s.eta
    cfg = _model_cfg(checkpoint)
    files = bench_images({"name": cfg.get("name") or cfg.get("model_name"),
                          "input_size": cfg["data_config"]["input_size"]}, n_images)
    # Offline first, alone on the machine: all its CPUs for one process, as `cfvit bench throughput`.
    offline = offline_reference(checkpoint, files, batch_size, offline_batches, eta, exit_rate,
                                threads=os.cpu_count() or 1)
    eta = offline["eta"]
    result: Dict[str, Any] = {"checkpoint": checkpoint, "eta": eta, "exit_rate_target": exit_rate,
                              "duration_s": duration_s, "replicas": replicas, "cpus": os.cpu_count(),
                              "batch_size": batch_size, "images_per_request": per_request, "offline": offline,
                              "systems": {}}
    started = start_ray(None)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for i, spec in enumerate(systems):
            args = system_args(spec, checkpoint, eta, replicas, batch_size)
            info = _deploy(args, f"bench-{i}", port)
            result["model"], result["stage_gflops"] = info["name"], info["stage_gflops"]
            url = f"http://127.0.0.1:{port}/v1/classify?eta={eta}"
            result["systems"][spec] = [asyncio.run(_closed_loop(url, files, c, warmup_s, duration_s, per_request))
                                       for c in levels]
            serve.delete(f"bench-{i}")
    finally:
        if ray.is_initialized():
            if started:
                serve.shutdown()
                ray.shutdown()
            else:
                for i in range(len(systems)):
                    try:
                        serve.delete(f"bench-{i}")
                    except Exception:  # noqa: BLE001 - best effort on a shared cluster
                        pass
    return result


def label(spec: str) -> str:
    """`NAME:topology k=v …` → NAME; otherwise the spec itself."""
    head = spec.split()[0]
    return head.split(":", 1)[0] if ":" in head else spec


def strip_label(spec: str) -> str:
    head, *rest = spec.split()
    return " ".join([head.split(":", 1)[1] if ":" in head else head, *rest])


def _rank(key: str):
    """Breakdown rows in request order: proxy, read, decode, then each stage's hop, queue, compute, reply."""
    fixed = {"proxy": 0, "read": 1, "decode": 2, "app": 99}
    if key in fixed:
        return (fixed[key], key)
    stage, _, part = key.rpartition("_")
    parts = ("in", "fetch", "queue", "compute", "out", "batch")
    return (10 + 10 * (stage == "fine") + (parts.index(part) if part in parts else 9), key)


def answered_nothing(result: Dict[str, Any]) -> List[str]:
    """The systems that failed every request they were sent (no answer at any level)."""
    return [spec for spec, rows in result["systems"].items()
            if not any(r["requests"] for r in rows) and any(r["errors"] or r.get("failed_total") for r in rows)]


def served_ratios(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per CF-ViT system and level: served ÷ backbone (same clients; and at equal p99), vs offline. No ratio
    at a level where either system answered nothing."""
    systems = result["systems"]
    base = next((rows for spec, rows in systems.items() if strip_label(spec).split()[0] == "backbone"), None)
    off = result["offline"]
    out = []
    for spec, rows in systems.items():
        if base is None or rows is base:
            continue
        p99 = [r["ratio"] for r in ratio_at_equal_p99(rows, base)]
        for r, b in zip(rows, base):
            if not (r["requests"] and b["requests"]):
                continue
            ratio = r["throughput"] / b["throughput"]
            out.append({"system": label(spec), "clients": r["concurrency"], "ratio": ratio,
                        "p99_lo": min(p99) if p99 else float("nan"), "p99_hi": max(p99) if p99 else float("nan"),
                        "offline": off["ratio"], "of_offline": ratio / off["ratio"]})
    return out


def print_report(result: Dict[str, Any]) -> None:
    console = Console(width=80)
    off, systems = result["offline"], result["systems"]
    console.print(f"cfvit bench serve — {result.get('model')} · η={result['eta']:.5g} · {result['cpus']} CPUs")
    console.print(f"batch {result['batch_size']} · {result.get('images_per_request', 1)} image(s) per request · "
                  f"{result['duration_s']:.0f} s per level")
    load = Table(box=box.SIMPLE, title="closed-loop load")
    for col in ("clients", "system", "img/s", "p50 ms", "p99 ms", "errors", "exits"):
        load.add_column(col, justify="right")
    for spec, rows in systems.items():
        for r in rows:
            exits = "—" if strip_label(spec).startswith("backbone") else f"{100 * r['exit_rate']:.0f}%"
            load.add_row(str(r["concurrency"]), label(spec)[:24], f"{r['throughput']:.1f}", f"{r['p50_ms']:.0f}",
                         f"{r['p99_ms']:.0f}", str(r["errors"]), exits)
    console.print(load)
    console.print(f"offline (infer_stream, {off['threads']} threads, {off['n_batches']}×{off['batch_size']}): "
                  f"backbone {off['backbone_ips']:.1f} img/s, CF-ViT {off['cfvit_ips']:.1f} img/s at "
                  f"{100 * off['exit_rate']:.0f}% exits = {off['ratio']:.2f}×")
    ratios = Table(box=box.SIMPLE, title="CF-ViT ÷ backbone: served vs offline")
    for col in ("system", "clients", "served", "equal p99", "offline", "of offline"):
        ratios.add_column(col, justify="right")
    for r in served_ratios(result):
        p99 = "—" if not np.isfinite(r["p99_lo"]) else f"{r['p99_lo']:.2f}–{r['p99_hi']:.2f}×"
        ratios.add_row(r["system"][:24], str(r["clients"]), f"{r['ratio']:.2f}×", p99, f"{r['offline']:.2f}×",
                       f"{r['of_offline']:.2f}")
    console.print(ratios)
    for spec, rows in systems.items():
        best = max(r["throughput"] for r in rows)
        if strip_label(spec).split()[0] == "backbone" and best > 0:
            console.print(f"served backbone ({label(spec)}) ÷ offline backbone: {best:.1f} / "
                          f"{off['backbone_ips']:.1f} = {best / off['backbone_ips']:.2f} (best level)")
    _print_breakdown(console, systems)
    print_failures(result, console)


def print_failures(result: Dict[str, Any], console: Console) -> None:
    """Per system with failed requests: how many, and the first distinct statuses and error bodies."""
    for spec, rows in result["systems"].items():
        samples: Dict[tuple, Dict[str, Any]] = {}
        for r in rows:
            for e in r.get("error_samples", []):
                samples.setdefault((e["status"], e["body"]), {**e, "count": 0})["count"] += e["count"]
        failed = sum(r.get("failed_total", r["errors"]) for r in rows)
        for line in describe(label(spec), list(samples.values())[:MAX_DISTINCT], failed):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    for spec in answered_nothing(result):
        console.print(f"{label(spec)} answered no request: none of its figures above means anything",
                      markup=False, style="bold red")


def _print_breakdown(console, systems: Dict[str, List[Dict[str, Any]]]) -> None:
    levels = [r["concurrency"] for r in next(iter(systems.values()))]
    for li, c in enumerate(levels):
        t = Table(box=box.SIMPLE, title=f"where a request's time goes, {c} clients (ms; *_batch: images)")
        t.add_column("entry")
        for spec in systems:
            t.add_column(label(spec)[:12], justify="right")
        keys = sorted({k for rows in systems.values() for k in rows[li]["breakdown"]}, key=_rank)
        for k in keys:
            t.add_row(k, *(f"{rows[li]['breakdown'][k]:.1f}" if k in rows[li]["breakdown"] else ""
                           for rows in systems.values()))
        console.print(t)
