"""`cfvit serve` in a subprocess with its own Ray instance: it serves, and SIGINT/SIGTERM stop it all."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fixtures.serve_app import free_port

ROOT = Path(__file__).resolve().parents[2]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cfvit_serve_starts_and_shuts_down_cleanly(fmnist_checkpoint, sig):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}  # never join the test cluster
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfvit_cli", "serve", "--checkpoint", str(fmnist_checkpoint), "--port", str(port),
         "--num-cpus", "2", "--max-replicas", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "serving at" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    family = []
    try:
        assert ready.wait(180), "".join(lines[-40:])
        assert f"http://127.0.0.1:{port}/" in "".join(lines)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=30)
        assert r.status_code == 200 and r.json()["name"] == "cfvit_tiny_fmnist"
        # Everything this command started: its Ray (gcs, raylet, workers, replicas) descends from it.
        family = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert any("raylet" in " ".join(p.cmdline()) for p in family if _alive(p))
        proc.send_signal(sig)
        assert proc.wait(90) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert f"received {sig.name}" in out and "stopped" in out
    deadline = time.time() + 30
    while time.time() < deadline and any(map(_alive, family)):
        time.sleep(0.5)
    alive = [p for p in family if _alive(p)]
    for p in alive:  # leave nothing behind even when the test fails
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
