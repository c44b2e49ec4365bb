"""`cfvit tune`: the most accurate (α, β, η) for each FLOPs budget.

- `settings.py`  what tuning adds to a training config (search space, trials, budgets)
- `search.py`    level 1: Ray Tune (Optuna + ASHA) over α, β (+lr), trials sized to leave Ray Data CPUs
- `watchdog.py`  stall detection and Ctrl-C/SIGTERM handling around the search
- `posthoc.py`   level 2: every trial calibrated post hoc (exact η per budget), Pareto plot, winners
- `report.py`    MLflow child runs, registration, the printed tables
- `driver.py`    `run_tune(cfg, settings)`
"""
from .driver import TuneOutcome, run_tune
from .posthoc import TrialOutcome, alias_for, pareto_front
from .report import print_outcome
from .search import ClusterTooSmall, fit_concurrency, trial_cpus
from .settings import TRIAL_METRIC, TuneSettings, make_settings, parse_range, settings_from_cli

__all__ = ["ClusterTooSmall", "TRIAL_METRIC", "TrialOutcome", "TuneOutcome", "TuneSettings", "alias_for",
           "fit_concurrency", "make_settings", "pareto_front", "parse_range", "print_outcome", "run_tune",
           "settings_from_cli", "trial_cpus"]
