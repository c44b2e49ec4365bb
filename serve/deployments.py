"""The model stages as Serve deployments, each with dynamic batching (`serve.batching.GreedyBatcher`:
a batch is cut when the model is free, from everything that queued meanwhile).

Every `run` takes all the images of one request in one call (uint8 pixels, or float32 when the app's
`wire_dtype` says so), queues each in the replica's batch queue, and answers per image with a
`serve.messages.StageAnswer` — the same shape for every topology — carrying its timings (milliseconds:
time in transit to the replica, queueing for a batch, batch compute, batch size), which the ingress
returns as a `Server-Timing` header.

- split: `CoarseStage.run` answers the images whose top coarse probability reaches their own η; for
  the rest it puts image + coarse state into the object store and returns only the reference
  (`handoff="direct"`), which the ingress passes to `FineStage.run`: the state never travels through
  the ingress. A coarse replica never waits on the fine stage, so each autoscales on its own load.
- fused: `FusedStage.run` runs both stages in one replica: coarse batches, then the hard images of
  consecutive coarse batches pooled into fine batches (as `cfvit.streaming.infer_stream` does offline).
- backbone: `BackboneStage.run`, the plain ViT on every fine token (the single-stage baseline).

`FusedModel` and `BackboneModel` are the plain classes behind `FusedStage` and `BackboneStage`: with
`model_in_ingress` the ingress replica holds one itself and awaits its `run` directly (no hop, nothing
serialised; the shadowed images' handoffs stay in the process instead of the object store).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import ray
import torch
from ray import serve
from ray.serve import metrics

from cfvit.model import CoarseState, exit_mask

from .batching import GreedyBatcher
from .inputs import normalise
from .messages import BatchTiming, Handoff, StageAnswer, VersionMismatch
from .model_host import load_model, model_identity, placement, threads_for
from .settings import StageOptions

_LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
_BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class _Metrics:
    """Per-stage metrics through Ray Serve's metrics API (exported with Ray's Prometheus metrics)."""

    def __init__(self):
        tags = ("stage",)
        self.latency = metrics.Histogram("cfvit_stage_latency_ms", description="model time of one batch of a stage",
                                         boundaries=_LATENCY_MS, tag_keys=tags)
        self.batch = metrics.Histogram("cfvit_stage_batch_size", description="images per batch of a stage",
                                       boundaries=_BATCH, tag_keys=tags)
        self.queue = metrics.Histogram("cfvit_stage_queue_ms", description="time an image waits in a replica "
                                       "for its batch to start", boundaries=_LATENCY_MS, tag_keys=tags)
        self.exits = metrics.Counter("cfvit_exits_total", description="images answered by each stage", tag_keys=tags)
        self.exit_rate = metrics.Gauge("cfvit_coarse_exit_rate",
                                       description="share of this replica's images answered by the coarse stage")
        self._seen = self._exited = 0

    def observe(self, stage: str, n: int, seconds: float) -> None:
        self.batch.observe(n, tags={"stage": stage})
        self.latency.observe(seconds * 1000.0, tags={"stage": stage})

    def exited(self, n_exit: int, n: int) -> None:
        if n_exit:
            self.exits.inc(n_exit, tags={"stage": "coarse"})
        if n - n_exit:
            self.exits.inc(n - n_exit, tags={"stage": "fine"})
        self._seen += n
        self._exited += n_exit
        self.exit_rate.set(self._exited / self._seen)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class _Stage:
    """Model, placement and the batched stage functions; the deployments below choose which they run."""

    def __init__(self, checkpoint: str, options: StageOptions, stage: str):
        self.opts = opts = options
        self.model, local = load_model(checkpoint, threads_for(opts.num_cpus, opts.torch_threads))
        # the version every answer of this replica carries (build_app binds one per deployment)
        self.version = model_identity(checkpoint, local, dict(getattr(self.model, "cfvit_config", {}) or {}))["version"]
        self.device, self.dtype = placement(opts.num_gpus, opts.precision)
        self.model.to(self.device)
        self.mean, self.std = self.model.data_config["mean"], self.model.data_config["std"]
        # One worker thread: torch runs off the event loop (health checks and queueing stay live),
        # one batch at a time.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cfvit-{stage}")
        self.metrics = _Metrics()

    def _batch(self, images):
        """Stack a batch onto the replica's device; uint8 pixels are normalised here, all at once."""
        x = torch.stack(images).to(self.device, non_blocking=True)
        return normalise(x, self.mean, self.std) if x.dtype == torch.uint8 else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    async def _compute(self, stage: str, fn, *args) -> List[Tuple[Any, BatchTiming]]:
        started = time.time()
        t0 = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        dt = time.perf_counter() - t0
        self.metrics.observe(stage, len(args[0]), dt)
        timing = BatchTiming(started=started, compute_ms=_ms(dt), size=len(args[0]))
        return [(o, timing) for o in out]

    # ------------------------------------------------------------------ model passes (executor thread)
    def _coarse_forward(self, images, etas, keeps) -> List[Tuple[StageAnswer, Optional[CoarseState]]]:
        """Each image's coarse answer, with its coarse state where the fine stage (or the drift monitor's
        shadow check) will need it."""
        with torch.inference_mode(), self._autocast():
            state = self.model.coarse_stage(self._batch(images))
        # Replies (and the state a fine replica picks up, maybe on another node) travel as CPU tensors.
        state = state.to("cpu")
        with torch.inference_mode():
            logits = state.logits.float()
            exits = exit_mask(logits, torch.tensor(etas, dtype=torch.float32)).tolist()
            probs = logits.softmax(-1)
            out = []
            for i in range(len(images)):
                p = probs[i].clone()  # a copy per sample, so only its own tensors are serialised
                answer = StageAnswer(stage="coarse", probs=p, exited=exits[i], coarse_probs=p)
                out.append((answer, state[[i]] if keeps[i] or not exits[i] else None))
            return out

    def _fine_forward(self, images, states) -> List[StageAnswer]:
        with torch.inference_mode(), self._autocast():
            state = CoarseState.cat(states).to(self.device, non_blocking=True)
            logits, selected = self.model.fine_stage(self._batch(images), state)
            probs = logits.float().softmax(-1).cpu()
            selected = selected.cpu().tolist()
            return [StageAnswer(stage="fine", probs=probs[i].clone(), selected=selected[i]) for i in range(len(images))]

    def _backbone_forward(self, images) -> List[StageAnswer]:
        with torch.inference_mode(), self._autocast():
            probs = self.model.vit(self._batch(images)).float().softmax(-1).cpu()
            return [StageAnswer(stage="backbone", probs=probs[i].clone()) for i in range(len(images))]

    # ------------------------------------------------------------------ batch functions (event loop)
    async def _coarse_batch(self, images: List[Any], etas: List[float], keeps: List[bool]):
        out = await self._compute("coarse", self._coarse_forward, images, etas, keeps)
        self.metrics.exited(sum(a.exited for (a, _), _ in out), len(out))
        return out

    async def _fine_batch(self, images: List[Any], states: List[CoarseState]):
        return await self._compute("fine", self._fine_forward, images, states)

    async def _backbone_batch(self, images: List[Any]):
        return await self._compute("backbone", self._backbone_forward, images)

    async def _queued(self, stage: str, call, timing: Dict[str, float], ready_at: float) -> Any:
        """Await one image's batched call and book its queueing, compute and batch size under `stage`."""
        out, batch = await call
        queue = max(0.0, batch.started - ready_at)
        self.metrics.queue.observe(queue * 1000.0, tags={"stage": stage})
        timing.update({f"{stage}_queue": _ms(queue), f"{stage}_compute": batch.compute_ms,
                       f"{stage}_batch": batch.size})
        return out

    async def _each(self, name: str, sent_at: float, items: List[Any], answer) -> List[StageAnswer]:
        """`answer(item, timing, arrived)` for every image of one call, concurrently; each reply carries its
        timings (`<name>_in` first) and the moment it left the replica (`done_at`, for `<name>_out`)."""
        now = time.time()
        timings = [_arrived(name, sent_at) for _ in items]
        outs = await asyncio.gather(*(answer(x, t, now) for x, t in zip(items, timings)))
        for out, t in zip(outs, timings):
            out.timing = {**t, **out.timing}
            out.done_at, out.version = time.time(), self.version
        return outs


