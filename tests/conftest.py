"""Shared pytest set-up: fixtures live in small plugin modules under tests/fixtures/.

The `e2e` mark goes by what a test starts, not by its folder: Ray, a server (S3, MLflow, Serve, a Ray head),
a subprocess, or a whole command run end to end in this process (`cfvit reproduce --quick`). A test that
uses a fixture starting one of them is marked here; a test that starts one itself carries `pytest.mark.e2e`. A test without the mark that leaves Ray running in this process or
processes behind fails (`-m "not e2e"` must stay a quick, self-contained run).
"""
import os
import sys
import tempfile

import psutil
import pytest

# Keep Ray, MLflow and timm quiet and local in tests.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Downloaded checkpoints go to a per-session cache, not the user's ~/.cache/cfvit.
os.environ.setdefault("CFVIT_CACHE", tempfile.mkdtemp(prefix="cfvit-test-cache-"))

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.models", "tests.fixtures.serve_app",
                  "tests.fixtures.cli_model"]

# Session fixtures that start real components (tests/fixtures/): using one, directly or through another
# fixture, makes a test e2e.
COMPONENT_FIXTURES = {"ray_session", "s3_server", "mlflow_server", "serve_instance", "served", "cli_trained"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMPONENT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    # The tests on the session's shared Serve instance run last, in their order: the ones that need Serve to
    # themselves (tests/fixtures/serve_app.py `serving`) then never stop it and make it start again.
    items.sort(key=lambda item: "serve_instance" in getattr(item, "fixturenames", ()))


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(request):
    """A test not marked e2e must not start Ray here nor leave a process of its own behind."""
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    me = psutil.Process()
    ray_before, children_before = _ray_up(), {p.pid for p in me.children(recursive=True)}
    yield
    if not ray_before and _ray_up():
        pytest.fail("this test started Ray: mark it e2e (tests/conftest.py)")
    left = [p for p in me.children(recursive=True) if p.pid not in children_before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        pytest.fail(f"this test left processes running: {[' '.join(p.cmdline())[:80] for p in left]}")
