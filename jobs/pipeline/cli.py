"""`cfvit pipeline`: the README's main job (train → calibrate → serve → classify over HTTP → summary).

Only typer and rich are imported at module level: the job loads when the command runs, so `cfvit --help`
answers at once.
"""
from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer()


@app.command("pipeline")
def pipeline_cmd(
    config: Optional[str] = typer.Option(None, help="Job config (YAML path or shipped name); default fmnist_main."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. schedule.epochs=5."),
    quick: bool = typer.Option(False, "--quick", help="A run of a few minutes (fewer images and epochs)."),
    budgets: str = typer.Option("40%,55%,70%", help="FLOPs budgets: GFLOPs or % of the backbone."),
    images: int = typer.Option(1000, help="Test images classified over HTTP at each budget."),
    host: str = typer.Option("127.0.0.1", help="Serve HTTP host."),
    port: int = typer.Option(8000, help="Serve HTTP port."),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="Keep the endpoint up until Ctrl-C."),
    verbose: bool = typer.Option(False, "--verbose", help="Stream Ray, Ray Data and DeepSpeed logs here too."),
    log_dir: str = typer.Option("outputs/logs", help="Folder of the run's log file."),
):
    """Train on Fashion-MNIST (Ray Train + DeepSpeed), calibrate η per budget, serve, classify over HTTP."""
    from cfvit_common.logs import log_path, routed_logs
    from jobs.train.config import ConfigError

    t0 = time.perf_counter()
    path = None if verbose else log_path(log_dir, "pipeline")
    with routed_logs(path, verbose) as term:
        # imported here: DeepSpeed prints its accelerator warning on import, which belongs in the log file
        from .run import run_pipeline, summary_notes, summary_table

        console = Console(file=term, emoji=False, highlight=False)
        if path:
            console.print(f"Ray, Ray Data, DeepSpeed and MLflow logs (--verbose streams them):\n  {path}",
                          soft_wrap=True)
        try:
            res = run_pipeline(config, tuple(set_), quick=quick, budgets=budgets, n_images=images, host=host,
                               port=port, keep_serving=keep_serving, echo=console.print, console=console,
                               verbose=verbose)
        except ConfigError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)
        except Exception as e:
            console.print(f"[red]failed:[/red] {type(e).__name__}: {e}" + (f" (details: {path})" if path else ""))
            raise typer.Exit(1)
        console.print(summary_table(res))
        for line in summary_notes(res):
            console.print(line, highlight=False)
        console.print(f"MLflow: run {res.mlflow_run_id}\n  at {res.tracking_uri}", soft_wrap=True)
        if res.model_uri:
            console.print(f"  registered model {res.model_uri}", soft_wrap=True)
        console.print(f"calibrated checkpoint: {res.checkpoint}", soft_wrap=True)
        console.print(f"endpoint: {res.endpoint} ({'stopped' if not keep_serving else 'stopped after Ctrl-C'})")
        console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items()))
        total = time.perf_counter() - t0
        console.print(f"total: {total:.0f} s ({int(total // 60)} min {total % 60:.0f} s)")