def _arrived(name: str, sent_at: float) -> Dict[str, float]:
    return {f"{name}_in": _ms(max(0.0, time.time() - sent_at))}


@serve.deployment(name="CoarseStage", max_ongoing_requests=256)
class CoarseStage(_Stage):
    def __init__(self, checkpoint: str, options: StageOptions, handoff: str = "direct"):
        super().__init__(checkpoint, options, "coarse")
        self._coarse = GreedyBatcher(self._coarse_batch, self.opts.max_batch_size, self.opts.batch_wait_timeout_s)
        self.handoff = handoff

    async def run(self, images: List[Any], etas: List[float], sent_at: float,
                  shadows: Optional[List[bool]] = None) -> List[StageAnswer]:
        """`shadows`: the images whose coarse state is kept even when they exit (the drift monitor's sample)."""
        return await self._each("coarse", sent_at, list(zip(images, etas, shadows or [False] * len(images))),
                                self._one)

    async def _one(self, item, t: Dict[str, float], arrived: float) -> StageAnswer:
        """One image's coarse answer; a hard (or shadowed) one carries image + coarse state for the fine stage."""
        image, eta, keep = item
        answer, state = await self._queued("coarse", self._coarse(image, eta, keep), t, arrived)
        if state is not None:
            handoff = Handoff(image=image, state=state, version=self.version)
            answer.handoff = ray.put(handoff) if self.handoff == "direct" else handoff
        return answer


