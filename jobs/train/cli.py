"""`cfvit train` (also `python -m jobs.train`, the Ray job entrypoint).

Only typer is imported at module level: the job (torch, Ray, DeepSpeed) loads when the command runs, so
`cfvit --help` answers at once.
"""
from __future__ import annotations

import json

import typer

app = typer.Typer()


@app.command("train")
def train_cmd(
    config: str = typer.Option("fmnist_tiny", "--config", "-c",
                               help="YAML file or shipped config name (jobs/configs/NAME.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value, e.g. schedule.epochs=5 (YAML typed)."),
):
    """Train CF-ViT with Ray Train + DeepSpeed (data by Ray Data, tracking in MLflow)."""
    from .config import ConfigError, load_config
    from .driver import run_training

    try:
        cfg = load_config(config, set_)
        out = run_training(cfg)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    m = out.metrics
    typer.echo(json.dumps({"checkpoint": out.checkpoint_path, "mlflow_run_id": out.mlflow_run_id,
                           "registered_model": cfg.mlflow.registered_model, "model_version": out.model_version,
                           **{k: m.get(k) for k in ("epoch", "val_coarse_top1", "val_fine_top1", "images_per_s")}}))
