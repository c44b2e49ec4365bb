"""Rules of the test suite itself, read from its source with `ast`: every subprocess a test starts gets its own
session (so its whole tree can be stopped) and a limit that leaves pytest's own timeout time to stop it."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.fixtures.procs import PYTEST_TIMEOUT_S

TESTS = Path(__file__).resolve().parents[1]
PROCS = TESTS / "fixtures" / "procs.py"


def _calls():
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                yield path, node


def test_subprocesses_start_in_their_own_session():
    """Direct `subprocess.Popen/run` only with `start_new_session=True` (tests/fixtures/procs.py does it for
    the rest): a test's processes must be stoppable as one group when it times out."""
    bad = []
    for path, call in _calls():
        f = call.func
        if (path != PROCS and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                and f.value.id == "subprocess" and f.attr in ("Popen", "run", "call", "check_call", "check_output")):
            if not any(k.arg == "start_new_session" for k in call.keywords):
                bad.append(f"{path.relative_to(TESTS)}:{call.lineno}")
    assert not bad, f"use tests.fixtures.procs.run/running, or start_new_session=True: {bad}"


def test_every_limit_fits_under_pytests_timeout():
    """A `timeout=` given as a number leaves a minute of pytest's timeout to stop the process and report."""
    bad = [f"{path.relative_to(TESTS)}:{call.lineno} timeout={k.value.value}" for path, call in _calls()
           for k in call.keywords
           if k.arg == "timeout" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, (int, float))
           and k.value.value > PYTEST_TIMEOUT_S - 60]
    assert not bad, bad
