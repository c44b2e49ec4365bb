"""A Serve application the cluster cannot place says so, with what it asked for and what the cluster has:
`cfvit serve` on a Ray it starts refuses at once; on a cluster it joins, the wait ends with Serve's own word.
Each case runs in a subprocess with its own Ray instance, stopped with it."""
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.procs import command_env, run
from tests.fixtures.serve_app import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_cfvit_serve_refuses_an_app_its_own_ray_cannot_hold(fmnist_checkpoint):
    proc = run([sys.executable, "-m", "cfvit_cli", "serve", "--checkpoint", str(fmnist_checkpoint), "--port",
                str(free_port()), "--num-cpus", "1"], timeout=240, env=command_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # the defaults: a coarse and a fine replica of half a CPU each and an ingress of 0.1 on a 1-CPU Ray
    assert "asks for {CPU: 1.1}" in out and "CPU 1.1 (the cluster has 1)" in out, out
    assert "CoarseStage 1 × {CPU: 0.5}; FineStage 1 × {CPU: 0.5}; CFViTIngress 1 × {CPU: 0.1}" in out, out
    assert "stopped" in out  # it shut down the Ray it started


SCRIPT = textwrap.dedent("""
    import sys, time
    import ray
    from ray import serve
    from serve.app import build_app
    from serve.placement import AppDoesNotFit, deploy
    from serve.settings import AppArgs

    ray.init(num_cpus=1, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
    args = AppArgs(checkpoint=sys.argv[1], coarse={"num_cpus": 2})  # a replica no node of this cluster holds
    t = time.monotonic()
    try:
        deploy(build_app(args), args, "cfvit", fixed_cluster=False, timeout_s=30)
    except AppDoesNotFit as e:
        print(f"REFUSED after {time.monotonic() - t:.0f} s: {e}")
    finally:
        serve.shutdown()
        ray.shutdown()
""")


def test_a_joined_cluster_gets_a_bounded_wait_with_serves_reason(fmnist_checkpoint):
    """On a cluster this process joined (it may autoscale) nothing is refused up front: the wait is bounded
    and its error carries Serve's message on the replica that was never scheduled."""
    proc = run([sys.executable, "-c", SCRIPT, str(fmnist_checkpoint), str(free_port())], timeout=240,
               env=command_env(RAY_SERVE_SLOW_STARTUP_WARNING_S="5"))
    out = proc.stdout + proc.stderr
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REFUSED")), None)
    assert proc.returncode == 0 and line, out
    seconds = int(line.split()[2])
    assert 30 <= seconds < 60, line
    assert "is not running after 30 s" in line and "asks for {CPU: 2.6}" in line, line
    assert "CoarseStage" in line and "to be scheduled" in line, line  # Serve's own message on that deployment
    assert "the cluster has {CPU: 1" in line, line
