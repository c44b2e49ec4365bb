"""Serving pieces that need no running Ray: config, argument checks, η from a budget, bench maths, S3."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from serve.inputs import APIError, eta_from_table, resolve_eta
from serve.settings import ETA_MAX, AppArgs

ROOT = Path(__file__).resolve().parents[2]


def test_config_yaml_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    args = AppArgs(**app.args)
    # the fine stage is sized below the coarse one (it sees only the hard images)
    assert args.fine.autoscaling_config["max_replicas"] < args.coarse.autoscaling_config["max_replicas"]


def test_build_app_composes_three_named_deployments(tmp_path):
    from serve.app import build_app

    app = build_app({"checkpoint": str(tmp_path), "eta": "0.3"})  # `serve run k=v` passes strings
    ingress = app._bound_deployment
    assert ingress.name == "CFViTIngress"
    names = {a._bound_deployment.name for a in ingress.init_args[:2]}
    assert names == {"CoarseStage", "FineStage"}
    assert ingress.init_args[2].eta == 0.3  # validated into AppArgs, as `serve run` does for a typed builder
    coarse = ingress.init_args[0]._bound_deployment
    assert coarse._deployment_config.autoscaling_config.max_replicas == 4
    single = build_app({"checkpoint": str(tmp_path), "stages": "backbone"})._bound_deployment
    assert single.init_args[0]._bound_deployment.name == "BackboneStage" and single.init_args[1] is None
    fused = build_app({"checkpoint": str(tmp_path), "stages": "fused", "fused": {"fine_batch_size": 8}})._bound_deployment
    stage = fused.init_args[0]._bound_deployment
    assert stage.name == "FusedStage" and fused.init_args[1] is None
    assert stage.init_args[1].fine_batch_size == 8 and stage.init_args[1].max_batch_size == 32
    assert stage._deployment_config.autoscaling_config.max_replicas == 4
    spread = build_app({"checkpoint": str(tmp_path), "ingress_resources": {"head": 0.01},
                        "coarse": {"resources": {"worker": 1}, "max_replicas_per_node": 1}})._bound_deployment
    coarse = spread.init_args[0]._bound_deployment
    assert coarse.ray_actor_options["resources"] == {"worker": 1} and coarse._replica_config.max_replicas_per_node == 1
    assert spread.ray_actor_options["resources"] == {"head": 0.01}


def test_app_args_reject_unknown_keys_by_name():
    with pytest.raises(ValueError, match="max_batchsize"):
        AppArgs(checkpoint="x", fine={"max_batchsize": 8})
    with pytest.raises(ValueError, match="etaa"):
        AppArgs(checkpoint="x", etaa=0.5)
    with pytest.raises(ValueError, match="stages"):
        AppArgs(checkpoint="x", stages="cfvit")


def test_a_partial_stage_block_is_merged_over_that_stages_defaults():
    default = AppArgs(checkpoint="x")
    args = AppArgs(checkpoint="x", fine={"max_batch_size": 8})
    assert args.fine.max_batch_size == 8
    assert args.fine.batch_wait_timeout_s == default.fine.batch_wait_timeout_s == 0.01
    assert args.fine.autoscaling_config == default.fine.autoscaling_config  # not dropped
    assert args.coarse == default.coarse
    args = AppArgs(checkpoint="x", coarse={"autoscaling_config": {"max_replicas": 8}})
    assert args.coarse.autoscaling_config == {**default.coarse.autoscaling_config, "max_replicas": 8}
    assert args.coarse.max_batch_size == default.coarse.max_batch_size
    assert AppArgs(checkpoint="x", fused={"autoscaling_config": None}).fused.autoscaling_config is None
    assert AppArgs(**args.model_dump()) == args  # a dumped config reads back the same
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        AppArgs(checkpoint="x", coarse={"max_batch_size": 64, "max_ongoing_requests": 16})


def test_server_timing_round_trip():
    from serve.timing import parse_server_timing, server_timing

    header = server_timing([{"coarse_in": 1.0, "coarse_batch": 4}, {"coarse_in": 3.0, "coarse_batch": 8}],
                           {"read": 0.5}, 12.25)
    assert parse_server_timing(header) == {"read": 0.5, "coarse_in": 2.0, "coarse_batch": 6.0, "app": 12.25}


def test_bench_system_specs_and_eta_for_an_exit_rate():
    from benchmarks.serve import label, system_args
    from benchmarks.throughput import eta_for_exit_fraction

    args = system_args("f32:split wire_dtype=float32 coarse.torch_threads=2", "ckpt", 0.3, 1, 16)
    assert label("f32:split wire_dtype=float32") == "f32" and args["wire_dtype"] == "float32"
    assert args["coarse"]["torch_threads"] == 2 and args["fine"]["torch_threads"] == 1
    AppArgs(**args)
    assert system_args("fused", "ckpt", 0.3, 1, 16)["fused"]["num_replicas"] == 2
    conf = [0.9, 0.8, 0.7, 0.6]
    assert eta_for_exit_fraction(conf, 0.5) == 0.8 and eta_for_exit_fraction(conf, 1.0) == 0.0
    assert eta_for_exit_fraction(conf, 0.0) > 0.9


def test_pixels_then_batched_normalisation_equal_the_eval_transform():
    import torch
    from PIL import Image

    from cfvit.transforms import build_transform
    from serve.inputs import PixelTransform, normalise

    rng = np.random.default_rng(0)
    for name in ("cfvit_tiny_fmnist", "cfvit_deit_small_patch16_224"):
        dc = _data_config(name)
        pt, tf = PixelTransform(dc), build_transform(dc)
        imgs = [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in ((240, 320, 3), (28, 28), (17, 50))]
        px = [pt.pixels(i) for i in imgs]
        assert all(p.dtype == torch.uint8 and tuple(p.shape) == tuple(dc["input_size"]) for p in px)
        torch.testing.assert_close(normalise(torch.stack(px), pt.mean, pt.std), torch.stack([tf(i) for i in imgs]),
                                   atol=0, rtol=0)


def _data_config(name: str) -> dict:
    import cfvit

    kw = {"embed_dim": 32, "depth": 1, "num_heads": 2} if "fmnist" in name else {"depth": 1}
    return dict(cfvit.create_model(name, **kw).data_config)


def test_app_args_reject_nonsense():
    with pytest.raises(ValueError):
        AppArgs(checkpoint="x", eta=3)
    with pytest.raises(ValueError):
        AppArgs(checkpoint="x", max_images=0)


TABLE = [{"budget_gflops": 0.05, "eta": 0.9, "accuracy": 0.80, "gflops": 0.048},
         {"budget_gflops": 0.08, "eta": 0.99, "accuracy": 0.84, "gflops": 0.079},
         {"budget_gflops": 0.12, "eta": 0.999, "accuracy": 0.83, "gflops": 0.11}]


def test_eta_from_budget_picks_the_most_accurate_point_that_fits():
    assert eta_from_table(TABLE, 0.05) == 0.9
    assert eta_from_table(TABLE, 0.2) == 0.99  # more budget, but the costlier point is less accurate
    with pytest.raises(APIError) as e:
        eta_from_table(TABLE, 0.01)
    assert e.value.status == 422 and e.value.detail["min_gflops"] == 0.048
    with pytest.raises(APIError) as e:
        eta_from_table(None, 1.0)
    assert e.value.status == 422 and "no calibrated" in e.value.detail


def test_eta_from_the_library_table():
    from cfvit.budget import eta_curve, eta_table

    rng = np.random.default_rng(0)
    cp, fp = rng.dirichlet(np.ones(10), 200), rng.dirichlet(np.ones(10), 200)
    y = rng.integers(0, 10, 200)
    curve = eta_curve(cp, fp, y, coarse_gflops=1.0, fine_gflops=3.0)
    table = eta_table(curve, [1.5, 2.5, 4.0])
    assert eta_from_table(table, 2.5) == table[1]["eta"]


@pytest.mark.parametrize("eta,budget", [(-0.01, None), (ETA_MAX + 1e-3, None), (float("nan"), None),
                                        (0.5, 1.0), (None, 0.0), (None, -1.0),
                                        (None, float("inf")), (None, float("nan"))])
def test_resolve_eta_refuses(eta, budget):
    with pytest.raises(APIError) as e:
        resolve_eta(eta, budget, 0.5, TABLE)
    assert e.value.status == 422


def test_resolve_eta_accepts():
    assert resolve_eta(None, None, 0.4, TABLE) == 0.4
    assert resolve_eta(0.0, None, 0.4, None) == 0.0
    assert resolve_eta(ETA_MAX, None, 0.4, None) == ETA_MAX
    assert resolve_eta(None, 0.1, 0.4, TABLE) == 0.99


def test_ratio_at_equal_p99_interpolates_both_curves():
    from benchmarks.serve import ratio_at_equal_p99

    cf = [{"p99_ms": 10, "throughput": 100}, {"p99_ms": 30, "throughput": 300}]
    base = [{"p99_ms": 20, "throughput": 100}, {"p99_ms": 40, "throughput": 150}]
    rows = ratio_at_equal_p99(cf, base)
    assert [r["p99_ms"] for r in rows] == [20, 30]
    assert rows[0]["ratio"] == pytest.approx(200 / 100)
    assert rows[1]["ratio"] == pytest.approx(300 / 125)
    assert ratio_at_equal_p99(cf, [{"p99_ms": 99, "throughput": 1}]) == []


def test_cli_registers_serve_and_bench_serve():
    from typer.testing import CliRunner

    from cfvit_cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["serve", "--help"])
    assert out.exit_code == 0 and "--checkpoint" in out.output and "--port" in out.output
    out = runner.invoke(app, ["bench", "serve", "--help"], terminal_width=200)
    assert out.exit_code == 0 and "--concurrency" in out.output and "--burst" in out.output
    out = runner.invoke(app, ["bench", "failover", "--help"], terminal_width=200)
    assert out.exit_code == 0 and "--clients" in out.output


def test_s3_checkpoint_is_downloaded(s3_server, tmp_path, monkeypatch):
    from cfvit_common.checkpoints import resolve_checkpoint

    monkeypatch.setenv("CFVIT_CACHE", str(tmp_path / "cache"))
    s3 = s3_server.client()
    s3.create_bucket(Bucket="serve-models")
    s3.put_object(Bucket="serve-models", Key="runs/a/ckpt/config.json", Body=b"{}")
    s3.put_object(Bucket="serve-models", Key="runs/a/ckpt/model.safetensors", Body=b"weights")
    s3.put_object(Bucket="serve-models", Key="runs/a/ckpt2/config.json", Body=b"other")  # same prefix, not inside
    local = resolve_checkpoint("s3://serve-models/runs/a/ckpt")
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert resolve_checkpoint("s3://serve-models/runs/a/ckpt") == local  # cached
    # rewritten in place (as `cfvit calibrate s3://…` does): fetched again, not served from the stale cache
    s3.put_object(Bucket="serve-models", Key="runs/a/ckpt/config.json", Body=b'{"eta_table": []}')
    fresh = resolve_checkpoint("s3://serve-models/runs/a/ckpt")
    assert fresh != local and (fresh / "config.json").read_bytes() == b'{"eta_table": []}'
    s3.put_object(Bucket="serve-models", Key="runs/evil/ckpt/../../../escape.txt", Body=b"x")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        resolve_checkpoint("s3://serve-models/runs/evil/ckpt")
    assert not list((tmp_path / "cache").rglob("escape.txt")) and not (tmp_path / "escape.txt").exists()
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint("s3://serve-models/nothing/here")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "missing"))


def test_replica_placement_follows_its_gpu_reservation():
    import torch

    from serve.model_host import placement

    assert placement(0) == (torch.device("cpu"), None)
    assert placement(0, "bf16") == (torch.device("cpu"), torch.bfloat16)
    if torch.cuda.is_available():
        assert placement(0.5) == (torch.device("cuda"), torch.bfloat16)
        assert placement(1, "fp32") == (torch.device("cuda"), None)
    else:  # a replica that reserved a GPU but sees none must not quietly serve from the CPU
        with pytest.raises(RuntimeError, match="no CUDA device"):
            placement(1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage_forward_passes_run_on_the_replica_device_and_reply_on_cpu(precision):
    """The stages' batch functions (without Serve around them) on the placement a replica would get:
    coarse + fine answers equal the library's early-exit inference; replies are CPU tensors."""
    import torch

    import cfvit
    from serve.deployments import CoarseStage
    from serve.model_host import placement

    torch.manual_seed(0)
    model = cfvit.create_model("cfvit_tiny_fmnist", embed_dim=32, depth=3, num_heads=2).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def stage(cls):
        s = object.__new__(cls.func_or_class)  # the class Serve would instantiate, minus the replica plumbing
        s.model = model.to(device)
        s.device, s.dtype = device, placement(0, precision)[1]
        return s

    x = torch.randn(5, 1, 56, 56)
    s = stage(CoarseStage)
    s.mean, s.std = model.data_config["mean"], model.data_config["std"]
    coarse = s._coarse_forward(list(x), [0.0, 2.0, 0.0, 2.0, 2.0], [False, False, True, False, False])
    answers = [a for a, _ in coarse]
    assert [a.exited for a in answers] == [True, False, True, False, False]
    assert {a.stage for a in answers} == {"coarse"}
    # an exiting image keeps its coarse state only when the drift monitor shadows it (image 2)
    assert [state is not None for _, state in coarse] == [False, True, True, True, True]
    hard = [i for i, a in enumerate(answers) if not a.exited]
    fine = s._fine_forward([x[i] for i in hard], [coarse[i][1] for i in hard])
    base = s._backbone_forward(list(x))
    assert {f.stage for f in fine} == {"fine"} and {b.stage for b in base} == {"backbone"}
    assert all(b.coarse_probs is None and b.exited for b in base)
    # uint8 pixels are normalised inside the replica, as a batch
    u8 = torch.randint(0, 256, (3, 1, 56, 56), dtype=torch.uint8)
    from serve.inputs import normalise
    torch.testing.assert_close(s._batch(list(u8)), normalise(u8, s.mean, s.std).to(device))
    assert all(r.probs.device.type == "cpu" for r in answers + fine + base)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        ref = model.infer(x.to(device), torch.tensor([0.0, 2.0, 0.0, 2.0, 2.0], device=device))
        ref_backbone = model.vit(x.to(device)).float().softmax(-1).cpu()
    got = torch.stack([answers[i].probs for i in range(5) if answers[i].exited] + [f.probs for f in fine])
    order = [0, 2] + hard
    want = ref.logits.float().softmax(-1).cpu()[order]
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    torch.testing.assert_close(torch.stack([b.probs for b in base]), ref_backbone, atol=tol, rtol=0)
    assert len(fine[0].selected) == model.k_selected
    # a hard coarse answer completed by its fine answer keeps the coarse probabilities beside the fine ones
    done = answers[hard[0]].finished_by(fine[0])
    assert done.stage == "fine" and done.exited and done.coarse_probs is answers[hard[0]].probs


