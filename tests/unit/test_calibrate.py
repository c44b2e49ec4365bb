"""Post-hoc calibration (`jobs.calibrate`, `cfvit calibrate`): budget parsing, infeasible budgets, exactness
of the η chosen per budget on a real model's outputs against a brute-force scan, what is written into the
checkpoint, and the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import cfvit
from cfvit.budget import eta_curve
from benchmarks.calibrate import bench
from jobs.calibrate import (Budget, BudgetSpecError, Variant, best_per_budget, calibrate, parse_budgets, parse_floats,
                            validation_batches)

LIMIT = 400  # validation images: enough ties and exits to make the scan interesting, quick on 2 cores


# ------------------------------------------------------------------ budgets
def test_parse_budgets_gflops_percent_and_suffixes():
    got = parse_budgets("1.5, 2.0,2.5GFLOPs,3g", backbone_gflops=4.0)
    assert [b.gflops for b in got] == [1.5, 2.0, 2.5, 3.0]
    assert all(b.percent is None for b in got)
    pct = parse_budgets(["40%", "50 %"], backbone_gflops=4.6)
    assert [b.gflops for b in pct] == pytest.approx([0.4 * 4.6, 0.5 * 4.6])
    assert [b.percent for b in pct] == [40.0, 50.0]
    assert pct[0].spec == "40%"


@pytest.mark.parametrize("text, msg", [
    ("", "no budgets given"),
    (" , ", "no budgets given"),
    ("abc", "'abc' is not a number"),
    ("1.5,two", "'two' is not a number"),
    ("-1", "positive"),
    ("0", "positive"),
    ("nan", "positive, finite"),
    ("inf", "positive, finite"),
    ("%", "not a number"),
])
def test_parse_budgets_rejects_bad_strings(text, msg):
    with pytest.raises(BudgetSpecError, match=msg):
        parse_budgets(text, backbone_gflops=4.0)


def test_percent_budget_needs_the_backbone():
    with pytest.raises(BudgetSpecError, match="relative to the backbone"):
        parse_budgets("50%")


def test_parse_floats_ranges():
    assert parse_floats("0.3,0.5", "--alphas", 0, 1, lo_open=True) == [0.3, 0.5]
    assert parse_floats(None, "--alphas", 0, 1) == []
    with pytest.raises(BudgetSpecError, match=r"--alphas: 0.0 is outside \(0, 1\]"):
        parse_floats("0", "--alphas", 0, 1, lo_open=True)
    with pytest.raises(BudgetSpecError, match="--betas: 'x' is not a number"):
        parse_floats("x", "--betas", 0, 1)
    assert parse_floats("0,0.999", "--betas", 0, 1, hi_open=True) == [0.0, 0.999]
    with pytest.raises(BudgetSpecError, match=r"--betas: 1.0 is outside \[0, 1\)"):  # the EMA would stay 0
        parse_floats("1", "--betas", 0, 1, hi_open=True)


# ------------------------------------------------------------------ choosing across variants, infeasible budgets
def _variant(seed, coarse_g, fine_g, n=300, c=5):
    rng = np.random.default_rng(seed)
    cp = rng.dirichlet(np.ones(c) * 0.3, n)
    fp = rng.dirichlet(np.ones(c) * 0.3, n)
    y = rng.integers(0, c, n)
    curve = eta_curve(cp, fp, y, coarse_gflops=coarse_g, fine_gflops=fine_g)
    return Variant(0.5, 0.99, curve, {"coarse": coarse_g, "fine": fine_g}, 0, 0, n, source=f"s{seed}")


def test_infeasible_budget_below_every_variant_says_what_is_reachable():
    vs = [_variant(0, 1.0, 2.0), _variant(1, 1.2, 1.5)]
    (r,) = best_per_budget(vs, [Budget("0.5", 0.5)])
    assert not r.feasible and r.variant is None
    assert r.reachable == pytest.approx((1.0, 3.0))
    assert r.note == "infeasible: reachable 1.000–3.000 GFLOPs"
    assert "below the cheapest operating point (1.000 GFLOPs" in r.message
    assert r.summary()["feasible"] is False


def test_budget_above_every_variant_is_feasible_and_flagged():
    vs = [_variant(0, 1.0, 2.0), _variant(1, 1.2, 1.5)]
    (r,) = best_per_budget(vs, [Budget("10", 10.0)])
    assert r.feasible
    assert r.note == "above every operating point (max 3.000 GFLOPs)"
    best = max(float(v.curve.accuracy.max()) for v in vs)
    assert r.accuracy == pytest.approx(best)


def test_best_across_variants_is_the_most_accurate_that_fits():
    vs = [_variant(s, 1.0 + 0.1 * s, 2.0 - 0.2 * s) for s in range(4)]
    for b in np.linspace(1.05, 3.0, 12):
        (r,) = best_per_budget(vs, [Budget(f"{b:.3f}", float(b))])
        cands = [(a, -g) for v in vs for a, g in zip(v.curve.accuracy, v.curve.gflops) if g <= b + 1e-9]
        if not cands:
            assert not r.feasible
            continue
        acc, neg_g = max(cands)
        assert (r.accuracy, r.gflops) == pytest.approx((acc, -neg_g))
        assert r.gflops <= b + 1e-9


# ------------------------------------------------------------------ real model: exactness vs a brute-force scan
def _brute_force(conf, coarse_ok, fine_ok, cg, fg, budget):
    """Scan every threshold (each distinct confidence, plus 'nobody exits'), simulating the exit rule."""
    best = None
    for t in np.concatenate([np.unique(conf), [np.nextafter(conf.max(), np.float32(2))]]):
        exits = conf >= t
        acc = float(np.where(exits, coarse_ok, fine_ok).mean())
        g = cg + (1 - exits.mean()) * fg
        if g <= budget + 1e-9 and (best is None or (acc, -g) > (best[0], -best[1])):
            best = (acc, g, float(t), float(exits.mean()))
    return best


@pytest.fixture(scope="module")
def calibrated(fmnist_checkpoint, tmp_path_factory):
    ck = tmp_path_factory.mktemp("calib") / "model"
    shutil.copytree(fmnist_checkpoint, ck)
    model = cfvit.load(ck)
    g = model.stage_gflops()
    budgets = [g["coarse"] + f * g["fine"] for f in (0.1, 0.35, 0.6, 0.9)]
    spec = ",".join(f"{b:.6f}" for b in budgets) + ",40%,50%"
    cal = calibrate(str(ck), spec, limit=LIMIT, alphas=[0.3, 0.5, 0.7], betas=[0.9, model.beta], adopt_best=True)
    return ck, model, cal


def test_eta_per_budget_equals_brute_force_on_real_outputs(calibrated):
    ck, model, cal = calibrated
    assert len(cal.variants) == 6  # own (α, β) + the 3 × 2 grid, without the duplicate
    assert (cal.variants[0].alpha, cal.variants[0].beta) == (model.alpha, model.beta)
    # recompute the probabilities independently for one variant per α and compare every budget's choice
    x, y = map(np.concatenate, zip(*validation_batches("fashion-mnist:test", model.data_config, 10, limit=LIMIT)))
    for v in cal.variants:
        model.alpha, model.beta = v.alpha, v.beta
        with torch.no_grad():
            out = model.infer(torch.from_numpy(x[:256]), 2.0), model.infer(torch.from_numpy(x[256:]), 2.0)
        cl = torch.cat([o.coarse_logits for o in out]).float()
        fl = torch.cat([o.logits for o in out]).float()
        conf = cl.softmax(-1).amax(-1).numpy()
        c_ok, f_ok = (cl.argmax(-1).numpy() == y), (fl.argmax(-1).numpy() == y)
        g = model.stage_gflops()
        assert v.stage_gflops == pytest.approx(g)
        for r in best_per_budget([v], [b.budget for b in cal.results]):
            bf = _brute_force(conf, c_ok, f_ok, g["coarse"], g["fine"], r.budget.gflops)
            if bf is None:
                assert not r.feasible
                continue
            assert (r.accuracy, r.gflops, r.exit_fraction) == pytest.approx((bf[0], bf[1], bf[3]), abs=1e-12)
            # the chosen η lets out exactly the samples the brute-force threshold lets out
            assert np.array_equal(conf >= np.float32(r.eta), conf >= np.float32(bf[2]))
    model.alpha, model.beta = cal.variants[0].alpha, cal.variants[0].beta


def test_table_eta_realised_by_early_exit_inference(calibrated):
    """Run the real early exit at each written η: accuracy and mean GFLOPs are what the table promises."""
    ck, _, cal = calibrated
    loaded = cfvit.load(ck)
    assert (loaded.alpha, loaded.beta) == (cal.chosen.alpha, cal.chosen.beta)  # adopted setting survives a reload
    g = loaded.stage_gflops()
    x, y = map(np.concatenate, zip(*validation_batches("fashion-mnist:test", loaded.data_config, 10, limit=LIMIT)))
    for row in loaded.cfvit_config["eta_table"]:
        correct = exits = 0
        for lo in (0, 256):
            out = loaded.infer(torch.from_numpy(x[lo:lo + 256]), row["eta"])
            correct += int((out.logits.argmax(-1).numpy() == y[lo:lo + 256]).sum())
            exits += int((out.exit_stage == 0).sum())
        assert correct / len(y) == pytest.approx(row["accuracy"], abs=1.5 / len(y))  # ≤ 1 borderline flip
        assert exits / len(y) == pytest.approx(row["exit_fraction"], abs=1.5 / len(y))
        assert g["coarse"] + (1 - exits / len(y)) * g["fine"] <= row["budget_gflops"] + g["fine"] / len(y) + 1e-9


def test_written_checkpoint_has_the_eta_table_and_percent_budgets(calibrated):
    ck, model, cal = calibrated
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["eta_table"] == cal.table and cal.table
    assert cfg["calibration"]["budgets"][-2:] == ["40%", "50%"]
    assert cfg["alpha"] == cal.chosen.alpha and cfg["model_kwargs"].get("alpha", model.alpha) == cal.chosen.alpha
    pct = [r for r in cal.results if r.budget.percent is not None]
    assert [r.budget.gflops for r in pct] == pytest.approx([0.4 * cal.backbone_gflops, 0.5 * cal.backbone_gflops])
    for r in pct:  # the tiny model's coarse stage costs < 40 % of its backbone: both are feasible
        assert r.feasible and r.gflops <= r.budget.gflops + 1e-9
    assert cfg["class_names"]  # metadata already in the checkpoint is kept


def test_calibrate_too_low_and_too_high_budgets_do_not_crash(fmnist_checkpoint, tmp_path):
    model = cfvit.load(fmnist_checkpoint)
    g = model.stage_gflops()
    lo, hi = g["coarse"], g["coarse"] + g["fine"]
    too_low, too_high = f"{lo / 2:.6f}", f"{hi * 3:.6f}"
    cal = calibrate(str(fmnist_checkpoint), [too_low, too_high], limit=128, output=str(tmp_path / "o"))
    low, high = cal.results
    assert not low.feasible and low.note.startswith("infeasible: reachable ")
    assert f"{low.reachable[0]:.3f}–{low.reachable[1]:.3f} GFLOPs" in low.note
    assert low.reachable[0] >= lo - 1e-12 and low.reachable[1] <= hi + 1e-12
    assert high.feasible and "above every operating point" in high.note
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert [r["budget_gflops"] for r in written["eta_table"]] == [float(too_high)]
    assert written["calibration"]["infeasible"][0]["budget"] == f"{lo / 2:.6f}"


def test_calibrate_refuses_data_with_other_classes_and_leaves_the_checkpoint_alone(tmp_path):
    torch.manual_seed(0)
    model = cfvit.create_model("cfvit_tiny_fmnist", embed_dim=32, depth=3, num_heads=2, num_classes=5)
    cfvit.save(model, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ValueError, match=r"the model has no names \(5 classes\)"):
        calibrate(str(tmp_path / "m"), ["50%"], limit=64)  # no --data, none stored: fashion-mnist:test
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from cfvit_cli import app

    return CliRunner(), app


def test_cli_calibrate_prints_table_and_infeasible(cli, fmnist_checkpoint, tmp_path):
    runner, app = cli
    model = cfvit.load(fmnist_checkpoint)
    lo = model.stage_gflops()["coarse"]
    res = runner.invoke(app, ["calibrate", "--checkpoint", str(fmnist_checkpoint), "--budgets", f"{lo / 2:.5f},60%",
                              "--limit", "128", "--output", str(tmp_path / "c"), "--json", str(tmp_path / "c.json")],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())  # rich wraps table cells at the console width
    assert "below the cheapest operating point" in flat and "reachable budgets are" in flat and "60%" in flat
    summary = json.loads((tmp_path / "c.json").read_text())
    assert [b["feasible"] for b in summary["budgets"]] == [False, True]
    assert cfvit.load(tmp_path / "c").cfvit_config["eta_table"]


@pytest.mark.parametrize("budgets, msg", [("abc", "not a number"), ("-2", "positive")])
def test_cli_calibrate_bad_budgets(cli, fmnist_checkpoint, budgets, msg):
    runner, app = cli
    res = runner.invoke(app, ["calibrate", "--checkpoint", str(fmnist_checkpoint), "--budgets", budgets, "--no-write"])
    assert res.exit_code == 2 and msg in res.output


def test_cli_calibrate_missing_checkpoint(cli, tmp_path):
    runner, app = cli
    res = runner.invoke(app, ["calibrate", "--checkpoint", str(tmp_path / "nope"), "--budgets", "1"])
    assert res.exit_code == 2 and "config.json missing" in res.output


def test_bench_calibrate_runs(cli):
    runner, app = cli
    res = runner.invoke(app, ["bench", "calibrate", "--samples", "5000", "--classes", "100", "--repeats", "1"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "5,000" in res.output
    r = bench(2000, 50, repeats=1)
    assert r["operating_points"] > 1 and r["seconds_best"] > 0
