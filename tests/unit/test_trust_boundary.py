"""What the clients keep to themselves, without a cluster: where `cfvit submit` sends the Ray token and from
where it reads it, the credentials it refuses to put in a runtime_env, the training workers' env allow-list,
and what GET /v1/model says about the served model (identity, never location)."""
from __future__ import annotations

import hashlib

import pytest

from jobs.ops import submit
from jobs.train.driver import WORKER_ENV, worker_env
from serve.model_host import model_identity

CREDENTIALS = {"AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "a", "AWS_SESSION_TOKEN": "t",
               "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_TOKEN": "t", "RAY_AUTH_TOKEN": "r",
               "HF_TOKEN": "h", "WANDB_API_KEY": "w", "DB_PASSWD": "d", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json"}
SETTINGS = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://minio:9000",
            "AWS_REGION": "us-east-1", "CFVIT_ALLOW_LOCAL_OUTPUTS": "1", "RAY_AUTH_TOKEN_PATH": "/run/token"}


@pytest.mark.parametrize("url,private", [
    ("https://ray.example.com", True), ("http://127.0.0.1:8265", True), ("http://127.8.0.1:8265", True),
    ("http://localhost:8265", True), ("http://[::1]:8265", True), ("auto", True),
    ("http://10.0.0.5:8265", False), ("http://ray-head.cfvit.svc:8265", False), ("http://localhost.evil.com", False),
])
def test_the_token_goes_only_over_https_or_to_loopback(url, private):
    assert submit.private_transport(url) is private


def test_connect_refuses_to_send_a_token_in_clear(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(submit.SubmitError, match="refusing to send the Ray token to http://10.0.0.5:8265") as e:
        submit.connect("10.0.0.5:8265")
    assert "--allow-insecure-token" in str(e.value) and "RAY_AUTH_MODE=disabled" in str(e.value)


def test_the_token_is_read_as_ray_reads_it(monkeypatch, tmp_path):
    home, path = tmp_path / "home", tmp_path / "token"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path.write_text("from-path\n")
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    assert submit.auth_headers() == {"Authorization": "Bearer from-home"}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert submit.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.SubmitError, match="cannot read the Ray token"):  # Ray treats it as fatal too
        submit.auth_headers()


def test_credentials_are_refused_in_a_jobs_runtime_env(tmp_path):
    for name, value in CREDENTIALS.items():
        with pytest.raises(submit.SubmitError, match=f"refusing --env {name}: .*runtime_env is kept in the "
                                                     "cluster's GCS"):
            submit.build_runtime_env(str(tmp_path), {**SETTINGS, name: value})
    renv = submit.build_runtime_env(str(tmp_path), SETTINGS)
    assert renv["env_vars"] == SETTINGS
    assert {".env", "*.pem", ".aws/", ".ray/"} <= set(renv["excludes"])


def test_training_workers_get_settings_never_credentials():
    environ = {**CREDENTIALS, **SETTINGS, "FASHION_MNIST_ROOT": "/data/fmnist", "HOME": "/root"}
    env = worker_env(environ, "http://mlflow.cfvit-mlflow.svc.cluster.local:5000")
    assert env == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "us-east-1",
                   "FASHION_MNIST_ROOT": "/data/fmnist",
                   "MLFLOW_TRACKING_URI": "http://mlflow.cfvit-mlflow.svc.cluster.local:5000"}
    assert not [name for name in WORKER_ENV if submit.looks_like_credential(name)]


def test_v1_model_names_the_version_and_digest_not_the_location(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    digest = "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert model_identity("models:/cfvit-deit-s/7", tmp_path, {}) == {
        "registered_model": "cfvit-deit-s", "version": "7", "digest": digest}
    local = model_identity(str(tmp_path), tmp_path, {})
    assert local == {"registered_model": None, "version": digest[:19], "digest": digest}
    assert str(tmp_path) not in str(local)
    assert model_identity("s3://bucket/models/x", tmp_path, {"version": "2024-05"})["version"] == "2024-05"
