"""The README's main job, `cfvit pipeline --quick`, end to end in a subprocess with its own Ray instance."""
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform, decode_image
from serve.inputs import eta_from_table
from tests.fixtures.procs import command_env, run
from tests.fixtures.services import free_port, png_bytes

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]




def offline_answers(checkpoint: Path, n: int, budget_share: float) -> tuple[float, float]:
    """(top-1, coarse exit rate) of the library on the last `n` test images, as PNGs, at the η the endpoint
    picks for `budget_share` of the backbone's GFLOPs."""
    model = cfvit.load(str(checkpoint)).eval()
    table = [p for p in model.cfvit_config["eta_table"] if p.get("eta") is not None]
    eta = eta_from_table(table, budget_share * model.backbone_gflops())
    x, y = load_fashion_mnist("test")
    tf = build_transform(model.data_config)
    batch = torch.stack([tf(decode_image(png_bytes(a))) for a in x[-n:]])
    with torch.no_grad():
        out = model.infer(batch, eta)
    return (float((out.logits.argmax(-1).numpy() == y[-n:]).mean()),
            float((out.exit_stage == 0).float().mean()))


def test_pipeline_quick_runs_end_to_end(tmp_path):
    port = free_port()
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", COLUMNS="200")  # tables unwrapped
    cmd = [sys.executable, "-m", "cfvit_cli", "pipeline", "--quick", "--port", str(port), "--images", "64",
           "--budgets", "40%,0.0001", "--set", "data.train_limit=1024", "--set", "data.val_limit=256",
           "--set", f"checkpoint.storage_path={tmp_path}/runs"]
    proc = run(cmd, timeout=600, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the summary: a served row for the feasible budget, and the infeasible one reported, not a crash
    # budget, η, val top-1, val MFLOPs, HTTP top-1, coarse exits, HTTP MFLOPs
    row = re.search(r"│ 40% [\d.]+\s+│\s+([\d.]+)\s+│\s+([\d.]+)%\s+│\s+([\d.]+)\s+│\s+([\d.]+)%\s+│"
                    r"\s+([\d.]+)%\s+│\s+([\d.]+)\s+│", out)
    assert row, out[-3000:]
    http_top1, exit_rate = float(row.group(4)) / 100, float(row.group(5)) / 100
    assert "0.0001" in out and "infeasible" in out.lower()
    assert "registered model models:/cfvit-fmnist-tiny/" in out
    assert f"endpoint: http://127.0.0.1:{port}/ (stopped)" in out
    # one line per epoch on the terminal; Ray's and the workers' logs in the file it names, not here
    assert re.search(r"^epoch 2/2  loss [\d.]+  coarse [\d.]+%  fine [\d.]+%", proc.stdout, re.M), out[-3000:]
    log = Path(re.search(r"^  (/\S+\.log)$", proc.stdout, re.M).group(1))
    assert "RayTrainWorker" in log.read_text() and "RayTrainWorker" not in out
    # the calibrated checkpoint it served carries the η table
    ck = re.search(r"calibrated checkpoint: (\S+)", out).group(1)
    cfg = json.loads((Path(ck) / "config.json").read_text())
    assert cfg["eta_table"] and cfg["eta_table"][0]["budget_gflops"] > 0
    # what HTTP answered is what the library answers for the same 64 PNGs at the η the budget picks
    top1, exits = offline_answers(Path(ck), 64, 0.4)
    assert abs(http_top1 - top1) <= 1 / 64 + 5e-4 and abs(exit_rate - exits) <= 1 / 64 + 5e-3, (http_top1, top1,
                                                                                                   exit_rate, exits)
    # and the endpoint is down afterwards
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
