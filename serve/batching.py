"""Dynamic batching that forms each batch when the model is free to run it.

Why not `@serve.batch`: since Ray 2.46 its queue forms a batch as soon as `batch_wait_timeout_s` has passed
after the first arrival and only then waits for a free slot (`max_concurrent_batches`). Behind a model that
takes 50-100 ms per batch, the requests that arrive meanwhile have already been cut into batches of one or
two, so the replica runs them one by one: measured on this repo's DeiT-S app at 16 clients, 1.1 images per
batch with 0.5 s spent queueing (docs/BENCHMARKS.md), and 3.5 per batch for a 100 ms `time.sleep` handler
with 16 requests waiting. Here a batch is cut only when the model is idle: it takes everything that queued
while the previous batch ran (up to `max_batch_size`), and waits up to `wait_s` for more only when fewer
are waiting (continuous batching, as Triton's dynamic batcher does).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Tuple


class GreedyBatcher:
    """`await batcher(*item)` → that item's result of `fn(*columns)`, where `fn` gets one list per argument
    (the items of a batch column-wise, as `@serve.batch` passes them) and returns one result per item."""

    def __init__(self, fn: Callable[..., Awaitable[Sequence[Any]]], max_batch_size: int, wait_s: float):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_s >= 0, got {max_batch_size}, {wait_s}")
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._queue: Optional[asyncio.Queue] = None
        self._arrived: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def __call__(self, *item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is None:  # bound to the replica's own event loop at the first call
            self._loop, self._queue, self._arrived = loop, asyncio.Queue(), asyncio.Event()
        elif loop is not self._loop:
            raise RuntimeError("GreedyBatcher called from a second event loop")
        if self._task is None or self._task.done():  # the same queue: nothing waiting in it is lost
            self._task = loop.create_task(self._serve_batches())
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        self._arrived.set()
        return await future

    async def _serve_batches(self) -> None:
        while True:
            batch = await self._next_batch()
            live = [(item, fut) for item, fut in batch if not fut.done()]  # callers that gave up are skipped
            if not live:
                continue
            try:
                results = await self.fn(*(list(col) for col in zip(*(item for item, _ in live))))
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except BaseException as exc:  # every caller of this batch gets the error
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"batch ended: {exc!r}"))
                if not isinstance(exc, Exception):
                    raise  # cancelled (replica shutting down): the next call starts a new loop on the same queue
                continue
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)

    async def _next_batch(self) -> List[Tuple[tuple, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return batch
