"""The η table the main job writes has points SLO mode can step down through: evenly spaced FLOPs budgets
from the coarse stage's cost up to the default η's, whatever budgets the user asked for."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cfvit
from cfvit.budget import eta_curve, eta_table, gflops_at, ladder_budgets, point_at
from jobs.calibrate import calibrate
from serve.slo import EtaGovernor, eta_ladder

DEFAULT_ETA = 0.5


def _probs(seed: int, n: int = 400, c: int = 10):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c) * 0.3, n), rng.dirichlet(np.ones(c) * 0.3, n), rng.integers(0, c, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_at_an_eta_is_the_exit_rules_own(seed):
    cp, fp, y = _probs(seed)
    curve = eta_curve(cp, fp, y, coarse_gflops=1.0, fine_gflops=2.0)
    for eta in (0.0, 0.2, 0.5, float(cp.max(axis=1)[3]), 0.99, 1.5):
        assert gflops_at(curve, eta) == pytest.approx(point_at(cp, fp, y, eta, coarse_gflops=1.0, fine_gflops=2.0).gflops)


def test_ladder_runs_evenly_from_the_coarse_cost_to_below_the_default_etas():
    cp, fp, y = _probs(0)
    curve = eta_curve(cp, fp, y, coarse_gflops=1.0, fine_gflops=2.0)
    top = gflops_at(curve, DEFAULT_ETA)
    budgets = ladder_budgets(curve, DEFAULT_ETA, steps=4)
    g = [b.gflops for b in budgets]
    assert g[0] == pytest.approx(1.0) and np.allclose(np.diff(g), (top - 1.0) / 4) and g[-1] < top
    rows = eta_table(curve, g)
    etas = [r["eta"] for r in rows]
    assert all(e < DEFAULT_ETA for e in etas) and etas == sorted(etas)  # cheaper budget, lower η
    assert rows[0]["exit_fraction"] == 1.0  # the bottom rung: every image answered by the coarse stage
    assert eta_ladder(DEFAULT_ETA, rows) == [DEFAULT_ETA] + sorted(set(etas), reverse=True)


def test_no_ladder_when_the_default_costs_the_coarse_stage_only():
    cp, fp, y = _probs(0)
    curve = eta_curve(cp, fp, y, coarse_gflops=1.0, fine_gflops=2.0)
    assert ladder_budgets(curve, 0.0) == []  # η 0: every image exits already
    with pytest.raises(ValueError, match="at least one step"):
        ladder_budgets(curve, DEFAULT_ETA, steps=0)


def test_calibrated_model_gets_a_ladder_slo_mode_walks_down_and_back(fmnist_checkpoint, tmp_path):
    """Only budgets above the default η asked for (the main job's case), the ladder added below it."""
    hi_budget = f"{gflops_at_eta_one(fmnist_checkpoint):.6f}"
    cal = calibrate(str(fmnist_checkpoint), [hi_budget], limit=256, output=str(tmp_path / "m"),
                    slo_ladder=(DEFAULT_ETA, 4))
    assert [r.budget.spec for r in cal.results] == [hi_budget]  # the report: the user's budgets only
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["eta_table"] == cal.table
    assert len(written["calibration"]["slo_ladder"]["budgets_gflops"]) == 4
    ladder = eta_ladder(DEFAULT_ETA, cal.table)
    assert len(ladder) >= 3 and ladder[-1] < DEFAULT_ETA
    floor = min(cal.table, key=lambda r: r["eta"])
    assert floor["gflops"] == pytest.approx(cal.chosen.stage_gflops["coarse"])  # down to the coarse stage's cost

    now = [0.0]
    gov = EtaGovernor(ladder, target_ms=100, window_s=5, check_s=1, min_samples=5, clock=lambda: now[0])
    seen = []
    # overload, then quiet for long enough to climb every rung (a step per check, after the window clears)
    for latency in [300.0] * (20 * len(ladder)) + [10.0] * (40 * len(ladder)):
        now[0] += 0.25
        gov.observe(latency)
        seen.append(gov.current_eta)
    assert min(seen) == ladder[-1] and seen[-1] == DEFAULT_ETA  # all the way down, and back


def gflops_at_eta_one(checkpoint) -> float:
    """Every image through the fine stage: a budget whose η is at the top of the curve."""
    g = cfvit.load(checkpoint).stage_gflops()
    return g["coarse"] + g["fine"]
