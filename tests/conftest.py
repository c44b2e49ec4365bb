"""Shared pytest set-up: fixtures live in small plugin modules under tests/fixtures/."""
import os
import tempfile

# Keep Ray, MLflow and timm quiet and local in tests.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Downloaded checkpoints go to a per-session cache, not the user's ~/.cache/cfvit.
os.environ.setdefault("CFVIT_CACHE", tempfile.mkdtemp(prefix="cfvit-test-cache-"))

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.models"]


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ starts real components: mark it `e2e` (`-m "not e2e"` skips it)."""
    import pytest

    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
