"""`cfvit tune` the way a user runs it: a subprocess, the shipped fmnist_tiny config with its 2 workers, the
CLI's own local Ray, on this machine's cores. Before, the trial took every logical CPU and Ray Data's
decode tasks never got one: the first epoch never came and the terminal filled with Ray Train warnings."""
import json
import signal
import sys
from pathlib import Path

import pytest

from tests.fixtures.procs import command_env, run, running

pytestmark = pytest.mark.e2e


def _tune_cmd(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cfvit_cli", "tune", "--config", "jobs/configs/fmnist_tiny.yaml",
            "--budgets", "40%,60%", "--epochs", "2", "--max-steps", "3", "--output", str(tmp / "out"),
            "--set", "data.val_limit=200", "--set", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            "--set", f"checkpoint.storage_path={tmp}/ray", *extra]


def _env() -> dict:
    return command_env(COLUMNS="80")  # the CLI starts its own Ray


def _run_status(tmp: Path, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db").get_run(run_id).info.status


def test_two_short_trials_run_to_the_summary_table(tmp_path):
    # grace period 2: ASHA may not stop a trial before its last epoch, so both run to the end
    out = run(_tune_cmd(tmp_path, "--trials", "2", "--grace-period", "2"), timeout=600, env=_env())
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "best (α, β, η) per budget" in text and "Pareto plot:" in text
    assert "Traceback" not in text
    assert "Failed to query Ray Train Controller" not in text
    summary = json.loads((tmp_path / "out" / "tune_summary.json").read_text())
    # --max-steps ends every epoch early; the second epoch still got its data
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    assert all(t["iterations"] == 2 and t["checkpoint"] for t in summary["trials"])
    assert _run_status(tmp_path, summary["parent_run_id"]) == "FINISHED"


def test_ctrl_c_keeps_what_finished_and_exits_without_a_traceback(tmp_path):
    with running(_tune_cmd(tmp_path, "--trials", "3"), env=_env()) as proc:
        proc.wait_for(r"\[tune\] trial.*epoch 1/2", timeout=480)  # the first trial's first epoch is in
        proc.proc.send_signal(signal.SIGINT)  # interrupt as a user would
        rc = proc.wait(timeout=240)
        text = proc.output
    assert rc == 130, text[-4000:]
    assert "SIGINT: stopping the trials" in text and "Traceback" not in text
    summary = json.loads((tmp_path / "out" / "tune_summary.json").read_text())
    assert summary["interrupted"] == "SIGINT"
    kept = [t for t in summary["trials"] if t["checkpoint"]]
    assert kept and all(t["status"] in ("interrupted", "completed") for t in kept)  # the epoch that finished
    assert summary["best"] and any(b["feasible"] for b in summary["best"])  # still calibrated and reported
    assert _run_status(tmp_path, summary["parent_run_id"]) == "KILLED"