def test_unexpected_failures_are_json_errors_503_when_a_stage_is_unavailable():
    import asyncio
    import json as _json

    from ray.serve.exceptions import BackPressureError

    from serve.http_api import _unexpected

    busy = asyncio.run(_unexpected(None, BackPressureError(num_queued_requests=9, max_queued_requests=8)))
    assert busy.status_code == 503
    assert _json.loads(busy.body) == {"error": "model stage unavailable, retry later", "detail": "BackPressureError"}
    bug = asyncio.run(_unexpected(None, RuntimeError("secret internals")))
    assert bug.status_code == 500 and _json.loads(bug.body) == {"error": "internal error", "detail": "RuntimeError"}


def test_build_app_is_a_typed_application_builder(tmp_path):
    """`serve run serve.app:build_app k=v` / a config's `args:` go through Ray's typed-builder path: the dict
    arrives validated as AppArgs, and an unknown key is refused by name before anything deploys."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"checkpoint": str(tmp_path), "eta": "0.25"})
    args = app._bound_deployment.init_args[2]
    assert isinstance(args, AppArgs) and args.eta == 0.25
    with pytest.raises(ValueError, match="shadow_fractoin"):
        call_user_app_builder_with_args_if_necessary(build_app, {"checkpoint": "x", "shadow_fractoin": 0.1})
