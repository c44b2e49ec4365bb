"""`cfvit bench serve --burst`: an open-loop traffic step against one CF-ViT deployment, SLO mode off and on.

Requests arrive at `rate`/s (Poisson, seeded) for `steady_s`, at `burst_factor` × that for `burst_s`, then
at `rate` again for `after_s`. Arrivals never wait for replies (open loop, as real users do), and latency
runs from each request's scheduled arrival, so client-side queueing counts. Every request is one labelled
Fashion-MNIST test image (held out from calibration), so accuracy during the burst is measured, next to
the η each reply was answered with, its GFLOPs and its status. Per second: p99, errors, mean η, mean
GFLOPs, accuracy; a PNG with p99 and η over time for both runs.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import httpx
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import ray
from ray import serve
from rich.console import Console
from rich.table import Table

from benchmarks.failures import BODY_CHARS, ErrorLog, describe
from benchmarks.serve import _deploy, png_files, system_args
from cfvit.data import load_fashion_mnist
from serve.runner import start_ray


def labelled_images(n: int, start: int = 5000) -> tuple[List[bytes], np.ndarray]:
    """PNG files and labels of Fashion-MNIST test images from `start` on (calibration reads the first 5,000)."""
    x, y = load_fashion_mnist("test")
    return png_files(x[start:start + n]), np.asarray(y[start:start + n])


def arrivals(phases: Sequence[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Poisson arrival times for consecutive (duration_s, rate) phases."""
    rng, out, t0 = np.random.default_rng(seed), [], 0.0
    for duration, rate in phases:
        t = t0 + rng.exponential(1 / rate)
        while t < t0 + duration:
            out.append(t)
            t += rng.exponential(1 / rate)
        t0 += duration
    return np.array(out)


