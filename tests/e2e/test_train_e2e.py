"""End to end: 2 CPU workers, DeepSpeed ZeRO-2, Fashion-MNIST PNGs streamed from an S3 server (moto),
checkpoints into that server, a real MLflow server; a worker is SIGKILLed mid-run and must be recovered;
a corrupt object in the bucket must be skipped and counted; a rerun resumes at the right epoch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform, decode_image
from cfvit_common.tracking import download_model
from jobs.train import run_training
from jobs.train.config import load_config
from tests.fixtures.services import png_bytes, upload_fashion_mnist

pytestmark = pytest.mark.e2e

BUCKET, RUNS = "cfvit-data", "cfvit-runs"
N_TRAIN, N_VAL, EPOCHS = 127, 64, 3  # + 1 corrupt object = 128 rows: 2 micro-batches of 32 per worker
TINY = "{depth: 2, embed_dim: 48, num_heads: 2}"


def job_config(mlflow_uri, tmp, **sets):
    base = {
        "name": "e2e",
        "data.train": f"s3://{BUCKET}/fmnist/train", "data.val": f"s3://{BUCKET}/fmnist/val",
        "data.train_limit": "null", "data.val_limit": "null",
        "model.name": "cfvit_tiny_fmnist", "model.overrides": TINY, "optim.batch_size": 64, "deepspeed.micro_batch_size": 32,
        "deepspeed.zero_stage": 2, "schedule.epochs": EPOCHS, "schedule.split_fraction": 0.34,
        "scaling.num_workers": 2, "checkpoint.storage_path": f"s3://{RUNS}/checkpoints",
        "checkpoint.run_name": "e2e", "checkpoint.max_failures": 2,
        "mlflow.tracking_uri": mlflow_uri, "mlflow.experiment": "e2e", "mlflow.registered_model": "cfvit-e2e",
        "mlflow.alias": "candidate",
        # the failure drill: rank 1 SIGKILLs itself once when epoch 2 (0-based) starts
        "debug.kill_at_epoch": 2, "debug.kill_rank": 1, "debug.kill_marker": str(tmp / "killed"),
    }
    base.update(sets)
    return load_config("fmnist_tiny", [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3 = s3_server.client()
    folders = upload_fashion_mnist(s3, BUCKET, "fmnist/train", "train", n=N_TRAIN)
    upload_fashion_mnist(s3, BUCKET, "fmnist/val", "test", n=N_VAL)
    # a corrupt object with an image name, in a real class folder: must be skipped, never fatal
    s3.put_object(Bucket=BUCKET, Key=f"fmnist/train/{folders[3]}/corrupt.png", Body=b"\x89PNG\r\n\x1a\nnot really")
    s3.create_bucket(Bucket=RUNS)
    return s3


@pytest.fixture(scope="module")
def trained(bucket, ray_session, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = job_config(mlflow_server, tmp)
    return cfg, run_training(cfg), tmp


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_run_finishes_with_metrics_in_mlflow(trained, mlflow_server):
    cfg, out, _ = trained
    assert out.result.error is None
    assert out.metrics["epoch"] == EPOCHS - 1
    client = _client(mlflow_server)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["model.name"] == "cfvit_tiny_fmnist"
    for key in ("train_loss", "val_coarse_top1", "val_fine_top1", "images_per_s", "skipped_images", "data_wait_share"):
        steps = [m.step for m in client.get_metric_history(out.mlflow_run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), (key, steps)
    split = {m.step: m.value for m in client.get_metric_history(out.mlflow_run_id, "split_all")}
    assert split == {0: 1.0, 1: 0.0, 2: 0.0}  # every patch split in epoch 0, informative selection after
    # the share of each epoch's step time spent waiting for Ray Data: a fraction, and per epoch in MLflow
    assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(out.mlflow_run_id, "data_wait_share"))
    acc = run.data.metrics["val_fine_top1"]
    assert 0.0 <= acc <= 1.0 and run.data.metrics["val_images"] == N_VAL
    assert "plots/accuracy_gflops.png" in {a.path for a in client.list_artifacts(out.mlflow_run_id, "plots")}


def test_registered_model_loads_and_predicts(trained, mlflow_server):
    import cfvit
    from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
    from cfvit_common.tracking import download_model
    from tests.fixtures.quick_train import to_batch

    _, out, _ = trained
    assert out.model_version is not None
    local = download_model("models:/cfvit-e2e@candidate", tracking=mlflow_server)
    # downloaded once per node (replicas share it); by version too, as the alias points at that version
    assert download_model("models:/cfvit-e2e@candidate", tracking=mlflow_server) == local
    assert download_model(f"models:/cfvit-e2e/{out.model_version}", tracking=mlflow_server) == local
    model = cfvit.load(local).eval()
    meta = model.cfvit_config
    assert meta["trained_epochs"] == EPOCHS and meta["eta_table"]
    assert meta["data"]["val"] == f"s3://{BUCKET}/fmnist/val"  # what `cfvit calibrate` uses when given no --data
    assert [n.split("_", 1)[1] for n in meta["class_names"]] == \
        [c.replace("/", "_").replace(" ", "_") for c in FASHION_MNIST_CLASSES]
    x, y = load_fashion_mnist("test")
    res = model.infer(to_batch(x[:64]), eta=0.5)
    assert res.logits.shape == (64, 10) and np.isfinite(res.logits.numpy()).all()
    assert set(res.exit_stage.tolist()) <= {0, 1}


def test_checkpoints_in_s3_hold_deepspeed_state_and_export(trained, bucket):
    keys = [o["Key"] for p in bucket.get_paginator("list_objects_v2").paginate(Bucket=RUNS, Prefix="checkpoints/e2e/")
            for o in p.get("Contents", [])]
    files = [k.split("/", 3)[2:] for k in keys if k.count("/") >= 3]  # [checkpoint dir, file inside it]
    last = sorted({d for d, _ in files if d.startswith("checkpoint_")})[-1]
    names = {f for d, f in files if d == last}
    assert {"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "deepspeed/mp_rank_00_model_states.pt", "model/model.safetensors", "model/config.json",
            "train_state.json"} <= names


def test_killed_worker_is_recovered_from_the_last_checkpoint(trained, mlflow_server):
    _, out, tmp = trained
    assert (tmp / "killed").read_text().startswith("rank 1 killed at epoch 2")
    # the restarted worker group resumed from epoch 1's checkpoint instead of starting over
    assert out.metrics["start_epoch"] == 2
    steps = [m.step for m in _client(mlflow_server).get_metric_history(out.mlflow_run_id, "train_loss")]
    assert sorted(steps) == [0, 1, 2]  # no epoch trained twice


def test_corrupt_object_is_skipped_and_counted(trained, mlflow_server):
    _, out, _ = trained
    hist = _client(mlflow_server).get_metric_history(out.mlflow_run_id, "train_skipped_images")
    assert {m.step: m.value for m in hist} == {0: 1.0, 1: 1.0, 2: 1.0}
    assert out.metrics["train_images"] == N_TRAIN  # every good image, every epoch


def test_rerun_resumes_at_the_next_epoch_decoding_on_the_device(trained, mlflow_server):
    """The rerun trains one more epoch with `data.decode: device`: Ray Data only reads the objects' bytes from
    S3 and each worker decodes and augments its batch (on its CPU here), the corrupt object still skipped."""
    cfg, first, tmp = trained
    more = job_config(mlflow_server, tmp, **{"schedule.epochs": EPOCHS + 1, "debug.kill_at_epoch": "null",
                                             "data.decode": "device"})
    out = run_training(more)
    assert out.metrics["epoch"] == EPOCHS and out.metrics["start_epoch"] == EPOCHS
    client = _client(mlflow_server)
    steps = [m.step for m in client.get_metric_history(out.mlflow_run_id, "train_loss")]
    assert steps == [EPOCHS]  # only the new epoch was trained
    assert out.model_version == first.model_version + 1
    run = client.get_run(out.mlflow_run_id)
    assert run.data.params["data.decode"] == "device"
    assert out.metrics["train_images"] == N_TRAIN and out.metrics["train_skipped_images"] == 1
    assert run.data.metrics["val_images"] == N_VAL
    # validation decoded on the device scores the exported model as the library does on the CPU (the device
    # resize is within a grey level of PIL's: allow an image or two to flip)
    model = cfvit.load(download_model(f"models:/cfvit-e2e/{out.model_version}", tracking=mlflow_server)).eval()
    x, y = load_fashion_mnist("test")
    tf = build_transform(model.data_config)
    with torch.no_grad():
        res = model.infer(torch.stack([tf(decode_image(png_bytes(a))) for a in x[:N_VAL]]), 2.0)
    for stage, logits in (("coarse", res.coarse_logits), ("fine", res.logits)):
        top1 = float((logits.argmax(-1).numpy() == y[:N_VAL]).mean())
        assert abs(run.data.metrics[f"val_{stage}_top1"] - top1) <= 2 / N_VAL, (stage, run.data.metrics, top1)
