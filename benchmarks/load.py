"""Closed-loop clients for `cfvit bench serve`: `clients` concurrent callers, each sending its next request
when the previous one is answered, over HTTP (aiohttp, keep-alive connections) or gRPC (grpc.aio, one
HTTP/2 channel per address), to one address or spread over several (one per ingress replica with direct
ingress). The CPU of the machine and of this process tree is metered over the measured window."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import aiohttp
import grpc
import numpy as np

from serve.proto import cfvit_pb2 as pb
from serve.proto import cfvit_pb2_grpc as pb_grpc
from serve.timing import parse_server_timing

from .cpu_meter import CpuMeter
from .failures import ErrorLog


@dataclass
class LoadSpec:
    """What to send: `addresses` (host:port, clients spread over them), the files cycled through, images
    per request, the query (eta) and the transport."""

    transport: str  # "http" | "grpc"
    addresses: List[str]
    files: List[bytes]
    per_request: int = 1
    eta: Optional[float] = None
    headers: Dict[str, str] = field(default_factory=dict)  # e.g. authorization


@dataclass
class Outcome:
    ok: bool
    stages: List[str] = field(default_factory=list)
    timing: Dict[str, float] = field(default_factory=dict)
    status: int = 200  # a failure's HTTP status (gRPC: its status code's value); 0: no answer
    error: str = ""  # a failure's body, or the client's error


def _images(spec: LoadSpec, i: int) -> List[bytes]:
    return [spec.files[(i + j) % len(spec.files)] for j in range(spec.per_request)]


class _HttpCaller:
    def __init__(self, spec: LoadSpec, clients: int):
        self.spec = spec
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients, force_close=False),
                                             timeout=aiohttp.ClientTimeout(total=120))
        query = f"?eta={spec.eta}" if spec.eta is not None else ""
        self.urls = [f"http://{a}/v1/classify{query}" for a in spec.addresses]

    async def call(self, k: int, i: int) -> Outcome:
        files = _images(self.spec, i)
        if self.spec.per_request == 1:
            kw = {"data": files[0], "headers": {"content-type": "image/png", **self.spec.headers}}
        else:
            kw = {"json": {"images": [base64.b64encode(f).decode() for f in files]}, "headers": self.spec.headers}
        try:
            async with self.session.post(self.urls[k % len(self.urls)], **kw) as r:
                body = await r.read()
                if r.status != 200:
                    return Outcome(False, status=r.status, error=body.decode(errors="replace"))
                timing = parse_server_timing(r.headers.get("server-timing", ""))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return Outcome(False, status=0, error=f"{type(e).__name__}: {e}")
        answer = json.loads(body)
        preds = answer.get("predictions") or ([answer] if "stage" in answer else [])
        return Outcome(True, [p["stage"] for p in preds], timing)

    async def close(self) -> None:
        await self.session.close()


class _GrpcCaller:
    def __init__(self, spec: LoadSpec, clients: int):
        self.spec = spec
        self.channels = [grpc.aio.insecure_channel(a) for a in spec.addresses]
        self.stubs = [pb_grpc.ClassifierStub(c) for c in self.channels]
        self.metadata = tuple((k.lower(), v) for k, v in spec.headers.items())

    async def call(self, k: int, i: int) -> Outcome:
        request = pb.ClassifyRequest(images=_images(self.spec, i), eta=self.spec.eta)
        call = self.stubs[k % len(self.stubs)].Classify(request, metadata=self.metadata, timeout=120)
        try:
            reply = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            return Outcome(False, status=e.code().value[0], error=f"{e.code().name}: {e.details()}")
        timing = parse_server_timing(dict(trailing or ()).get("server-timing", ""))
        return Outcome(True, [p.stage for p in reply.predictions], timing)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


async def _run(spec: LoadSpec, clients: int, warmup_s: float, duration_s: float) -> Dict[str, Any]:
    caller = (_GrpcCaller if spec.transport == "grpc" else _HttpCaller)(spec, clients)
    lat: List[float] = []
    stages: List[str] = []
    timings: List[Dict[str, float]] = []
    errors = 0
    failed = ErrorLog()  # the warm-up's failures too: a system that fails there fails in the window as well
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    meter = CpuMeter()

    async def metered():
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        meter.start()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        return meter.stop()

    async def worker(k: int):
        nonlocal errors
        i = k * spec.per_request
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            out = await caller.call(k, i)
            t1 = time.perf_counter()
            if not out.ok:
                failed.add(out.status, out.error)
            if t0 >= t_start and t1 <= t_end:  # only requests wholly inside the window count
                if out.ok:
                    lat.append(t1 - t0)
                    stages.extend(out.stages)
                    timings.append(out.timing)
                else:
                    errors += 1
            i += clients * spec.per_request

    try:
        window, *_ = await asyncio.gather(metered(), *(worker(k) for k in range(clients)))
    finally:
        await caller.close()
    return {**summary(lat, stages, timings, clients, errors, duration_s, spec.per_request),
            **window.per(len(lat) + errors), "failed_total": failed.total, "error_samples": failed.samples()}


def closed_loop(spec: LoadSpec, clients: int, warmup_s: float, duration_s: float) -> Dict[str, Any]:
    """One level of closed-loop load: latency, throughput, exits, the Server-Timing breakdown, CPU per request."""
    return asyncio.run(_run(spec, clients, warmup_s, duration_s))


def summary(lat: List[float], stages: List[str], timings: List[Dict[str, float]], clients: int,
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
        "requests_per_s": len(lat) / duration_s,
        "throughput": len(lat) * per_request / duration_s,  # images/s
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else float("nan"),
        "exit_rate": (stages.count("coarse") / len(stages)) if stages else float("nan"),
        "breakdown": breakdown,
    }