@serve.deployment(name="FineStage", max_ongoing_requests=256)
class FineStage(_Stage):
    def __init__(self, checkpoint: str, options: StageOptions):
        super().__init__(checkpoint, options, "fine")
        self._fine = GreedyBatcher(self._fine_batch, self.opts.max_batch_size, self.opts.batch_wait_timeout_s)

    async def run(self, handoffs: List[Any], sent_at: float) -> List[StageAnswer]:
        """`handoffs`: a `Handoff` per hard image, or object references to them (fetched here)."""
        timings = [_arrived("fine", sent_at) for _ in handoffs]
        t0 = time.time()
        refs = [h for h in handoffs if isinstance(h, ray.ObjectRef)]
        fetched = dict(zip(map(id, refs), await asyncio.gather(*refs))) if refs else {}
        items: List[Handoff] = [fetched.get(id(h), h) for h in handoffs]
        other = sorted({h.version for h in items} - {self.version})
        if other:  # a coarse replica of another version made these states: never finish them here
            raise VersionMismatch(f"fine stage of model version {self.version!r} refuses coarse states of "
                                  f"version(s) {other}")
        now = time.time()
        for t in timings:
            t["fine_fetch"] = _ms(now - t0)
        outs = await asyncio.gather(*(self._queued("fine", self._fine(h.image, h.state), t, now)
                                      for h, t in zip(items, timings)))
        for out, t in zip(outs, timings):
            out.timing, out.done_at, out.version = t, time.time(), self.version
        return outs


class FusedModel(_Stage):
    """Both stages in one replica: coarse batches of up to `max_batch_size` images, and the hard images
    of consecutive coarse batches pooled into fine batches of `fine_batch_size` (or fewer after
    `fine_wait_timeout_s`). Nothing but pixels in and answers out crosses the process boundary."""

    def __init__(self, checkpoint: str, options: StageOptions, embedded: bool = False):
        super().__init__(checkpoint, options, "fused")
        opts = self.opts
        self._share = (lambda handoff: handoff) if embedded else ray.put
        self._coarse = GreedyBatcher(self._coarse_batch, opts.max_batch_size, opts.batch_wait_timeout_s)
        self._fine = GreedyBatcher(self._fine_batch, opts.fine_batch_size, opts.fine_wait_timeout_s)

    async def _one(self, item, t: Dict[str, float], arrived: float) -> StageAnswer:
        image, eta, keep = item
        coarse, state = await self._queued("coarse", self._coarse(image, eta, keep), t, arrived)
        if coarse.exited:
            if state is not None:  # shadowed: the ingress sends it to `shadow` after replying
                coarse.handoff = self._share(Handoff(image=image, state=state, version=self.version))
            return coarse
        fine = await self._queued("fine", self._fine(image, state), t, time.time())
        return coarse.finished_by(fine)

    async def run(self, images: List[Any], etas: List[float], sent_at: float,
                  shadows: Optional[List[bool]] = None) -> List[StageAnswer]:
        return await self._each("fused", sent_at, list(zip(images, etas, shadows or [False] * len(images))),
                                self._one)

    async def shadow(self, handoffs: List[Any]) -> List[StageAnswer]:
        """The drift monitor's shadowed images (answered already) through this replica's fine pool."""
        items: List[Handoff] = [await h if isinstance(h, ray.ObjectRef) else h for h in handoffs]
        outs = await asyncio.gather(*(self._fine(h.image, h.state) for h in items))
        return [answer for answer, _ in outs]


FusedStage = serve.deployment(name="FusedStage", max_ongoing_requests=256)(FusedModel)


class BackboneModel(_Stage):
    """The plain timm ViT of the same checkpoint on all fine tokens: the single-stage baseline."""

    def __init__(self, checkpoint: str, options: StageOptions, embedded: bool = False):
        super().__init__(checkpoint, options, "backbone")
        self._backbone = GreedyBatcher(self._backbone_batch, self.opts.max_batch_size,
                                       self.opts.batch_wait_timeout_s)

    async def run(self, images: List[Any], sent_at: float) -> List[StageAnswer]:
        return await self._each("backbone", sent_at, images,
                                lambda x, t, arrived: self._queued("backbone", self._backbone(x), t, arrived))


BackboneStage = serve.deployment(name="BackboneStage", max_ongoing_requests=256)(BackboneModel)
# The stage an ingress embeds for each topology (`model_in_ingress`).
EMBEDDABLE = {"fused": FusedModel, "backbone": BackboneModel}
