"""`cfvit submit` against a real local Ray head (`ray start --head` on loopback, own ports and temp dir).

The head is started in its own process session and torn down by killing that session only, never with
`ray stop` (which would kill every Ray on the machine, including other people's).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import typer
from typer.testing import CliRunner

from jobs.ops.cli import app as ops_app
from jobs.ops import submit


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _app() -> typer.Typer:
    return ops_app


def _kill_session(pgid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 4.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """Dashboard URL of a private Ray head; every port it opens is chosen free so it can coexist."""
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # short: Ray's unix sockets live under it
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    # Jobs run `python` from PATH: make it this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(runtime_env),
        "--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid  # start_new_session: the session/group id is the launcher's pid, daemons inherit it
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed:\n{out.decode(errors='replace')[-3000:]}")
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:  # the job API answers a little after `ray start` returns
            try:
                submit.connect(url)
                break
            except submit.SubmitError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        _kill_session(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.e2e
def test_run_job_to_completion_and_fetch_logs(ray_head, tmp_path):
    workdir = tmp_path / "proj"
    workdir.mkdir()
    # The job imports a module from the uploaded working dir and reads an --env variable.
    (workdir / "greet.py").write_text("import os\nprint('hello from cfvit job', os.environ['CFVIT_GREETING'])\n")
    runner = CliRunner()
    result = runner.invoke(
        _app(),
        ["submit", "run", "--address", ray_head, "--working-dir", str(workdir), "--env", "CFVIT_GREETING=ahoy",
         "--submission-id", "cfvit-test-hello", "--", "python", "-c", "import greet"],
    )
    assert result.exit_code == 0, result.output
    assert "hello from cfvit job ahoy" in result.stdout
    assert "SUCCEEDED" in result.stderr

    status = runner.invoke(_app(), ["submit", "status", "cfvit-test-hello", "--address", ray_head])
    assert status.exit_code == 0, status.output
    assert "SUCCEEDED" in status.stdout

    logs = runner.invoke(_app(), ["submit", "logs", "cfvit-test-hello"], env={"RAY_ADDRESS": ray_head})
    assert logs.exit_code == 0, logs.output
    assert "hello from cfvit job ahoy" in logs.stdout

    listing = runner.invoke(_app(), ["submit", "list", "--address", ray_head])
    assert listing.exit_code == 0, listing.output
    assert "cfvit-test-hello" in listing.stdout


@pytest.mark.e2e
def test_failed_job_exits_nonzero_and_stop(ray_head):
    runner = CliRunner()
    # Start the long job first so that its start-up overlaps the failing one.
    started = runner.invoke(
        _app(),
        ["submit", "run", "--address", ray_head, "--working-dir", "", "--no-wait",
         "--submission-id", "cfvit-test-sleeper", "--", "python", "-c", "import time; time.sleep(300)"],
    )
    assert started.exit_code == 0, started.output
    assert started.stdout.strip() == "cfvit-test-sleeper"

    failed = runner.invoke(
        _app(),
        ["submit", "run", "--address", ray_head, "--working-dir", "", "--", "python", "-c", "raise SystemExit(3)"],
    )
    assert failed.exit_code == 1, failed.output
    assert "FAILED" in failed.stderr

    stopped = runner.invoke(_app(), ["submit", "stop", "cfvit-test-sleeper", "--address", ray_head])
    assert stopped.exit_code == 0, stopped.output
    client = submit.connect(ray_head)
    assert submit.wait(client, "cfvit-test-sleeper", timeout_s=60) == "STOPPED"


@pytest.mark.e2e
def test_unknown_job_is_a_clear_error(ray_head):
    runner = CliRunner()
    for verb in ("status", "logs", "stop"):
        result = runner.invoke(_app(), ["submit", verb, "raysubmit_doesnotexist", "--address", ray_head])
        assert result.exit_code == 1, (verb, result.output)
        assert result.stderr.strip() == f"error: no job 'raysubmit_doesnotexist' on {ray_head}", verb
        assert "Traceback" not in result.output


def test_unreachable_address_is_a_clear_error():
    (port,) = _free_ports(1)  # nothing listens there
    result = CliRunner().invoke(_app(), ["submit", "status", "raysubmit_x", "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach the Ray job server at http://127.0.0.1:{port}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_missing_address_and_bad_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runner = CliRunner()
    result = runner.invoke(_app(), ["submit", "list"])
    assert result.exit_code == 1
    assert "no cluster address" in result.stderr

    result = runner.invoke(_app(), ["submit", "run", "--address", "http://127.0.0.1:1", "--env", "NOEQUALS", "--", "true"])
    assert result.exit_code == 1
    assert "--env expects KEY=VALUE, got 'NOEQUALS'" in result.stderr


def test_runtime_env_and_entrypoint_quoting(tmp_path):
    env = submit.parse_env(["A=1", "URI=postgresql://u:p@h/db?x=y", "EMPTY="])
    assert env == {"A": "1", "URI": "postgresql://u:p@h/db?x=y", "EMPTY": ""}
    renv = submit.build_runtime_env(str(tmp_path), env, pip=["einops"], excludes=["data/"])
    assert renv["working_dir"] == str(tmp_path.resolve())
    assert ".venv" in renv["excludes"] and "data/" in renv["excludes"]
    assert renv["env_vars"] == env and renv["pip"] == ["einops"]
    assert submit.build_runtime_env("", {}) == {}
    with pytest.raises(submit.SubmitError, match="not a directory"):
        submit.build_runtime_env(str(tmp_path / "missing"), {})
    assert submit.resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    assert submit.resolve_address("https://ray.example.com") == "https://ray.example.com"


# ------------------------------------------------------------------ results that would vanish with the job
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.e2e
def test_submit_refuses_a_job_whose_results_would_vanish(ray_head):
    """The shipped config keeps checkpoints in ./outputs and MLflow in ./mlflow.db: under Ray Jobs both land in
    the uploaded working dir, which Ray deletes. Refused before anything is submitted, with the fix named."""
    client = submit.connect(ray_head)
    before = {j.submission_id for j in submit.list_jobs(client)}
    result = CliRunner().invoke(_app(), [
        "submit", "run", "--address", ray_head, "--working-dir", REPO, "--",
        "python", "-m", "jobs.train", "--config", "jobs/configs/fmnist_tiny.yaml"])
    assert result.exit_code == 1, result.output
    assert "refusing to submit" in result.stderr
    assert "--set checkpoint.storage_path=s3://" in result.stderr and "MLFLOW_TRACKING_URI=http" in result.stderr
    assert {j.submission_id for j in submit.list_jobs(client)} == before  # nothing reached the cluster


@pytest.mark.e2e
def test_the_job_itself_refuses_under_ray_jobs(ray_head):
    """Submitted past the CLI (the plain Ray client, as a KubeRay RayJob would): the job fails at once, before
    training, and its log says why."""
    client = submit.connect(ray_head)
    runtime_env = submit.build_runtime_env(REPO, {"RAY_DEDUP_LOGS": "0"})
    job_id = submit.submit(client, ["python", "-m", "jobs.train", "--config", "jobs/configs/fmnist_tiny.yaml",
                                    "--set", "mlflow.enabled=false"], runtime_env, "cfvit-test-vanishing")
    assert submit.wait(client, job_id, timeout_s=240) == "FAILED"
    log = submit.logs(client, job_id)
    assert "would lose its results" in log and "checkpoint.storage_path './outputs/ray_results' is relative" in log
    assert "epoch 1/" not in log.split("would lose its results")[0].lower()  # refused before any epoch ran
