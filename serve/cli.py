"""`cfvit serve`: start (or join) Ray, deploy the application, serve until Ctrl-C / SIGTERM.

Only typer and pydantic are imported at module level: Ray and torch load when the command runs, so
`cfvit --help` answers at once.
"""
from __future__ import annotations

from typing import Optional

import typer

from .settings import AppArgs

app = typer.Typer()


@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Option(..., help="Checkpoint directory, s3://bucket/prefix, or models:/NAME@ALIAS."),
    port: int = typer.Option(8000, help="HTTP port."),
    host: str = typer.Option("127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)."),
    eta: float = typer.Option(0.5, min=0.0, max=1.0001, help="Default exit threshold η."),
    stages: str = typer.Option("split", help="split | fused | backbone (see serve/settings.py)."),
    address: Optional[str] = typer.Option(None, help="Join this Ray cluster (default: $RAY_ADDRESS, else "
                                                     "start a local instance and stop it on exit)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of a locally started Ray instance."),
    max_replicas: int = typer.Option(4, help="Most coarse (or fused) replicas; the fine stage gets ~3/4 of it."),
    max_images: int = typer.Option(32, help="Most images per request."),
    ready_timeout: float = typer.Option(300.0, min=1.0, help="Seconds the application may take to start before "
                                        "the command gives up, saying what it asked for and what the cluster has."),
):
    """Serve a checkpoint over HTTP (Ray Serve): POST /v1/classify, GET /v1/model, a page at /."""
    from .placement import AppDoesNotFit
    from .runner import serve_forever

    try:
        serve_forever(_app_args(checkpoint, eta, stages, max_replicas, max_images), host=host, port=port,
                      address=address, num_cpus=num_cpus, echo=typer.echo, ready_timeout_s=ready_timeout)
    except AppDoesNotFit as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _app_args(checkpoint: str, eta: float, stages: str, max_replicas: int, max_images: int) -> AppArgs:
    args = AppArgs(checkpoint=checkpoint, eta=eta, stages=stages, max_images=max_images)
    args.coarse.autoscaling_config["max_replicas"] = max(1, max_replicas)
    args.fused.autoscaling_config["max_replicas"] = max(1, max_replicas)
    args.fine.autoscaling_config["max_replicas"] = max(1, round(0.75 * max_replicas))
    for cfg in (args.coarse.autoscaling_config, args.fine.autoscaling_config, args.fused.autoscaling_config):
        cfg["min_replicas"] = min(cfg["min_replicas"], cfg["max_replicas"])
        cfg["initial_replicas"] = min(cfg["initial_replicas"], cfg["max_replicas"])
    return args
