"""The load benchmarks fail loudly: a system's failed requests are printed with their first distinct statuses
and bodies, no ratio is computed from a system that answered nothing, and such a system is named so the
command exits non-zero (the real runs: tests/e2e/test_bench_cli.py)."""
from __future__ import annotations

import pytest
from rich.console import Console

from benchmarks.burst import answered_nothing as burst_answered_nothing
from benchmarks.burst import failures, print_burst
from benchmarks.failures import MAX_DISTINCT, ErrorLog, describe
from benchmarks.serve_report import answered_nothing, print_failures, served_ratios

BODY_413 = '{"error":"image too large","detail":{"index":0,"width":28,"height":28,"max_pixels":1}}'


def test_error_log_keeps_the_first_distinct_answers_and_counts_all():
    log = ErrorLog()
    for _ in range(3):
        log.add(413, BODY_413)
    log.add(0, "ConnectError: [Errno 111] Connection refused")
    for i in range(10):
        log.add(500, f'{{"error":"internal error","detail":"E{i}"}}')
    assert log.total == 14
    samples = log.samples()
    assert len(samples) == MAX_DISTINCT and samples[0] == {"status": 413, "body": BODY_413, "count": 3}
    lines = describe("broken", samples, log.total, 20)
    assert lines[0] == "broken: 14 of 20 request(s) failed; first distinct answers:"
    assert lines[1] == f"  3× HTTP 413: {BODY_413}" and lines[2].startswith("  1× no answer: ConnectError")
    assert describe("fine", [], 0) == []


def _row(clients, throughput, requests, errors=0, samples=(), p99=10.0):
    return {"concurrency": clients, "throughput": throughput, "requests": requests, "errors": errors,
            "failed_total": sum(s["count"] for s in samples), "error_samples": list(samples),
            "p99_ms": p99 if requests else float("nan"), "p50_ms": p99, "exit_rate": 0.5, "breakdown": {}}


def _result(base_rows):
    return {"offline": {"ratio": 2.0}, "systems": {"split": [_row(1, 50.0, 100), _row(4, 80.0, 160)],
                                                   "backbone max_pixels=1": base_rows}}


def test_no_ratio_from_a_backbone_that_answered_nothing_and_its_errors_are_printed():
    failed = [{"status": 413, "body": BODY_413, "count": 40}]
    broken = [_row(1, 0.0, 0, 20, failed), _row(4, 0.0, 0, 20, failed)]
    result = _result(broken)
    assert served_ratios(result["systems"], result["offline"]) == [] and answered_nothing(result) == ["backbone max_pixels=1"]
    console = Console(width=200, record=True)
    print_failures(result["systems"], console)
    text = console.export_text()
    assert f"80× HTTP 413: {BODY_413}" in text  # the body as sent, brackets and all
    assert "backbone max_pixels=1 answered no request" in text and "split:" not in text


def test_a_level_where_the_backbone_answered_nothing_has_no_ratio():
    partial = [_row(1, 25.0, 50), _row(4, 0.0, 0, 30, [{"status": 503, "body": "overloaded", "count": 30}])]
    result = _result(partial)
    ratios = served_ratios(result["systems"], result["offline"])
    assert [(r["clients"], r["ratio"]) for r in ratios] == [(1, pytest.approx(2.0))]
    assert answered_nothing(result) == []  # it answered at one level: figures, not an exit


def test_burst_reports_failed_runs_with_their_answers():
    ok = [{"t": 0.1 * i, "status": 200, "latency_ms": 20.0} for i in range(5)]
    bad = [{"t": 0.1 * i, "status": 0, "error": "ReadTimeout: timed out", "latency_ms": 10_000.0} for i in range(5)]
    runs = {"slo-off": {**failures(ok), "phases": {}}, "slo-on": {**failures(bad), "phases": {}}}
    assert failures(ok) == {"sent": 5, "failed": 0, "error_samples": []}
    result = {"rate": 5, "burst_factor": 3, "slo_ms": 100, "stages": "split", "runs": runs}
    assert burst_answered_nothing(result) == ["slo-on"]
    console = Console(width=120, record=True)
    print_burst(result, console)
    text = console.export_text()
    assert "slo-on: 5 of 5 request(s) failed" in text and "5× no answer: ReadTimeout: timed out" in text
