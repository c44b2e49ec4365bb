"""What `cfvit bench serve --autoscale` saw, per second and as figures: replicas of each deployment and Ray
nodes (sampled from Serve's controller and the GCS) beside the clients' p99, η and errors (benchmarks/burst.py's
per-second buckets); then the seconds from the load step to the first new replica, to a new node and to p99
back under the target, errors while scaling up and down, and what is left after the load falls. Pure
functions of the records: no Ray here."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
from rich.console import Console

from benchmarks.failures import describe
from cfvit_common.tables import compact_table

DEPLOYMENTS = {"ingress": "CFViTIngress", "coarse": "CoarseStage", "fine": "FineStage"}
PHASES = ("steady", "step", "down", "hard")
RECOVERED_FOR_S = 3  # p99 counts as back under the target once it stays there this many seconds


def phase_bounds(durations: Sequence[float]) -> Dict[str, tuple[float, float]]:
    """(start, end) seconds of each phase from its duration; a phase of 0 s is left out."""
    out, t = {}, 0.0
    for name, d in zip(PHASES, durations):
        if d > 0:
            out[name] = (t, t + d)
        t += d
    return out


def with_samples(rows: List[Dict[str, Any]], samples: List[Dict[str, Any]], width_s: float = 1.0
                 ) -> List[Dict[str, Any]]:
    """Each per-second row of client figures with the last replica/node sample taken in that second (or the
    one before it, when none was)."""
    out, last, k = [], {}, 0
    ordered = sorted(samples, key=lambda s: s["t"])
    for row in rows:
        while k < len(ordered) and ordered[k]["t"] < row["t"] + width_s:
            last = ordered[k]
            k += 1
        out.append({**row, "replicas": dict(last.get("replicas", {})), "nodes": last.get("nodes")})
    return out


def _first(samples: List[Dict[str, Any]], after: float, test) -> Optional[float]:
    """Seconds from `after` to the first sample at or after it for which `test` holds."""
    for s in sorted(samples, key=lambda s: s["t"]):
        if s["t"] >= after and test(s):
            return round(s["t"] - after, 1)
    return None


def _at(samples: List[Dict[str, Any]], t: float) -> Dict[str, Any]:
    """The last sample taken before `t` (the first one when none was)."""
    before = [s for s in samples if s["t"] < t]
    return max(before, key=lambda s: s["t"]) if before else min(samples, key=lambda s: s["t"])


def _total(s: Dict[str, Any]) -> int:
    return sum(s["replicas"].values())


def recovered_s(rows: List[Dict[str, Any]], start: float, end: float, target_ms: float) -> Optional[float]:
    """Seconds from `start` to the first second of [start, end), after p99 first went over the target, from
    which it stays at or under it for `RECOVERED_FOR_S` seconds (0 when it never went over); None: never."""
    window = [r for r in rows if start <= r["t"] < end and r["p99_ms"] is not None]
    over = next((i for i, r in enumerate(window) if r["p99_ms"] > target_ms), None)
    if over is None:
        return 0.0
    for i in range(over + 1, len(window)):
        run = window[i:i + RECOVERED_FOR_S]
        if len(run) == RECOVERED_FOR_S and all(x["p99_ms"] <= target_ms for x in run):
            return round(window[i]["t"] - start, 1)
    return None


def _errors(rows: List[Dict[str, Any]], bounds: Optional[tuple[float, float]]) -> Optional[int]:
    if bounds is None:
        return None
    return sum(r["errors"] for r in rows if bounds[0] <= r["t"] < bounds[1])


def _removed_after_peak(samples: List[Dict[str, Any]], bounds: Dict[str, tuple[float, float]], count
                        ) -> Optional[float]:
    """Seconds from the load's fall to the first sample, after the most `count` the step brought (which may
    come after the fall: replicas and nodes take time to start), that counts fewer."""
    lo, hi = bounds["step"][0], bounds["down"][1]
    window = [s for s in sorted(samples, key=lambda s: s["t"]) if lo <= s["t"] < hi]
    if not window:
        return None
    most = max(count(s) for s in window)
    peak = next(i for i, s in enumerate(window) if count(s) == most)
    fall = bounds["down"][0]
    removed = next((s for s in window[peak:] if count(s) < most and s["t"] >= fall), None)
    return None if removed is None else round(removed["t"] - fall, 1)


def figures(rows: List[Dict[str, Any]], samples: List[Dict[str, Any]], bounds: Dict[str, tuple[float, float]],
            target_ms: float) -> Dict[str, Any]:
    """The run's figures (seconds measured from the start of the phase they name; None: not seen)."""
    if not samples:
        return {}
    fig: Dict[str, Any] = {}
    if "step" in bounds:
        lo, hi = bounds["step"]
        base = _at(samples, lo)
        fig.update(
            step_to_new_replica_s=_first(samples, lo, lambda s: _total(s) > _total(base)),
            step_to_new_node_s=_first(samples, lo, lambda s: s["nodes"] > base["nodes"]),
            step_to_p99_under_target_s=recovered_s(rows, lo, hi, target_ms),
            errors_scaling_up=_errors(rows, bounds["step"]),
            replicas_before_step=base["replicas"], nodes_before_step=base["nodes"],
            replicas_peak={k: max(s["replicas"].get(k, 0) for s in samples) for k in base["replicas"]},
            nodes_peak=max(s["nodes"] for s in samples))
    if "down" in bounds and "step" in bounds:
        hi = bounds["down"][1]
        end = _at(samples, hi)
        fig.update(
            fall_to_replica_removed_s=_removed_after_peak(samples, bounds, _total),
            fall_to_node_removed_s=_removed_after_peak(samples, bounds, lambda s: s["nodes"]),
            errors_scaling_down=_errors(rows, bounds["down"]),
            replicas_after_fall=end["replicas"], nodes_after_fall=end["nodes"])
    if "hard" in bounds:
        lo, hi = bounds["hard"]
        during = [s for s in samples if lo <= s["t"] < hi] or [_at(samples, hi)]
        start = _at(samples, lo)
        fig.update(
            hard_replicas_start=start["replicas"],
            hard_replicas_peak={k: max(s["replicas"].get(k, 0) for s in during) for k in start["replicas"]},
            errors_hard=_errors(rows, bounds["hard"]))
    return fig


