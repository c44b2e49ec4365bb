"""A new registered version rolled out under load, then rolled back, as a RayService update does: the alias
moved in the registry and the application deployed again (`serve.run` of the same arguments, which
`build_app` pins to the version the alias names now). Closed-loop clients send JSON batches of two images
throughout; every reply must succeed, carry one model version (header and every prediction), and be that
version's own answer.

Version 2 is version 1 with class FORCED winning every image at its coarse stage (confidence 1), so its
answers are recognisable whatever path served them: a v2 reply is a coarse answer of class FORCED; a v1
reply never answers FORCED (the images are ones v1 does not answer so); a coarse state of v1 finished by
v2's fine stage would be a *fine* answer of class FORCED. Requests ask η 0.95 so most v1 images go on to
the fine stage, where versions could mix.
"""
from __future__ import annotations

import base64
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit_common import tracking
from serve.app import build_app
from serve.versions import VERSION_HEADER
from tests.fixtures.procs import wait_until_up
from tests.fixtures.serve_app import FIXED, app_log, delete
from tests.fixtures.services import png_bytes

pytestmark = pytest.mark.e2e
MODEL, APP, PREFIX = "cfvit-rollout", "rollout", "/rollout"
FORCED = 3
CLIENTS = 3
STEADY_S = 1.5  # load on one version before and after each switch


@ray.remote(num_cpus=0)
def _deploy(args: dict) -> float:
    """`serve.run` the app (blocks until RUNNING) from a task whose environment names the registry, as the
    RayService's pods do: the replicas inherit it. Returns the seconds it took."""
    t = time.monotonic()
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    return time.monotonic() - t


@pytest.fixture(scope="module")
def registered(mlflow_server, fmnist_checkpoint, tmp_path_factory):
    """Versions 1 (the session's model) and 2 (class FORCED always, at the coarse stage) of MODEL."""
    root = tmp_path_factory.mktemp("rollout")
    v1 = shutil.copytree(fmnist_checkpoint, root / "v1")
    model = cfvit.load(v1).eval()
    with torch.no_grad():
        model.vit.head.bias[FORCED] += 1000.0
    v2 = Path(cfvit.save(model, root / "v2"))
    versions = []
    for folder in (v1, v2):
        with tracking.run(mlflow_server, "rollout", folder.name, {}) as run_id:
            versions.append(str(tracking.log_model(mlflow_server, run_id, folder, MODEL)))
    return versions


def _alias(uri: str, version: str) -> None:
    tracking.mlflow_client(uri).set_registered_model_alias(MODEL, "production", version)


def _bodies(url: str):
    """JSON batches of two test images that version 1 does not answer FORCED."""
    images, _ = load_fashion_mnist("test")
    files = [base64.b64encode(png_bytes(x)).decode() for x in images[:24]]
    r = httpx.post(url + "/v1/classify", json={"images": files, "eta": 0.95}, timeout=60)
    assert r.status_code == 200, r.text
    keep = [f for f, p in zip(files, r.json()["predictions"]) if p["label"] != FORCED][:8]
    return [{"images": keep[i:i + 2], "eta": 0.95} for i in range(0, len(keep) - 1, 2)]


class Load:
    """Closed-loop clients; every reply booked as (sent, received, status, header version, predictions)."""

    def __init__(self, url: str, bodies: list):
        self.url, self.bodies, self.replies = url, bodies, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = i
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(self.url + "/v1/classify", json=self.bodies[n % len(self.bodies)])
                    status, header = r.status_code, r.headers.get(VERSION_HEADER)
                    preds = r.json().get("predictions") if status == 200 else r.text
                except httpx.HTTPError as e:  # a dropped connection counts as a failure
                    status, header, preds = 0, None, repr(e)
                self.replies.append((sent, time.monotonic(), status, header, preds))
                n += CLIENTS

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def _switch(load: Load, uri: str, args: dict, version: str, old: str) -> dict:
    """Move the alias to `version`, deploy again under load; seconds to the first reply of the new version
    and to the last of the old one, counted from the deploy call."""
    _alias(uri, version)
    t0 = time.monotonic()
    deploy_s = ray.get(_deploy.options(runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri}}).remote(args))
    time.sleep(STEADY_S)
    after = [r for r in load.replies if r[1] > t0 and r[2] == 200]
    first_new = min((r[1] for r in after if r[3] == version), default=float("nan")) - t0
    last_old = max((r[1] for r in after if r[3] == old), default=t0) - t0
    slowest = max((r[1] - r[0] for r in after), default=float("nan"))
    return {"deploy_s": round(deploy_s, 2), "first_new_s": round(first_new, 2), "last_old_s": round(last_old, 2),
            "replies": len(after), "slowest_reply_s": round(slowest, 2)}


def test_rollout_and_rollback_under_load_lose_nothing_and_never_mix(serve_instance, registered, mlflow_server):
    v1, v2 = registered
    args = {**FIXED, "checkpoint": f"models:/{MODEL}@production", "drift_seed": 0}
    url = serve_instance.rstrip("/") + PREFIX
    t_start = time.monotonic()
    _alias(mlflow_server, v1)
    env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}
    try:
        ray.get(_deploy.options(runtime_env=env).remote(args))
        wait_until_up(url + "/healthz", 60, lambda: app_log(APP))
        bodies = _bodies(url)
        with Load(url, bodies) as load:
            time.sleep(STEADY_S)
            forward = _switch(load, mlflow_server, args, v2, v1)
            back = _switch(load, mlflow_server, args, v1, v2)
        figures = {"requests": len(load.replies), "forward": forward, "rollback": back}
    finally:
        delete(APP)
    failed = [r for r in load.replies if r[2] != 200]
    per_version = {v: sum(r[3] == v for r in load.replies) for v in (v1, v2)}
    retried = sum("answered by model version" in line for line in app_log(APP, 5000).splitlines())
    print(f"\nrollout under load: {figures}, failed {len(failed)}, replies per version {per_version}, "
          f"requests answered again {retried}, test {time.monotonic() - t_start:.1f} s")
    assert not failed, failed[:3]
    for sent, received, status, header, preds in load.replies:
        assert {p["model_version"] for p in preds} == {header}, (header, preds)  # one version per request
        for p in preds:
            if header == v2:  # v2's own answer: its coarse stage, class FORCED
                assert (p["stage"], p["label"]) == ("coarse", FORCED), p
            else:  # v1's own: never FORCED (a v1 coarse state finished by v2's fine stage would be)
                assert header == v1 and p["label"] != FORCED, p
    assert per_version[v2] > 0 and per_version[v1] > 0
    assert load.replies[-1][3] == v1  # rolled back
    assert forward["first_new_s"] <= forward["deploy_s"] + STEADY_S  # the new version answered after the switch
