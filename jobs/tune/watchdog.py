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

from ray.tune import Callback, Stopper
from rich.console import Console

from jobs.train.stall import StallError, cluster_waits_on

from .plan import fixed_cost_s

__all__ = ["StallError", "StallWatchdog", "TrialLines", "run_interruptible"]


class StallWatchdog(Stopper):
    def __init__(self, timeout_s: Optional[float]):
        self.timeout_s = timeout_s
        self.last_progress = time.monotonic()
        self.stalled: Optional[str] = None  # the diagnosis, once it fired
        self.interrupt = threading.Event()

    # Tune pickles its run config (for restoring an experiment): the event is rebuilt, not pickled.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "interrupt"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
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
                           f"{cluster_waits_on()}"
            return True
        return False

    def raise_if_stalled(self) -> None:
        if self.stalled:
            raise StallError(self.stalled)


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
            console.print(f"\\[tune] second {name}: exiting now, trials are being killed", highlight=False)
            raise SystemExit(130)
        got.append(name)
        console.print(f"\\[tune] {name}: stopping the trials; finished ones are kept", highlight=False)
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


_TERMINAL = None  # where the trial lines go: stdout, or the terminal when the CLI routes stdout to a log file


def say_to(stream) -> None:
    global _TERMINAL
    _TERMINAL = stream


def _say(text: str) -> None:
    Console(file=_TERMINAL).print(text, highlight=False, markup=False)


class TrialLines(Callback):
    """One line per trial event instead of Tune's wide status table (picklable: Tune stores its callbacks)."""

    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = trial.config
        _say(f"[tune] trial {trial.trial_id} started: α={cfg.get('alpha', 0):.3f} β={cfg.get('beta', 0):.4f}"
             + (f" lr={cfg['lr']:.2e}" if "lr" in cfg else ""))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        val = result.get(self.metric)
        _say(f"[tune] trial {trial.trial_id} epoch {result.get('training_iteration')}/{self.epochs}: {self.metric} "
             + ("n/a" if val is None else f"{100 * val:.1f}%"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        fixed = fixed_cost_s(trial.last_result or {})
        _say(f"[tune] trial {trial.trial_id} done" + ("" if fixed is None else f" ({fixed:.0f} s outside its epochs)"))

    def on_trial_error(self, iteration, trials, trial, **info):
        _say(f"[tune] trial {trial.trial_id} failed (its log: {trial.path})")

