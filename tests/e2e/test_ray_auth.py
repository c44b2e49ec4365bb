"""Ray token authentication on a real `ray start --head` (RAY_AUTH_MODE=token, a token of its own, every port
chosen free, on loopback), and the clients of it: what comes without the token is refused and runs nothing;
`cfvit submit` needs the token, names the variables to set when it lacks one, and with it runs a job whose
runtime_env carries no credential and whose working dir arrives without secrets. One head for the module,
torn down by killing its own process session only (never `ray stop`)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.procs import run, stop_tree

ROOT = Path(__file__).resolve().parents[2]
TOKEN = secrets.token_hex(32)
CLIENT_SECRET = "client-side-secret-" + secrets.token_hex(8)  # in the client's environment, never sent
pytestmark = pytest.mark.e2e


@dataclass
class Head:
    url: str  # dashboard / Jobs API
    gcs: str
    root: Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _base_env(home: Path) -> dict:
    """This interpreter on PATH, an empty home (no ~/.ray/auth_token), no Ray, AWS or MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return env


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
def head():
    root = Path(tempfile.mkdtemp(prefix="rauth", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    env = {**_base_env(root / "head-home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--include-dashboard", "true", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
           "--num-cpus", "1", "--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed:\n{out.decode(errors='replace')[-3000:]}")
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while _status("GET", f"{url}/api/version", TOKEN) != 200:  # the dashboard answers a moment later
            assert time.monotonic() < deadline, "the dashboard did not answer"
            time.sleep(1)
        yield Head(url, f"127.0.0.1:{gcs}", root)
    finally:
        _kill_session(proc.pid)  # start_new_session: the daemons share the launcher's process group
        shutil.rmtree(root, ignore_errors=True)


def _status(method: str, url: str, token: str | None = None, body: dict | None = None, header="Authorization") -> int:
    headers = {"Content-Type": "application/json", **({header: f"Bearer {token}"} if token else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _jobs(head: Head) -> list:
    request = urllib.request.Request(f"{head.url}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _cfvit(head: Head, env: dict, verb: str, *args: str) -> subprocess.Popen:
    """`cfvit submit VERB --address HEAD ARGS…` as a user runs it."""
    return subprocess.Popen([sys.executable, "-m", "cfvit_cli", "submit", verb, "--address", head.url, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _done(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_tree(proc)  # on the limit (or pytest's timeout): nothing it started is left running
    return proc.returncode, out, err


def test_the_jobs_api_refuses_requests_without_the_token_and_runs_nothing(head):
    marker = head.root / "ran-without-the-token"
    body = {"entrypoint": f"python -c \"open('{marker}', 'w').write('ran')\"", "submission_id": "no-token"}
    tried = [_status("POST", f"{head.url}/api/jobs/", None, body),                       # no token
             _status("POST", f"{head.url}/api/jobs/", "not-the-token", body),            # a wrong one
             _status("POST", f"{head.url}/api/jobs/", "not-the-token", body, "X-Ray-Authorization"),
             _status("GET", f"{head.url}/api/jobs/"),                                    # reading jobs too
             _status("GET", f"{head.url}/api/version")]
    assert tried == [401, 403, 403, 401, 401]
    time.sleep(2)  # had anything been accepted, its driver would have started by now
    assert not marker.exists()
    assert [j for j in _jobs(head) if j.get("submission_id") == "no-token"] == []  # never created


def test_ray_init_to_the_gcs_needs_the_token(head):
    base = {**_base_env(head.root / "client-home"), "RAY_gcs_server_port_wait_time_s": "3"}  # fail in ~3 s
    code = f"import ray; ray.init(address={head.gcs!r}); print('joined', ray.cluster_resources()['CPU'])"
    cases = {"no token": base, "wrong token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
             "the token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}}
    procs = {name: subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
             for name, env in cases.items()}
    results = {name: _done(p, 120) for name, p in procs.items()}
    for name in ("no token", "wrong token"):
        rc, out, err = results[name]
        assert rc != 0 and "joined" not in out, (name, out)
        assert "Authentication token is missing or incorrect" in err, (name, err[-2000:])
    rc, out, err = results["the token"]
    assert rc == 0 and "joined 1.0" in out, err[-2000:]


def test_cfvit_submit_needs_the_token_and_sends_no_credential(head):
    home = head.root / "submit-home"
    base = _base_env(home)
    before = {j.get("submission_id") for j in _jobs(head)}
    work = head.root / "project"
    (work / ".aws").mkdir(parents=True)
    (work / ".ray").mkdir()
    for name in (".env", "server.pem", ".aws/credentials", ".ray/auth_token"):
        (work / name).write_text("secret\n")
    marker = head.root / "ran-with-the-token"
    (work / "job.py").write_text(
        "import os, sys\nopen(sys.argv[1], 'w').write('ran')\n"
        "print('files:', sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs))\n"
        "print('secret in env:', 'AWS_SECRET_ACCESS_KEY' in os.environ)\n")
    run = ["run", "-w", str(work), "--submission-id", "with-token", "--", "python", "job.py", str(marker)]

    refused = {"no token": _cfvit(head, base, *run),
               "wrong token": _cfvit(head, {**base, "RAY_AUTH_TOKEN": "not-the-token"}, *run),
               "credential --env": _cfvit(head, {**base, "RAY_AUTH_TOKEN": TOKEN}, "run", "-w", str(work), "--env",
                                          f"AWS_SECRET_ACCESS_KEY={CLIENT_SECRET}", "--", "python", "job.py", "x")}
    for verb in (["status", "x"], ["logs", "x"], ["stop", "x"], ["list"]):
        refused[verb[0]] = _cfvit(head, base, *verb)
    results = {name: _done(p) for name, p in refused.items()}
    for name, (rc, _, err) in results.items():
        assert rc == 1 and "Traceback" not in err, (name, err[-2000:])
        if name != "credential --env":
            assert "RAY_AUTH_TOKEN to the cluster's token" in err and "RAY_AUTH_TOKEN_PATH" in err, (name, err)
    assert "(the token was not accepted)" in results["wrong token"][2]
    assert "(it needs a Ray token)" in results["no token"][2]
    assert "refusing --env AWS_SECRET_ACCESS_KEY" in results["credential --env"][2]
    assert "a Secret in the pod's env or a mounted file" in results["credential --env"][2]
    assert {j.get("submission_id") for j in _jobs(head)} == before  # nothing reached the cluster

    # With the token, from a file as Ray reads it, and credentials in the client's environment.
    token_file = home / "token"
    token_file.write_text(TOKEN)
    env = {**base, "RAY_AUTH_TOKEN_PATH": str(token_file), "AWS_SECRET_ACCESS_KEY": CLIENT_SECRET,
           "MLFLOW_TRACKING_PASSWORD": CLIENT_SECRET}
    rc, out, err = _done(_cfvit(head, env, *run))
    assert rc == 0 and "job with-token: SUCCEEDED" in err, err[-3000:]
    assert marker.read_text() == "ran"
    assert "files: ['job.py']" in out and "secret in env: False" in out, out
    (job,) = [j for j in _jobs(head) if j.get("submission_id") == "with-token"]
    assert CLIENT_SECRET not in json.dumps(job) and "AWS_SECRET_ACCESS_KEY" not in json.dumps(job["runtime_env"])
    assert {".env", "*.pem", ".aws/", ".ray/"} <= set(job["runtime_env"]["excludes"])


def test_a_local_ray_started_by_the_jobs_has_token_auth(tmp_path):
    """`cfvit serve` / `cfvit pipeline` start their Ray through init_ray: token auth on, the token made
    owner-only in ~/.ray/auth_token when there is none."""
    code = ("import json, os, urllib.request, urllib.error, ray\n"
            "from cfvit_common.ray_env import init_ray\n"
            "init_ray(num_cpus=1, private=True, log_to_driver=False)\n"
            "url = 'http://' + ray._private.worker._global_node.address_info['webui_url'] + '/api/jobs/'\n"
            "try:\n    status = urllib.request.urlopen(url, timeout=30).status\n"
            "except urllib.error.HTTPError as e:\n    status = e.code\n"
            "token = os.path.expanduser('~/.ray/auth_token')\n"
            "print(json.dumps({'status': status, 'mode': oct(os.stat(token).st_mode & 0o777)}))\n"
            "ray.shutdown()\n")
    proc = run([sys.executable, "-c", code], timeout=180, env=_base_env(tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"status": 401, "mode": "0o600"}
