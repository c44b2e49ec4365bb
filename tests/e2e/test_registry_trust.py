"""The model registry behind authentication, and the weights it serves pinned and verified, over real HTTP.

MLflow runs its basic-auth app as the local stack and infra/mlflow run it (benchmarks/local_cluster.py:
admin with a generated password, `cfvit-trainer` editing, `cfvit-serve` read-only). Three versions of one
model are registered by the editing user through the project's own registration (digests as version
tags): 1 (alias `production`), 2 (the same weights with class 3 forced, no alias), 3 (alias `tampered`,
whose stored weights are then changed on the server's disk, as a compromised artifact store would).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch

import cfvit
from benchmarks.local_cluster import SERVER, TRAINER, MlflowUser, mlflow_http, start_mlflow_auth_server, stop_process
from benchmarks.serve import png_files
from cfvit.data import FASHION_MNIST_CLASSES
from cfvit_common import tracking
from cfvit_common.ray_env import free_port
from tests.fixtures.procs import run

ROOT = Path(__file__).resolve().parents[2]
MODEL = "cfvit-trust"
FORCED = 3  # version 2 answers this class for every image
pytestmark = pytest.mark.e2e


@dataclass
class Registry:
    url: str
    users: dict
    root: Path
    sources: dict  # version → artifact source


@contextlib.contextmanager
def acting_as(registry: Registry, user: MlflowUser):
    """MLflow's clients in this process log in as `user` (they read these variables at each request)."""
    names = {"MLFLOW_TRACKING_URI": registry.url, **user.env()}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _checkpoints(root: Path) -> tuple[Path, Path]:
    """A small untrained model (v1) and the same with class FORCED always winning (v2)."""
    torch.manual_seed(0)
    model = cfvit.create_model("cfvit_tiny_fmnist", embed_dim=48, depth=2, num_heads=2).eval()
    v1 = cfvit.save(model, root / "v1", class_names=FASHION_MNIST_CLASSES)
    with torch.no_grad():
        model.vit.head.bias[FORCED] += 1000.0
    v2 = cfvit.save(model, root / "v2", class_names=FASHION_MNIST_CLASSES)
    return Path(v1), Path(v2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    proc, url, users = start_mlflow_auth_server(root / "mlflow")
    try:
        v1, v2 = _checkpoints(root)
        reg = Registry(url, users, root, {})
        with acting_as(reg, users[TRAINER]):
            for folder, alias in ((v1, "production"), (v2, None), (v1, "tampered")):
                with tracking.run(url, "trust", f"register-{alias}", {}) as run_id:
                    version = tracking.log_model(url, run_id, folder, MODEL, alias)
                reg.sources[version] = tracking.mlflow_client(url).get_model_version(MODEL, str(version)).source
        assert sorted(reg.sources) == [1, 2, 3]
        # Version 3's weights changed where the server stores them, after registration.
        run_id = _run_of(reg.sources[3])
        (stored,) = (root / "mlflow" / "artifacts").glob(f"*/{run_id}/artifacts/cfvit_model/model.safetensors")
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
        yield reg
    finally:
        stop_process(proc)


def _run_of(source: str) -> str:
    return source.split("/")[-3]  # mlflow-artifacts:/<experiment>/<run>/artifacts/cfvit_model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _api(reg: Registry, method: str, path: str, body: dict | None = None, user: MlflowUser | None = None) -> int:
    return mlflow_http(method, f"{reg.url}/api/2.0/mlflow/{path}", body, user)[0]


def _alias(reg: Registry) -> str:
    status, body = mlflow_http("GET", f"{reg.url}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias="
                                      "production", user=reg.users["admin"])
    assert status == 200, body
    return body["model_version"]["version"]


def _writes(reg: Registry) -> dict:
    """Requests that change what is served: a new version, the alias moved or removed, the digests rewritten."""
    return {
        "create version": ("POST", "model-versions/create", {"name": MODEL, "source": reg.sources[2],
                                                             "run_id": _run_of(reg.sources[2])}),
        "move alias": ("POST", "registered-models/alias", {"name": MODEL, "alias": "production", "version": "2"}),
        "delete alias": ("DELETE", "registered-models/alias", {"name": MODEL, "alias": "production"}),
        "rewrite digest": ("POST", "model-versions/set-tag", {"name": MODEL, "version": "1", "key":
                                                              "cfvit.sha256.model.safetensors", "value": "0" * 64}),
        "delete version": ("DELETE", "model-versions/delete", {"name": MODEL, "version": "1"}),
    }


def test_anonymous_requests_are_refused(registry):
    tried = {name: _api(registry, *request) for name, request in _writes(registry).items()}
    source = urllib.parse.quote(registry.sources[1].split("mlflow-artifacts:/", 1)[1] + "/model.safetensors")
    tried["download"] = mlflow_http("GET", f"{registry.url}/api/2.0/mlflow-artifacts/artifacts/{source}")[0]
    tried["upload"] = mlflow_http("PUT", f"{registry.url}/api/2.0/mlflow-artifacts/artifacts/{source}", {})[0]
    assert tried == dict.fromkeys(tried, 401)
    assert _alias(registry) == "1"
    query = urllib.parse.urlencode({"filter": f"name='{MODEL}'"})
    status, body = mlflow_http("GET", f"{registry.url}/api/2.0/mlflow/model-versions/search?{query}",
                               user=registry.users["admin"])
    assert status == 200 and sorted(v["version"] for v in body["model_versions"]) == ["1", "2", "3"]


def test_the_read_only_user_downloads_but_cannot_change_what_is_served(registry, tmp_path):
    serve_user = registry.users[SERVER]
    tried = {name: _api(registry, *request, user=serve_user) for name, request in _writes(registry).items()}
    assert tried == dict.fromkeys(tried, 403)
    assert _alias(registry) == "1"
    with acting_as(registry, serve_user):
        local = Path(tracking.download_model(f"models:/{MODEL}@production", str(tmp_path / "dl")))
    assert _sha(local / "model.safetensors") == _sha(registry.root / "v1" / "model.safetensors")
    # The editing user may (the control: the same request succeeds with the right user).
    body = {"name": MODEL, "alias": "staging", "version": "1"}
    assert _api(registry, "POST", "registered-models/alias", body, registry.users[TRAINER]) == 200


def test_a_tampered_or_unverifiable_version_is_refused(registry):
    with acting_as(registry, registry.users[SERVER]):
        with pytest.raises(tracking.ModelIntegrityError, match=f"models:/{MODEL}/3: model.safetensors has sha256"):
            tracking.download_model(f"models:/{MODEL}@tampered")
    # A version registered around the project's registration (no digests) is not loaded either.
    body = {"name": MODEL, "source": registry.sources[1], "run_id": _run_of(registry.sources[1])}
    status, created = mlflow_http("POST", f"{registry.url}/api/2.0/mlflow/model-versions/create", body,
                                  registry.users[TRAINER])
    assert status == 200, created
    bare = created["model_version"]["version"]
    with acting_as(registry, registry.users[SERVER]):
        with pytest.raises(tracking.ModelIntegrityError, match=f"models:/{MODEL}/{bare} has no recorded sha256"):
            tracking.download_model(f"models:/{MODEL}/{bare}")
    # `cfvit serve` refuses before starting anything, naming the version.
    env = _serve_env(registry)
    proc = run([sys.executable, "-m", "cfvit_cli", "serve", "--checkpoint", f"models:/{MODEL}@tampered",
                "--port", str(free_port())], timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: models:/{MODEL}/3: model.safetensors has sha256" in proc.stderr
    assert "refusing to load it" in proc.stderr and "Traceback" not in proc.stderr


def test_build_app_binds_one_version_to_every_deployment(registry):
    """What a RayService deploys: the alias read once by build_app, the version in every deployment's args."""
    from ray.serve._private.build_app import build_app as build_graph  # Serve's own view of the application

    from serve.app import build_app

    with acting_as(registry, registry.users[SERVER]):
        production = _alias(registry)
        built = build_graph(build_app({"checkpoint": f"models:/{MODEL}@production"}), name="trust")
    bound = {d.name: d.init_args[0] if d.name != "CFViTIngress" else d.init_args[2].checkpoint
             for d in built.deployments}
    assert bound == dict.fromkeys(["CoarseStage", "FineStage", "CFViTIngress"], f"models:/{MODEL}/{production}")


def _serve_env(registry: Registry) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=registry.url, **registry.users[SERVER].env(), PYTHONPATH=str(ROOT),
               CFVIT_CACHE=str(registry.root / f"cache-{time.monotonic_ns()}"))
    return env


def _classify(url: str, images: list) -> list:
    files = [("file", (f"{i}.png", body, "image/png")) for i, body in enumerate(images)]
    r = httpx.post(url + "/v1/classify", files=files, params={"eta": 0.0}, timeout=60)  # η 0: the coarse stage
    r.raise_for_status()
    return [p["label"] for p in r.json()["predictions"]]


def _coarse_replicas(proc: subprocess.Popen) -> list:
    """The live CoarseStage replica processes of the `cfvit serve` run (its Ray descends from it)."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "CoarseStage" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone, or a zombie, between the listing and the look
            pass
    return found


def test_a_replica_added_after_the_alias_moved_loads_the_bound_version(registry):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cfvit_cli", "serve", "--checkpoint", f"models:/{MODEL}@production",
                             "--port", str(port), "--num-cpus", "2", "--max-replicas", "1"], cwd=ROOT,
                            env=_serve_env(registry), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, ready = [], threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "serving at" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    images = png_files(np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8))
    try:
        assert ready.wait(240), "".join(lines[-40:])
        info = httpx.get(url + "/v1/model", timeout=30).json()
        v1_digest = "sha256:" + _sha(registry.root / "v1" / "model.safetensors")
        assert (info["registered_model"], info["version"], info["digest"]) == (MODEL, "1", v1_digest)
        assert "checkpoint" not in info and str(registry.root) not in json.dumps(info)  # where it lives: not said
        before = _classify(url, images)
        assert set(before) != {FORCED}  # version 2 would answer FORCED for all
        assert _api(registry, "POST", "registered-models/alias", {"name": MODEL, "alias": "production",
                                                                   "version": "2"}, registry.users[TRAINER]) == 200
        (old,) = _coarse_replicas(proc)
        old.send_signal(signal.SIGKILL)  # Serve replaces the replica: a new one, started after the move
        deadline, after = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            fresh = [p for p in _coarse_replicas(proc) if p.pid != old.pid]
            if fresh:
                try:
                    after = _classify(url, images)
                    break
                except httpx.HTTPError:
                    pass
            time.sleep(1)
        assert fresh and after is not None, "".join(lines[-40:])
        assert after == before
        assert httpx.get(url + "/v1/model", timeout=30).json()["version"] == "1"
    finally:
        family = [p for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():
                    p.kill()
