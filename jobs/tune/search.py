"""Level 1 of tuning: Ray Tune over α, β (and optionally the learning rate). Each trial is a shortened run of
the training job (`jobs.train.run_training`, a Ray Train `TorchTrainer` inside a Tune function trainable,
metrics passed to Tune by `TuneReportCallback`), early-stopped by ASHA on fine top-1, proposed by a seeded
Optuna search, as many at once as the cluster holds — with CPUs left for each trial's Ray Data pipeline."""
from __future__ import annotations

import copy
import math
import os
from typing import Optional

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from cfvit_common.errors import ConfigError
from cfvit_common.ray_env import init_ray
from jobs.train.config import JobConfig
from jobs.train.driver import run_training

from .plan import Plan, TrialContext
from .settings import TuneSettings
from .watchdog import StallWatchdog, TrialLines, run_interruptible


def trial_job(base: dict, config: dict, *, run_name: str, storage_path: str, tracking_uri: Optional[str]) -> JobConfig:
    """The training config of one trial: the base config with the trial's α, β (and lr)."""
    job = copy.deepcopy(base)
    job["model"]["alpha"] = float(config["alpha"])
    job["model"]["beta"] = float(config["beta"])
    if config.get("lr") is not None:
        job["optim"]["lr"] = float(config["lr"])
    job["checkpoint"]["run_name"] = run_name
    job["checkpoint"]["storage_path"] = storage_path
    if tracking_uri:
        job["mlflow"]["tracking_uri"] = tracking_uri
    job["data"]["check_uris"] = False  # checked once by the driver
    return JobConfig.model_validate(job)


def _trial(config: dict, base: dict, ctx: TrialContext) -> None:
    """A Tune function trainable: one shortened training run; Ray Train reports each epoch to Tune."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_job(base, config, run_name=f"{ctx.name}-{trial_id}", storage_path=ctx.storage_path,
                    tracking_uri=ctx.tracking_uri)
    run_training(cfg, callbacks=[TuneReportCallback()], parent_run_id=ctx.parent_run_id, register=False)


TRAINABLE_CPUS = 0.01  # the Tune function trainable itself: it only waits on its TorchTrainer


def trial_cpus(cfg: JobConfig) -> float:
    """Logical CPUs one trial holds: its train workers, the trainable, and `data.cpus` left free for its
    Ray Data read/decode tasks (without them the trial's data pipeline never gets a CPU)."""
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRAINABLE_CPUS + cfg.data.cpus


def fit_concurrency(cfg: JobConfig, resources: dict, requested: Optional[int], trials: int) -> int:
    """Trials at once: what the cluster's CPUs (and GPUs) hold, capped by what was asked; at least one.
    Raises ClusterTooSmall when not even one trial and its data pipeline fit."""
    cpus, need = float(resources.get("CPU", 0)), trial_cpus(cfg)
    s = cfg.scaling
    if cpus + 1e-9 < need:
        raise ClusterTooSmall(
            f"the Ray cluster has {cpus:g} CPUs but one trial needs {need:g}: {s.num_workers} train worker(s) × "
            f"{s.cpus_per_worker:g} CPU + {TRAINABLE_CPUS:g} for the trial + {cfg.data.cpus:g} left for Ray "
            f"Data (data.cpus). Lower scaling.num_workers, scaling.cpus_per_worker or data.cpus with --set, or "
            f"add nodes")
    n = int((cpus + 1e-9) // need)
    if s.use_gpu:
        gpus = float(resources.get("GPU", 0))
        if gpus < s.num_workers:
            raise ClusterTooSmall(f"the Ray cluster has {gpus:g} GPUs but one trial needs {s.num_workers} "
                                  f"(scaling.num_workers with scaling.use_gpu)")
        n = min(n, int(gpus // s.num_workers))
    return max(1, min(n, requested or trials, trials))


class ClusterTooSmall(ValueError):
    """The cluster cannot hold one trial plus its data pipeline."""


def local_cpus(cfg: JobConfig) -> int:
    """Logical CPUs for a Ray that `cfvit tune` starts itself: one trial and its data pipeline at least."""
    return int(math.ceil(trial_cpus(cfg) - 1e-9))


def run_search(p: Plan, settings: TuneSettings, uri: Optional[str], parent: Optional[str], console):
    """Start (or join) Ray, run the Tuner in a thread (so Ctrl-C/SIGTERM reach us, not Tune), return
    (ResultGrid, interrupted signal name or None). Stalls raise StallError."""
    short = p.short
    init_ray(short.scaling.ray_address, min_cpus=local_cpus(short))
    resources = ray.cluster_resources()
    try:
        concurrent = fit_concurrency(short, resources, settings.max_concurrent, settings.trials)
    except ClusterTooSmall as e:
        raise ConfigError(str(e)) from None
    console.print(f"\\[tune] {settings.trials} trials of {short.schedule.epochs} epoch(s), {concurrent} at a time "
                  f"({trial_cpus(short):g} CPUs each, {short.data.cpus:g} of them for Ray Data; cluster "
                  f"{resources.get('CPU', 0):g} CPUs); budgets {', '.join(b.label for b in p.budgets)}",
                  highlight=False)
    watchdog = StallWatchdog(settings.stall_timeout_s)
    tuner = _tuner(p, settings, uri, parent, concurrent, watchdog)
    grid, interrupted = run_interruptible(tuner.fit, watchdog, console)
    watchdog.raise_if_stalled()
    return grid, interrupted


def _tuner(p: Plan, settings: TuneSettings, uri: Optional[str], parent: Optional[str], concurrent: int,
           watchdog: StallWatchdog) -> tune.Tuner:
    # Our TrialLines print one line per trial event; Tune's own boxes and tables would not fit 80 columns.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epochs, name = p.short.schedule.epochs, p.short.name
    space = {"alpha": tune.uniform(*settings.alpha), "beta": tune.uniform(*settings.beta)}
    if settings.lr:
        space["lr"] = tune.loguniform(*settings.lr)
    ctx = TrialContext(name=name, storage_path=p.storage, tracking_uri=uri, parent_run_id=parent)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=p.base, ctx=ctx), {"CPU": TRAINABLE_CPUS})
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode="max", num_samples=settings.trials, max_concurrent_trials=concurrent,
            search_alg=OptunaSearch(seed=settings.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                    grace_period=min(settings.grace_period, epochs),
                                    reduction_factor=settings.reduction_factor)),
        run_config=tune.RunConfig(name=f"tune-{name}", storage_path=str(p.out / "ray_tune"), verbose=0,
                                  stop=watchdog, callbacks=[TrialLines(settings.metric, epochs)]),
    )
