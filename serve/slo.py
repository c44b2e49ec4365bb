"""SLO mode: the default eta steps down the model's calibrated eta table when the measured p99 latency passes
the target, and back up when load subsides — CF-ViT's per-request compute knob used before Serve's
autoscaler has added replicas (`upscale_delay_s` plus start-up).

`EtaGovernor` is pure (clock injected) so its rules are tested without a server:
- the ladder is the app's default eta, then every eta of the table below it, down to the floor (`min_eta`,
  or the lowest eta whose table accuracy is within `max_accuracy_drop` of the default's);
- every `check_s`, with at least `min_samples` latencies in the last `window_s`: p99 > target → one step
  down; p99 < `recover_ratio` × target → one step up (hysteresis: between the two nothing moves), and
  after any step the window restarts, so each decision sees only latencies at the current eta;
- requests that name their own `eta` or `budget_gflops` are answered as asked (the ingress only applies
  `current_eta` to requests without one); their latencies count, since they load the same replicas.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ray.serve import metrics

logger = logging.getLogger("ray.serve")


def eta_ladder(default_eta: float, table: Optional[List[Dict[str, float]]], min_eta: Optional[float] = None,
               max_accuracy_drop: Optional[float] = None) -> List[float]:
    """[default eta, then the table's eta values below it in descending order, down to the floor]."""
    points = sorted({(float(p["eta"]), p.get("accuracy")) for p in table or []}, key=lambda p: -p[0])
    below = [(e, a) for e, a in points if e < default_eta]
    if max_accuracy_drop is not None:
        # the accuracy at the default eta: the table point nearest above it (else the table's best)
        above = [(e, a) for e, a in points if e >= default_eta and a is not None]
        ref = min(above)[1] if above else max((a for _, a in points if a is not None), default=None)
        if ref is not None:
            below = [(e, a) for e, a in below if a is not None and a >= ref - max_accuracy_drop]
    if min_eta is not None:  # a floor typed from a table printed to 4-6 digits still includes that point
        below = [(e, a) for e, a in below if e >= min_eta - 1e-6]
    return [default_eta] + [e for e, _ in below]


@dataclass
class EtaGovernor:
    ladder: List[float]
    target_ms: float
    window_s: float = 10.0
    check_s: float = 1.0
    recover_ratio: float = 0.6
    min_samples: int = 20
    clock: Callable[[], float] = time.monotonic
    level: int = 0
    reason: str = "at the default eta: p99 within the target"
    p99_ms: Optional[float] = None
    steps: int = 0
    on_change: Optional[Callable[[Dict[str, object]], None]] = None  # e.g. set Serve metrics
    _samples: Deque[Tuple[float, float]] = field(default_factory=deque)
    _stages: Deque[Tuple[float, int, int]] = field(default_factory=deque)  # (time, images, coarse exits)
    _last_check: float = 0.0

    def __post_init__(self):
        if not self.ladder or self.target_ms <= 0 or not 0 < self.recover_ratio < 1:
            raise ValueError("an eta ladder, a positive target and 0 < recover_ratio < 1 are needed")
        self._last_check = self.clock()

    @property
    def current_eta(self) -> float:
        return self.ladder[self.level]

    @property
    def floor_eta(self) -> float:
        return self.ladder[-1]

    def observe(self, latency_ms: float, stages: Sequence[str] = ()) -> None:
        """Book one request's latency (and the stages that answered its images); maybe take one step."""
        now = self.clock()
        self._samples.append((now, float(latency_ms)))
        self._stages.append((now, len(stages), sum(s == "coarse" for s in stages)))
        for q in (self._samples, self._stages):
            while q and q[0][0] < now - self.window_s:
                q.popleft()
        if now - self._last_check >= self.check_s:
            self._last_check = now
            level = self.level
            self._decide(now)
            if self.on_change is not None:
                self.on_change(self.state())
            if self.level != level:
                logger.warning("SLO mode: %s", self.reason)

    @property
    def exit_rate(self) -> Optional[float]:
        n = sum(k for _, k, _ in self._stages)
        return sum(e for _, _, e in self._stages) / n if n else None

    def _decide(self, now: float) -> None:
        if len(self._samples) < self.min_samples:
            return
        lat = sorted(v for _, v in self._samples)
        self.p99_ms = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        if self.p99_ms > self.target_ms and self.level < len(self.ladder) - 1:
            self._step(+1, f"p99 {self.p99_ms:.0f} ms > target {self.target_ms:g} ms")
        elif self.p99_ms > self.target_ms:
            self.reason = f"at the floor eta {self.floor_eta:.4g}: p99 {self.p99_ms:.0f} ms > target {self.target_ms:g} ms"
        elif self.p99_ms < self.recover_ratio * self.target_ms and self.level > 0:
            self._step(-1, f"p99 {self.p99_ms:.0f} ms < {self.recover_ratio:g} × target: load subsided")

    def _step(self, direction: int, why: str) -> None:
        self.level += direction
        self.steps += 1
        self.reason = f"eta {'down' if direction > 0 else 'up'} to {self.current_eta:.4g}: {why}"
        self._samples.clear()  # judge the new eta on its own latencies

    def state(self) -> Dict[str, object]:
        return {"enabled": True, "eta": self.current_eta, "level": self.level, "floor_eta": self.floor_eta,
                "ladder": list(self.ladder), "latency_slo_ms": self.target_ms, "p99_ms": self.p99_ms,
                "reason": self.reason, "steps": self.steps, "exit_rate": self.exit_rate}


def governor_for(args, table) -> Optional[EtaGovernor]:
    """SLO mode's governor for the app's `AppArgs`, with its Serve metrics; None when `latency_slo_ms` is unset."""
    if args.latency_slo_ms is None:
        return None

    ladder = eta_ladder(args.eta, table, args.min_eta, args.max_accuracy_drop)
    gov = EtaGovernor(ladder, args.latency_slo_ms, window_s=args.slo_window_s, check_s=args.slo_check_s,
                      recover_ratio=args.slo_recover_ratio, min_samples=args.slo_min_samples)
    gauges = {"eta": metrics.Gauge("cfvit_slo_eta", description="default eta chosen by SLO mode"),
              "p99_ms": metrics.Gauge("cfvit_slo_p99_ms", description="p99 latency SLO mode last judged"),
              "exit_rate": metrics.Gauge("cfvit_slo_exit_rate", description="coarse exits in SLO mode's window"),
              "level": metrics.Gauge("cfvit_slo_level", description="steps below the default eta (0: none)")}
    gov.on_change = lambda state: [g.set(float(state[k])) for k, g in gauges.items() if state.get(k) is not None]
    gov.on_change(gov.state())
    logger.info("SLO mode on: p99 target %s ms, eta ladder %s", args.latency_slo_ms, ladder)
    if len(ladder) == 1:
        logger.warning("SLO mode has no lower eta to go to: the model's eta table has no point below the default "
                       "eta %s above the floor (calibrate more budgets, or lower min_eta)", args.eta)
    return gov