async def open_loop(url: str, files: List[bytes], labels: np.ndarray, times: np.ndarray,
                    timeout_s: float = 10.0) -> List[Dict[str, Any]]:
    """One request per arrival time; each record: arrival t, latency ms, status, stage, eta, gflops, correct."""
    records: List[Dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()

        async def one(i: int, at: float):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            rec: Dict[str, Any] = {"t": float(at), "status": 0}
            try:
                r = await client.post(url, content=files[i % len(files)], headers={"content-type": "image/png"})
                rec["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    rec.update(stage=body["stage"], eta=body["eta"], gflops=body["gflops"],
                               correct=int(body["label"] == int(labels[i % len(labels)])))
                else:
                    rec["error"] = r.text[:BODY_CHARS]
            except httpx.HTTPError as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["latency_ms"] = (time.perf_counter() - (start + at)) * 1000
            records.append(rec)

        await asyncio.gather(*(one(i, at) for i, at in enumerate(times)))
    return sorted(records, key=lambda r: r["t"])


def per_second(records: List[Dict[str, Any]], width_s: float = 1.0) -> List[Dict[str, Any]]:
    """Buckets by arrival time: requests, errors, p99 latency, mean η, mean GFLOPs, accuracy."""
    if not records:
        return []
    out = []
    for k in range(int(max(r["t"] for r in records) // width_s) + 1):
        rs = [r for r in records if k * width_s <= r["t"] < (k + 1) * width_s]
        out.append({"t": k * width_s, **_stats(rs)})
    return out


def _stats(rs: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in rs if r["status"] == 200]
    lat = [r["latency_ms"] for r in rs]
    mean = (lambda k: float(np.mean([r[k] for r in ok])) if ok else None)
    return {"requests": len(rs), "errors": len(rs) - len(ok),
            "p99_ms": float(np.percentile(lat, 99)) if lat else None,
            "p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "eta": mean("eta"), "gflops": mean("gflops"), "accuracy": mean("correct"),
            "exit_rate": float(np.mean([r["stage"] == "coarse" for r in ok])) if ok else None}


def phase_stats(records: List[Dict[str, Any]], bounds: Dict[str, tuple[float, float]]) -> Dict[str, Dict[str, Any]]:
    return {name: _stats([r for r in records if lo <= r["t"] < hi]) for name, (lo, hi) in bounds.items()}


def table_accuracy(table: Optional[List[Dict[str, float]]], eta: Optional[float]) -> Optional[float]:
    """The calibrated accuracy of the η table point nearest to `eta` (what the table predicts for it)."""
    pts = [p for p in table or [] if p.get("accuracy") is not None]
    if eta is None or not pts:
        return None
    return float(min(pts, key=lambda p: abs(p["eta"] - eta))["accuracy"])


@dataclass
class BurstSettings:
    """One `cfvit bench serve --burst` run: the traffic step, SLO mode's settings and the deployment."""

    checkpoint: str
    rate: float  # steady requests/s
    burst_factor: float = 3.0  # load during the burst ÷ steady load
    steady_s: float = 15.0
    burst_s: float = 20.0
    after_s: float = 20.0
    slo_ms: float = 100.0  # SLO mode's p99 target
    min_eta: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    eta: float = 0.5
    stages: str = "split"
    replicas: int = 1
    batch_size: int = 16
    port: int = 8123
    seed: int = 0


def run_burst(s: BurstSettings) -> Dict[str, Any]:
    """Deploy the checkpoint twice (SLO mode off, then on), send the same arrival schedule to each."""
    checkpoint, rate, burst_factor, eta, stages, port = s.checkpoint, s.rate, s.burst_factor, s.eta, s.stages, s.port
    steady_s, burst_s, after_s, slo_ms, seed = s.steady_s, s.burst_s, s.after_s, s.slo_ms, s.seed
    phases = [(steady_s, rate), (burst_s, burst_factor * rate), (after_s, rate)]
    times = arrivals(phases, seed)
    files, labels = labelled_images(2000)
    bounds = {"steady": (0, steady_s), "burst": (steady_s, steady_s + burst_s),
              "after": (steady_s + burst_s, steady_s + burst_s + after_s)}
    slo = {"latency_slo_ms": slo_ms, "min_eta": s.min_eta, "max_accuracy_drop": s.max_accuracy_drop,
           "slo_window_s": 2.0, "slo_check_s": 0.5, "slo_min_samples": 10}
    result: Dict[str, Any] = {"checkpoint": checkpoint, "rate": rate, "burst_factor": burst_factor, "phases": bounds,
                              "slo_ms": slo_ms, "eta": eta, "stages": stages, "replicas": s.replicas, "runs": {}}
    started = start_ray(None)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, extra in (("slo-off", {}), ("slo-on", slo)):
            args = {**system_args(stages, checkpoint, eta, s.replicas, s.batch_size), **extra, "shadow_fraction": 0.0}
            info = _deploy(args, f"burst-{mode}", port)
            url = f"http://127.0.0.1:{port}/v1/classify"
            asyncio.run(open_loop(url, files, labels, arrivals([(3.0, rate)], seed + 1)))  # warm-up, not counted
            records = asyncio.run(open_loop(url, files, labels, times))
            result["eta_table"] = info.get("eta_table")
            result["runs"][mode] = {"per_second": per_second(records), "phases": phase_stats(records, bounds),
                                    "slo": _get(port, "slo"), **failures(records)}
            serve.delete(f"burst-{mode}")
    finally:
        if ray.is_initialized() and started:
            serve.shutdown()
            ray.shutdown()
    return result


def failures(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """How many requests failed, of how many, and the first distinct statuses and error bodies."""
    log = ErrorLog()
    for r in records:
        if r["status"] != 200:
            log.add(r["status"], r.get("error", ""))
    return {"sent": len(records), "failed": log.total, "error_samples": log.samples()}


def answered_nothing(result: Dict[str, Any]) -> List[str]:
    """The runs (slo-off, slo-on) in which every request failed."""
    return [mode for mode, run in result["runs"].items() if run["sent"] and run["failed"] == run["sent"]]


def _get(port: int, key: str):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json().get(key)
    except httpx.HTTPError:
        return None


def plot_burst(result: Dict[str, Any], path: str) -> None:
    matplotlib.use("Agg")

    fig, axes = plt.subplots(3, 1, figsize=(7, 7), dpi=110, sharex=True)
    for mode, run in result["runs"].items():
        ps = run["per_second"]
        t = [p["t"] for p in ps]
        axes[0].plot(t, [p["p99_ms"] for p in ps], label=mode)
        axes[1].plot(t, [p["eta"] for p in ps], label=mode)
        axes[2].plot(t, [None if p["accuracy"] is None else 100 * p["accuracy"] for p in ps], label=mode)
    axes[0].axhline(result["slo_ms"], color="k", lw=0.8, ls="--", label="p99 target")
    axes[0].set_yscale("log")
    for ax, name in zip(axes, ("p99 latency (ms)", "mean η", "top-1 (%)")):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        lo, hi = result["phases"]["burst"]
        ax.axvspan(lo, hi, color="C3", alpha=0.08)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("seconds (shaded: the burst)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_burst(result: Dict[str, Any], console: Optional[Console] = None) -> None:
    console = console or Console(width=80)
    r, f = result["rate"], result["burst_factor"]
    console.print(f"{result['stages']} · {r:g} req/s, {f:g}× burst · p99 target {result['slo_ms']:g} ms")
    tab = Table("mode", "phase", "req", "err", "p99 ms", "η", "GFLOPs", "top-1", "table")
    for mode, run in result["runs"].items():
        for phase, s in run["phases"].items():
            pred = table_accuracy(result.get("eta_table"), s["eta"])
            tab.add_row(mode, phase, str(s["requests"]), str(s["errors"]), _f(s["p99_ms"], "{:.0f}"),
                        _f(s["eta"], "{:.3f}"), _f(s["gflops"], "{:.4f}"), _f(s["accuracy"], "{:.1%}"),
                        _f(pred, "{:.1%}"))
    console.print(tab)
    for mode, run in result["runs"].items():
        for line in describe(mode, run.get("error_samples", []), run.get("failed", 0), run.get("sent")):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def _f(v, fmt: str) -> str:
    return "—" if v is None else fmt.format(v)
