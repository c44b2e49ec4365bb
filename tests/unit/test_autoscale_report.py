"""The pure parts of `cfvit bench serve --autoscale`: phases, per-second rows with the replica/node samples,
and the figures taken from them (benchmarks/autoscale_report.py), plus the cluster config the fake
multi-node provider is given."""
from __future__ import annotations

from rich.console import Console

from benchmarks.autoscale import AutoscaleSettings, app_args, cluster_config
from benchmarks.autoscale_report import figures, phase_bounds, print_autoscale, recovered_s, with_samples
from serve.settings import AppArgs


def _row(t, p99, errors=0):
    return {"t": float(t), "requests": 10, "errors": errors, "p99_ms": p99, "eta": 0.5}


def _sample(t, coarse, nodes, fine=1):
    return {"t": t, "replicas": {"ingress": 1, "coarse": coarse, "fine": fine}, "nodes": nodes}


def test_phase_bounds_skip_empty_phases():
    assert phase_bounds([10, 20, 30, 0]) == {"steady": (0, 10), "step": (10, 30), "down": (30, 60)}
    assert phase_bounds([0, 5, 0, 5]) == {"step": (0, 5), "hard": (5, 10)}


def test_with_samples_takes_the_last_sample_of_each_second_and_carries_it_on():
    rows = [_row(t, 10) for t in range(4)]
    samples = [_sample(0.2, 1, 1), _sample(0.7, 2, 1), _sample(2.5, 3, 2)]
    out = with_samples(rows, samples)
    assert [r["replicas"]["coarse"] for r in out] == [2, 2, 3, 3]
    assert [r["nodes"] for r in out] == [1, 1, 2, 2]
    assert out[0]["p99_ms"] == 10 and out[0]["requests"] == 10


def test_recovered_counts_from_the_step_after_p99_went_over():
    rows = [_row(t, p) for t, p in enumerate([50, 50, 900, 800, 90, 400, 80, 70, 60, 50])]
    assert recovered_s(rows, 0, 10, 100) == 6  # 4 is under, but 5 is over again: 6, 7, 8 stay under
    assert recovered_s(rows, 0, 4, 100) is None  # never back in the window
    assert recovered_s([_row(t, 20) for t in range(5)], 0, 5, 100) == 0.0


def test_figures_from_a_run():
    bounds = phase_bounds([10, 20, 20, 10])
    rows = [_row(t, 900 if 10 <= t < 16 else 50, errors=1 if t == 12 else 0) for t in range(60)]
    samples = ([_sample(t + 0.5, 1, 1) for t in range(13)] + [_sample(t + 0.5, 2, 1) for t in range(13, 15)]
               + [_sample(t + 0.5, 3, 2) for t in range(15, 36)] + [_sample(t + 0.5, 1, 2) for t in range(36, 44)]
               + [_sample(t + 0.5, 1, 1) for t in range(44, 50)]
               + [_sample(t + 0.5, 1, 1, fine=2) for t in range(50, 60)])
    f = figures(with_samples(rows, samples), samples, bounds, 100)
    assert f["step_to_new_replica_s"] == 3.5  # first 2 coarse replicas at 13.5
    assert f["step_to_new_node_s"] == 5.5
    assert f["step_to_p99_under_target_s"] == 6
    assert f["errors_scaling_up"] == 1 and f["errors_scaling_down"] == 0
    assert f["replicas_peak"]["coarse"] == 3 and f["nodes_peak"] == 2
    assert f["fall_to_replica_removed_s"] == 6.5 and f["fall_to_node_removed_s"] == 14.5
    assert f["replicas_after_fall"]["coarse"] == 1 and f["nodes_after_fall"] == 1
    assert f["hard_replicas_start"]["fine"] == 1 and f["hard_replicas_peak"] == {"ingress": 1, "coarse": 1, "fine": 2}
    assert figures(rows, [], bounds, 100) == {}


def test_nothing_scaled_reads_not_seen():
    bounds = phase_bounds([5, 5, 5, 0])
    samples = [_sample(t + 0.5, 1, 1) for t in range(15)]
    f = figures(with_samples([_row(t, 50) for t in range(15)], samples), samples, bounds, 100)
    assert f["step_to_new_replica_s"] is None and f["step_to_new_node_s"] is None
    assert f["fall_to_replica_removed_s"] is None


def test_report_prints_in_80_columns():

    bounds = phase_bounds([5, 5, 5, 0])
    samples = [_sample(t + 0.5, 1 + (5 <= t < 10), 1) for t in range(15)]
    rows = with_samples([_row(t, 50) for t in range(15)], samples)
    result = {"settings": {"rate": 5, "step_factor": 4, "hard_share": 0.2, "nodes": False}, "target_ms": 100,
              "phases": bounds, "per_second": rows, "figures": figures(rows, samples, bounds, 100),
              "sent": 10, "failed": 0}
    console = Console(width=80, record=True)
    print_autoscale(result, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "step → first new replica (s)" in text and "0.5" in text


def test_app_args_validate_and_carry_the_overrides():
    s = AutoscaleSettings(checkpoint="/nowhere", upscale_delay_s=2, downscale_delay_s=12, max_replicas=(2, 3, 2))
    args = AppArgs.model_validate(app_args(s, 0.3))
    assert args.coarse.autoscaling_config["max_replicas"] == 3
    assert args.fine.autoscaling_config["downscale_delay_s"] == 12
    assert args.coarse.num_cpus == s.replica_cpus and args.latency_slo_ms is None
    assert AppArgs.model_validate(app_args(AutoscaleSettings("/x", slo_mode=True, target_ms=250), 0.3)).latency_slo_ms == 250


def test_cluster_config_names_the_fake_provider_and_the_idle_timeout():
    cfg = cluster_config(AutoscaleSettings("/x", idle_timeout_s=30, max_workers=3), "10.0.0.1:1234")
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["provider"]["gcs_address"] == "10.0.0.1:1234"
    assert cfg["idle_timeout_minutes"] == 0.5
    assert cfg["available_node_types"]["ray.worker.cpu"]["max_workers"] == 3


def test_a_replica_that_starts_after_the_fall_counts_as_removed_when_it_goes():
    bounds = phase_bounds([5, 10, 20, 0])  # the fall at 15 s; the added replica runs from 17 s to 22 s
    samples = [_sample(t + 0.5, 2 if 17 <= t < 22 else 1, 1) for t in range(35)]
    f = figures(with_samples([_row(t, 50) for t in range(35)], samples), samples, bounds, 100)
    assert f["step_to_new_replica_s"] == 12.5 and f["fall_to_replica_removed_s"] == 7.5
    assert f["fall_to_node_removed_s"] is None
