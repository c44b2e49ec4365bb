"""The request path's settings without Ray running: the profiles' environments, the app's `model_in_ingress`
placement, the floor's apps, the CPU meter and how the report pairs each CF-ViT system with its backbone."""
import os
import time

import pytest

from benchmarks.cpu_meter import CpuMeter
from benchmarks.floor import FLOOR_SYSTEMS, floor_app
from benchmarks.serve_report import baseline_of
from serve.request_path import PROFILES, choose_profile, direct_ingress, profile_env
from serve.settings import AppArgs


def test_profiles_switch_direct_ingress_and_give_haproxy_files_and_ports_of_its_own():
    assert not direct_ingress(profile_env("default"))
    assert direct_ingress(profile_env("optimized")) and direct_ingress(profile_env("haproxy"))
    ports = iter([41001, 41002, 41003, 41004])
    a, b = profile_env("haproxy", lambda: next(ports)), profile_env("haproxy", lambda: next(ports))
    assert a["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and a["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert a["RAY_SERVE_HAPROXY_SOCKET_PATH"] != b["RAY_SERVE_HAPROXY_SOCKET_PATH"]  # never Ray's shared /tmp default
    assert os.path.isdir(a["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert {a["RAY_SERVE_HAPROXY_STATS_PORT"], a["RAY_SERVE_HAPROXY_METRICS_PORT"]} == {"41001", "41002"}
    with pytest.raises(ValueError, match="default, optimized, haproxy"):
        profile_env("fast")
    assert set(PROFILES) == {"default", "optimized", "haproxy"}


def test_cfvit_serve_puts_haproxy_in_front_only_of_an_endpoint_on_the_network():
    # Ray's HAProxy opens its stats and metrics ports on every interface: never for a loopback endpoint
    for host in ("127.0.0.1", "localhost", "::1"):
        assert choose_profile("auto", host) == "default"
    for host in ("0.0.0.0", "10.0.3.7", "::"):
        assert choose_profile("auto", host) == "haproxy"
    assert choose_profile("haproxy", "127.0.0.1") == "haproxy"  # asked for by name: as asked
    assert choose_profile("optimized", "0.0.0.0") == "optimized"
    with pytest.raises(ValueError, match="auto, default, optimized, haproxy"):
        choose_profile("fastest", "0.0.0.0")


def test_model_in_ingress_makes_one_deployment_with_the_stage_blocks_placement(tmp_path):
    from serve.app import build_app

    with pytest.raises(ValueError, match="model_in_ingress takes stages fused or backbone"):
        AppArgs(checkpoint="x", model_in_ingress=True)  # split: two deployments by design
    fused = {"num_cpus": 1.5, "max_ongoing_requests": 64, "autoscaling_config": {"max_replicas": 6}}
    app = build_app({"checkpoint": str(tmp_path), "stages": "fused", "model_in_ingress": True, "fused": fused,
                     "ingress_num_cpus": 0.25})
    ingress = app._bound_deployment
    model, fine, args = ingress.init_args
    assert model is None and fine is None and args.model_in_ingress
    assert ingress.ray_actor_options["num_cpus"] == 1.75  # the stage's CPUs and the ingress's
    assert ingress._deployment_config.max_ongoing_requests == 64
    assert ingress._deployment_config.autoscaling_config.max_replicas == 6  # scales as the stage block says
    backbone = build_app({"checkpoint": str(tmp_path), "stages": "backbone", "model_in_ingress": True,
                          "coarse": {"autoscaling_config": None, "num_replicas": 3}})._bound_deployment
    assert backbone._deployment_config.autoscaling_config is None and backbone.num_replicas == 3


def test_floor_apps_are_an_ingress_alone_or_with_one_hop():
    assert FLOOR_SYSTEMS == ("noop", "noop+hop")
    assert floor_app("noop")._bound_deployment.init_args == (None,)
    assert floor_app("noop+hop")._bound_deployment.init_args[0] is not None
    with pytest.raises(ValueError, match="unknown floor system"):
        floor_app("noop+2hops")


def test_cpu_meter_sees_this_process_work():
    meter = CpuMeter()
    meter.start()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    w = meter.stop()
    assert 0.25 <= w.own_s <= w.wall_s * w.cores + 0.05
    assert w.machine_s >= 0.25 * 0.9  # the machine counts this process's busy time too
    per = w.per(3)
    assert per["own_cpu_ms_per_request"] == pytest.approx(1000 * w.own_s / 3)


def test_each_cf_vit_system_is_compared_with_the_backbone_served_the_same_way():
    systems = {"fused": [], "backbone": [], "local:fused model_in_ingress=true fused.max_batch_size=8": [],
               "local-bb:backbone model_in_ingress=true": []}
    assert baseline_of("fused", systems) == "backbone"
    assert baseline_of("local:fused model_in_ingress=true fused.max_batch_size=8", systems) == (
        "local-bb:backbone model_in_ingress=true")
    assert baseline_of("split wire_dtype=float32", systems) == "backbone"  # no such backbone: the first


def _rows(exit_rate, rps):
    return [{"concurrency": c, "requests": 100, "requests_per_s": rps * c, "throughput": rps * c, "p50_ms": 20.0 * c,
             "p99_ms": 40.0 * c, "cpu_ms_per_request": 12.5, "own_cpu_ms_per_request": 11.0, "errors": 0,
             "failed_total": 0, "exit_rate": exit_rate, "error_samples": [],
             "breakdown": {"proxy": 3.0, "read": 1.0, "decode": 2.0, "coarse_compute": 9.0, "app": 20.0}}
            for c in (1, 8)]


def test_the_report_fits_80_columns(capsys):
    from benchmarks.serve_report import print_report

    systems = {"split": _rows(0.76, 20.0), "fused model_in_ingress=true": _rows(0.76, 22.0),
               "backbone": _rows(0.0, 9.0)}
    run = {"env": "RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "systems": systems,
           "floor": {"noop": _rows(0.0, 150.0), "noop+hop": _rows(0.0, 90.0)}}
    result = {"model": "cfvit_deit_small_patch16_224", "eta": 0.0027, "cpus": 2, "cpu": "x86_64",
              "load_at_start": 0.4, "transport": "http", "images_per_request": 1, "body_bytes": 151_000,
              "batch_size": 16, "duration_s": 10.0, "profiles": {"optimized": run},
              "offline": {"ratio": 2.7, "threads": 2, "n_batches": 4, "batch_size": 16, "backbone_ips": 17.0,
                          "cfvit_ips": 46.0, "exit_rate": 0.76}}
    print_report(result)
    out = capsys.readouterr().out
    assert "floor: noop+hop" in out and "fused model_in" in out and "served backbone" in out
    assert max(len(line) for line in out.splitlines()) <= 80, out
