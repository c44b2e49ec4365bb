"""serve.batching.GreedyBatcher: a batch is cut when the model is free, from everything queued meanwhile."""
import asyncio
import time

import pytest

from serve.batching import GreedyBatcher


def test_requests_that_queue_while_a_batch_runs_form_the_next_batch():
    sizes = []

    async def model(xs, ys):  # 50 ms per batch, whatever its size (a GPU, or a CPU batch that vectorises)
        sizes.append(len(xs))
        await asyncio.sleep(0.05)
        return [x + y for x, y in zip(xs, ys)]

    async def main():
        b = GreedyBatcher(model, max_batch_size=16, wait_s=0.005)
        t_end = time.monotonic() + 1.0

        async def client(k):
            n = 0
            while time.monotonic() < t_end:
                assert await b(k, n) == k + n  # each caller gets its own item's answer
                n += 1
            return n

        return sum(await asyncio.gather(*(client(k) for k in range(16))))

    done = asyncio.run(main())
    # 16 closed-loop clients: after the first batch every batch holds all 16 (serve.batch gave ~3.5 here)
    assert sum(sizes) == done and max(sizes) == 16
    assert sum(sizes[1:]) / len(sizes[1:]) >= 12, sizes


def test_max_batch_size_wait_and_errors():
    seen = []

    async def model(xs):
        seen.append(list(xs))
        if "bad" in xs:
            raise ValueError("bad input in batch")
        return [x.upper() for x in xs]

    async def main():
        b = GreedyBatcher(model, max_batch_size=3, wait_s=0.05)
        got = await asyncio.gather(*(b(x) for x in "abcdefg"))
        assert got == list("ABCDEFG") and [len(s) for s in seen] == [3, 3, 1]
        t0 = time.monotonic()
        assert await b("z") == "Z" and time.monotonic() - t0 >= 0.04  # a lone item waits wait_s for company
        with pytest.raises(ValueError, match="bad input"):
            await b("bad")
        assert await b("ok") == "OK"  # the loop survives a failed batch

    asyncio.run(main())
    with pytest.raises(ValueError):
        GreedyBatcher(model, 0, 0.0)
