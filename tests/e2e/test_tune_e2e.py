"""End to end on CPU: `run_tune` with 2 real trials (Ray Tune + Optuna + ASHA around the real training job on
a local Ray), the post-hoc η per budget, the Pareto plot, an MLflow server holding a parent run with one child
per trial, and the winner registered with its η table in its config."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cfvit
from jobs.train.config import ConfigError, load_config
from jobs.tune import (
    ClusterTooSmall,
    TuneSettings,
    fit_concurrency,
    pareto_front,
    run_tune,
    settings_from_cli,
    trial_cpus,
)

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}


# ------------------------------------------------------------------ quick checks (no Ray)
def test_settings_from_cli_rejects_bad_input():
    with pytest.raises(ConfigError, match="'x' is not a number"):
        settings_from_cli("1.0,x")
    with pytest.raises(ConfigError, match="alpha"):
        settings_from_cli("1.0", alpha_range="0.7,0.3")
    with pytest.raises(ConfigError, match="--beta-range"):
        settings_from_cli("1.0", beta_range="a,b")
    s = settings_from_cli("40%,2.0", alpha_range="0.5", posthoc_alphas="0.3,0.7", max_steps=3)
    assert s.budgets == ["40%", "2.0"] and s.alpha == (0.5, 0.5) and s.posthoc_alphas == [0.3, 0.7]
    assert s.max_steps_per_epoch == 3


def test_concurrency_fits_the_cluster():
    # 2 workers × 1 CPU + 0.01 for the trial itself + 1 left free for Ray Data = 3.01 CPUs a trial
    cfg = load_config("fmnist_tiny", check_uris=False)
    assert trial_cpus(cfg) == pytest.approx(3.01)
    assert fit_concurrency(cfg, {"CPU": 4}, None, 8) == 1
    assert fit_concurrency(cfg, {"CPU": 12}, None, 8) == 3
    assert fit_concurrency(cfg, {"CPU": 12}, None, 2) == 2
    assert fit_concurrency(cfg, {"CPU": 64}, 3, 8) == 3
    assert fit_concurrency(cfg, {"CPU": 4}, 3, 8) == 1  # asking for more than fits does not starve the data
    # a cluster that cannot hold one trial and its data pipeline is refused at once, with the numbers
    with pytest.raises(ClusterTooSmall, match=r"has 3 CPUs but one trial needs 3\.01.*data\.cpus"):
        fit_concurrency(cfg, {"CPU": 3}, None, 8)
    with pytest.raises(ClusterTooSmall, match="GPUs"):
        fit_concurrency(cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": True})}),
                        {"CPU": 16, "GPU": 1}, None, 8)


def test_pareto_front():
    pts = [(1.0, 0.5), (1.0, 0.6), (1.5, 0.55), (2.0, 0.7), (2.5, 0.7), (3.0, 0.8)]
    assert pareto_front(pts) == [(1.0, 0.6), (2.0, 0.7), (3.0, 0.8)]


# ------------------------------------------------------------------ the real thing
@pytest.fixture(scope="module")
def tuned(ray_session, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    sets = {
        "name": "tune-e2e", "data.train_limit": 256, "data.val_limit": 128,
        "model.name": "cfvit_tiny_fmnist", "model.overrides": json.dumps(TINY), "optim.batch_size": 64, "deepspeed.micro_batch_size": 32,
        "schedule.epochs": 2, "schedule.split_fraction": 0.5, "scaling.num_workers": 1,
        "checkpoint.storage_path": str(out / "ckpt"),
        "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": "tune-e2e",
        "mlflow.registered_model": "cfvit-tune-e2e",
    }
    cfg = load_config("fmnist_tiny", [f"{k}={v}" for k, v in sets.items()])
    g = cfvit.create_model("cfvit_tiny_fmnist", **TINY).stage_gflops()
    budgets = [f"{g['coarse'] / 2:.6f}",  # below any coarse stage: infeasible
               f"{g['coarse'] + 0.5 * g['fine']:.6f}", "60%",
               f"{10 * (g['coarse'] + g['fine']):.6f}"]  # above every trial
    settings = TuneSettings(budgets=budgets, trials=2, seed=0, alpha=(0.3, 0.7), beta=(0.95, 0.999), epochs=2,
                            max_steps_per_epoch=2, posthoc_alphas=[0.3, 0.7], calib_limit=128, output=str(out / "o"))
    return run_tune(cfg, settings), mlflow_server, g


@pytest.mark.e2e
def test_both_trials_ran_and_were_calibrated(tuned):
    o, _, _ = tuned
    assert len(o.trials) == 2
    for t in o.trials:
        assert t.error is None and t.iterations >= 1 and t.checkpoint
        assert 0.3 <= t.config["alpha"] <= 0.7 and 0.95 <= t.config["beta"] <= 0.999
        assert "val_fine_top1" in t.metrics
        # own setting + the post-hoc α variants (the trained α may coincide with none of them)
        assert len(t.variants) == 3 and {0.3, 0.7} <= {v.alpha for v in t.variants}
    assert len({(t.config["alpha"], t.config["beta"]) for t in o.trials}) == 2  # the search proposed two settings


@pytest.mark.e2e
def test_best_per_budget_and_infeasible_messages(tuned):
    o, _, g = tuned
    low, mid, pct, high = o.results
    variants = [v for t in o.trials for v in t.variants]
    lo = min(v.reachable[0] for v in variants)
    hi = max(v.reachable[1] for v in variants)
    assert not low.feasible and low.note == f"infeasible: reachable {lo:.3f}–{hi:.3f} GFLOPs"
    assert "below the cheapest operating point" in low.message
    assert high.feasible and high.note == f"above every operating point (max {hi:.3f} GFLOPs)"
    assert pct.budget.percent == 60 and pct.budget.gflops == pytest.approx(0.6 * o.summary()["backbone_gflops"])
    for r in (mid, pct, high):  # the best over every trial and variant, by brute force over all curve points
        pts = [(a, -gf) for v in variants for a, gf in zip(v.curve.accuracy, v.curve.gflops)
               if gf <= r.budget.gflops + 1e-9]
        assert r.feasible and (r.accuracy, -r.gflops) == pytest.approx(max(pts))
        assert r.variant.meta["trial_id"] in {t.trial_id for t in o.trials}
    s = o.summary()
    assert [b["feasible"] for b in s["best"]] == [False, True, True, True]


@pytest.mark.e2e
def test_pareto_plot_written(tuned):
    o, _, _ = tuned
    from PIL import Image

    with Image.open(o.plot) as im:
        assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.e2e
def test_mlflow_parent_with_two_children_and_registered_winner(tuned, tmp_path):
    from mlflow.tracking import MlflowClient

    from cfvit_common.tracking import download_model

    o, uri, _ = tuned
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(o.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{o.parent_run_id}'")
    assert len(children) == 2
    assert {c.info.run_id for c in children} == {t.mlflow_run_id for t in o.trials}
    final = {"completed": "FINISHED", "stopped early": "KILLED"}  # by what happened to the trial
    by_run = {t.mlflow_run_id: t for t in o.trials}
    for c in children:
        trial = by_run[c.info.run_id]
        assert c.info.status == final[trial.status], (trial.status, c.info.status)
        assert c.data.tags["cfvit.tune.status"] == trial.status
        assert float(c.data.params["model.alpha"]) == trial.config["alpha"]
        assert "val_fine_top1" in c.data.metrics
    assert any(k.startswith("best_") and k.endswith("_eta") for k in parent.data.metrics)
    arts = [a.path for a in client.list_artifacts(o.parent_run_id, "plots")]
    assert "plots/pareto.png" in arts

    # the champion is registered (as <training model name>-tuned by default, beside the training job's own
    # registrations); its config carries the η table serving reads
    name = "cfvit-tune-e2e-tuned"
    mv = client.get_model_version_by_alias(name, "champion")
    path = download_model(f"models:/{name}@champion", str(tmp_path / "dl"), uri)
    model = cfvit.load(path)
    table = model.cfvit_config["eta_table"]
    assert table and {"budget_gflops", "eta", "accuracy", "gflops", "exit_fraction"} <= set(table[0])
    assert (model.alpha, model.beta) == pytest.approx((o.champion.alpha, o.champion.beta))
    from jobs.calibrate import eta_table_for

    assert table == eta_table_for(o.champion, o.budgets)
    # every feasible budget's winner has a budget-… alias pointing at a version with its η for that budget
    for r in o.results:
        if r.feasible:
            from jobs.tune import alias_for as _alias_for

            v = client.get_model_version_by_alias(name, _alias_for(r.budget))
            p = download_model(f"models:/{name}/{v.version}", str(tmp_path / f"v{v.version}"), uri)
            rows = {row["budget_gflops"]: row for row in cfvit.load(p).cfvit_config["eta_table"]}
            assert rows[r.budget.gflops]["eta"] == r.eta
            assert rows[r.budget.gflops]["accuracy"] == pytest.approx(r.accuracy)
    assert int(mv.version) >= 1
    # the served model takes "budget X" and picks the η it was calibrated with
    assert np.all(np.diff([row["gflops"] for row in sorted(table, key=lambda x: x["budget_gflops"])]) >= -1e-12)
