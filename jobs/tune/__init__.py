"""`cfvit tune`: the most accurate (α, β, η) for each FLOPs budget.

- `settings.py`  what tuning adds to a training config (search space, trials, budgets)
- `search.py`    level 1: Ray Tune (Optuna + ASHA) over α, β (+lr), trials sized to leave Ray Data CPUs
- `watchdog.py`  stall detection and Ctrl-C/SIGTERM handling around the search
- `posthoc.py`   level 2: every trial calibrated post hoc (exact η per budget), Pareto plot, winners
- `report.py`    MLflow child runs, registration, the printed tables
- `driver.py`    `run_tune(cfg, settings)`
"""
from cfvit_common.lazy import lazy_exports

# Loaded on first use, so that this package's `cli.py` imports without torch or Ray.
__getattr__ = lazy_exports(__name__, {
    "ClusterTooSmall": ".search",
    "TRIAL_METRIC": ".settings",
    "TrialOutcome": ".plan",
    "TuneOutcome": ".plan",
    "TuneSettings": ".settings",
    "alias_for": ".posthoc",
    "fit_concurrency": ".search",
    "make_settings": ".settings",
    "pareto_front": ".posthoc",
    "parse_range": ".settings",
    "print_outcome": ".report",
    "run_tune": ".driver",
    "settings_from_cli": ".settings",
    "trial_cpus": ".search",
})
__all__ = ["ClusterTooSmall", "TRIAL_METRIC", "TrialOutcome", "TuneOutcome", "TuneSettings", "alias_for",
           "fit_concurrency", "make_settings", "pareto_front", "parse_range", "print_outcome", "run_tune",
           "settings_from_cli", "trial_cpus"]
