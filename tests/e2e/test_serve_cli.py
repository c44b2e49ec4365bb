"""`cfvit serve` as a user runs it: a subprocess with its own Ray instance that answers POSTs as the library does,
and stops with everything it started on SIGINT / SIGTERM. Once with the session's checkpoint folder, once with
the model `cfvit train` registered, by its `models:/` URI (MLFLOW_TRACKING_URI pointing at the server)."""
import base64
import signal
from pathlib import Path

import httpx
import psutil
import pytest

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit_common.tracking import download_model, file_sha256
from tests.fixtures.answers import assert_answers, library_answers
from tests.fixtures.cli_model import REGISTERED
from tests.fixtures.procs import cfvit as cfvit_cmd
from tests.fixtures.procs import command_env, kill_leftovers, running
from tests.fixtures.services import free_port, png_bytes

pytestmark = pytest.mark.e2e


def _served(request, sig, fmnist_checkpoint):
    """(checkpoint as given to `cfvit serve`, its local folder, the command's environment)."""
    if sig == signal.SIGINT:
        return str(fmnist_checkpoint), Path(fmnist_checkpoint), command_env()
    trained = request.getfixturevalue("cli_trained")
    assert trained.returncode == 0, trained.output[-3000:]
    local = Path(download_model(trained.uri, tracking=trained.tracking_uri))
    return trained.uri, local, command_env(MLFLOW_TRACKING_URI=trained.tracking_uri)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT-folder", "SIGTERM-models-uri"])
def test_cfvit_serve_answers_and_shuts_down_cleanly(request, fmnist_checkpoint, sig):
    checkpoint, local, env = _served(request, sig, fmnist_checkpoint)
    model = cfvit.load(str(local)).eval()
    files = [png_bytes(a) for a in load_fashion_mnist("test")[0][3000:3008]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # each case on a request path of its own (asked for by name): HAProxy; direct ingress with the proxy's port
    path = "haproxy" if sig == signal.SIGINT else "optimized"
    with running(cfvit_cmd("serve", "--checkpoint", checkpoint, "--port", str(port), "--num-cpus", "2",
                           "--max-replicas", "1", "--request-path", path), env=env) as proc:
        proc.wait_for("serving at", timeout=180)
        assert f"{url}/" in proc.output
        assert f"request path: {path}" in proc.output
        info = httpx.get(url + "/v1/model", timeout=30).json()
        assert info["name"] == "cfvit_tiny_fmnist" and info["digest"] == "sha256:" + file_sha256(local / "model.safetensors")
        assert info["registered_model"] == (None if sig == signal.SIGINT else REGISTERED), info
        # a JSON batch at the default η and a raw PNG, each answered as the library answers it
        r = httpx.post(url + "/v1/classify", json={"images": [base64.b64encode(f).decode() for f in files]},
                       timeout=60)
        assert r.status_code == 200, r.text
        for pred, ref in zip(r.json()["predictions"], library_answers(model, files, 0.5)):
            assert_answers(pred, ref)
        r = httpx.post(url + "/v1/classify", content=files[0], headers={"content-type": "image/png"},
                       params={"eta": 1.0001}, timeout=60)
        assert r.status_code == 200, r.text
        assert_answers(r.json(), library_answers(model, files[:1], 1.0001)[0])
        # Everything this command started: its Ray (gcs, raylet, workers, replicas) descends from it.
        family = psutil.Process(proc.proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in family if p.is_running())
        proc.proc.send_signal(sig)
        assert proc.wait(90) == 0, proc.tail()
        out = proc.output
        left = kill_leftovers(family)  # what did not exit by itself within 30 s (killed: nothing is left behind)
    assert f"received {sig.name}" in out and "stopped" in out
    assert not left, left
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)
