"""One model version per request, also while a rollout replaces the stages.

Mid-rollout the coarse and fine deployments are replaced at different moments, and an ingress replica's
handles reach whatever replicas of each stage are up, of either version. Every stage answer carries its
replica's version (`StageAnswer.version`) and every hand-off the coarse stage's (`Handoff.version`); a
fine replica refuses a hand-off of another version, and a coarse answer is never completed by a fine answer
of another version (both raise `VersionMismatch`). The ingress then answers the whole request again, from
its pixels, after a short pause, until every image of it was answered by one version; the version goes
out with each prediction (`model_version`) and as the `cfvit-model-version` header. The mixed window lasts
as long as the slower stage's new replica takes to start, so the ingress keeps trying for up to
`VERSION_WAIT_S`; a request that finds no single version by then is refused with 503 (retry), never
answered mixed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, List

from .inputs import APIError
from .messages import StageAnswer, VersionMismatch

logger = logging.getLogger("ray.serve")

VERSION_WAIT_S = 30.0  # a stage replica's start-up on a busy node, with room to spare
VERSION_PAUSE_S = 0.05  # × the attempt number, up to VERSION_PAUSE_MAX_S: the rollout moves on between tries
VERSION_PAUSE_MAX_S = 0.5
VERSION_HEADER = "cfvit-model-version"


def version_mismatch(exc: BaseException) -> bool:
    """A stage refused work of another model version (raised in a replica, it reaches the ingress as Ray's
    task error, which is also an instance of the cause's class)."""
    return isinstance(exc, VersionMismatch) or isinstance(getattr(exc, "cause", None), VersionMismatch)


async def answered_by_one_version(attempt: Callable[[], Awaitable[List[StageAnswer]]],
                                  wait_s: float = VERSION_WAIT_S) -> List[StageAnswer]:
    """`attempt()`'s answers once they all come from one model version; again (whole) while they do not,
    for up to `wait_s` seconds."""
    seen: List[str] = []
    deadline = time.monotonic() + wait_s
    n = 0
    while True:
        n += 1
        try:
            answers = await attempt()
        except Exception as e:  # noqa: BLE001 - only a version mismatch is answered again
            if not version_mismatch(e):
                raise
            seen.append("refused")
        else:
            versions = sorted({a.version for a in answers})
            if len(versions) <= 1:
                if n > 1:
                    logger.info("request answered by model version %s after %d tries (%s)", versions, n, seen[-5:])
                return answers
            seen.append("+".join(versions))
        if time.monotonic() >= deadline:
            raise APIError(503, "model version changing, retry", {"attempts": n, "waited_s": wait_s,
                                                                  "seen": seen[-5:]})
        await asyncio.sleep(min(VERSION_PAUSE_S * n, VERSION_PAUSE_MAX_S))
