"""The training's progress on the terminal: one line per epoch (the workers' `epoch_line`) printed above a
rich progress bar of the running epoch, fed by rank 0's progress records (jobs/train/worker.py `_progress`)."""
from __future__ import annotations

import threading
from typing import Optional

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainingProgress:
    """`line(text)` prints above the bar; `update(record)` moves the bar of the record's epoch. Both are called
    from Ray's log thread (`cfvit_common.logs.forward_worker_lines`)."""

    def __init__(self, console, steps_per_epoch: Optional[int] = None):
        self.steps = steps_per_epoch
        self._lock = threading.Lock()
        self._task, self._epoch = None, None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 transient=True, auto_refresh=True, refresh_per_second=2)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def line(self, text: str) -> None:
        with self._lock:
            if self._task is not None and text.startswith(f"epoch {self._epoch}/"):
                done = next(t.completed for t in self.progress.tasks if t.id == self._task)
                self.steps = self.steps or int(done)  # a source of unknown size: learnt in epoch 1
                self.progress.remove_task(self._task)
                self._task = None
            self.progress.console.print(text, markup=False, highlight=False)

    def update(self, rec: dict) -> None:
        with self._lock:
            if rec["epoch"] != self._epoch:
                if self._task is not None:
                    self.progress.remove_task(self._task)
                self._epoch = rec["epoch"]
                phase = "all split" if rec.get("split_all") else "selection"
                self._task = self.progress.add_task(f"epoch {rec['epoch']}/{rec['epochs']} ({phase})",
                                                    total=self.steps, info="")
            self.progress.update(self._task, completed=rec["step"],
                                 info=f"loss {rec['loss']:.3f}  {rec['images_per_s']:.0f} img/s")
