"""The tables of `cfvit bench serve`: per request-path profile, the floor (Ray Serve's no-op paths) beside
the app's systems (throughput, latency, CPU per request), CF-ViT ÷ backbone served vs offline, the served
backbone vs offline, and where a request's time went (the app's Server-Timing)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from serve.request_path import profile_title

from .failures import MAX_DISTINCT, describe
from .serve import label, ratio_at_equal_p99, strip_label

_STAGE_BLOCKS = ("coarse.", "fine.", "fused.")


def _topology(spec: str) -> str:
    return strip_label(spec).split()[0]


def _pairing_key(spec: str) -> str:
    """A system's overrides that a backbone must share to be its baseline (stage-block tuning aside)."""
    _, *overrides = strip_label(spec).split()
    return " ".join(sorted(o for o in overrides if not o.startswith(_STAGE_BLOCKS)))


def baseline_of(spec: str, systems: Dict[str, Any]) -> Optional[str]:
    """The backbone system a CF-ViT system is compared with: the one with the same overrides, else the first."""
    backbones = [b for b in systems if _topology(b) == "backbone"]
    same = [b for b in backbones if _pairing_key(b) == _pairing_key(spec)]
    return (same or backbones or [None])[0]


def served_ratios(systems: Dict[str, List[Dict[str, Any]]], offline: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per CF-ViT system and level: served ÷ its backbone (same clients; and at equal p99), vs offline. No ratio
    at a level where either system answered nothing."""
    out = []
    for spec, rows in systems.items():
        base_spec = baseline_of(spec, systems)
        if base_spec is None or _topology(spec) == "backbone" or "ratio" not in offline:
            continue
        base = systems[base_spec]
        p99 = [r["ratio"] for r in ratio_at_equal_p99(rows, base)]
        for r, b in zip(rows, base):
            if not (r["requests"] and b["requests"]):
                continue
            ratio = r["throughput"] / b["throughput"]
            out.append({"system": label(spec), "baseline": label(base_spec), "clients": r["concurrency"],
                        "ratio": ratio, "p99_lo": min(p99) if p99 else float("nan"),
                        "p99_hi": max(p99) if p99 else float("nan"), "offline": offline["ratio"],
                        "of_offline": ratio / offline["ratio"]})
    return out


def _load_table(title: str, groups: Dict[str, Dict[str, List[Dict[str, Any]]]], per_request: int) -> Table:
    """One row per system and client count, in 80 columns (img/s only when a request holds several)."""
    t = Table(box=box.SIMPLE, title=title, padding=(0, 1))
    cols = ["system", "cl", "req/s"] + (["img/s"] if per_request > 1 else []) + [
        "p50", "p99", "CPU", "own", "err", "exits"]
    for col in cols:
        t.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    for kind, systems in groups.items():
        for spec, rows in systems.items():
            for r in rows:
                exits = "—" if kind == "floor" or _topology(spec) == "backbone" else f"{100 * r['exit_rate']:.0f}%"
                name = f"floor: {spec}" if kind == "floor" else label(spec)
                cells = [name[:20], str(r["concurrency"]), f"{r['requests_per_s']:.1f}"]
                cells += [f"{r['throughput']:.1f}"] if per_request > 1 else []
                cells += [f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['cpu_ms_per_request']:.2f}",
                          f"{r['own_cpu_ms_per_request']:.2f}", str(r["errors"]), exits]
                t.add_row(*cells)
    return t


def print_report(result: Dict[str, Any], console: Optional[Console] = None) -> None:
    console = console or Console(width=80)
    off, per_request = result["offline"], result.get("images_per_request", 1)
    console.print(f"cfvit bench serve — {result.get('model')} · η={result['eta']:.5g} · {result['cpus']} CPUs "
                  f"({result.get('cpu', '')}) · load average {result.get('load_at_start', float('nan')):.2f} at start")
    console.print(f"{result.get('transport', 'http')} · {per_request} image(s) per request "
                  f"of {result.get('body_bytes', 0):,} bytes · batch {result['batch_size']} · "
                  f"{result['duration_s']:.0f} s per level · cl: clients · p50, p99: latency in ms · CPU: ms of the "
                  f"whole machine's busy CPU per request (client included); own: of this bench's process tree "
                  f"(client + Ray)")
    if "ratio" in off:
        console.print(f"offline (infer_stream, {off['threads']} threads, {off['n_batches']}×{off['batch_size']}): "
                      f"backbone {off['backbone_ips']:.1f} img/s, CF-ViT {off['cfvit_ips']:.1f} img/s at "
                      f"{100 * off['exit_rate']:.0f}% exits = {off['ratio']:.2f}×")
    for profile, run in result.get("profiles", {"": result}).items():
        console.print(_load_table(profile_title(profile or "default"),
                                  {"floor": run.get("floor", {}), "app": run["systems"]}, per_request))
        _print_ratios(console, run["systems"], off)
        _print_breakdown(console, run["systems"])
        print_failures(run["systems"], console)


def answered_nothing(result: Dict[str, Any]) -> List[str]:
    """The systems (of every request-path profile) that failed every request they were sent."""
    out = []
    for run in result.get("profiles", {"": result}).values():
        out += [spec for spec, rows in run["systems"].items()
                if not any(r["requests"] for r in rows) and any(r["errors"] or r.get("failed_total") for r in rows)]
    return out


def print_failures(systems: Dict[str, List[Dict[str, Any]]], console: Console) -> None:
    """Per system with failed requests: how many, and the first distinct statuses and error bodies."""
    for spec, rows in systems.items():
        samples: Dict[tuple, Dict[str, Any]] = {}
        for r in rows:
            for e in r.get("error_samples", []):
                samples.setdefault((e["status"], e["body"]), {**e, "count": 0})["count"] += e["count"]
        failed = sum(r.get("failed_total", r["errors"]) for r in rows)
        for line in describe(label(spec), list(samples.values())[:MAX_DISTINCT], failed):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if not any(r["requests"] for r in rows) and failed:
            console.print(f"{label(spec)} answered no request: none of its figures above means anything",
                          markup=False, style="bold red")


def _print_ratios(console, systems, off) -> None:
    ratios = served_ratios(systems, off)
    if ratios:
        t = Table(box=box.SIMPLE, title="CF-ViT ÷ backbone: served vs offline")
        for col in ("system", "baseline", "cl", "served", "equal p99", "offline", "of offline"):
            t.add_column(col, justify="right", no_wrap=True)
        for r in ratios:
            p99 = "—" if not np.isfinite(r["p99_lo"]) else f"{r['p99_lo']:.2f}–{r['p99_hi']:.2f}×"
            t.add_row(r["system"][:20], r["baseline"][:12], str(r["clients"]), f"{r['ratio']:.2f}×", p99,
                      f"{r['offline']:.2f}×", f"{r['of_offline']:.2f}")
        console.print(t)
    for spec, rows in systems.items():
        if _topology(spec) == "backbone" and "backbone_ips" in off:
            best = max(r["throughput"] for r in rows)
            console.print(f"served backbone ({label(spec)}) ÷ offline backbone: {best:.1f} / "
                          f"{off['backbone_ips']:.1f} = {best / off['backbone_ips']:.2f} (best level)")


def _rank(key: str):
    """Breakdown rows in request order: proxy, read, decode, then each stage's hop, queue, compute, reply."""
    fixed = {"proxy": 0, "read": 1, "decode": 2, "app": 99}
    if key in fixed:
        return (fixed[key], key)
    stage, _, part = key.rpartition("_")
    parts = ("in", "fetch", "queue", "compute", "out", "batch")
    return (10 + 10 * (stage == "fine") + (parts.index(part) if part in parts else 9), key)


def _print_breakdown(console, systems: Dict[str, List[Dict[str, Any]]]) -> None:
    if not systems:
        return
    levels = [r["concurrency"] for r in next(iter(systems.values()))]
    for li, c in enumerate(levels):
        t = Table(box=box.SIMPLE, title=f"where a request's time goes, {c} clients (ms; *_batch: images)")
        t.add_column("entry", no_wrap=True)
        for spec in systems:
            t.add_column(label(spec)[:12], justify="right", no_wrap=True)
        keys = sorted({k for rows in systems.values() for k in rows[li]["breakdown"]}, key=_rank)
        for k in keys:
            t.add_row(k, *(f"{rows[li]['breakdown'][k]:.1f}" if k in rows[li]["breakdown"] else ""
                           for rows in systems.values()))
        console.print(t)
