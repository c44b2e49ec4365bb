"""Budget-constrained tuning of CF-ViT: the most accurate (α, β, η) for each FLOPs budget.

    cfvit tune --config jobs/configs/fmnist_tiny.yaml --budgets 1.5,2.0,2.5 --trials 8 [--set key=value]
    python -m jobs.tune --config fmnist_tiny --budgets 40%,50%

Level 1 — Ray Tune searches α and β (and optionally the learning rate): each trial is a shortened run of
the training job (`jobs.train.run_training`, a Ray Train `TorchTrainer` inside a Tune function trainable,
metrics passed to Tune by `TuneReportCallback`), early-stopped by ASHA on fine top-1, proposed by a seeded
Optuna search, as many at once as the cluster's CPUs/GPUs hold.
Level 2 — post hoc, per trial with a checkpoint (early-stopped ones included): one validation pass records
coarse and fine probabilities (and the inference-only α/β variants asked for), then `cfvit.budget` gives
the exact η for each budget. No retraining to move along the accuracy–GFLOPs curve.

Result: the best (α, β, η) per budget with accuracy and expected GFLOPs, a Pareto plot of every trial, a
table, an MLflow parent run with one child run per trial, and the winning models registered with their
η table in `config.json` (alias `champion`, plus `budget-…` aliases for each budget's winner).
"""
from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import ConfigError, JobConfig

TRIAL_METRIC = "val_fine_top1"


