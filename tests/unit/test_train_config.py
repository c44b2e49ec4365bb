"""The training job's configuration: bad configs fail fast with a message that names the key."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from jobs.train.config import ConfigError, load_config, parse_set
from jobs.train import deepspeed_config, prepare


def test_shipped_configs_validate_and_follow_the_paper():
    tiny = load_config("fmnist_tiny", check_uris=False)
    assert tiny.scaling.num_workers == 2 and not tiny.scaling.use_gpu and tiny.deepspeed.zero_stage == 2
    ds = deepspeed_config(tiny, on_gpu=False)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # fp32 on CPU
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == tiny.optim.batch_size

    s = load_config("imagenet_deit_s", check_uris=False)
    assert (s.optim.batch_size, s.optim.lr, s.optim.weight_decay, s.optim.opt) == (1024, 1e-3, 0.05, "adamw")
    assert (s.schedule.epochs, s.schedule.warmup_epochs, s.schedule.min_lr, s.schedule.sched) == (300, 5, 1e-5, "cosine")
    assert s.split_epochs == 200  # informative selection from epoch 201
    a = s.augment
    assert (a.auto_augment, a.mixup, a.cutmix, a.label_smoothing, a.re_prob) == \
        ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25)
    assert s.model.drop_path == 0.1 and s.data.train.startswith("s3://")
    ds = deepspeed_config(s, on_gpu=True)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * s.scaling.num_workers == 1024

    star = load_config("imagenet_deit_s_9x9", check_uris=False)
    assert star.model.overrides == {"coarse_grid": 9} and star.split_epochs == 200


def test_set_overrides_use_yaml_typing():
    assert parse_set(["a.b=3", "a.c=1e-3", "d=true", "e=null", "f={depth: 2}", "g=[1, 2]", "h=text"]) == \
        {"a": {"b": 3, "c": 1e-3}, "d": True, "e": None, "f": {"depth": 2}, "g": [1, 2], "h": "text"}
    cfg = load_config("fmnist_tiny", ["schedule.epochs=5", "model.overrides={depth: 2}"], check_uris=False)
    assert cfg.schedule.epochs == 5 and cfg.model.overrides == {"depth": 2}
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_set(["schedule.epochs"])


@pytest.mark.parametrize("sets, expected", [
    (["data.trian=x"], "data.trian: unknown key"),
    (["optimizer.lr=1"], "optimizer: unknown key"),
    (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    (["optim.lr=fast"], "optim.lr: Input should be a valid number"),
    (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
    (["deepspeed.precision=fp8"], "deepspeed.precision"),
    (["schedule.split_fraction=1.5"], "schedule.split_fraction"),
    (["optim.batch_size=100"], "must be a multiple of deepspeed.micro_batch_size"),
    (["schedule.warmup_epochs=3"], "warmup_epochs (3) must be < epochs (3)"),
    (["mlflow.alias=latest"], "'latest' is reserved"),
])
def test_bad_values_name_the_key(sets, expected):
    with pytest.raises(ConfigError) as e:
        load_config("fmnist_tiny", sets, check_uris=False)
    assert expected in str(e.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\noptim:\n  lr: 1.0e-3\n  lrr: 2\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key") as e:
        load_config(path, check_uris=False)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="config file .* not found .*fmnist_tiny"):
        load_config(tmp_path / "missing.yaml")


def test_unreachable_local_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train: local path .*nowhere.* does not exist"):
        load_config("fmnist_tiny", [f"data.train={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match=r"data\.val: 'fashion-mnist:validation': the fashion-mnist split must be 'train' or 'test'"):
        load_config("fmnist_tiny", ["data.val=fashion-mnist:validation"])
    with pytest.raises(ConfigError, match="unsupported URI scheme"):
        load_config("fmnist_tiny", ["data.train=gs://bucket/x"])


def test_bad_model_overrides_fail_before_training():
    cfg = load_config("fmnist_tiny", ["model.overrides={depthh: 2}"], check_uris=False)
    with pytest.raises(ConfigError, match=r"model: cannot build 'cfvit_tiny32_fmnist' .*depthh"):
        prepare(cfg)


@pytest.mark.e2e
def test_unreachable_s3_data(s3_server, monkeypatch):
    s3 = s3_server.client()
    s3.create_bucket(Bucket="cfg-empty")
    with pytest.raises(ConfigError, match=r"data\.train: cannot read s3://cfg-missing/x at http://127\.0\.0\.1:\d+: "
                                           r"NoSuchBucket"):
        load_config("fmnist_tiny", ["data.train=s3://cfg-missing/x"])
    with pytest.raises(ConfigError, match=r"data\.val: no objects under s3://cfg-empty/val"):
        load_config("fmnist_tiny", ["data.val=s3://cfg-empty/val"])
    with pytest.raises(ConfigError, match=r"checkpoint\.storage_path: cannot read s3://cfg-missing/runs"):
        load_config("fmnist_tiny", ["checkpoint.storage_path=s3://cfg-missing/runs"])
    # nothing listening at the endpoint
    from tests.fixtures.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ConfigError, match=r"data\.train: cannot reach s3://cfg-empty/x at http://127\.0\.0\.1"):
        load_config("fmnist_tiny", ["data.train=s3://cfg-empty/x"])


def test_cli_reports_config_errors():
    from cfvit_cli import app

    res = CliRunner().invoke(app, ["train", "--config", "fmnist_tiny", "--set", "data.trian=x"])
    assert res.exit_code == 2
    assert "data.trian: unknown key" in res.output


def test_compact_validation_gives_the_exact_curve():
    """Workers send (confidence, prediction) pairs, not N x C probabilities; the η curve must not change."""
    import numpy as np

    from cfvit.budget import eta_curve
    from jobs.train.worker import _as_probs

    rng = np.random.default_rng(0)
    n, c = 500, 10
    cp, fp = (rng.dirichlet(np.ones(c), n).astype(np.float32) for _ in range(2))
    y = rng.integers(0, c, n)
    full = eta_curve(cp, fp, y, coarse_gflops=1.0, fine_gflops=2.0)
    small = eta_curve(*_as_probs(np.stack([cp.max(1), cp.argmax(1)], 1), fp.argmax(1), c), y,
                      coarse_gflops=1.0, fine_gflops=2.0)
    for k in ("eta", "accuracy", "gflops", "exit_fraction"):
        assert np.array_equal(getattr(full, k), getattr(small, k)), k
