"""`cfvit calibrate` (also `python -m jobs.calibrate`).

Only typer and rich are imported at module level: the job (torch, Ray, MLflow) loads when the command
runs, so `cfvit --help` answers at once.
"""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console

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
):
    """Post-hoc η per FLOPs budget for one trained model (no retraining); writes the η table."""
    from cfvit.budget import BudgetSpecError
    from cfvit.calibration import parse_floats

    from .report import log_to_mlflow, print_calibration
    from .run import calibrate

    try:
        a = parse_floats(alphas, "--alphas", 0.0, 1.0, lo_open=True)
        b = parse_floats(betas, "--betas", 0.0, 1.0, hi_open=True)
        cal = calibrate(checkpoint, budgets, data=data, limit=limit, alphas=a, betas=b, adopt_best=adopt_best,
                        write=write, output=output, tracking_uri=tracking_uri, batch_size=batch_size,
                        device=device)
    except (BudgetSpecError, FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        _fail(str(e))
    print_calibration(cal, CONSOLE)
    if register_name and not mlflow_experiment:
        _fail("--register needs --mlflow-experiment")
    if mlflow_experiment:
        info = log_to_mlflow(cal, tracking_uri, mlflow_experiment, register_name, alias)
        CONSOLE.print(f"MLflow run {info['run_id']}"
                      + (f", registered {register_name} version {info['model_version']}" if info["model_version"]
                         else ""), highlight=False)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(cal.summary(), f, indent=2, default=str)
