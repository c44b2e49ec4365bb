"""The README's main job, `cfvit pipeline --quick`, end to end in a subprocess with its own Ray instance."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.services import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]




def test_pipeline_quick_runs_end_to_end(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_ENDPOINT", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    env["COLUMNS"] = "200"  # rich tables unwrapped
    cmd = [sys.executable, "-m", "cfvit_cli", "pipeline", "--quick", "--port", str(port), "--images", "64",
           "--budgets", "40%,0.0001", "--set", "data.train_limit=1024", "--set", "data.val_limit=256",
           "--set", f"checkpoint.storage_path={tmp_path}/runs"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the summary: a served row for the feasible budget, and the infeasible one reported, not a crash
    # budget, η, val top-1, val MFLOPs, HTTP top-1, coarse exits, HTTP MFLOPs
    row = re.search(r"│ 40% [\d.]+\s+│\s+([\d.]+)\s+│\s+([\d.]+)%\s+│\s+([\d.]+)\s+│\s+([\d.]+)%\s+│"
                    r"\s+([\d.]+)%\s+│\s+([\d.]+)\s+│", out)
    assert row, out[-3000:]
    http_top1, exit_rate = float(row.group(4)) / 100, float(row.group(5)) / 100
    assert 0.0 <= http_top1 <= 1.0 and 0.0 <= exit_rate <= 1.0
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
    # and the endpoint is down afterwards
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
