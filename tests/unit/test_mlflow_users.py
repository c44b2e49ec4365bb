"""infra/mlflow/mlflow_users.py, what the users Job runs, against a real `mlflow server --app-name
basic-auth` on loopback: it creates the clients' users as non-admins, a re-run rotates their passwords,
and a non-admin cannot create users."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from benchmarks.local_cluster import free_port, stop_process, wait_http
from tests.unit.infra_manifests import INFRA


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


pytestmark = pytest.mark.e2e  # starts an MLflow server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on loopback with sqlite stores, its admin from the environment."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n")
    admin = ("admin", "admin-pw-for-the-test")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key"}
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=300, proc=proc, log=log)
        yield url, admin, root
    finally:
        stop_process(proc)


def _credentials(folder, user: str, password: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "username").write_text(user + "\n")
    (folder / "password").write_text(password + "\n")
    return folder


def _load_users_script():
    """infra/mlflow/mlflow_users.py is a standalone script of the MLflow image, not a package module."""
    spec = importlib.util.spec_from_file_location("mlflow_users", INFRA / "mlflow" / "mlflow_users.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_users_script(monkeypatch, capsys):
    """Run the script's main() in this process (as the Job runs it: --admin, --user folders); its
    (exit code, stdout, stderr). The script sets MLFLOW_TRACKING_* for its client: kept to this test."""
    script = _load_users_script()

    def run(url, admin_dir, *user_dirs):
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        argv = ["--tracking-uri", url, "--admin", str(admin_dir), "--timeout", "60"]
        argv += [a for d in user_dirs for a in ("--user", str(d))]
        try:
            script.main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            print(stop.code, file=sys.stderr)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_users_script_creates_and_rotates_non_admin_users(auth_server, run_users_script):
    url, admin, root = auth_server
    admin_dir = _credentials(root / "admin", *admin)
    trainer = _credentials(root / "trainer", "cfvit-trainer", "trainer-password-1")
    serve = _credentials(root / "serve", "cfvit-serve", "serve-password-1")
    experiments = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(experiments) == 401                                  # anonymous: refused
    assert _status(experiments, _basic("cfvit-trainer", "trainer-password-1")) == 401   # no such user yet

    code, out, err = run_users_script(url, admin_dir, trainer, serve)
    assert code == 0, err
    assert out.splitlines() == ["cfvit-trainer: created", "cfvit-serve: created"]
    assert _status(experiments, _basic("cfvit-trainer", "trainer-password-1")) == 200
    user_api = f"{url}/api/2.0/mlflow/users/get?username=cfvit-serve"
    user = json.loads(urllib.request.urlopen(urllib.request.Request(user_api, headers=_basic(*admin))).read())
    assert user["user"]["is_admin"] is False

    # Rotation: a new password in the Secret, the Job re-run; the old password stops working.
    _credentials(root / "trainer", "cfvit-trainer", "trainer-password-2")
    code, out, err = run_users_script(url, admin_dir, trainer, serve)
    assert code == 0, err
    assert out.splitlines() == ["cfvit-trainer: password updated", "cfvit-serve: password updated"]
    assert _status(experiments, _basic("cfvit-trainer", "trainer-password-1")) == 401
    assert _status(experiments, _basic("cfvit-trainer", "trainer-password-2")) == 200

    # A non-admin cannot create users; wrong admin credentials fail the script with MLflow's answer.
    wrong_admin = _credentials(root / "wrong-admin", "cfvit-serve", "serve-password-1")
    code, out, err = run_users_script(url, wrong_admin, _credentials(root / "extra", "someone", "someone-password"))
    assert code != 0 and "someone: " in err and "403" in err, err
    assert _status(experiments, _basic("someone", "someone-password")) == 401
