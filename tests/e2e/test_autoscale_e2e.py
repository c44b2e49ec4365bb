"""`cfvit bench serve --autoscale` on one local Ray (no cluster autoscaler, to keep it short): under a load
step Serve adds a replica, after the load falls it removes one, and no request fails while a replica goes
away (it drains what it holds). The node part (Ray's autoscaler on the fake multi-node provider) is the
benchmark's own run, recorded in docs/BENCHMARKS.md."""
from __future__ import annotations

import json

import pytest

from tests.fixtures.procs import cfvit as cfvit_cmd
from tests.fixtures.procs import run
from tests.fixtures.services import free_port

# a whole command, Ray and Serve for real; slow: about 150 s alone, and beside the rest of the suite on two
# cores the new replica does not always start within the load step, so it runs on its own (`-m slow`)
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_replicas_added_under_load_and_removed_after(tmp_path):
    out, plot = tmp_path / "as.json", tmp_path / "as.png"
    proc = run(cfvit_cmd("bench", "serve", "--model", "cfvit_tiny_fmnist", "--autoscale", "--no-nodes",
                         "--rate", "5", "--step-factor", "6", "--as-phases", "5,20,35,0", "--slo-ms", "1000",
                         "--port", str(free_port()), "--json", str(out), "--plot", str(plot)),
               timeout=400, merge=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    r = json.loads(out.read_text())
    f, rows = r["figures"], r["per_second"]
    assert r["sent"] > 0 and sum(row["requests"] for row in rows) == r["sent"]
    assert all(row["nodes"] == 1 for row in rows if row["nodes"] is not None)  # one Ray: no node to add
    assert f["step_to_new_replica_s"] is not None, rows  # a replica added under the step
    assert sum(f["replicas_peak"].values()) > sum(f["replicas_before_step"].values())
    assert f["fall_to_replica_removed_s"] is not None, rows  # and one removed after the load fell
    assert f["errors_scaling_down"] == 0, r["error_samples"]
    assert "step → first new replica (s)" in proc.stdout and plot.stat().st_size > 0
