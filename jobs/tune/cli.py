"""`cfvit tune` (also `python -m jobs.tune`).

Only typer and rich are imported at module level: the job (torch, Ray, MLflow) loads when the command
runs, so `cfvit --help` answers at once.
"""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer()


def _fail(msg: str) -> None:
    Console().print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(2)


@app.command("tune")
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
    from cfvit_common.logs import log_path, routed_logs
    from jobs.train.config import ConfigError, load_config

    from .settings import settings_from_cli
    from .watchdog import say_to

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
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run_tune(cfg, settings, console) -> None:
    from jobs.train.config import ConfigError

    from .driver import run_tune
    from .plan import TuneInterrupted
    from .report import print_outcome
    from .watchdog import StallError

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
