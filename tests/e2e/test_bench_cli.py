"""Every `cfvit bench` verb the README lists runs once for real, in a small form (seconds of load, a tiny model),
its JSON checked; `failover` and `train-failover` run in their own tests. The serving benchmark also shows
how it fails: a system that answers every request with an error is named with its status and body, gives
no ratio, and makes the command exit 1."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

import cfvit
from benchmarks.serve_report import served_ratios
from cfvit_cli import app
from tests.fixtures.procs import cfvit as cfvit_cmd
from tests.fixtures.procs import run
from tests.fixtures.services import free_port

pytestmark = pytest.mark.e2e  # each runs a whole command for real


def _invoke(*args: str) -> str:
    res = CliRunner().invoke(app, ["bench", *args], terminal_width=120)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return res.output


def test_bench_throughput(tmp_path):
    out = tmp_path / "t.json"
    _invoke("throughput", "--model", "cfvit_tiny_fmnist", "--batch-size", "8", "--batches", "2", "--device", "cpu",
            "--json", str(out))
    r = json.loads(out.read_text())
    g = cfvit.create_model("cfvit_tiny_fmnist").stage_gflops()
    base, *rows = r["rows"]
    assert base["name"] == "backbone" and base["speedup"] == 1.0 and base["images_per_s"] > 0
    assert [row["exit_fraction"] for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]  # 0.76 of 8 images: 6
    for row in rows:  # the FLOPs of each row are the model's, and the ratios are of the measured rates
        assert row["gflops"] == pytest.approx(g["coarse"] + (1 - row["exit_fraction"]) * g["fine"])
        assert row["flops_ratio"] == pytest.approx(base["gflops"] / row["gflops"])
        assert row["speedup"] == pytest.approx(row["images_per_s"] / base["images_per_s"])
    assert r["stages"]["coarse_gflops"] == pytest.approx(g["coarse"]) and r["settings"]["device"] == "cpu"


def test_bench_train_and_calibrate(tmp_path):
    _invoke("train", "--batch-size", "8", "--steps", "2", "--device", "cpu", "--fp32", "--json", str(tmp_path / "t.json"))
    r = json.loads((tmp_path / "t.json").read_text())
    assert [row["variant"] for row in r["rows"]] == ["backbone", "cfvit_split_all", "cfvit_selection"]
    base = r["rows"][0]
    for row in r["rows"]:
        assert row["step_ms"] > 0 and row["images_per_s"] == pytest.approx(8 / (row["step_ms"] / 1000))
        assert row["ratio"] == pytest.approx(base["images_per_s"] / row["images_per_s"])
    assert r["cfvit_ratio"] == r["rows"][2]["ratio"] and r["split_all_ratio"] == r["rows"][1]["ratio"]
    text = _invoke("calibrate", "--samples", "2000", "--classes", "10", "--repeats", "1", "--json",
                   str(tmp_path / "c.json"))
    c = json.loads((tmp_path / "c.json").read_text())
    assert (c["samples"], c["classes"], c["repeats"]) == (2000, 10, 1) and c["operating_points"] > 1
    assert 0 < c["seconds_best"] < 1 and "< 1 s ✓" in text


@pytest.mark.xfail(reason="one of the 64 images is sometimes missing from one pipeline variant's count "
                          "(63 of 64, seen twice in full-suite runs, never alone); not yet explained", strict=False)
def test_bench_data_reads_through_ray_data_from_s3(tmp_path):
    out = tmp_path / "d.json"
    proc = run(cfvit_cmd("bench", "data", "--images", "64", "--max-side", "64", "--cpus", "2", "--per-core-images",
                         "4", "--json", str(out)), timeout=400, merge=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    r = json.loads(out.read_text())
    assert r["images"] == 64 and "moto" in r["store"] and set(r["mean_bytes"]) == {"original", "max-side 64"}
    assert r["mean_bytes"]["max-side 64"] < r["mean_bytes"]["original"]
    for variant in r["per_core"].values():
        assert all(t["failed"] == 0 and t["cpu_ms"] > 0 for t in variant.values())
    assert set(r["pipeline"]) == {"imagefolder", "webdataset", "webdataset max-side 64"}
    for p in r["pipeline"].values():  # every image through, two batches of 32: a rate after the first
        assert p["images"] == 64 and p["steady_img_s"] > 0 and 0 < p["first_batch_s"] <= p["total_s"]


def test_bench_serve_measures_a_system_and_names_one_that_answers_nothing(fmnist_checkpoint, tmp_path):
    """split answers; `backbone max_pixels=1` refuses every image (413): its errors are printed with their
    body, no ratio is computed against it, and the command exits 1 after writing the JSON."""
    out = tmp_path / "s.json"
    proc = run(cfvit_cmd("bench", "serve", "--checkpoint", str(fmnist_checkpoint), "--concurrency", "2",
                         "--duration", "2", "--warmup", "0.5", "--images", "16", "--batch-size", "8",
                         "--system", "split", "--system", "backbone max_pixels=1", "--port", str(free_port()),
                         "--json", str(out)), timeout=400, merge=True)
    text = proc.stdout
    assert proc.returncode == 1, text[-4000:]
    assert "error: backbone max_pixels=1 failed every request" in text
    assert 'HTTP 413: {"error":"image too large","detail":{"index":0,"width":28,"height":28,"max_pixels":1}}' in text
    r = json.loads(out.read_text())
    (split,), (broken,) = r["systems"]["split"], r["systems"]["backbone max_pixels=1"]
    assert split["requests"] > 0 and split["errors"] == split["failed_total"] == 0 and split["throughput"] > 0
    assert split["p50_ms"] <= split["p99_ms"] and abs(split["exit_rate"] - r["offline"]["exit_rate"]) <= 0.25
    assert {"read", "decode", "coarse_in", "coarse_compute", "app", "proxy"} <= set(split["breakdown"])
    assert broken["requests"] == 0 and broken["failed_total"] >= broken["errors"] > 0
    assert broken["error_samples"][0]["status"] == 413
    assert r["offline"]["backbone_ips"] > 0 and r["offline"]["ratio"] > 0
    assert served_ratios(r["systems"], r["offline"]) == []  # no ratio against a system that answered nothing


def test_bench_serve_burst_steps_eta_down_with_slo_mode_on(fmnist_checkpoint, tmp_path):
    """A 1 ms target no request meets: with SLO mode on η steps down the table; off, every reply is at 0.5."""
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    proc = run(cfvit_cmd("bench", "serve", "--checkpoint", str(fmnist_checkpoint), "--burst", "--rate", "5",
                         "--phases", "2,2,2", "--slo-ms", "1", "--port", str(free_port()), "--json", str(out),
                         "--plot", str(plot)), timeout=400, merge=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    r = json.loads(out.read_text())
    off, on = r["runs"]["slo-off"], r["runs"]["slo-on"]
    assert off["sent"] == on["sent"] > 0 and off["failed"] == on["failed"] == 0  # the same arrival schedule
    for run_ in (off, on):
        assert sum(p["requests"] for p in run_["phases"].values()) == run_["sent"]
        assert all(0 <= p["accuracy"] <= 1 for p in run_["phases"].values())
    assert off["slo"] is None and all(p["eta"] == 0.5 for p in off["phases"].values())
    assert on["slo"]["latency_slo_ms"] == 1 and on["slo"]["level"] >= 1 and on["slo"]["eta"] < 0.5
    assert on["phases"]["after"]["eta"] < 0.5 and on["slo"]["eta"] in on["slo"]["ladder"]
    with Image.open(plot) as im:
        assert im.format == "PNG"
