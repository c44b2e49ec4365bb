"""The reproduction's 95 % intervals (jobs/reproduce/stats.py) and its plateau verdict, on vectors whose
answers are known."""
import numpy as np
import pytest

from jobs.reproduce.run import plateau
from jobs.reproduce.stats import paired_difference, verdict, wilson_interval


def test_wilson_interval_brackets_the_accuracy_and_shrinks_with_n():
    lo, hi = wilson_interval([True] * 80 + [False] * 20)
    assert lo < 0.8 < hi and (lo, hi) == pytest.approx((0.7112, 0.8666), abs=1e-3)  # the textbook Wilson values
    lo2, hi2 = wilson_interval([True] * 8000 + [False] * 2000)
    assert hi2 - lo2 < (hi - lo) / 5
    assert wilson_interval([True] * 10)[1] == 1.0 and wilson_interval([False] * 10)[0] == 0.0


def test_paired_difference_sees_only_the_images_that_differ():
    rng = np.random.default_rng(0)
    base = rng.random(10_000) < 0.7
    better = base.copy()
    better[np.flatnonzero(~base)[:300]] = True  # 300 more right, none lost: +3 points
    d = paired_difference(better, base, seed=0)
    assert d["diff"] == pytest.approx(0.03) and d["differing_images"] == 300
    assert 0 < d["low"] < 0.03 < d["high"] and verdict(d) == ">"
    assert verdict(paired_difference(base, better, seed=0)) == "<"
    swapped = base.copy()  # 10 gained, 10 lost: a tie
    swapped[np.flatnonzero(~base)[:10]] = True
    swapped[np.flatnonzero(base)[:10]] = False
    assert verdict(paired_difference(swapped, base, seed=0)) == "≈"
    same = paired_difference(base, base)
    assert (same["diff"], same["low"], same["high"], verdict(same)) == (0.0, 0.0, 0.0, "≈")
    with pytest.raises(ValueError):
        paired_difference(base, base[:10])


def test_plateau_is_the_last_epochs_test_gain():
    hist = [{"test_top1": v} for v in (0.70, 0.80, 0.85, 0.870, 0.874)]
    p = plateau(hist)
    assert p["reached"] and p["last_gain"] == pytest.approx(0.004) and p["last3_gain"] == pytest.approx(0.074)
    assert not plateau(hist[:3])["reached"]  # +5 points in the last epoch
    assert not plateau(hist[:1])["reached"] and plateau([])["last_gain"] is None
