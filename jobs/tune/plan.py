"""What a tuning run works with: the plan made before anything starts, the context each trial gets, and
what comes out of each trial and of the whole run."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from cfvit.budget import Budget, BudgetSpecError, parse_budgets
from cfvit.calibration import BudgetResult, Variant
from cfvit_common.errors import ConfigError
from jobs.ops.outputs import check_running_job
from jobs.train.config import JobConfig
from jobs.train.driver import prepare

from .settings import TuneSettings


@dataclass
class Plan:
    """A tuning run worked out before anything starts."""
    short: JobConfig  # the shortened trial config
    base: dict  # `short` as JSON: each trial sets its α, β (and lr) in a copy
    budgets: list[Budget]
    backbone: float
    out: Path
    storage: str  # where the trials' Ray checkpoints go


def make_plan(cfg: JobConfig, settings: TuneSettings) -> Plan:
    """The plan of a tuning run: the shortened trial config, its budgets, where its outputs go."""
    check_running_job(cfg, settings.output or f"./outputs/tune/{cfg.name}")

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
    backbone = float(prep.backbone_gflops)
    try:
        budgets = parse_budgets(settings.budgets, backbone)
    except BudgetSpecError as e:
        raise ConfigError(f"--budgets: {e}") from None
    out = Path(settings.output or f"./outputs/tune/{short.name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = short.checkpoint.storage_path
    storage = (storage.rstrip("/") + f"/tune-{short.name}") if storage.startswith("s3://") else str(out / "trials")
    return Plan(short, base, budgets, backbone, out, storage)


@dataclass(frozen=True)
class TrialContext:
    """What every trial's trainable needs from the driver (sent to the trial processes with the trainable)."""

    name: str
    storage_path: str
    tracking_uri: Optional[str]
    parent_run_id: Optional[str]


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict
    status: str  # completed | stopped early | error
    iterations: int
    metrics: dict
    checkpoint: Optional[str]  # the cfvit export directory (local)
    mlflow_run_id: Optional[str] = None
    variants: list[Variant] = field(default_factory=list)  # its calibrated (α, β) settings
    error: Optional[str] = None


@dataclass
class TuneOutcome:
    trials: list[TrialOutcome]
    results: list[BudgetResult]  # the best per budget
    champion: Optional[Variant]
    registered: dict  # label -> {"version", "aliases", "path"}
    plot: Optional[str]
    summary_path: str
    parent_run_id: Optional[str]
    output: str
    budgets: list
    seconds: dict
    interrupted: Optional[str] = None  # "SIGINT" / "SIGTERM" when the search was stopped early

    def summary(self) -> dict:
        return json.loads(Path(self.summary_path).read_text())


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM before any trial had a checkpoint (the MLflow runs end KILLED)."""


def fixed_cost_s(metrics: dict) -> Optional[float]:
    """A trial's time outside its epochs (Ray Train start, DeepSpeed init, Ray Data start, checkpoints):
    Tune's clock at the last report minus the epochs the workers timed."""
    total, epochs = metrics.get("time_total_s"), metrics.get("epochs_seconds_total")
    return None if total is None or epochs is None else max(0.0, float(total) - float(epochs))