class TuneSettings(BaseModel):
    """What `cfvit tune` adds to a training config."""

    model_config = ConfigDict(extra="forbid")

    budgets: list[str] = Field(min_length=1, description="GFLOPs per image or % of the backbone")
    trials: int = Field(8, ge=1)
    max_concurrent: Optional[int] = Field(None, ge=1, description="None: as many as the cluster's resources hold")
    seed: int = 0
    alpha: tuple[float, float] = (0.3, 0.7)
    beta: tuple[float, float] = (0.95, 0.999)
    lr: Optional[tuple[float, float]] = None  # log-uniform when given
    epochs: Optional[int] = Field(None, ge=1, description="epochs per trial (default: the config's)")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    metric: str = TRIAL_METRIC
    posthoc_alphas: list[float] = Field(default_factory=list, description="inference-only α variants per trial")
    posthoc_betas: list[float] = Field(default_factory=list, description="inference-only β variants per trial")
    calib_data: Optional[str] = None  # default: the config's data.val
    calib_limit: Optional[int] = Field(None, ge=1)  # default: the config's data.val_limit
    registered_model: Optional[str] = None  # default: <mlflow.registered_model or name>-tuned
    alias: str = "champion"
    output: Optional[str] = None  # default: ./outputs/tune/<name>

    @field_validator("alpha", "beta", "lr")
    @classmethod
    def _range(cls, v, info):
        if v is None:
            return v
        lo, hi = v
        if not lo <= hi:
            raise ValueError(f"expected low <= high, got {lo}, {hi}")
        if info.field_name == "alpha" and not (0 < lo and hi <= 1):
            raise ValueError("α must lie in (0, 1]")
        if info.field_name == "beta" and not (0 <= lo and hi < 1):
            raise ValueError("β must lie in [0, 1)")
        if info.field_name == "lr" and not lo > 0:
            raise ValueError("learning rates must be > 0")
        return v

    @field_validator("posthoc_alphas")
    @classmethod
    def _alphas(cls, v):
        bad = [a for a in v if not 0 < a <= 1]
        if bad:
            raise ValueError(f"α must lie in (0, 1], got {bad}")
        return v

    @field_validator("posthoc_betas")
    @classmethod
    def _betas(cls, v):
        bad = [b for b in v if not 0 <= b < 1]
        if bad:
            raise ValueError(f"β must lie in [0, 1), got {bad}")
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v):
        if not re.fullmatch(r"[\w\-]+", v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError("an MLflow alias: letters, digits, _ and -, not 'latest' nor v<N>")
        return v

    @model_validator(mode="after")
    def _metric(self):
        if not self.metric:
            raise ValueError("metric must be named")
        return self


def parse_range(text: Optional[str], name: str) -> Optional[tuple[float, float]]:
    """`"0.3,0.7"` → (0.3, 0.7); a single value → a point."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{name}: expected LOW,HIGH numbers, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2:
        raise ConfigError(f"{name}: expected LOW,HIGH, got {text!r}")
    return vals[0], vals[1]


def make_settings(**kw) -> TuneSettings:
    try:
        return TuneSettings(**{k: v for k, v in kw.items() if v is not None})
    except ValidationError as e:
        lines = ["invalid tuning settings:"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


# ---------------------------------------------------------------------------------------------- level 1
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


def _trial(config: dict, base: dict, ctx: dict) -> None:
    """A Tune function trainable: one shortened training run; Ray Train reports each epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_job(base, config, run_name=f"{ctx['name']}-{trial_id}", storage_path=ctx["storage_path"],
                    tracking_uri=ctx["tracking_uri"])
    run_training(cfg, callbacks=[TuneReportCallback()], parent_run_id=ctx["parent_run_id"], register=False)


def trial_cpus(cfg: JobConfig) -> float:
    """Logical CPUs one trial holds: its train workers plus one for Ray Data's decoding tasks."""
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1


def fit_concurrency(cfg: JobConfig, resources: dict, requested: Optional[int], trials: int) -> int:
    """Trials at once: what was asked, else what the cluster's CPUs (and GPUs) hold; at least one."""
    if requested:
        return max(1, min(requested, trials))
    n = int(resources.get("CPU", 1) // trial_cpus(cfg))
    if cfg.scaling.use_gpu:
        n = min(n, int(resources.get("GPU", 0) // cfg.scaling.num_workers))
    return max(1, min(n, trials))


def _init_ray(cfg: JobConfig) -> None:
    from .train import init_ray

    init_ray(cfg, need_cpus=trial_cpus(cfg))


# ---------------------------------------------------------------------------------------------- outcome
@dataclass
class TrialOutcome:
    trial_id: str
    config: dict
    status: str  # completed | stopped early | error
    iterations: int
    metrics: dict
    checkpoint: Optional[str]  # the cfvit export directory (local)
    mlflow_run_id: Optional[str] = None
    variants: list = field(default_factory=list)  # jobs.calibrate.Variant
    error: Optional[str] = None


@dataclass
class TuneOutcome:
    trials: list[TrialOutcome]
    results: list  # jobs.calibrate.BudgetResult per budget
    champion: Optional[Any]  # Variant
    registered: dict  # label -> {"version", "aliases", "path"}
    plot: Optional[str]
    summary_path: str
    parent_run_id: Optional[str]
    output: str
    budgets: list
    seconds: dict

    def summary(self) -> dict:
        return json.loads(Path(self.summary_path).read_text())


# ---------------------------------------------------------------------------------------------- level 2
def _local_export(checkpoint_path: str, storage_path: str, dst: Path) -> Optional[Path]:
    """The cfvit export inside a Ray Train checkpoint, as a local directory."""
    from .train import EXPORT_DIR

    if storage_path.startswith("s3://"):
        import pyarrow.fs as pafs

        from .data import s3_filesystem

        dst.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{checkpoint_path.rstrip('/')}/{EXPORT_DIR}", str(dst), source_filesystem=s3_filesystem())
        path = dst
    else:
        path = Path(checkpoint_path) / EXPORT_DIR
    return path if (path / "config.json").is_file() else None


def calibrate_trial(trial: TrialOutcome, budgets, settings: TuneSettings, data_uri: str, limit: Optional[int]) -> list:
    import cfvit

    from .calibrate import inference_settings, record_probs, validation_batches, variants_from_probs

    model = cfvit.load(trial.checkpoint)
    grid = inference_settings(model, settings.posthoc_alphas, settings.posthoc_betas)
    probs = record_probs(model, validation_batches(data_uri, model.data_config, model.num_classes, limit=limit), grid)
    return variants_from_probs(model, probs, grid, source=f"trial {trial.trial_id}",
                               meta={"trial_id": trial.trial_id, "checkpoint": trial.checkpoint,
                                     "trained_alpha": float(model.alpha), "trained_beta": float(model.beta),
                                     **({"lr": trial.config["lr"]} if "lr" in trial.config else {})})


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (GFLOPs, accuracy) points: lowest cost for each accuracy, ascending."""
    front, best = [], -1.0
    for g, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((g, a))
            best = a
    return front


def pareto_plot(trials: list[TrialOutcome], results, backbone_gflops: float, path: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    cmap = plt.get_cmap("tab10")
    pts = []
    i = 0
    for t in trials:
        for v in t.variants:
            c = v.curve
            style = "-" if v.alpha == v.meta.get("trained_alpha") and v.beta == v.meta.get("trained_beta") else ":"
            ax.plot(c.gflops, 100 * c.accuracy, style, color=cmap(i % 10), lw=1, alpha=0.75,
                    label=f"{v.source} α={v.alpha:.2f} β={v.beta:.3f}")
            pts.extend(zip(c.gflops.tolist(), c.accuracy.tolist()))
            i += 1
    if pts:
        front = np.array(pareto_front(pts))
        ax.step(front[:, 0], 100 * front[:, 1], where="post", color="black", lw=2, label="Pareto front")
    for r in results:
        ax.axvline(r.budget.gflops, color="grey", ls="--", lw=0.8)
        if r.feasible:
            ax.plot([r.gflops], [100 * r.accuracy], "*", color="crimson", ms=12)
            ax.annotate(f"{r.budget.spec}: η={r.eta:.3g}", (r.gflops, 100 * r.accuracy), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    ax.axvline(backbone_gflops, color="grey", ls="-.", lw=1, label="backbone")
    ax.set_xlabel("expected GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _alias_for(budget) -> str:
    return "budget-" + re.sub(r"[^\w\-]", "_", budget.spec.replace("%", "pct"))


# ---------------------------------------------------------------------------------------------- MLflow
def _child_runs(client, parent_run_id: str) -> dict:
    run = client.get_run(parent_run_id)
    runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=1000)
    return {r.info.run_name: r for r in runs}


def _register(client, parent_run_id: str, name: str, local_dir: str, label: str, aliases: list[str]) -> int:
    from .tracking import register_artifacts

    artifact = f"winners/{label}"
    client.log_artifacts(parent_run_id, local_dir, artifact)
    return register_artifacts(client, parent_run_id, artifact, name, aliases, tags={"tuned": "true"})


# ---------------------------------------------------------------------------------------------- driver
def run_tune(cfg: JobConfig, settings: TuneSettings, console=None) -> TuneOutcome:
    from rich.console import Console

    console = console or Console()
    t0 = time.perf_counter()
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from . import tracking
    from .calibrate import (BudgetSpecError, best_per_budget, eta_table_for, parse_budgets, pick_adopted,
                            save_calibrated)
    from .train import prepare

    # -- shortened training runs, checked and costed before anything starts
    base = cfg.model_dump(mode="json")
    if settings.epochs:
        base["schedule"]["epochs"] = settings.epochs
        base["schedule"]["warmup_epochs"] = min(base["schedule"]["warmup_epochs"], settings.epochs - 1)
    if settings.max_steps_per_epoch:
        base["debug"]["max_steps_per_epoch"] = settings.max_steps_per_epoch
    try:
        short = JobConfig.model_validate(base)
    except ValidationError as e:
        raise ConfigError(f"the shortened trial config is invalid: {e}") from None
    prep = prepare(short)
    backbone = float(prep["backbone_gflops"])
    try:
        budgets = parse_budgets(settings.budgets, backbone)
    except BudgetSpecError as e:
        raise ConfigError(f"--budgets: {e}") from None
    epochs = short.schedule.epochs
    name = short.name
    out = Path(settings.output or f"./outputs/tune/{name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = short.checkpoint.storage_path
    storage = (storage.rstrip("/") + f"/tune-{name}") if storage.startswith("s3://") else str(out / "trials")

    uri = tracking.tracking_uri(short.mlflow.tracking_uri) if short.mlflow.enabled else None
    parent = None
    if uri:
        params = {f"tune.{k}": v for k, v in settings.model_dump(mode="json").items()}
        params.update({k: v for k, v in short.flat().items() if k not in ("model.alpha", "model.beta")})
        parent = tracking.start_run(uri, short.mlflow.experiment, f"tune-{name}", params,
                                    tags={"cfvit.job": name, "cfvit.tune": "parent"})
    try:
        _init_ray(short)
        resources = ray.cluster_resources()
        concurrent = fit_concurrency(short, resources, settings.max_concurrent, settings.trials)
        space = {"alpha": tune.uniform(*settings.alpha), "beta": tune.uniform(*settings.beta)}
        if settings.lr:
            space["lr"] = tune.loguniform(*settings.lr)
        ctx = {"name": name, "storage_path": storage, "tracking_uri": uri, "parent_run_id": parent}
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base, ctx=ctx), {"CPU": 0.01})
        console.print(f"[tune] {settings.trials} trials of {epochs} epoch(s), {concurrent} at a time "
                      f"({trial_cpus(short):g} CPUs each of {resources.get('CPU', 0):g}); "
                      f"budgets {', '.join(b.label for b in budgets)}", highlight=False)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode="max", num_samples=settings.trials, max_concurrent_trials=concurrent,
                search_alg=OptunaSearch(seed=settings.seed),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                        grace_period=min(settings.grace_period, epochs),
                                        reduction_factor=settings.reduction_factor)),
            run_config=tune.RunConfig(name=f"tune-{name}", storage_path=str(out / "ray_tune"), verbose=1),
        )
        grid = tuner.fit()
        t1 = time.perf_counter()

        # -- level 2: post-hoc η per budget for every trial with a checkpoint
        trials: list[TrialOutcome] = []
        for i, r in enumerate(grid):
            m = dict(r.metrics or {})
            tid = m.get("trial_id") or Path(r.path).name
            iters = int(m.get("training_iteration", 0))
            status = "error" if r.error else ("completed" if iters >= epochs else "stopped early")
            ck = m.get("checkpoint_path")
            local = _local_export(ck, storage, out / "exports" / tid) if ck else None
            cfg_used = {k: r.config[k] for k in ("alpha", "beta", "lr") if k in (r.config or {})}
            trials.append(TrialOutcome(tid, cfg_used, status, iters,
                                       {k: v for k, v in m.items() if isinstance(v, (int, float))},
                                       str(local) if local else None, error=str(r.error) if r.error else None))
        data_uri = settings.calib_data or short.data.val
        limit = settings.calib_limit or short.data.val_limit
        for t in trials:
            if t.checkpoint:
                t.variants = calibrate_trial(t, budgets, settings, data_uri, limit)
        variants = [v for t in trials for v in t.variants]
        if not variants:
            raise RuntimeError("no trial produced a checkpoint: nothing to calibrate "
                               f"({[t.error for t in trials if t.error][:1]})")
        results = best_per_budget(variants, budgets)
        champion = pick_adopted(variants, results)
        t2 = time.perf_counter()

        # -- outputs: winners saved with their η tables, plot, summary, MLflow
        plot = pareto_plot(trials, results, backbone, out / "pareto.png",
                           f"{name}: {len(trials)} trials · {len(variants)} (α, β) settings")
        winners: dict[int, dict] = {}
        for r in results:
            if r.feasible:
                w = winners.setdefault(id(r.variant), {"variant": r.variant, "aliases": [], "budgets": []})
                w["aliases"].append(_alias_for(r.budget))
                w["budgets"].append(r.budget.spec)
        winners.setdefault(id(champion), {"variant": champion, "aliases": [], "budgets": []})
        winners[id(champion)]["aliases"].insert(0, settings.alias)
        registered: dict[str, dict] = {}
        import cfvit

        client = tracking._client(uri) if uri else None
        children = _child_runs(client, parent) if client else {}
        for t in trials:
            run = children.get(f"{name}-{t.trial_id}")
            t.mlflow_run_id = run.info.run_id if run else None
        reg_name = settings.registered_model or f"{short.mlflow.registered_model or name}-tuned"
        for w in winners.values():
            v = w["variant"]
            label = re.sub(r"[^\w\-.]", "_", f"{v.meta['trial_id']}_a{v.alpha:.3f}_b{v.beta:.4f}")
            model = cfvit.load(v.meta["checkpoint"])
            table = eta_table_for(v, budgets)
            info = {"tune": f"tune-{name}", "trial_id": v.meta["trial_id"], "alpha": v.alpha, "beta": v.beta,
                    "data": data_uri, "images": v.n, "budgets": [b.spec for b in budgets],
                    "wins": w["budgets"], "parent_run_id": parent}
            path = save_calibrated(model, out / "winners" / label, v, table, info)
            entry = {"path": str(path), "aliases": w["aliases"], "budgets": w["budgets"], "version": None}
            if client and (settings.registered_model or short.mlflow.registered_model is not None):
                entry["version"] = _register(client, parent, reg_name, str(path), label, w["aliases"])
            registered[label] = entry

        summary = {
            "name": name, "budgets": [b.__dict__ for b in budgets], "backbone_gflops": backbone,
            "trials": [{"trial_id": t.trial_id, **t.config, "status": t.status, "iterations": t.iterations,
                        "metric": t.metrics.get(settings.metric), "checkpoint": t.checkpoint,
                        "mlflow_run_id": t.mlflow_run_id, "error": t.error,
                        "variants": [{"alpha": v.alpha, "beta": v.beta, "coarse_top1": v.coarse_top1,
                                      "fine_top1": v.fine_top1, "reachable_gflops": list(v.reachable)}
                                     for v in t.variants]} for t in trials],
            "best": [r.summary() for r in results],
            "champion": {"trial_id": champion.meta["trial_id"], "alpha": champion.alpha, "beta": champion.beta},
            "registered": {"name": reg_name if client else None, **registered},
            "pareto_plot": plot, "parent_run_id": parent,
            "seconds": {"search": t1 - t0, "calibration": t2 - t1},
        }
        summary_path = out / "tune_summary.json"
        summary_path.write_text(json.dumps(summary, indent=2, default=str))

        if client:
            _log_mlflow(client, uri, parent, trials, results, plot, summary_path)
    except BaseException:
        if uri and parent:
            tracking.end_run(uri, parent, "FAILED")
        raise
    if uri and parent:
        tracking.end_run(uri, parent)
    return TuneOutcome(trials, results, champion, registered, plot, str(summary_path), parent, str(out), budgets,
                       {"search": t1 - t0, "calibration": t2 - t1, "total": time.perf_counter() - t0})


def _log_mlflow(client, uri, parent, trials, results, plot, summary_path) -> None:
    from . import tracking
    from .calibrate import _metric_key


    for t in trials:
        if not t.mlflow_run_id:
            continue
        run = client.get_run(t.mlflow_run_id)
        # Tune ends a trial's training its own way (an early stop interrupts `fit`, which marks the run FAILED):
        # the run's final status follows what happened to the trial.
        client.set_tag(t.mlflow_run_id, "cfvit.tune.status", t.status)
        final = {"completed": "FINISHED", "stopped early": "KILLED"}.get(t.status, "FAILED")
        if run.info.status != final:
            client.set_terminated(t.mlflow_run_id, final)
        own = [v for v in t.variants if v.alpha == v.meta.get("trained_alpha") and v.beta == v.meta.get("trained_beta")]
        if own:
            from .calibrate import best_per_budget

            metrics = {}
            for r in best_per_budget(own, [r.budget for r in results]):
                if r.feasible:
                    k = _metric_key(r.budget)
                    metrics.update({f"posthoc_{k}_accuracy": r.accuracy, f"posthoc_{k}_gflops": r.gflops,
                                    f"posthoc_{k}_eta": r.eta})
            if metrics:
                tracking.log_metrics(uri, t.mlflow_run_id, metrics, step=t.iterations)
    metrics = {}
    for r in results:
        if r.feasible:
            k = _metric_key(r.budget)
            metrics.update({f"best_{k}_accuracy": r.accuracy, f"best_{k}_gflops": r.gflops, f"best_{k}_eta": r.eta,
                            f"best_{k}_alpha": r.variant.alpha, f"best_{k}_beta": r.variant.beta})
    if metrics:
        tracking.log_metrics(uri, parent, metrics, step=0)
    client.log_artifact(parent, plot, "plots")
    client.log_artifact(parent, str(summary_path))


# ---------------------------------------------------------------------------------------------- printing
def print_outcome(o: TuneOutcome, console, metric: str = TRIAL_METRIC) -> None:
    from rich.table import Table

    from .calibrate import results_table

    t = Table("trial", "α", "β", "lr", "epochs", metric, "status", "post-hoc settings", "reachable GFLOPs",
              title="trials")
    for tr in o.trials:
        reach = ""
        if tr.variants:
            lo = min(v.reachable[0] for v in tr.variants)
            hi = max(v.reachable[1] for v in tr.variants)
            reach = f"{lo:.3f}–{hi:.3f}"
        val = tr.metrics.get(metric)
        t.add_row(tr.trial_id, f"{tr.config.get('alpha', float('nan')):.3f}", f"{tr.config.get('beta', float('nan')):.4f}",
                  f"{tr.config['lr']:.2e}" if "lr" in tr.config else "", str(tr.iterations),
                  "" if val is None else f"{100 * val:.2f}%", tr.status if not tr.error else f"error: {tr.error[:60]}",
                  str(len(tr.variants)), reach)
    console.print(t)
    console.print(results_table(o.results, title="best (α, β, η) per budget", show_source=True))
    for r in o.results:
        if r.message:
            console.print(f"note: {r.message}", highlight=False)
    for label, e in o.registered.items():
        where = f"version {e['version']}" if e.get("version") else "not registered (MLflow off)"
        console.print(f"winner {label}: {where}, aliases {', '.join(e['aliases'])} → {e['path']}", highlight=False)
    console.print(f"Pareto plot: {o.plot}\nsummary: {o.summary_path}"
                  + (f"\nMLflow parent run: {o.parent_run_id}" if o.parent_run_id else ""), highlight=False)


# ---------------------------------------------------------------------------------------------- python -m
def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    from rich.console import Console

    from .config import load_config

    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--budgets", required=True)
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--alpha-range", default=None)
    p.add_argument("--beta-range", default=None)
    p.add_argument("--lr-range", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--grace-period", type=int, default=None)
    p.add_argument("--posthoc-alphas", default=None)
    p.add_argument("--posthoc-betas", default=None)
    p.add_argument("--calib-limit", type=int, default=None)
    p.add_argument("--register", default=None)
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    console = Console()
    try:
        settings = settings_from_cli(a.budgets, trials=a.trials, max_concurrent=a.max_concurrent, seed=a.seed,
                                     alpha_range=a.alpha_range, beta_range=a.beta_range, lr_range=a.lr_range,
                                     epochs=a.epochs, max_steps=a.max_steps, grace_period=a.grace_period,
                                     posthoc_alphas=a.posthoc_alphas, posthoc_betas=a.posthoc_betas,
                                     calib_limit=a.calib_limit, registered_model=a.register, output=a.output)
        outcome = run_tune(load_config(a.config, a.sets), settings, console)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_outcome(outcome, console, settings.metric)
    return 0


def settings_from_cli(budgets: str, *, alpha_range=None, beta_range=None, lr_range=None, posthoc_alphas=None,
                      posthoc_betas=None, max_steps=None, **kw) -> TuneSettings:
    from .calibrate import BudgetSpecError, parse_budgets, parse_floats

    try:
        parse_budgets(budgets, 1.0)  # syntax only; % are resolved against the model later
        pa = parse_floats(posthoc_alphas, "--posthoc-alphas", 0, 1, lo_open=True)
        pb = parse_floats(posthoc_betas, "--posthoc-betas", 0, 1, hi_open=True)
    except BudgetSpecError as e:
        raise ConfigError(str(e)) from None
    return make_settings(budgets=[s.strip() for s in budgets.split(",") if s.strip()],
                         alpha=parse_range(alpha_range, "--alpha-range"), beta=parse_range(beta_range, "--beta-range"),
                         lr=parse_range(lr_range, "--lr-range"), posthoc_alphas=pa or None, posthoc_betas=pb or None,
                         max_steps_per_epoch=max_steps, **kw)


if __name__ == "__main__":
    raise SystemExit(main())
