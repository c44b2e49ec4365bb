"""Where a request's time goes, as a `Server-Timing` header (RFC-style `name;dur=ms` entries).

Entries, in milliseconds (averaged over the images of a request where there are several):
`read` (body read and parsed), `decode` (decode, resize, crop), then per hop `<stage>_in` (ingress →
replica: routing and (de)serialising the arguments), `<stage>_queue` (waiting in the replica for the
batch to start; for the fused fine stage this is the pooling wait), `<stage>_compute` (the batch's
model time), `<stage>_out` (reply back to the ingress), `fine_fetch` (split: image + coarse state
fetched from the object store), and `app` (the whole handler). `<stage>_batch;desc=N`: the batch
size the image ran in. The HTTP proxy's share is what a client measures minus `app`.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping

_ENTRY = re.compile(r'\s*([\w-]+)\s*(?:;\s*dur=([\d.eE+-]+))?\s*(?:;\s*desc="?([^",;]*)"?)?\s*')


def server_timing(per_image: List[Mapping[str, float]], ingress: Mapping[str, float], total_ms: float) -> str:
    sums: Dict[str, List[float]] = {}
    for t in per_image:
        for k, v in t.items():
            sums.setdefault(k, []).append(float(v))
    parts = [f"{k};dur={v:.2f}" for k, v in ingress.items()]
    for k, vs in sums.items():
        mean = sum(vs) / len(vs)
        parts.append(f'{k};desc="{mean:g}"' if k.endswith("_batch") else f"{k};dur={mean:.2f}")
    parts.append(f"app;dur={total_ms:.2f}")
    return ", ".join(parts)


def parse_server_timing(header: str) -> Dict[str, float]:
    """`Server-Timing` header → {name: ms, or batch size for `*_batch`}."""
    out: Dict[str, float] = {}
    for part in (header or "").split(","):
        m = _ENTRY.fullmatch(part)
        if not m:
            continue
        name, dur, desc = m.groups()
        value = dur if dur is not None else desc
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out
