"""CPU seconds spent over a measurement window: by the whole machine (from /proc/stat: every process,
the benchmark's client included, and anything else running) and by this process's tree (the client and,
for a Ray instance this process started, every Ray process: GCS, raylet, workers, Serve's proxy and
replicas, HAProxy). The second is what the benchmark itself costs; the first is what the issue-style
tables report, and is only meaningful on a quiet machine (the load average is recorded beside it)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import psutil

_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")  # not idle, not iowait


def machine_cpu_s() -> float:
    """CPU seconds all cores have spent busy since boot."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, f, 0.0) for f in _BUSY_FIELDS))


def tree_cpu_s(root: Optional[psutil.Process] = None) -> Dict[int, float]:
    """{pid: user + system CPU seconds} of `root` (default: this process) and all its descendants."""
    root = root or psutil.Process()
    out: Dict[int, float] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@dataclass
class CpuWindow:
    wall_s: float
    machine_s: float
    own_s: float
    load_before: float  # 1-minute load average when the window opened
    load_after: float
    cores: int

    def per(self, requests: int) -> Dict[str, float]:
        """CPU milliseconds per request (machine and own) and the window's figures."""
        n = max(1, requests)
        return {"cpu_ms_per_request": 1000 * self.machine_s / n, "own_cpu_ms_per_request": 1000 * self.own_s / n,
                "cpu_busy_share": self.machine_s / (self.wall_s * self.cores) if self.wall_s else float("nan"),
                "load_before": self.load_before, "load_after": self.load_after}


class CpuMeter:
    """`start()` then `stop()` → a CpuWindow."""

    def start(self) -> None:
        self._load = os.getloadavg()[0]
        self._wall = time.perf_counter()
        self._machine = machine_cpu_s()
        self._tree = tree_cpu_s()

    def stop(self) -> CpuWindow:
        machine = machine_cpu_s() - self._machine
        wall = time.perf_counter() - self._wall
        tree = tree_cpu_s()
        # a process that started inside the window counts whole; one that ended inside it is not seen
        own = sum(cpu - self._tree.get(pid, 0.0) for pid, cpu in tree.items())
        return CpuWindow(wall_s=wall, machine_s=machine, own_s=own, load_before=self._load,
                         load_after=os.getloadavg()[0], cores=psutil.cpu_count() or 1)
