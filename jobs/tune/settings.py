"""What `cfvit tune` adds to a training config: the search space, trial counts, budgets, outputs."""
from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cfvit.budget import BudgetSpecError, parse_budgets
from cfvit.calibration import parse_floats
from jobs.train.config import ConfigError

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
    # no trial progress for this long → the search stops and says what it waited on (0: never)
    stall_timeout_s: float = Field(900.0, ge=0)

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


def settings_from_cli(budgets: str, *, alpha_range=None, beta_range=None, lr_range=None, posthoc_alphas=None,
                      posthoc_betas=None, max_steps=None, **kw) -> TuneSettings:
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
