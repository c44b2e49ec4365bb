"""A training worker that waits on its data for too long says so and fails, instead of hanging.

`DataWatchdog` runs beside the loop that pulls batches from Ray Data: the loop calls `tick()` per batch;
when no batch arrived for `timeout_s`, the watchdog prints what the cluster is short of and raises
`StallError` in the loop's thread (at its next Python instruction: Ray Data's iterators wait in Python).
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Optional

import ray
from ray.util.state import list_actors, list_tasks


class StallError(RuntimeError):
    """No progress for the configured time; the message says what the job was waiting on."""


def cluster_waits_on() -> str:
    """Free vs. total CPUs/GPUs and the tasks and actors still waiting for resources (Ray's state API)."""
    if not ray.is_initialized():
        return "(not connected to Ray: no resource figures)"
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"free {free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if k in total]
    try:
        pending = [t.name for t in list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], timeout=10)]
        pending += [a.class_name for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], timeout=10)]
        if pending:
            names = sorted(set(pending))
            parts.append(f"{len(pending)} task(s)/actor(s) waiting for resources: {', '.join(names[:6])}")
    except Exception as e:  # the state API needs the dashboard; the resource figures above are still true
        parts.append(f"(pending tasks unknown: {type(e).__name__})")
    return "; ".join(parts)


class DataWatchdog:
    def __init__(self, timeout_s: Optional[float], what: str = "the next training batch"):
        self.timeout_s, self.what = timeout_s, what
        self.last = time.monotonic()
        self._target = threading.get_ident()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "DataWatchdog":
        if self.timeout_s:
            self._thread = threading.Thread(target=self._watch, name="data-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def tick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                msg = (f"waited {idle:.0f} s for {self.what} from Ray Data (stall timeout {self.timeout_s:g} s, "
                       f"scaling.stall_timeout_s); {cluster_waits_on()}")
                print(f"[stall] {msg}", flush=True)
                _raise_in(self._target, msg)
                return


def _raise_in(thread_id: int, message: str) -> None:
    StallError.pending_message = message  # the async exception is raised by class; keep the text here
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_Stalled))


class _Stalled(StallError):
    def __init__(self, *args):
        super().__init__(*(args or (getattr(StallError, "pending_message", "stalled"),)))
