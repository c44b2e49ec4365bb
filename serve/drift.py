"""Drift monitor: does the live traffic still look like the data the η table was calibrated on?

Two signals, each compared with what calibration measured at the η each image was answered with (the
checkpoint's `agreement_profile`, written by `cfvit calibrate` and by training's export):
- **coarse–fine agreement**: a share (`shadow_fraction`, default 1 %) of the images answered by the coarse
  stage is also sent through the fine stage *after* the reply has gone, off the request's path; the rolling
  share whose fine answer equals the coarse one is compared with the calibrated share among the images that
  exit at that η. Falling more than `drift_margin` below it means the coarse stage is confidently wrong
  more often than on the calibration data: its early answers cost more accuracy than the table says.
- **exit rate**: the rolling share of images answered by the coarse stage (every image, no extra work) vs
  the calibrated exit fraction at η; off by more than `exit_rate_margin` either way means the inputs have
  shifted (e.g. inverted images make a Fashion-MNIST model unsure, so nothing exits), and the FLOPs the
  table promises no longer hold.

`DriftMonitor` is pure (no Ray, no clock), so its arithmetic is tested on its own; the ingress feeds it and
exports its state as Serve metrics and in `GET /v1/model`. It never changes or delays a reply.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

from ray.serve import metrics

logger = logging.getLogger("ray.serve")


def profile_at(profile: Optional[List[Dict]], eta: float, key: str) -> Optional[float]:
    """The calibrated `key` (exit_fraction or agreement) at η, linear between the profile's rows; None
    outside them or where the neighbouring rows have none."""
    rows = sorted((float(r["eta"]), r.get(key)) for r in profile or [])
    for (e0, v0), (e1, v1) in zip(rows, rows[1:]):
        if e0 <= eta <= e1:
            if v0 is None or v1 is None:
                return v0 if eta == e0 else (v1 if eta == e1 else None)
            return float(v0) if e1 == e0 else float(v0) + (eta - e0) / (e1 - e0) * (float(v1) - float(v0))
    if len(rows) == 1 and rows[0][0] == eta and rows[0][1] is not None:
        return float(rows[0][1])
    return None


@dataclass
class _Rolling:
    """The last `window` observations (value, calibrated expectation or None) and the alert's hysteresis.
    Running sums keep every add O(1): it runs for every image the ingress answers."""
    window: int
    min_samples: int
    margin: float
    two_sided: bool
    items: Deque[Tuple[float, Optional[float]]] = field(default_factory=deque)
    alert: bool = False
    # sums over items: all values; values, expectations and count of the items with an expectation
    _sums: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0])

    def _book(self, value: float, expected: Optional[float], sign: int) -> None:
        self._sums[0] += sign * value
        if expected is not None:
            self._sums[1] += sign * value
            self._sums[2] += sign * expected
            self._sums[3] += sign

    def add(self, value: float, expected: Optional[float]) -> Optional[bool]:
        """Book one observation; True/False when the alert switched on/off, None otherwise."""
        self.items.append((value, expected))
        self._book(value, expected, +1)
        while len(self.items) > self.window:
            self._book(*self.items.popleft(), -1)
        obs, exp = self.means()
        if obs is None or exp is None or len(self.items) < self.min_samples:
            return None
        gap = obs - exp
        off = gap < -self.margin or (self.two_sided and gap > self.margin)
        back = abs(gap) <= self.margin / 2 if self.two_sided else gap >= -self.margin / 2  # hysteresis
        if off and not self.alert:
            self.alert = True
            return True
        if self.alert and back:
            self.alert = False
            return False
        return None

    def means(self) -> Tuple[Optional[float], Optional[float]]:
        """(observed, expected) means, both over the items with an expectation; (all items, None) without."""
        every, known_v, known_e, n_known = self._sums
        if not n_known:
            return (every / len(self.items) if self.items else None), None
        return known_v / n_known, known_e / n_known

    def state(self) -> Dict[str, object]:
        obs, exp = self.means()
        return {"samples": len(self.items), "observed": obs, "expected": exp, "margin": self.margin,
                "alert": self.alert}


@dataclass
class DriftMonitor:
    profile: List[Dict]
    shadow_fraction: float = 0.01
    agreement_margin: float = 0.1
    exit_rate_margin: float = 0.15
    window: int = 200
    exit_window: int = 500
    min_samples: int = 50
    max_in_flight: int = 8  # shadow calls at once; more are skipped, never queued behind replies
    seed: Optional[int] = None
    on_change: Optional[Callable[[Dict[str, object]], None]] = None  # e.g. set Serve metrics
    shadowed: int = 0
    agreed: int = 0
    skipped: int = 0
    failed: int = 0
    in_flight: int = 0

    def __post_init__(self):
        if not 0 <= self.shadow_fraction <= 1:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {self.shadow_fraction}")
        self._rng = random.Random(self.seed)
        self.agreement = _Rolling(self.window, self.min_samples, self.agreement_margin, two_sided=False)
        self.exit_rate = _Rolling(self.exit_window, max(self.min_samples, self.exit_window // 5),
                                  self.exit_rate_margin, two_sided=True)

    @property
    def calibrated(self) -> bool:
        return bool(self.profile)

    def pick_shadows(self, n: int) -> List[bool]:
        """Which of a request's n images are shadowed should the coarse stage answer them."""
        return [self._rng.random() < self.shadow_fraction for _ in range(n)]

    def start_shadow(self) -> bool:
        """Reserve one slot for a shadow call (False: too many in flight, this one is skipped)."""
        if self.in_flight >= self.max_in_flight:
            self.skipped += 1
            return False
        self.in_flight += 1
        return True

    def shadow_done(self, eta: float, coarse_label: Optional[int], fine_label: Optional[int]) -> None:
        """A shadow call came back (labels None: it failed). Books agreement at the image's η."""
        self.in_flight -= 1
        if coarse_label is None or fine_label is None:
            self.failed += 1
            return
        agree = int(coarse_label) == int(fine_label)
        self.shadowed += 1
        self.agreed += agree
        self._switched("agreement", self.agreement.add(float(agree), profile_at(self.profile, eta, "agreement")))
        self._publish()

    def observe_exits(self, etas: List[float], exited: List[bool]) -> None:
        """Every answered image of one request: whether the coarse stage answered it, at its η."""
        expected: Dict[float, Optional[float]] = {}  # one profile lookup per distinct η of the request
        for eta, ex in zip(etas, exited):
            if eta not in expected:
                expected[eta] = profile_at(self.profile, eta, "exit_fraction")
            self._switched("exit_rate", self.exit_rate.add(float(ex), expected[eta]))
        self._publish()

    def _publish(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state())

    def _switched(self, what: str, switched: Optional[bool]) -> None:
        """Log an alert switching on (a warning) or off."""
        if switched is True:
            obs, exp = getattr(self, what).means()
            label = "coarse-fine agreement" if what == "agreement" else "coarse exit rate"
            logger.warning("drift: %s %.3f over the last %d images, calibration expects %.3f (margin %g): the "
                           "inputs may have shifted from the calibration data; the eta table's accuracy and "
                           "GFLOPs may no longer hold (recalibrate on current data: cfvit calibrate)",
                           label, obs, len(getattr(self, what).items), exp, getattr(self, what).margin)
        elif switched is False:
            logger.info("drift: %s back within its margin", what)

    def state(self) -> Dict[str, object]:
        return {"enabled": True, "calibrated": self.calibrated, "shadow_fraction": self.shadow_fraction,
                "shadowed": self.shadowed, "agreed": self.agreed, "skipped": self.skipped, "failed": self.failed,
                "agreement": self.agreement.state(), "exit_rate": self.exit_rate.state(),
                "alert": self.agreement.alert or self.exit_rate.alert}


