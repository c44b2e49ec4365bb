"""The training job's driver: validate the config, start (or join) Ray, run the `TorchTrainer`, track it in
MLflow and register the final model. `train_loop_per_worker` (jobs/train/worker.py) runs on the workers.

    cfvit train --config jobs/configs/fmnist_tiny.yaml --set schedule.epochs=3
    python -m jobs.train --config …        (the same, as a Ray job entrypoint)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

import cfvit
from cfvit_common import tracking
from cfvit_common.ray_env import init_ray as _init
from cfvit_common.storage import run_storage
from jobs.ops.outputs import check_running_job

from .config import ConfigError, JobConfig
from .data import Source, build_datasets, describe, train_augment
from .device_augment import check
from .worker import EXPORT_DIR, WorkerSetup, train_loop_per_worker

# What the workers' runtime_env may carry from the driver's environment: where things are, never a
# credential. Ray keeps a runtime_env in its GCS and shows it on the dashboard; workers take S3 keys and
# the MLflow user from their own node (a pod's identity or mounted Secret, an instance profile, or, on a Ray
# started here, the environment it inherited from this process).
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
              "FASHION_MNIST_ROOT")


@dataclass
class TrainingOutcome:
    result: Any  # ray.train.Result
    metrics: dict
    checkpoint_path: Optional[str]
    mlflow_run_id: Optional[str]
    model_version: Optional[int]


@dataclass
class Prepared:
    """What the driver works out once, before anything starts: the data's layout and the model's facts."""

    train_src: Source
    val_src: Source
    classes: list[str]
    data_config: dict
    stage_gflops: dict[str, float]
    backbone_gflops: float

    def worker_setup(self, mlflow_run_id: Optional[str], tracking_uri: Optional[str]) -> WorkerSetup:
        return WorkerSetup(classes=self.classes, data_config=self.data_config, stage_gflops=self.stage_gflops,
                           backbone_gflops=self.backbone_gflops, mlflow_run_id=mlflow_run_id,
                           tracking_uri=tracking_uri)


def prepare(cfg: JobConfig) -> Prepared:
    """Everything the workers need that the driver can work out once: classes, model facts."""
    try:
        train_src = describe(cfg.data.train, cfg.data.format)
        val_src = describe(cfg.data.val, cfg.data.format)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    try:  # the model's classes are the training set's: validation labels by class name (jobs/train/classes.py)
        val_src = val_src.matched_to(train_src.classes, len(train_src.classes), model_name="data.train")
    except ValueError as e:
        raise ConfigError(f"data.val: {e}") from None
    try:
        model = cfvit.create_model(cfg.model.name, **cfg.model.create_kwargs(len(train_src.classes)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: cannot build {cfg.model.name!r} with {cfg.model.create_kwargs(len(train_src.classes))}: {e}") from None
    if cfg.data.decode == "device":

        try:
            check(model.data_config, train_augment(cfg))
        except ValueError as e:
            raise ConfigError(f"data.decode=device: {e}") from None
    return Prepared(train_src=train_src, val_src=val_src, classes=train_src.classes, data_config=model.data_config,
                    stage_gflops=model.stage_gflops(), backbone_gflops=model.backbone_gflops())


def init_ray(cfg: JobConfig, min_cpus: Optional[float] = None) -> None:
    """Join `scaling.ray_address` / RAY_ADDRESS, else start a local Ray with at least `min_cpus` CPUs."""
    _init(cfg.scaling.ray_address, min_cpus=min_cpus)


def run_training(cfg: JobConfig, *, callbacks: Optional[list] = None, parent_run_id: Optional[str] = None,
                 register: bool = True) -> TrainingOutcome:
    """Validate, start (or join) Ray, train with checkpoints and MLflow; register the final model.
    Whatever fails after the MLflow run starts (Ray, data, training, registration) ends it FAILED."""

    check_running_job(cfg)  # under Ray Jobs: never write results into the job's temporary working dir
    prep = prepare(cfg)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    with tracking.run(uri, cfg.mlflow.experiment, cfg.run_name, cfg.flat(), parent_run_id=parent_run_id,
                      tags={"cfvit.job": cfg.name, "cfvit.model": cfg.model.name},
                      enabled=cfg.mlflow.enabled) as run_id:
        init_ray(cfg, min_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2)
        result = build_trainer(cfg, prep, run_id, uri, callbacks).fit()
        version = None
        if run_id and result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                version = tracking.log_model(uri, run_id, Path(d) / EXPORT_DIR,
                                             cfg.mlflow.registered_model if register else None, cfg.mlflow.alias)
    return TrainingOutcome(result=result, metrics=dict(result.metrics or {}),
                           checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                           mlflow_run_id=run_id, model_version=version)


def worker_env(environ: Mapping[str, str], tracking_uri: Optional[str] = None) -> dict[str, str]:
    """The workers' env_vars: the WORKER_ENV names the driver has, and the tracking server it logs to."""
    env = {k: environ[k] for k in WORKER_ENV if environ.get(k)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def build_trainer(cfg: JobConfig, prep: Prepared, run_id: Optional[str], uri: str,
                  callbacks: Optional[list] = None) -> TorchTrainer:
    """The `TorchTrainer`: workers, storage, failure handling and the Ray Data inputs of one job."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines are the progress
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg, "setup": prep.worker_setup(run_id, uri)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **cfg.scaling.worker_resources},
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RunConfig(
            name=cfg.run_name, **run_storage(cfg.checkpoint.storage_path),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks, worker_runtime_env={"env_vars": worker_env(os.environ, uri if run_id else None)}),
        datasets=build_datasets(cfg, prep.data_config, prep.train_src, prep.val_src),
    )
