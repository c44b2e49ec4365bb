"""A search that cannot hang silently or die with a traceback on Ctrl-C.

`StallWatchdog` is a Tune `Stopper`: when no trial has reported for `timeout_s`, it stops the search and
records what the cluster was waiting on (free vs. total resources, tasks and actors pending). The Tuner runs
in a worker thread (`run_interruptible`), so SIGINT/SIGTERM reach this process rather than Tune's own
handler: the first one stops every trial through the same stopper and the search returns what finished.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

from ray.tune import Stopper


class StallError(RuntimeError):
    """No progress for the configured time; the message says what the job was waiting on."""


class StallWatchdog(Stopper):
    def __init__(self, timeout_s: Optional[float]):
        self.timeout_s = timeout_s
        self.last_progress = time.monotonic()
        self.stalled: Optional[str] = None  # the diagnosis, once it fired
        self.interrupt = threading.Event()

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.last_progress = time.monotonic()
        return False

    def stop_all(self) -> bool:
        if self.interrupt.is_set() or self.stalled:
            return True
        idle = time.monotonic() - self.last_progress
        if self.timeout_s and idle > self.timeout_s:
            self.stalled = f"no trial reported progress for {idle:.0f} s (stall timeout {self.timeout_s:g} s); " \
                           f"{waiting_on()}"
            return True
        return False

    def raise_if_stalled(self) -> None:
        if self.stalled:
            raise StallError(self.stalled)


def waiting_on() -> str:
    """What the cluster is short of: free/total CPUs and GPUs, and the tasks and actors still pending."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"free {free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if k in total]
    try:
        from ray.util.state import list_actors, list_tasks

        pending = [t.name for t in list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], timeout=10)]
        pending += [a.class_name for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], timeout=10)]
        if pending:
            names = sorted(set(pending))
            parts.append(f"{len(pending)} task(s)/actor(s) waiting for resources: {', '.join(names[:6])}")
    except Exception as e:  # the state API needs the dashboard; the resources above are still true
        parts.append(f"(pending tasks unknown: {type(e).__name__})")
    return "; ".join(parts)


def run_interruptible(fit: Callable, watchdog: StallWatchdog, console) -> tuple:
    """Run `fit()` in a thread; the first SIGINT/SIGTERM stops the trials through `watchdog`, a second one
    exits at once. Returns (fit's result, the signal's name or None)."""
    box: dict = {}
    got: list[str] = []

    def target():
        try:
            box["result"] = fit()
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if got:
            console.print(f"[tune] second {name}: exiting now, trials are being killed", highlight=False)
            raise SystemExit(130)
        got.append(name)
        console.print(f"[tune] {name}: stopping the trials; finished ones are kept", highlight=False)
        watchdog.interrupt.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=target, name="tune-fit", daemon=True)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in box:
        raise box["error"]
    return box.get("result"), (got[0] if got else None)
