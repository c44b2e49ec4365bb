"""The two model stages as Serve deployments, each with dynamic batching.

`CoarseStage.run(image, eta)` answers the images whose top coarse probability reaches their own η
and returns, for the rest, the coarse state the fine stage needs (global class attention, coarse
output tokens, coarse input embedding). `FineStage.run(image, state)` finishes those. The ingress
composes them, so a coarse replica never waits on the fine stage (its autoscaling load is its own).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

from ray import serve
from ray.serve import metrics

from .model_host import load_model, placement, threads_for
from .settings import StageOptions

_LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
_BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class _Metrics:
    """Per-stage metrics through Ray Serve's metrics API (exported with Ray's Prometheus metrics)."""

    def __init__(self, stage: str):
        self.tags = {"stage": stage}
        self.latency = metrics.Histogram(
            "cfvit_stage_latency_ms", description="model time of one batch of a stage", boundaries=_LATENCY_MS,
            tag_keys=("stage",))
        self.batch = metrics.Histogram(
            "cfvit_stage_batch_size", description="images per batch of a stage", boundaries=_BATCH,
            tag_keys=("stage",))

    def observe(self, n: int, seconds: float) -> None:
        self.batch.observe(n, tags=self.tags)
        self.latency.observe(seconds * 1000.0, tags=self.tags)


class _Stage:
    def __init__(self, checkpoint: str, options: Dict[str, Any], stage: str):
        opts = StageOptions(**options)
        self.model, _ = load_model(checkpoint, threads_for(opts.num_cpus, opts.torch_threads))
        self.device, self.dtype = placement(opts.num_gpus, opts.precision)
        self.model.to(self.device)
        # One worker thread: torch runs off the event loop (health checks and queueing stay live),
        # one batch at a time.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cfvit-{stage}")
        self.run.set_max_batch_size(opts.max_batch_size)
        self.run.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)
        self.metrics = _Metrics(stage)

    def _batch(self, images):
        """Stack a batch of preprocessed images onto the replica's device."""
        import torch

        return torch.stack(images).to(self.device, non_blocking=True)

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    async def _compute(self, fn, *args):
        t0 = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        return out, time.perf_counter() - t0


@serve.deployment(name="CoarseStage", max_ongoing_requests=256)
class CoarseStage(_Stage):
    def __init__(self, checkpoint: str, options: Dict[str, Any]):
        super().__init__(checkpoint, options, "coarse")
        self.exits = metrics.Counter("cfvit_exits_total", description="images answered by each stage",
                                     tag_keys=("stage",))
        self.exit_rate = metrics.Gauge("cfvit_coarse_exit_rate",
                                       description="share of this replica's images answered by the coarse stage")
        self._seen = self._exited = 0

    def _forward(self, images, etas):
        import torch

        from cfvit.model import exit_mask

        with torch.inference_mode(), self._autocast():
            state = self.model.coarse_stage(self._batch(images))
        # Replies (and the state a fine replica picks up, maybe on another node) travel as CPU tensors.
        state = state.to("cpu")
        with torch.inference_mode():
            logits = state.logits.float()
            exits = exit_mask(logits, torch.tensor(etas, dtype=torch.float32))
            probs = logits.softmax(-1)
            out = []
            for i in range(len(images)):
                item = {"probs": probs[i].clone(), "exit": bool(exits[i])}
                if not exits[i]:
                    # A copy per sample (advanced indexing), so only its own tensors are serialised.
                    item["state"] = state[[i]]
                out.append(item)
            return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, images: List[Any], etas: List[float]) -> List[Dict[str, Any]]:
        out, dt = await self._compute(self._forward, images, etas)
        self.metrics.observe(len(images), dt)
        n_exit = sum(o["exit"] for o in out)
        if n_exit:
            self.exits.inc(n_exit, tags={"stage": "coarse"})
        if len(out) - n_exit:
            self.exits.inc(len(out) - n_exit, tags={"stage": "fine"})
        self._seen += len(out)
        self._exited += n_exit
        self.exit_rate.set(self._exited / self._seen)
        return out


@serve.deployment(name="FineStage", max_ongoing_requests=256)
class FineStage(_Stage):
    def __init__(self, checkpoint: str, options: Dict[str, Any]):
        super().__init__(checkpoint, options, "fine")

    def _forward(self, images, states):
        import torch

        from cfvit.model import CoarseState

        with torch.inference_mode(), self._autocast():
            state = CoarseState.cat(states).to(self.device, non_blocking=True)
            logits, selected = self.model.fine_stage(self._batch(images), state)
            probs = logits.float().softmax(-1).cpu()
            selected = selected.cpu()
            return [{"probs": probs[i].clone(), "selected": selected[i].tolist()} for i in range(len(images))]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, images: List[Any], states: List[Any]) -> List[Dict[str, Any]]:
        out, dt = await self._compute(self._forward, images, states)
        self.metrics.observe(len(images), dt)
        return out


@serve.deployment(name="BackboneStage", max_ongoing_requests=256)
class BackboneStage(_Stage):
    """The plain timm ViT of the same checkpoint on all fine tokens: the single-stage baseline."""

    def __init__(self, checkpoint: str, options: Dict[str, Any]):
        super().__init__(checkpoint, options, "backbone")

    def _forward(self, images):
        import torch

        with torch.inference_mode(), self._autocast():
            probs = self.model.vit(self._batch(images)).float().softmax(-1).cpu()
            return [{"probs": probs[i].clone()} for i in range(len(images))]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, images: List[Any]) -> List[Dict[str, Any]]:
        out, dt = await self._compute(self._forward, images)
        self.metrics.observe(len(images), dt)
        return out
