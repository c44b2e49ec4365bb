"""checkov (static analysis of infrastructure as code) over infra/, offline (--skip-download, no API key):
no failed check but the ones infra/checkov-skips.yaml accepts, each with the resources it covers and why;
no entry left that matches nothing. checkov runs from its own virtualenv (requirements/checkov.txt says
why): $CHECKOV, else .venv-checkov/bin/checkov, else `checkov` on PATH."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.fixtures.procs import run
from tests.unit.infra_manifests import CHECKOV_SKIPS, INFRA, ROOT, all_k8s, namespace_of

FRAMEWORKS = ("kubernetes", "dockerfile")


def _checkov_executable() -> str:
    for candidate in (os.environ.get("CHECKOV"), ROOT / ".venv-checkov" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("checkov not found: run scripts/setup.sh (it creates .venv-checkov from requirements/checkov.txt) "
                "or set CHECKOV to a checkov executable")


def _pinned_version() -> str:
    text = (ROOT / "requirements" / "checkov.txt").read_text()
    return re.search(r"^checkov==(\S+)$", text, flags=re.M).group(1)


@pytest.fixture(scope="module")
def reports() -> dict:
    """checkov's JSON report per framework. No Prisma Cloud key, no download of guidelines or policies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_", "CKV_"))}
    cmd = [_checkov_executable(), "--directory", str(INFRA), "--framework", *FRAMEWORKS, "--skip-download",
           "--output", "json"]
    done = run(cmd, timeout=600, cwd=ROOT, env=env)
    assert done.returncode in (0, 1), f"checkov failed to run ({done.returncode}): {done.stderr[-2000:]}"
    parsed = json.loads(done.stdout)
    return {r["check_type"]: r for r in (parsed if isinstance(parsed, list) else [parsed])}


def _skips() -> list[dict]:
    return yaml.safe_load(CHECKOV_SKIPS.read_text())


def _failed(reports: dict) -> set[tuple[str, str]]:
    return {(f["check_id"], f["resource"]) for r in reports.values() for f in r["results"]["failed_checks"]}


def test_skip_list_entries_say_what_and_why():
    for entry in _skips():
        assert set(entry) == {"check", "name", "resources", "reason"}, entry
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", entry["check"]), entry["check"]
        assert entry["resources"] and all(isinstance(r, str) for r in entry["resources"]), entry["check"]
        assert len(entry["reason"].split()) >= 20, f"{entry['check']}: say why"


@pytest.mark.e2e  # runs checkov in a subprocess
def test_checkov_scanned_every_manifest_and_dockerfile(reports):
    assert set(reports) == set(FRAMEWORKS)
    for framework, report in reports.items():
        assert report["summary"]["parsing_errors"] == 0, framework
        assert report["summary"]["checkov_version"] == _pinned_version()
    checked = {r["resource"] for report in reports.values()
               for key in ("passed_checks", "failed_checks") for r in report["results"][key]}
    workloads = {f"{d['kind']}.{namespace_of(p)}.{d['metadata']['name']}"
                 for p, d in all_k8s() if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    assert workloads and workloads <= checked, workloads - checked
    dockerfiles = {f"/{p.relative_to(INFRA).as_posix()}." for p in INFRA.rglob("Dockerfile")}
    assert len(dockerfiles) == 2 and dockerfiles <= checked, dockerfiles - checked


@pytest.mark.e2e
def test_no_failed_check_outside_the_skip_list(reports):
    accepted = {(e["check"], r) for e in _skips() for r in e["resources"]}
    unexpected = _failed(reports) - accepted
    assert not unexpected, "fix these or add them to infra/checkov-skips.yaml with the reason: " + ", ".join(
        f"{check} on {resource}" for check, resource in sorted(unexpected))


@pytest.mark.e2e
def test_every_skip_list_entry_still_matches_a_finding(reports):
    failed = _failed(reports)
    stale = {(e["check"], r) for e in _skips() for r in e["resources"]} - failed
    assert not stale, f"no longer failing, remove from infra/checkov-skips.yaml: {sorted(stale)}"
    names = {f["check_id"]: f["check_name"] for r in reports.values() for f in r["results"]["failed_checks"]}
    for entry in _skips():
        assert names[entry["check"]] == entry["name"], entry["check"]
