"""The drift monitor's arithmetic (serve/drift.py) and the calibrated profile it compares with
(cfvit.budget.agreement_profile), on synthetic probabilities whose answers are known."""
import logging

import numpy as np
import pytest

from cfvit.budget import agreement_profile, eta_curve
from serve.drift import DriftMonitor, profile_at


def _probs(conf, label):
    p = np.full(4, (1 - conf) / 3, dtype=np.float32)
    p[label] = conf
    return p


def test_agreement_profile_counts_only_the_exiting_images():
    # coarse confidences .95 .9 .8 .6 .4; fine agrees on the first, third and fourth
    conf = [0.95, 0.9, 0.8, 0.6, 0.4]
    coarse = np.stack([_probs(c, 0) for c in conf])
    fine = np.stack([_probs(0.9, lab) for lab in (0, 1, 0, 0, 2)])
    curve = eta_curve(coarse, fine, np.zeros(5, dtype=int), coarse_gflops=1.0, fine_gflops=2.0)
    rows = {r["eta"]: r for r in agreement_profile(curve, etas=(0.3, 0.7, 0.85, 0.92, 0.97))}
    assert rows[0.3]["exit_fraction"] == 1.0 and rows[0.3]["agreement"] == pytest.approx(3 / 5)
    assert rows[0.7]["exit_fraction"] == 0.6 and rows[0.7]["agreement"] == pytest.approx(2 / 3)  # .95 .9 .8
    assert rows[0.85]["agreement"] == pytest.approx(1 / 2)  # .95 .9
    assert rows[0.92]["agreement"] == 1.0  # .95 alone
    assert rows[0.97] == {"eta": 0.97, "exit_fraction": 0.0, "agreement": None}  # nobody exits


def test_profile_at_interpolates_inside_the_rows_only():
    prof = [{"eta": 0.4, "exit_fraction": 0.8, "agreement": 0.9}, {"eta": 0.6, "exit_fraction": 0.4,
                                                                   "agreement": 1.0},
            {"eta": 0.8, "exit_fraction": 0.0, "agreement": None}]
    assert profile_at(prof, 0.5, "exit_fraction") == pytest.approx(0.6)
    assert profile_at(prof, 0.4, "agreement") == pytest.approx(0.9)
    assert profile_at(prof, 0.7, "agreement") is None  # one side has nobody exiting
    assert profile_at(prof, 0.8, "exit_fraction") == 0.0
    assert profile_at(prof, 0.2, "exit_fraction") is None and profile_at([], 0.5, "agreement") is None


PROFILE = [{"eta": 0.0, "exit_fraction": 1.0, "agreement": 0.8}, {"eta": 1.0, "exit_fraction": 0.0, "agreement": 1.0}]


def test_shadow_sampling_rate_and_in_flight_cap():
    mon = DriftMonitor(PROFILE, shadow_fraction=0.25, seed=0, max_in_flight=2)
    picks = mon.pick_shadows(4000)
    assert 0.22 < sum(picks) / 4000 < 0.28
    assert DriftMonitor(PROFILE, shadow_fraction=0.0).pick_shadows(100) == [False] * 100
    assert mon.start_shadow() and mon.start_shadow() and not mon.start_shadow()
    assert mon.skipped == 1
    mon.shadow_done(0.5, 3, 3)
    mon.shadow_done(0.5, None, None)  # a failed shadow call: counted, not booked as agreement
    assert (mon.shadowed, mon.agreed, mon.failed, mon.in_flight) == (1, 1, 1, 0)
    with pytest.raises(ValueError):
        DriftMonitor(PROFILE, shadow_fraction=1.5)


def test_agreement_alert_when_it_falls_below_calibration_and_recovery(caplog):
    mon = DriftMonitor(PROFILE, shadow_fraction=1.0, agreement_margin=0.1, window=20, min_samples=10)
    seen = []
    mon.on_change = seen.append
    for i in range(20):  # at η 0.5 calibration expects 0.9; 9 of 10 agree
        mon.start_shadow()
        mon.shadow_done(0.5, 1, 1 if i % 10 else 2)
    assert not mon.state()["alert"] and mon.state()["agreement"]["expected"] == pytest.approx(0.9)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        for _ in range(10):  # a shifted stream: the coarse answers stop matching the fine ones
            mon.start_shadow()
            mon.shadow_done(0.5, 1, 2)
    st = mon.state()
    assert st["alert"] and st["agreement"]["alert"] and st["agreement"]["observed"] < 0.8
    assert any("coarse-fine agreement" in r.getMessage() for r in caplog.records)
    assert sum("drift:" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1  # once
    for _ in range(20):
        mon.start_shadow()
        mon.shadow_done(0.5, 1, 1)
    assert not mon.state()["agreement"]["alert"] and seen[-1]["shadowed"] == 50


def test_higher_agreement_is_no_alert_but_exit_rate_is_two_sided():
    mon = DriftMonitor(PROFILE, agreement_margin=0.05, exit_rate_margin=0.15, window=10, exit_window=100,
                       min_samples=5)
    for _ in range(10):
        mon.start_shadow()
        mon.shadow_done(0.2, 4, 4)  # 1.0 where 0.84 is expected: better than calibration is not drift
    assert not mon.state()["agreement"]["alert"]
    mon.observe_exits([0.5] * 100, [True] * 50 + [False] * 50)  # expected 0.5 at η 0.5
    assert not mon.state()["exit_rate"]["alert"]
    mon.observe_exits([0.5] * 100, [False] * 100)  # nothing exits: e.g. inverted images
    assert mon.state()["exit_rate"]["alert"] and mon.state()["exit_rate"]["observed"] == 0.0
    mon.observe_exits([0.5] * 100, [True, False] * 50)
    assert not mon.state()["exit_rate"]["alert"]
    mon.observe_exits([0.5] * 100, [True] * 100)  # everything exits: also a shift
    assert mon.state()["alert"]


def test_no_profile_reports_without_alerting():
    mon = DriftMonitor([], window=5, min_samples=1)
    for _ in range(10):
        mon.start_shadow()
        mon.shadow_done(0.5, 1, 2)
    mon.observe_exits([0.5] * 600, [False] * 600)
    st = mon.state()
    assert not st["calibrated"] and not st["alert"] and st["agreement"]["observed"] == 0.0
    assert st["agreement"]["expected"] is None
