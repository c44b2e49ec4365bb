"""`cfvit calibrate` (also `python -m jobs.calibrate`).

Only typer and rich are imported at module level: the job (torch, Ray, MLflow) loads when the command
runs, so `cfvit --help` answers at once.
"""
from __future__ import annotations

import contextlib
import json
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer()
CONSOLE = Console()


def _fail(msg: str) -> None:
    CONSOLE.print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(2)


@app.command("calibrate")
def calibrate_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory, s3://bucket/prefix, or an "
                                   "MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/cfvit_model)."),
    budgets: str = typer.Option(..., "--budgets", help="GFLOPs per image (1.5,2.0) or % of the backbone (40%,50%)."),
    data: Optional[str] = typer.Option(None, help="Validation data URI (default: the model's, else fashion-mnist:test)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N validation images."),
    alphas: Optional[str] = typer.Option(None, help="Also evaluate these α (inference-only), e.g. 0.3,0.5,0.7."),
    betas: Optional[str] = typer.Option(None, help="Also evaluate these β (inference-only), e.g. 0.95,0.99."),
    adopt_best: bool = typer.Option(False, "--adopt-best", help="Write the (α, β) that wins most budgets instead "
                                    "of the model's own."),
    write: bool = typer.Option(True, "--write/--no-write", help="Write the η table into the checkpoint's config."),
    output: Optional[str] = typer.Option(None, help="Write the calibrated checkpoint here instead (default: in "
                                         "place for a local folder; a new prefix beside an s3:// one; a new local "
                                         "folder for MLflow URIs)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)."),
    mlflow_experiment: Optional[str] = typer.Option(None, help="Log the calibration as a run in this experiment."),
    register_name: Optional[str] = typer.Option(None, "--register", help="Register the calibrated model (needs "
                                                "--mlflow-experiment)."),
    alias: Optional[str] = typer.Option(None, help="Alias for the registered version."),
    batch_size: int = typer.Option(256, min=1),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the result to this JSON file."),
    verbose: bool = typer.Option(False, "--verbose", help="Stream Ray's, Ray Data's and MLflow's logs here too."),
    log_dir: str = typer.Option("outputs/logs", help="Folder of the run's log file."),
):
    """Post-hoc η per FLOPs budget for one trained model (no retraining); writes the η table."""
    from cfvit.budget import BudgetSpecError
    from cfvit.calibration import parse_floats
    from cfvit_common.logs import log_path, routed_logs

    from .report import log_to_mlflow, print_calibration
    from .run import calibrate

    try:
        a = parse_floats(alphas, "--alphas", 0.0, 1.0, lo_open=True)
        b = parse_floats(betas, "--betas", 0.0, 1.0, hi_open=True)
    except BudgetSpecError as e:
        _fail(str(e))
    if register_name and not mlflow_experiment:
        _fail("--register needs --mlflow-experiment")
    path = None if verbose else log_path(log_dir, "calibrate")
    with routed_logs(path, verbose) as term:  # Ray Data's and MLflow's lines go to the file
        console = Console(file=term, highlight=False)
        if path:
            console.print(f"Ray, Ray Data and MLflow logs (--verbose streams them):\n  {path}", soft_wrap=True)
        try:
            with _images_bar(console, limit) as advance:
                cal = calibrate(checkpoint, budgets, data=data, limit=limit, alphas=a, betas=b,
                                adopt_best=adopt_best, write=write, output=output, tracking_uri=tracking_uri,
                                batch_size=batch_size, device=device, on_batch=advance)
        except (BudgetSpecError, FileNotFoundError, ValueError) as e:  # CheckpointError, ClassMismatch: ValueError
            console.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2) from None
        print_calibration(cal, console)
        if mlflow_experiment:
            info = log_to_mlflow(cal, tracking_uri, mlflow_experiment, register_name, alias)
            console.print(f"MLflow run {info['run_id']}"
                          + (f", registered {register_name} version {info['model_version']}"
                             if info["model_version"] else ""), highlight=False)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(cal.summary(), f, indent=2, default=str)


@contextlib.contextmanager
def _images_bar(console: Console, total: Optional[int]):
    """A bar of the validation images read (its length: --limit, else unknown until the end)."""
    with Progress(TextColumn("validation pass"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("images", total=total)
        yield lambda n: bar.advance(task, n)
