"""`cfvit calibrate`: the exact η per FLOPs budget for one trained model (maths in `cfvit.calibration`)."""
from cfvit_common.lazy import lazy_exports

# Loaded on first use, so that this package's `cli.py` imports without torch or Ray.
__getattr__ = lazy_exports(__name__, {
    "Budget": "cfvit.budget",
    "BudgetResult": "cfvit.calibration",
    "BudgetSpecError": "cfvit.budget",
    "Calibration": ".run",
    "LocalCheckpoint": ".run",
    "Probs": "cfvit.calibration",
    "Variant": "cfvit.calibration",
    "best_per_budget": "cfvit.calibration",
    "calibrate": ".run",
    "eta_table_for": "cfvit.calibration",
    "eval_batch": ".run",
    "fetch_checkpoint": ".run",
    "inference_settings": "cfvit.calibration",
    "log_to_mlflow": ".report",
    "parse_floats": "cfvit.calibration",
    "pick_adopted": "cfvit.calibration",
    "record_probs": "cfvit.calibration",
    "variants_from_probs": "cfvit.calibration",
    "metric_key": ".report",
    "parse_budgets": "cfvit.budget",
    "print_calibration": ".report",
    "results_table": ".report",
    "validation_batches": ".run",
})
__all__ = ["Budget", "BudgetResult", "BudgetSpecError", "Calibration", "LocalCheckpoint", "Probs", "Variant",
           "best_per_budget", "calibrate", "eta_table_for", "eval_batch", "fetch_checkpoint", "inference_settings",
           "log_to_mlflow", "metric_key", "parse_budgets", "parse_floats", "pick_adopted", "print_calibration",
           "record_probs", "results_table", "validation_batches", "variants_from_probs"]
