"""`cfvit train` (also `python -m jobs.train`, the Ray job entrypoint).

Only typer and rich are imported at module level: the job (torch, Ray, DeepSpeed) loads when the command
runs, so `cfvit --help` answers at once.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer()


@app.command("train")
def train_cmd(
    config: str = typer.Option("fmnist_tiny", "--config", "-c",
                               help="YAML file or shipped config name (jobs/configs/NAME.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value, e.g. schedule.epochs=5 (YAML typed)."),
    verbose: bool = typer.Option(False, "--verbose", help="Stream Ray, Ray Data, DeepSpeed and MLflow logs here "
                                 "too (always so under Ray Jobs, whose log is the job's)."),
    log_dir: str = typer.Option("outputs/logs", help="Folder of the run's log file."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the outcome to this JSON file."),
):
    """Train CF-ViT with Ray Train + DeepSpeed (data by Ray Data, tracking in MLflow)."""
    from cfvit_common.logs import log_path, routed_logs
    from jobs.ops.outputs import under_ray_jobs

    from .config import ConfigError, load_config

    t0 = time.perf_counter()
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    verbose = verbose or under_ray_jobs()  # a submitted job's log is what `cfvit submit logs` shows
    path = None if verbose else log_path(log_dir, "train")
    with routed_logs(path, verbose) as term:
        console = Console(file=term, emoji=False, highlight=False)
        if path:
            console.print(f"Ray, Ray Data, DeepSpeed and MLflow logs (--verbose streams them):\n  {path}",
                          soft_wrap=True)
        try:
            out = _run(cfg, console, verbose)
        except ConfigError as e:  # found once the data is listed (classes, layout)
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        except Exception as e:
            console.print(f"[red]failed:[/red] {type(e).__name__}: {e}" + (f" (details: {path})" if path else ""))
            raise typer.Exit(1) from None
        summary = _summary(cfg, out)
        for line in _summary_lines(summary, time.perf_counter() - t0):
            console.print(line, soft_wrap=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(summary, f, indent=2, default=str)


def _run(cfg, console, verbose: bool):
    from .watch import run_watched  # the job itself (torch, Ray): see the module docstring

    console.print(f"training {cfg.model.name} ({cfg.name}): {cfg.schedule.epochs} epochs, "
                  f"{cfg.scaling.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}")
    return run_watched(cfg, console, verbose)


def _summary(cfg, out) -> dict:
    m = out.metrics
    return {"checkpoint": out.checkpoint_path, "mlflow_run_id": out.mlflow_run_id,
            "registered_model": cfg.mlflow.registered_model if out.model_version is not None else None,
            "model_version": out.model_version, "alias": cfg.mlflow.alias if out.model_version is not None else None,
            **{k: m.get(k) for k in ("epoch", "train_loss", "val_images", "val_coarse_top1", "val_fine_top1",
                                     "images_per_s")}}


def _summary_lines(s: dict, seconds: float) -> list[str]:
    pct = lambda k: "n/a" if s.get(k) is None else f"{100 * s[k]:.1f}%"  # noqa: E731
    lines = [f"validation ({s.get('val_images') or '?'} images): fine top-1 {pct('val_fine_top1')}, "
             f"coarse {pct('val_coarse_top1')}",
             f"checkpoint: {s['checkpoint']}"]
    if s["mlflow_run_id"]:
        lines.append(f"MLflow run {s['mlflow_run_id']}")
    if s["model_version"] is not None:
        alias = f" (alias @{s['alias']})" if s["alias"] else ""
        lines.append(f"registered model models:/{s['registered_model']}/{s['model_version']}{alias}")
    lines.append(f"total: {seconds:.0f} s ({int(seconds // 60)} min {seconds % 60:.0f} s)")
    return lines
