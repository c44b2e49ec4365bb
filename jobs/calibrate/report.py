"""What `cfvit calibrate` prints and logs: the per-budget table, MLflow run, the summary lines."""
from __future__ import annotations

from typing import Optional, Sequence

from rich import box
from rich.table import Column, Table

from cfvit.budget import Budget
from cfvit.calibration import BudgetResult
from cfvit_common import tracking

from .run import Calibration


def results_table(results: Sequence[BudgetResult], title: str = "", show_source: bool = False):
    """One row per budget, 80 columns wide: the budget (and its GFLOPs when given in %), the chosen (α, β, η),
    its exact top-1, expected GFLOPs and exit share. Notes are printed below the table, not in it."""

    num = dict(justify="right", no_wrap=True)
    cols = [Column("budget", no_wrap=True)] + ([Column("trial", no_wrap=True)] if show_source else []) + \
        [Column(h, min_width=len(h), **num) for h in ("α", "β", "η", "top-1", "GFLOPs", "exit")]
    t = Table(*cols, title=title or None, box=box.SIMPLE_HEAD, pad_edge=False)
    for r in results:
        head = [r.budget.spec if r.budget.percent is None else f"{r.budget.spec} = {r.budget.gflops:.3g}"]
        if not r.feasible:
            t.add_row(*head, *([""] if show_source else []), "", "", "[red]infeasible[/red]", "", "", "")
            continue
        v = r.variant
        t.add_row(*head, *([v.source.removeprefix("trial ")] if show_source else []), f"{v.alpha:.3g}",
                  f"{v.beta:.4g}", f"{r.eta:.4g}", f"{100 * r.accuracy:.2f}%", f"{r.gflops:.4g}",
                  f"{100 * r.exit_fraction:.1f}%")
    return t


def log_to_mlflow(cal: Calibration, tracking_uri: Optional[str], experiment: str, register: Optional[str] = None,
                  alias: Optional[str] = None) -> dict:
    """A run with the calibration's metrics and table; optionally the calibrated model registered."""
    uri = tracking.tracking_uri(tracking_uri)
    params = {"checkpoint": cal.checkpoint.origin, "budgets": ",".join(r.budget.spec for r in cal.results),
              "alpha": cal.chosen.alpha, "beta": cal.chosen.beta, "images": cal.chosen.n}
    metrics = {"coarse_top1": cal.chosen.coarse_top1, "fine_top1": cal.chosen.fine_top1}
    for r in cal.results:
        if r.feasible:
            key = metric_key(r.budget)
            metrics.update({f"{key}_accuracy": r.accuracy, f"{key}_gflops": r.gflops, f"{key}_eta": r.eta})
    with tracking.run(uri, experiment, "calibrate", params, tags={"cfvit.job": "calibrate"}) as run_id:
        tracking.log_metrics(uri, run_id, metrics, step=0)
        tracking.mlflow_client(uri).log_dict(run_id, cal.summary(), "calibration.json")
        version = None
        if register and cal.written_to and not cal.written_to.startswith("s3://"):
            version = tracking.log_model(uri, run_id, cal.written_to, register, alias)
    return {"run_id": run_id, "model_version": version}


def metric_key(b: Budget) -> str:
    s = b.spec.replace("%", "pct").replace(".", "_")
    return f"budget_{s}" if b.percent is not None else f"budget_{s}gflops"


def print_calibration(cal: Calibration, console) -> None:
    multi = len(cal.variants) > 1
    console.print(results_table(cal.results, title=f"η per budget · {cal.checkpoint.origin} · "
                                                   f"{cal.variants[0].n} images · backbone {cal.backbone_gflops:.3f} GFLOPs"))
    if multi:

        t = Table("α", "β", "coarse top-1", "fine top-1", "reachable GFLOPs", title="inference settings evaluated")
        for v in cal.variants:
            t.add_row(f"{v.alpha:g}", f"{v.beta:g}", f"{100 * v.coarse_top1:.2f}%", f"{100 * v.fine_top1:.2f}%",
                      f"{v.reachable[0]:.3f}–{v.reachable[1]:.3f}")
        console.print(t)
    if cal.data is not None and cal.data.labels is not None:  # not the data's own order: say how
        console.print(f"classes of {cal.data.uri} matched to the model's {cal.data.matched}", highlight=False)
    for r in cal.results:
        if r.message:
            console.print(f"note: {r.message}", highlight=False)
    if cal.written_to:
        console.print(f"η table ({len(cal.table)} rows, α={cal.chosen.alpha:g}, β={cal.chosen.beta:g}) written to "
                      f"{cal.written_to}", highlight=False)
