"""What tuning logs and prints: trial child runs' final status, post-hoc metrics, the winners' registration
in MLflow, and the tables of `cfvit tune`."""
from __future__ import annotations

from rich import box
from rich.table import Table

from cfvit.calibration import best_per_budget
from cfvit_common import tracking
from jobs.calibrate.report import metric_key, results_table

from .plan import TuneOutcome, fixed_cost_s
from .settings import TRIAL_METRIC


def child_runs(client, parent_run_id: str) -> dict:
    run = client.get_run(parent_run_id)
    runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=1000)
    return {r.info.run_name: r for r in runs}


def register_winner(client, parent_run_id: str, name: str, local_dir: str, label: str, aliases: list[str]) -> int:
    artifact = f"winners/{label}"
    client.log_artifacts(parent_run_id, local_dir, artifact)
    return tracking.register_artifacts(client, parent_run_id, artifact, name, aliases, tags={"tuned": "true"},
                                       local_dir=local_dir)


def log_mlflow(client, uri, parent, trials, results, plot, summary_path) -> None:
    for t in trials:
        if not t.mlflow_run_id:
            continue
        run = client.get_run(t.mlflow_run_id)
        # Tune ends a trial's training its own way (an early stop interrupts `fit`, which marks the run FAILED):
        # the run's final status follows what happened to the trial.
        client.set_tag(t.mlflow_run_id, "cfvit.tune.status", t.status)
        final = {"completed": "FINISHED", "stopped early": "KILLED", "interrupted": "KILLED"}.get(t.status, "FAILED")
        if run.info.status != final:
            client.set_terminated(t.mlflow_run_id, final)
        own = [v for v in t.variants if v.alpha == v.meta.get("trained_alpha") and v.beta == v.meta.get("trained_beta")]
        if own:
            metrics = {}
            for r in best_per_budget(own, [r.budget for r in results]):
                if r.feasible:
                    k = metric_key(r.budget)
                    metrics.update({f"posthoc_{k}_accuracy": r.accuracy, f"posthoc_{k}_gflops": r.gflops,
                                    f"posthoc_{k}_eta": r.eta})
            if metrics:
                tracking.log_metrics(uri, t.mlflow_run_id, metrics, step=t.iterations)
    metrics = {}
    for r in results:
        if r.feasible:
            k = metric_key(r.budget)
            metrics.update({f"best_{k}_accuracy": r.accuracy, f"best_{k}_gflops": r.gflops, f"best_{k}_eta": r.eta,
                            f"best_{k}_alpha": r.variant.alpha, f"best_{k}_beta": r.variant.beta})
    if metrics:
        tracking.log_metrics(uri, parent, metrics, step=0)
    client.log_artifact(parent, plot, "plots")
    client.log_artifact(parent, str(summary_path))


def print_outcome(o: TuneOutcome, console, metric: str = TRIAL_METRIC) -> None:
    has_lr = any("lr" in tr.config for tr in o.trials)
    t = Table("trial", "α", "β", *(["lr"] if has_lr else []), "ep", "top-1", "status", "fixed s", "GFLOPs",
              title=f"trials (top-1: {metric}; fixed s: start-up per trial, outside its epochs)",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for tr in o.trials:
        reach = ""
        if tr.variants:
            reach = f"{min(v.reachable[0] for v in tr.variants):.3g}–{max(v.reachable[1] for v in tr.variants):.3g}"
        val, fixed = tr.metrics.get(metric), fixed_cost_s(tr.metrics)
        t.add_row(tr.trial_id, f"{tr.config.get('alpha', float('nan')):.3f}", f"{tr.config.get('beta', float('nan')):.4f}",
                  *([f"{tr.config['lr']:.1e}" if "lr" in tr.config else ""] if has_lr else []), str(tr.iterations),
                  "" if val is None else f"{100 * val:.1f}%", tr.status.replace("stopped early", "stopped") if not tr.error
                  else "error",
                  "" if fixed is None else f"{fixed:.0f}", reach)
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