_GAUGES = {("agreement", "observed"): "cfvit_drift_agreement", ("agreement", "expected"): "cfvit_drift_expected_agreement",
           ("exit_rate", "observed"): "cfvit_drift_exit_rate", ("exit_rate", "expected"): "cfvit_drift_expected_exit_rate"}


def monitor_for(args, profile) -> Optional[DriftMonitor]:
    """The drift monitor for the app's `AppArgs` (split and fused), with its Serve metrics; None for the backbone."""
    if args.stages == "backbone":
        return None

    mon = DriftMonitor(profile or [], args.shadow_fraction, args.drift_agreement_margin, args.drift_exit_rate_margin,
                       window=args.drift_window, exit_window=args.drift_exit_window,
                       min_samples=args.drift_min_samples, seed=args.drift_seed)
    gauges = {k: metrics.Gauge(name, description=f"drift monitor: {k[1]} {k[0]} (rolling)") for k, name in _GAUGES.items()}
    alert = metrics.Gauge("cfvit_drift_alert", description="1 while the drift monitor warns, else 0")
    shadowed = metrics.Gauge("cfvit_drift_shadowed", description="images re-checked by the fine stage")

    def publish(state):
        for (signal, key), g in gauges.items():
            if state[signal][key] is not None:
                g.set(float(state[signal][key]))
        alert.set(float(state["alert"]))
        shadowed.set(float(state["shadowed"]))

    mon.on_change = publish
    if not mon.calibrated:
        logger.warning("drift monitor: the checkpoint has no agreement_profile (calibrated before it existed): "
                       "agreement and exit rate are reported without a reference; run cfvit calibrate to add one")
    return mon
