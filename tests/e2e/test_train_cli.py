"""`cfvit train` as a user runs it, to a registered model: a subprocess with its own Ray, WebDataset shards,
the ImageNet recipe's augmentations (mixup, cutmix, RandAugment, label smoothing, random erasing), a real
MLflow server (the run fixture: tests/fixtures/cli_model.py)."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import cfvit
from cfvit.data import FASHION_MNIST_CLASSES
from cfvit_common.tracking import download_model
from tests.fixtures.cli_model import AUGMENT, N_TRAIN, N_VAL, REGISTERED

pytestmark = pytest.mark.e2e


def test_cfvit_train_registers_a_model_trained_from_webdataset_shards_with_mixup(cli_trained):
    assert cli_trained.returncode == 0, cli_trained.output[-4000:]
    assert "Traceback" not in cli_trained.output and REGISTERED in cli_trained.output, cli_trained.output[-4000:]
    client = MlflowClient(tracking_uri=cli_trained.tracking_uri, registry_uri=cli_trained.tracking_uri)
    version = client.get_model_version_by_alias(REGISTERED, "candidate")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.format"] == "webdataset" and params["data.decode"] == "cpu"
    assert {k: params[k] for k in AUGMENT} == {k: str(v) for k, v in AUGMENT.items()}
    for key in ("train_loss", "val_fine_top1", "train_images"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    assert {m.value for m in client.get_metric_history(run.info.run_id, "train_images")} == {N_TRAIN}
    assert {m.value for m in client.get_metric_history(run.info.run_id, "train_skipped_images")} == {0}
    assert run.data.metrics["val_images"] == N_VAL
    model = cfvit.load(download_model(cli_trained.uri, tracking=cli_trained.tracking_uri))
    meta = model.cfvit_config
    assert meta["trained_epochs"] == 2 and meta["eta_table"] and meta["agreement_profile"]
    assert meta["class_names"] == list(FASHION_MNIST_CLASSES)  # from the shards' classes.json
