"""`cfvit reproduce --quick`: mechanics only (files written, sane keys/types/ranges, MLflow runs), plus the
pure helpers on synthetic logits. The quick run is tiny, so its accuracies mean nothing and are not checked."""
import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from jobs import reproduce as rp
from cfvit_cli import app as cfvit_app


def _app() -> typer.Typer:
    return cfvit_app


def test_cli_options():
    res = CliRunner().invoke(_app(), ["reproduce", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for opt in ("--quick", "--full", "--out", "--epochs", "--seed"):
        assert opt in res.output


def test_make_config_overrides():
    cfg = rp.make_config(quick=True, epochs=3, seed=7)
    assert (cfg.epochs, cfg.seed, cfg.quick, cfg.train_limit) == (3, 7, True, rp.QUICK["train_limit"])
    assert cfg.split_epochs == 2  # 2/3 of 3 epochs split every patch
    full = rp.make_config(full=True)
    assert full.full and not full.quick and full.train_limit == rp.ReproConfig().train_limit and full.test_limit is None
    gpu = rp.make_config(gpu_recipe=True, epochs=2)
    assert (gpu.device, gpu.full, gpu.batched_transforms, gpu.epochs) == ("cuda", True, True, 2)  # options override
    assert rp.make_config(model="cfvit_tiny_fmnist").model == "cfvit_tiny_fmnist"
    with pytest.raises(ValueError, match="exclude"):
        rp.make_config(quick=True, gpu_recipe=True)


@pytest.mark.parametrize("args, key", [
    (["--epochs", "0"], "epochs=0"),
    (["--train-limit", "-5"], "train_limit=-5"),
    (["--embed-dim", "30", "--num-heads", "4"], "not divisible"),
    (["--lr", "0"], "lr=0"),
    (["--model", "vit_huge"], "model='vit_huge'"),
    (["--device", "tpu"], "device='tpu'"),
])
def test_bad_options_fail_fast_with_the_key_named(args, key, tmp_path):
    res = CliRunner().invoke(_app(), ["reproduce", "--quick", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and key in res.output, res.output
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_fails_fast(tmp_path):
    res = CliRunner().invoke(_app(), ["reproduce", "--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no CUDA device" in res.output and not list(tmp_path.iterdir())


def test_eta_points_and_match_on_synthetic_logits():
    from cfvit.budget import eta_curve

    y = torch.tensor([0, 1, 2, 3])
    # coarse: confident+right, confident+wrong, unsure+right, unsure+wrong; fine gets all right
    coarse = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.01, 0.01, 0.97, 0.01],
                                     [0.1, 0.1, 0.7, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    fine = torch.eye(4) * 10
    g = {"coarse": 1.0, "fine": 3.0}
    rows = {r["eta"]: r for r in rp.eta_points(coarse, fine, y, g, etas=(0.0, 0.5, 0.9, 1.0))}
    assert rows[0.0]["exit_fraction"] == 1.0 and rows[0.0]["top1"] == 0.5 and rows[0.0]["gflops"] == 1.0
    assert rows[0.5]["coarse_exits"] == 3 and rows[0.5]["fine_exits"] == 1 and rows[0.5]["top1"] == 0.75
    assert rows[0.9]["coarse_exits"] == 2 and rows[0.9]["top1"] == 0.75
    assert rows[1.0]["exit_fraction"] == 0.0 and rows[1.0]["top1"] == 1.0 and rows[1.0]["gflops"] == 4.0

    curve = eta_curve(coarse.softmax(-1), fine.softmax(-1), y, coarse_gflops=1.0, fine_gflops=3.0)
    m = rp.match_backbone(curve, backbone_top1=0.75, backbone_gflops=8.0)
    # operating points: nobody exits 100 %; the two .97 (tied) exit 75 %; plus the .7 one 75 % (cheaper); all 50 %
    assert m is not None and m["top1"] >= 0.75
    assert math.isclose(m["gflops"], 1.0 + 3.0 * (1 - m["exit_fraction"]))
    assert math.isclose(m["flops_fraction"], m["gflops"] / 8.0) and math.isclose(m["flops_saved"], 1 - m["flops_fraction"])
    assert m["exit_fraction"] == 0.75 and m["top1"] == 0.75  # the cheapest point at >= 75 %
    assert rp.match_backbone(curve, backbone_top1=1.01, backbone_gflops=8.0) is None


# The quick runs are the whole `cfvit reproduce` command, end to end (minutes of training): e2e.
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    uri = f"sqlite:///{tmp}/mlflow.db"
    res = CliRunner().invoke(_app(), ["reproduce", "--quick", "--out", str(tmp / "docs"), "--seed", "3",
                                      "--tracking-uri", uri])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return tmp / "docs", uri


@pytest.mark.e2e
def test_quick_run_writes_results(quick_run):
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    n = r["settings"]["test_images"]
    assert n == rp.QUICK["test_limit"] and r["settings"]["train_images"] == rp.QUICK["train_limit"]
    assert r["config"]["seed"] == 3 and r["config"]["quick"] is True and r["wall_seconds"] > 0

    b = r["backbone"]
    assert 0 <= b["top1"] <= 1 and b["gflops"] > 0
    assert math.isclose(b["top1"] * n, round(b["top1"] * n), abs_tol=1e-6)  # a count of test images
    sg = r["cfvit"]["stage_gflops"]
    assert 0 < sg["coarse"] < sg["fine"] and sg["coarse"] + sg["fine"] < 1.5 * b["gflops"]

    t2 = r["table2"]
    assert [p["eta"] for p in t2] == list(rp.ETAS)
    assert t2[0]["exit_fraction"] == 1.0 and math.isclose(t2[0]["gflops"], sg["coarse"])
    assert math.isclose(t2[0]["top1"], r["cfvit"]["coarse_top1"])
    for p in t2:
        assert 0 <= p["top1"] <= 1 and 0 <= p["exit_fraction"] <= 1 and p["coarse_exits"] + p["fine_exits"] == n
        assert math.isclose(p["gflops"], sg["coarse"] + (1 - p["exit_fraction"]) * sg["fine"], rel_tol=1e-9)
    assert all(a["gflops"] <= c["gflops"] + 1e-12 for a, c in zip(t2, t2[1:]))  # more η, more fine work

    ff = r["flops_fraction_at_backbone_accuracy"]
    assert ff is None or (isinstance(ff, float) and 0 < ff < 1.5)
    assert (ff is None) == (r["match"] is None)
    if ff is not None:
        assert r["match"]["top1"] >= b["top1"]

    sel = r["ablations"]["selection"]
    assert set(sel) == {"gca", "last", "random", "negative"} and all(0 <= v <= 1 for v in sel.values())
    assert math.isclose(sel["gca"], r["cfvit"]["fine_top1"])  # gca is the trained model's own selection
    assert "reuse" not in r["ablations"]  # only with --full

    th = r["throughput"]
    assert th["backbone_images_per_s"] > 0 and [p["eta"] for p in th["rows"]] == list(rp.ETAS)
    assert all(p["images_per_s"] > 0 and p["speedup"] > 0 for p in th["rows"])
    assert sum(1 for e in r["exit_counts"]) == len(rp.EXIT_ETAS)
    assert [a for a in r["arms"]] == ["backbone", "cfvit"] and all(len(a["history"]) == 1 for a in r["arms"].values())
    # test top-1 after every epoch (the plateau's evidence), equal to the final evaluation after the last one
    assert r["arms"]["backbone"]["history"][-1]["test_top1"] == pytest.approx(b["top1"])
    assert r["arms"]["cfvit"]["history"][-1]["test_top1"] == pytest.approx(r["cfvit"]["fine_top1"])
    assert set(r["plateau"]) == {"backbone", "cfvit"} and not r["plateau"]["cfvit"]["reached"]  # one epoch: no trend

    ci = r["confidence_intervals"]
    lo, hi = ci["accuracy"]["backbone"]
    assert lo <= b["top1"] <= hi and 0 <= lo < hi <= 1
    for p in t2:
        d = ci["cfvit_minus_backbone"][f"{p['eta']:g}"]
        assert d["diff"] == pytest.approx(p["top1"] - b["top1"]) and d["low"] <= d["diff"] <= d["high"]
    assert list(ci["selection_order"]) == ["gca-last", "last-random", "random-negative"]
    assert all(v["verdict"] in (">", "<", "≈") for v in ci["selection_order"].values())
    assert set(r["near_backbone"]) == {"0.5", "1"}


@pytest.mark.e2e
def test_quick_run_writes_markdown_and_figures(quick_run):
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    md = (out / "RESULTS.md").read_text()
    for heading in ("Table 2 analogue", "Fig. 8", "Fig. 9", "Table 4", "--quick", "Did both arms plateau?",
                    "Intervals in brackets are 95 %", "backbone − 0.5 points", "| gca > last |"):
        assert heading in md
    assert f"{100 * r['backbone']['top1']:.2f}" in md  # generated from the run, not typed in
    assert f"{100 * r['ablations']['selection']['negative']:.2f}" in md
    for name in ("accuracy_gflops.png", "exit_counts.png", "regions.png"):
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


@pytest.mark.e2e
def test_quick_run_is_in_mlflow(quick_run):
    from mlflow.tracking import MlflowClient

    out, uri = quick_run
    r = json.loads((out / "results.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(r["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert math.isclose(run.data.metrics["backbone_top1"], r["backbone"]["top1"])
    assert set(run.data.metrics) >= {"selection_gca_top1", "selection_negative_top1", "top1_eta_0.5"}
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "RESULTS.md", "figures"} <= arts
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.info.run_name for c in children} == {"backbone", "cfvit"}
    assert all(c.info.status == "FINISHED" and "train_loss" in c.data.metrics for c in children)


@pytest.mark.e2e
def test_render_from_json_reproduces_the_markdown(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "results.json"
    copy.write_text((out / "results.json").read_text())
    assert rp.render_from_json(copy) == (out / "RESULTS.md").read_text()
    assert (tmp_path / "RESULTS.md").is_file()


@pytest.mark.e2e
def test_full_quick_run_retrains_the_reuse_and_loss_ablations(tmp_path):
    """`--full` mechanics on a sliver of data: three more arms, Table 5 + loss in the results, markdown and MLflow."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = CliRunner().invoke(_app(), ["reproduce", "--quick", "--full", "--out", str(tmp_path / "docs"),
                                      "--train-limit", "64", "--test-limit", "32", "--tracking-uri", uri])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    r = json.loads((tmp_path / "docs" / "results.json").read_text())
    ab = r["ablations"]
    assert list(ab["reuse"]) == ["mlp", "linear", "none"] and list(ab["loss"]) == ["CE+KL", "CE+CE"]
    assert ab["reuse"]["mlp"] == ab["loss"]["CE+KL"]  # the main CF-ViT arm is the reference row of both
    assert math.isclose(ab["reuse"]["mlp"]["fine_top1"], r["cfvit"]["fine_top1"])
    for v in [*ab["reuse"].values(), *ab["loss"].values()]:
        assert 0 <= v["coarse_top1"] <= 1 and 0 <= v["fine_top1"] <= 1 and v["train_seconds"] > 0
        assert math.isclose(v["fine_top1"] * 32, round(v["fine_top1"] * 32), abs_tol=1e-6)
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "Ablations retrained with `--full`" in md and "| reuse `none` (CE+KL) |" in md and "| loss CE+CE" in md
    client = MlflowClient(tracking_uri=uri)
    children = client.search_runs([client.get_experiment_by_name("cfvit-reproduce").experiment_id],
                                  f"tags.mlflow.parentRunId = '{r['mlflow']['run_id']}'")
    assert {c.info.run_name for c in children} == {"backbone", "cfvit", "cfvit-reuse-linear", "cfvit-reuse-none",
                                                   "cfvit-loss-ce"}
    assert all(c.info.status == "FINISHED" for c in children)
