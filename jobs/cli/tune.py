"""`cfvit tune`, `cfvit calibrate` and `cfvit bench calibrate`.

Module-level imports stay light: Ray, MLflow and torch are imported inside the commands."""
from __future__ import annotations

import functools
import json
from typing import Optional

import typer


@functools.lru_cache(maxsize=1)
def _console():
    from rich.console import Console

    return Console()


def _fail(msg: str) -> None:
    _console().print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(2)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
    app.command("tune")(tune_cmd)
    bench.command("calibrate")(bench_calibrate)


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
                                         "place; a new local folder for MLflow URIs)."),
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
    from jobs.calibrate import BudgetSpecError, calibrate, log_to_mlflow, parse_floats, print_calibration

    try:
        a = parse_floats(alphas, "--alphas", 0.0, 1.0, lo_open=True)
        b = parse_floats(betas, "--betas", 0.0, 1.0, hi_open=True)
        cal = calibrate(checkpoint, budgets, data=data, limit=limit, alphas=a, betas=b, adopt_best=adopt_best,
                        write=write, output=output, tracking_uri=tracking_uri, batch_size=batch_size,
                        device=device)
    except (BudgetSpecError, FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        _fail(str(e))
    print_calibration(cal, _console())
    if register_name and not mlflow_experiment:
        _fail("--register needs --mlflow-experiment")
    if mlflow_experiment:
        info = log_to_mlflow(cal, tracking_uri, mlflow_experiment, register_name, alias)
        _console().print(f"MLflow run {info['run_id']}"
                      + (f", registered {register_name} version {info['model_version']}" if info["model_version"]
                         else ""), highlight=False)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(cal.summary(), f, indent=2, default=str)


def tune_cmd(
    budgets: str = typer.Option(..., "--budgets", help="GFLOPs per image (1.5,2.0) or % of the backbone (40%,50%)."),
    config: Optional[str] = typer.Option(None, "--config", help="Training YAML or shipped config name."),
    set_: list[str] = typer.Option([], "--set", help="Override a training config value (key.sub=value)."),
    trials: int = typer.Option(8, min=1, help="Number of trials."),
    max_concurrent: Optional[int] = typer.Option(None, min=1, help="Trials at once (default: what the cluster holds)."),
    seed: int = typer.Option(0, help="Seed of the Optuna search."),
    alpha_range: str = typer.Option("0.3,0.7", help="α search range LOW,HIGH (or one value)."),
    beta_range: str = typer.Option("0.95,0.999", help="β search range LOW,HIGH (or one value)."),
    lr_range: Optional[str] = typer.Option(None, help="Also search the learning rate (log-uniform LOW,HIGH)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs per trial (default: the config's)."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Cap optimizer micro-steps per epoch (short trials)."),
    grace_period: int = typer.Option(1, min=1, help="ASHA grace period in epochs."),
    posthoc_alphas: Optional[str] = typer.Option(None, help="Inference-only α variants evaluated per trial."),
    posthoc_betas: Optional[str] = typer.Option(None, help="Inference-only β variants evaluated per trial."),
    calib_limit: Optional[int] = typer.Option(None, min=1, help="Validation images for calibration."),
    register_name: Optional[str] = typer.Option(None, "--register", help="Registered model name of the winners."),
    output: Optional[str] = typer.Option(None, help="Output folder (default ./outputs/tune/<name>)."),
    stall_timeout: float = typer.Option(900.0, min=0, help="Stop with an error after this many seconds without "
                                        "trial progress, saying what the cluster waits on (0: never)."),
    verbose: bool = typer.Option(False, "--verbose", help="Stream Ray's, Ray Data's and DeepSpeed's logs here "
                                 "instead of into the log file."),
    log_dir: str = typer.Option("outputs/logs", help="Folder of the run's log file."),
):
    """Ray Tune over α and β (ASHA, Optuna), then the exact η per budget for every trial."""
    from rich.console import Console

    from jobs.common.logs import log_path, routed_logs
    from jobs.train.config import ConfigError, load_config
    from jobs.tune import settings_from_cli
    from jobs.tune.watchdog import say_to

    try:
        settings = settings_from_cli(budgets, trials=trials, max_concurrent=max_concurrent, seed=seed,
                                     alpha_range=alpha_range, beta_range=beta_range, lr_range=lr_range,
                                     epochs=epochs, max_steps=max_steps, grace_period=grace_period,
                                     posthoc_alphas=posthoc_alphas, posthoc_betas=posthoc_betas,
                                     calib_limit=calib_limit, registered_model=register_name, output=output,
                                     stall_timeout_s=stall_timeout)
        cfg = load_config(config, set_)
    except ConfigError as e:
        _fail(str(e))
    path = None if verbose else log_path(log_dir, "tune")
    with routed_logs(path, verbose) as term:  # the trials' Ray/Train/Data lines go to the file
        console = Console(file=term, highlight=False)
        say_to(term)  # the per-trial lines too
        if path:
            console.print(f"Ray, Ray Train, Ray Data and DeepSpeed logs (--verbose streams them):\n  {path}",
                          soft_wrap=True)
        try:
            _run_tune(cfg, settings, console)
        finally:
            say_to(None)
            _stop_ray()  # before stdout is the terminal again: Ray's log thread would print its last lines there


def _stop_ray() -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run_tune(cfg, settings, console) -> None:
    from jobs.train.config import ConfigError
    from jobs.tune import print_outcome, run_tune
    from jobs.tune.driver import TuneInterrupted
    from jobs.tune.watchdog import StallError

    try:
        outcome = run_tune(cfg, settings, console)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    except TuneInterrupted as e:
        console.print(f"\\[tune] {e}")
        raise typer.Exit(130)
    except (StallError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1)
    print_outcome(outcome, console, settings.metric)
    if outcome.interrupted:
        console.print(f"\\[tune] interrupted by {outcome.interrupted}: "
                      f"{sum(t.status == 'completed' for t in outcome.trials)} trial(s) completed, results above")
        raise typer.Exit(130)


def bench_calibrate(
    samples: int = typer.Option(50_000, min=1, help="Validation samples."),
    classes: int = typer.Option(1000, min=2, help="Classes."),
    repeats: int = typer.Option(3, min=1),
    json_out: Optional[str] = typer.Option(None, "--json"),
):
    """Seconds to calibrate N samples: every η's exact accuracy/GFLOPs + the η per budget (goal < 1 s)."""

    from benchmarks.calibrate import bench

    from .tables import compact_table

    res = bench(samples, classes, repeats=repeats)
    t = compact_table("samples", "classes", "budgets", "points", "best s", "median s", "goal",
                      title="calibration time (random probabilities; the validation pass not included)")
    t.add_row(f"{res['samples']:,}", str(res["classes"]), str(res["budgets"]), f"{res['operating_points']:,}",
              f"{res['seconds_best']:.3f}", f"{res['seconds_median']:.3f}",
              "[green]< 1 s ✓[/green]" if res["seconds_best"] < 1 else "[red]< 1 s ✗[/red]")
    _console().print(t)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=2)
