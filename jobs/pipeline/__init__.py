"""`cfvit pipeline`: the main job, end to end on the embedded defaults (`run.py`; its command: `cli.py`)."""
from cfvit_common.lazy import lazy_exports

# Loaded on first use, so that this package's `cli.py` imports without torch or Ray.
__getattr__ = lazy_exports(__name__, {
    "BudgetServed": ".run",
    "PipelineResult": ".run",
    "classify_over_http": ".run",
    "run_pipeline": ".run",
    "summary_notes": ".run",
    "summary_table": ".run",
})
__all__ = ["BudgetServed", "PipelineResult", "classify_over_http", "run_pipeline", "summary_notes", "summary_table"]
