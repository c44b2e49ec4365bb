"""`cfvit bench serve`: closed-loop HTTP load at rising concurrency against the CF-ViT application and
against the single-stage backbone of the same checkpoint, deployed the same way on the same machine."""
from __future__ import annotations

import asyncio
import io
import os
import time
from typing import Any, Dict, List

import numpy as np


def bench_images(model_cfg: Dict[str, Any], n: int, seed: int = 0) -> List[bytes]:
    """PNG files as users have them: Fashion-MNIST test images for the fmnist model, else noise."""
    from PIL import Image

    c, h, w = model_cfg["input_size"]
    arrays = None
    if c == 1 and "fmnist" in str(model_cfg.get("name", "")):
        try:
            from cfvit.data import load_fashion_mnist

            arrays = load_fashion_mnist("test")[0][:n]
        except FileNotFoundError:
            arrays = None
    if arrays is None:
        rng = np.random.default_rng(seed)
        arrays = rng.integers(0, 256, size=(n, h, w) if c == 1 else (n, h, w, 3), dtype=np.uint8)
    files = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files


async def _closed_loop(url: str, files: List[bytes], clients: int, warmup_s: float, duration_s: float) -> Dict[str, Any]:
    import httpx

    lat, stages, gflops, errors = [], [], [], 0
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker(k: int):
            nonlocal errors
            i = k
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await client.post(url, content=files[i % len(files)], headers={"content-type": "image/png"})
                    ok = r.status_code == 200
                    body = r.json() if ok else None
                except httpx.HTTPError:
                    ok, body = False, None
                t1 = time.perf_counter()
                if t0 >= t_start and t1 <= t_end:  # only requests wholly inside the window count
                    if ok:
                        lat.append(t1 - t0)
                        stages.append(body["stage"])
                        gflops.append(body["gflops"])
                    else:
                        errors += 1
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    lat_ms = np.array(lat) * 1000
    return {
        "concurrency": clients,
        "requests": len(lat),
        "errors": errors,
        "throughput": len(lat) / duration_s,
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else float("nan"),
        "exit_rate": (stages.count("coarse") / len(stages)) if stages else float("nan"),
        "mean_gflops": float(np.mean(gflops)) if gflops else float("nan"),
    }


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


def _deploy(args: Dict[str, Any], name: str, port: int) -> Dict[str, Any]:
    import httpx
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(args), name=name, route_prefix="/")
    return httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()


def run_bench(checkpoint: str, levels: List[int], duration_s: float = 10.0, warmup_s: float = 2.0,
              eta: float = 0.5, n_images: int = 256, replicas: int = 1, port: int = 8123) -> Dict[str, Any]:
    import ray
    from ray import serve

    from serve.runner import start_ray

    started = start_ray(None)
    # Fixed replica counts (no autoscaling) and one torch thread per replica, so both systems get the
    # same CPU: CF-ViT `replicas` coarse + `replicas` fine, the backbone 2 × `replicas`.
    stage = {"num_cpus": 0, "torch_threads": 1, "autoscaling_config": None, "max_batch_size": 32}
    common = {"checkpoint": checkpoint, "eta": eta, "ingress_num_cpus": 0, "ingress_autoscaling_config": None}
    systems = {
        "cfvit": {**common, "coarse": {**stage, "num_replicas": replicas},
                  "fine": {**stage, "num_replicas": replicas, "batch_wait_timeout_s": 0.01}},
        "backbone": {**common, "stages": "backbone", "coarse": {**stage, "num_replicas": 2 * replicas}},
    }
    result: Dict[str, Any] = {"checkpoint": checkpoint, "eta": eta, "duration_s": duration_s,
                              "replicas": replicas, "cpus": os.cpu_count()}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, args in systems.items():
            info = _deploy(args, f"bench-{name}", port)
            files = bench_images(info, n_images)
            result["model"] = info["name"]
            result["stage_gflops"] = info["stage_gflops"]
            url = f"http://127.0.0.1:{port}/v1/classify" + (f"?eta={eta}" if name == "cfvit" else "")
            result[name] = [asyncio.run(_closed_loop(url, files, c, warmup_s, duration_s)) for c in levels]
            serve.delete(f"bench-{name}")
        result["ratio_at_equal_p99"] = ratio_at_equal_p99(result["cfvit"], result["backbone"])
    finally:
        if ray.is_initialized():
            if started:
                serve.shutdown()
                ray.shutdown()
            else:
                for name in systems:
                    try:
                        serve.delete(f"bench-{name}")
                    except Exception:  # noqa: BLE001 - best effort on a shared cluster
                        pass
    return result


def print_report(result: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    g = result.get("stage_gflops", {})
    table = Table(title=f"cfvit bench serve — {result.get('model')} · η={result['eta']} · {result['cpus']} CPUs · "
                        f"{result['duration_s']:.0f}s per level")
    for col in ("clients", "system", "img/s", "p50 ms", "p99 ms", "errors", "coarse exits", "GFLOPs/img"):
        table.add_column(col, justify="right")
    for cf, bb in zip(result["cfvit"], result["backbone"]):
        for name, r in (("CF-ViT", cf), ("backbone", bb)):
            table.add_row(str(r["concurrency"]), name, f"{r['throughput']:.1f}", f"{r['p50_ms']:.1f}",
                          f"{r['p99_ms']:.1f}", str(r["errors"]),
                          "—" if name == "backbone" else f"{100 * r['exit_rate']:.0f}%", f"{r['mean_gflops']:.4f}")
    console.print(table)
    if g:
        console.print(f"stage GFLOPs: coarse {g.get('coarse', 0):.4f}, fine {g.get('fine', 0):.4f}")
    ratio = Table(title="throughput ratio CF-ViT / backbone at equal p99")
    for col in ("p99 ms", "CF-ViT img/s", "backbone img/s", "ratio"):
        ratio.add_column(col, justify="right")
    for r in result["ratio_at_equal_p99"]:
        ratio.add_row(f"{r['p99_ms']:.1f}", f"{r['cfvit_rps']:.1f}", f"{r['backbone_rps']:.1f}", f"{r['ratio']:.2f}×")
    if not result["ratio_at_equal_p99"]:
        console.print("[yellow]the two p99 ranges do not overlap; no ratio at equal p99[/yellow]")
    console.print(ratio)
