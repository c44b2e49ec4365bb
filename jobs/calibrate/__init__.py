"""`cfvit calibrate`: the exact η per FLOPs budget for one trained model (maths in `cfvit.calibration`)."""
from cfvit.budget import Budget, BudgetSpecError, parse_budgets
from cfvit.calibration import (BudgetResult, Probs, Variant, best_per_budget, eta_table_for, inference_settings,
                               parse_floats, pick_adopted, record_probs, variants_from_probs)

from .report import log_to_mlflow, metric_key, print_calibration, results_table
from .run import Calibration, LocalCheckpoint, calibrate, eval_batch, fetch_checkpoint, validation_batches

__all__ = ["Budget", "BudgetResult", "BudgetSpecError", "Calibration", "LocalCheckpoint", "Probs", "Variant",
           "best_per_budget", "calibrate", "eta_table_for", "eval_batch", "fetch_checkpoint", "inference_settings",
           "log_to_mlflow", "metric_key", "parse_budgets", "parse_floats", "pick_adopted", "print_calibration",
           "record_probs", "results_table", "validation_batches", "variants_from_probs"]