def plot_autoscale(result: Dict[str, Any], path: str) -> None:
    """Replicas of each deployment, Ray nodes, p99 (with the target) and η per second; phases shaded."""
    matplotlib.use("Agg")
    rows = result["per_second"]
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(7, 8), dpi=110, sharex=True)
    for name in DEPLOYMENTS:
        axes[0].step(t, [r["replicas"].get(name) for r in rows], where="post", label=name)
    axes[1].step(t, [r["nodes"] for r in rows], where="post", color="k")
    axes[2].plot(t, [r["p99_ms"] for r in rows], label="p99")
    axes[2].axhline(result["target_ms"], color="k", lw=0.8, ls="--", label="target")
    axes[2].set_yscale("log")
    errs = [(r["t"], r["p99_ms"]) for r in rows if r["errors"] and r["p99_ms"]]
    if errs:
        axes[2].scatter(*zip(*errs), color="C3", marker="x", label="errors", zorder=3)
    axes[3].plot(t, [r["eta"] for r in rows])
    names = ("replicas", "Ray nodes", "p99 latency (ms)", "mean η")
    for ax, name in zip(axes, names):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        for i, (phase, (lo, hi)) in enumerate(result["phases"].items()):
            ax.axvspan(lo, hi, color=f"C{i}", alpha=0.06)
    for i, (phase, (lo, hi)) in enumerate(result["phases"].items()):
        axes[0].text((lo + hi) / 2, 1.02, phase, transform=axes[0].get_xaxis_transform(), ha="center", fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[2].legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _reps(r: Optional[Dict[str, int]]) -> str:
    return "—" if not r else "/".join(str(r.get(k, "?")) for k in DEPLOYMENTS)


def _s(v) -> str:
    return "not seen" if v is None else f"{v:g}"


def print_autoscale(result: Dict[str, Any], console: Optional[Console] = None, every_s: int = 5) -> None:
    """The per-second figures every `every_s` seconds, then the figures, in 80 columns."""
    console = console or Console(width=80)
    s = result["settings"]
    console.print(f"{s['rate']:g} req/s, step ×{s['step_factor']:g}, hard share {s['hard_share']:g} → 1 · "
                  f"p99 target {result['target_ms']:g} ms · nodes: {'autoscaled' if s['nodes'] else 'one'}")
    tab = compact_table("s", "phase", "req", "err", "p99 ms", "η", "replicas i/c/f", "nodes",
                        title="per second (every %d s)" % every_s)
    for r in result["per_second"][::every_s]:
        phase = next((p for p, (lo, hi) in result["phases"].items() if lo <= r["t"] < hi), "")
        tab.add_row(f"{r['t']:.0f}", phase, str(r["requests"]), str(r["errors"]),
                    "—" if r["p99_ms"] is None else f"{r['p99_ms']:.0f}",
                    "—" if r["eta"] is None else f"{r['eta']:.2f}", _reps(r["replicas"]), str(r["nodes"]))
    console.print(tab)
    f = result["figures"]
    fig = compact_table("figure", "value", title="scaling (replicas: ingress/coarse/fine)")
    for label, v in (("step → first new replica (s)", _s(f.get("step_to_new_replica_s"))),
                     ("step → new node (s)", _s(f.get("step_to_new_node_s"))),
                     ("step → p99 under target (s)", _s(f.get("step_to_p99_under_target_s"))),
                     ("errors while scaling up", _s(f.get("errors_scaling_up"))),
                     ("replicas, nodes before → peak",
                      f"{_reps(f.get('replicas_before_step'))}, {f.get('nodes_before_step')} → "
                      f"{_reps(f.get('replicas_peak'))}, {f.get('nodes_peak')}"),
                     ("fall → first replica removed (s)", _s(f.get("fall_to_replica_removed_s"))),
                     ("fall → node removed (s)", _s(f.get("fall_to_node_removed_s"))),
                     ("errors while scaling down", _s(f.get("errors_scaling_down"))),
                     ("replicas, nodes after the fall",
                      f"{_reps(f.get('replicas_after_fall'))}, {f.get('nodes_after_fall')}"),
                     ("hard images: replicas start → peak",
                      f"{_reps(f.get('hard_replicas_start'))} → {_reps(f.get('hard_replicas_peak'))}"),
                     ("errors with hard images", _s(f.get("errors_hard")))):
        fig.add_row(label, v)
    console.print(fig)
    for line in describe("autoscale", result.get("error_samples", []), result.get("failed", 0), result.get("sent")):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
