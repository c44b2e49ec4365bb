"""`cfvit pipeline`: the README's main job (train → calibrate → serve → classify over HTTP → summary)."""
from typing import Optional

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        config: Optional[str] = typer.Option(None, help="Job config (YAML path or shipped name); default fmnist_tiny."),
        set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. schedule.epochs=5."),
        quick: bool = typer.Option(False, "--quick", help="A run of a few minutes (fewer images and epochs)."),
        budgets: str = typer.Option("40%,55%,70%", help="FLOPs budgets: GFLOPs or % of the backbone."),
        images: int = typer.Option(200, help="Test images classified over HTTP at each budget."),
        host: str = typer.Option("127.0.0.1", help="Serve HTTP host."),
        port: int = typer.Option(8000, help="Serve HTTP port."),
        keep_serving: bool = typer.Option(False, "--keep-serving", help="Keep the endpoint up until Ctrl-C."),
    ):
        """Train on Fashion-MNIST (Ray Train + DeepSpeed), calibrate η per budget, serve, classify over HTTP."""
        from rich.console import Console

        from jobs.train.config import ConfigError
        from jobs.pipeline import run_pipeline, summary_table

        console = Console()
        try:
            res = run_pipeline(config, tuple(set_), quick=quick, budgets=budgets, n_images=images, host=host,
                               port=port, keep_serving=keep_serving, echo=console.print)
        except ConfigError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)
        console.print(summary_table(res))
        m = res.train_metrics
        console.print(f"training: coarse top-1 {m.get('val_coarse_top1', float('nan')):.3f}, fine top-1 "
                      f"{m.get('val_fine_top1', float('nan')):.3f} after epoch {m.get('epoch')}")
        console.print(f"MLflow: run {res.mlflow_run_id} at {res.tracking_uri}"
                      + (f"; registered model {res.model_uri}" if res.model_uri else ""))
        console.print(f"calibrated checkpoint: {res.checkpoint}")
        console.print(f"endpoint: {res.endpoint} ({'stopped' if not keep_serving else 'stopped after Ctrl-C'})")
        console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items()))
