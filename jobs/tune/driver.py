"""`run_tune(cfg, settings)`: the search (level 1), post-hoc calibration of every trial (level 2), winners
registered, a Pareto plot, an MLflow parent run with one child per trial.

Ctrl-C or SIGTERM stops the trials, keeps what finished (those trials are still calibrated and reported)
and ends the MLflow runs KILLED; a stalled search (no trial progress for `--stall-timeout`) ends with an
error that says what it was waiting on.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from cfvit.calibration import best_per_budget, pick_adopted
from cfvit_common import tracking
from jobs.train.config import JobConfig

from .plan import Plan, TrialOutcome, TuneInterrupted, TuneOutcome, make_plan
from .posthoc import calibrate_trial, local_export, pareto_plot, save_winners
from .report import child_runs, log_mlflow
from .search import run_search
from .settings import TuneSettings


def run_tune(cfg: JobConfig, settings: TuneSettings, console=None) -> TuneOutcome:
    console = console or Console()
    t0 = time.perf_counter()
    p = make_plan(cfg, settings)
    short, name = p.short, p.short.name
    uri = tracking.tracking_uri(short.mlflow.tracking_uri) if short.mlflow.enabled else None
    params = {f"tune.{k}": v for k, v in settings.model_dump(mode="json").items()}
    params.update({k: v for k, v in short.flat().items() if k not in ("model.alpha", "model.beta")})
    with tracking.run(uri, short.mlflow.experiment, f"tune-{name}", params, enabled=bool(uri),
                      tags={"cfvit.job": name, "cfvit.tune": "parent"}) as parent:
        grid, interrupted = run_search(p, settings, uri, parent, console)
        t1 = time.perf_counter()
        trials = collect_trials(grid, p, interrupted)
        outcome = finish(p, settings, trials, uri, parent, console, interrupted)
        outcome.seconds = {"search": t1 - t0, "calibration": outcome.seconds["calibration"],
                           "total": time.perf_counter() - t0}
    if interrupted and parent:  # KILLED, not FINISHED: the search did not run to its end
        tracking.end_run(uri, parent, "KILLED")
    return outcome


def collect_trials(grid, p: Plan, interrupted: Optional[str]) -> list[TrialOutcome]:
    trials = []
    epochs = p.short.schedule.epochs
    for r in grid:
        m = dict(r.metrics or {})
        tid = m.get("trial_id") or Path(r.path).name
        iters = int(m.get("training_iteration", 0))
        if r.error:
            status = "error"
        elif iters >= epochs:
            status = "completed"
        else:
            status = "interrupted" if interrupted else "stopped early"
        ck = m.get("checkpoint_path")
        local = local_export(ck, p.storage, p.out / "exports" / tid) if ck else None
        cfg_used = {k: r.config[k] for k in ("alpha", "beta", "lr") if k in (r.config or {})}
        trials.append(TrialOutcome(tid, cfg_used, status, iters,
                                   {k: v for k, v in m.items() if isinstance(v, (int, float))},
                                   str(local) if local else None,
                                   error=None if not r.error else _one_line(r.error)))
    return trials


def finish(p: Plan, settings: TuneSettings, trials: list[TrialOutcome], uri, parent, console,
           interrupted: Optional[str]) -> TuneOutcome:
    """Level 2 and the outputs: calibrate each trial with a checkpoint, best per budget, winners, summary."""
    t1 = time.perf_counter()
    data_uri = settings.calib_data or p.short.data.val
    limit = settings.calib_limit or p.short.data.val_limit
    for t in trials:
        if t.checkpoint:
            t.variants = calibrate_trial(t, p.budgets, settings, data_uri, limit)
    variants = [v for t in trials for v in t.variants]
    if not variants and interrupted:
        raise TuneInterrupted(f"interrupted by {interrupted} before any trial wrote a checkpoint: nothing kept")
    if not variants:
        raise RuntimeError("no trial produced a checkpoint, nothing to calibrate (first error: "
                           f"{next((t.error for t in trials if t.error), 'none')})")
    results = best_per_budget(variants, p.budgets)
    champion = pick_adopted(variants, results)
    t2 = time.perf_counter()
    name = p.short.name
    plot = pareto_plot(trials, results, p.backbone, p.out / "pareto.png",
                       f"{name}: {len(trials)} trials · {len(variants)} (α, β) settings")
    client = tracking.mlflow_client(uri) if uri else None
    children = child_runs(client, parent) if client else {}
    for t in trials:
        run = children.get(f"{name}-{t.trial_id}")
        t.mlflow_run_id = run.info.run_id if run else None
    reg_name = settings.registered_model or f"{p.short.mlflow.registered_model or name}-tuned"
    register = client is not None and (settings.registered_model or p.short.mlflow.registered_model is not None)
    registered = save_winners(results, champion, settings, p, data_uri, parent,
                              client if register else None, reg_name)
    summary = _summary(p, settings, trials, results, champion, registered, reg_name if client else None, plot,
                       parent, {"calibration": t2 - t1}, interrupted)
    summary_path = p.out / "tune_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    if client:
        log_mlflow(client, uri, parent, trials, results, plot, summary_path)
    return TuneOutcome(trials, results, champion, registered, plot, str(summary_path), parent, str(p.out),
                       p.budgets, {"calibration": t2 - t1}, interrupted)


def _summary(p: Plan, settings, trials, results, champion, registered, reg_name, plot, parent, seconds,
             interrupted) -> dict:
    return {
        "name": p.short.name, "budgets": [b.__dict__ for b in p.budgets], "backbone_gflops": p.backbone,
        "interrupted": interrupted,
        "trials": [{"trial_id": t.trial_id, **t.config, "status": t.status, "iterations": t.iterations,
                    "metric": t.metrics.get(settings.metric), "checkpoint": t.checkpoint,
                    "mlflow_run_id": t.mlflow_run_id, "error": t.error,
                    "variants": [{"alpha": v.alpha, "beta": v.beta, "coarse_top1": v.coarse_top1,
                                  "fine_top1": v.fine_top1, "reachable_gflops": list(v.reachable)}
                                 for v in t.variants]} for t in trials],
        "best": [r.summary() for r in results],
        "champion": {"trial_id": champion.meta["trial_id"], "alpha": champion.alpha, "beta": champion.beta},
        "registered": {"name": reg_name, **registered},
        "pareto_plot": plot, "parent_run_id": parent, "seconds": seconds,
    }


def _one_line(err) -> str:
    """A trial's error as one line (Ray wraps it in a long traceback)."""
    text = str(err).strip().splitlines()
    tail = [ln for ln in text if ln.strip() and not ln.startswith((" ", "Traceback"))]
    return re.sub(r"\s+", " ", (tail[-1] if tail else text[-1] if text else repr(err)))[:300]
