"""`cfvit serve`: start (or join) Ray, deploy the application, serve until Ctrl-C / SIGTERM.

Only typer and pydantic are imported at module level: Ray and torch load when the command runs, so
`cfvit --help` answers at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .settings import AppArgs

app = typer.Typer()


@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Option(..., help="Checkpoint directory, s3://bucket/prefix, or models:/NAME@ALIAS."),
    port: int = typer.Option(8000, help="HTTP port."),
    grpc_port: Optional[int] = typer.Option(None, help="Also serve the gRPC API (serve/proto/cfvit.proto: "
                                            "cfvit.v1.Classifier/Classify) on this port."),
    host: str = typer.Option("127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)."),
    eta: float = typer.Option(0.5, min=0.0, max=1.0001, help="Default exit threshold η."),
    stages: str = typer.Option("split", help="split | fused | backbone (see serve/settings.py)."),
    address: Optional[str] = typer.Option(None, help="Join this Ray cluster (default: $RAY_ADDRESS, else "
                                                     "start a local instance and stop it on exit)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of a locally started Ray instance."),
    max_replicas: int = typer.Option(4, help="Most coarse (or fused) replicas; the fine stage gets ~3/4 of it."),
    max_images: int = typer.Option(32, help="Most images per request."),
    api_keys_file: Optional[str] = typer.Option(None, help="File of API keys (one per line, or sha256:HEX); every "
                                                "/v1/ route then needs Authorization: Bearer KEY. Re-read on change."),
    rate_limit: Optional[float] = typer.Option(None, min=0.001, help="Requests per second per key (per client "
                                               "address without keys), in each ingress replica; 429 above."),
    rate_burst: Optional[int] = typer.Option(None, min=1, help="Requests a client may send at once (default: "
                                             "one second's worth)."),
    request_timeout: float = typer.Option(30.0, min=0.001, help="Seconds before a request not yet answered "
                                          "gets 408 (a client's own timeout header may only shorten it)."),
    ready_timeout: float = typer.Option(300.0, min=1.0, help="Seconds the application may take to start before "
                                        "the command gives up, saying what it asked for and what the cluster has."),
    request_path: str = typer.Option("auto", help="How requests reach the ingress, for a Ray started here: auto "
                                     "(haproxy when --host is not loopback, else default), default (Ray's Python "
                                     "proxy), optimized (RAY_SERVE_THROUGHPUT_OPTIMIZED), haproxy (HAProxy in front "
                                     "of the ingress replicas' own ports). See docs/BENCHMARKS.md."),
):
    """Serve a checkpoint over HTTP (Ray Serve): POST /v1/classify, GET /v1/model, a page at /.

    A `models:/NAME@ALIAS` checkpoint is pinned to the version the alias names at start; a registered
    version whose files do not match the sha256 recorded at registration is refused before Ray starts."""
    from mlflow.exceptions import MlflowException

    from cfvit_common.ray_env import joins_cluster

    from cfvit_common.tracking import ModelIntegrityError

    from .guard import KeyFileError, open_endpoint_warning, read_keys
    from .placement import AppDoesNotFit
    from .request_path import choose_profile
    from .runner import serve_forever

    try:
        profile = choose_profile(request_path, host)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--request-path") from None
    front = {"api_keys_file": str(Path(api_keys_file).resolve()) if api_keys_file else None,  # replicas' cwd differs
             "rate_limit_per_s": rate_limit, "rate_limit_burst": rate_burst, "request_timeout_s": request_timeout}
    args = _app_args(checkpoint, eta, stages, max_replicas, max_images, front)
    if api_keys_file:
        try:
            keys = read_keys(api_keys_file)
        except KeyFileError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"API keys: {len(keys)} from {args.api_keys_file} (a change takes effect within "
                   f"{args.keys_reload_s:g} s)")
    joins = joins_cluster(address)  # a joined cluster keeps its own request path
    if joins and request_path != "auto":
        typer.echo(f"warning: --request-path {request_path} is ignored when joining a cluster: its Ray processes "
                   "read the request-path settings when they start (serve/request_path.py)", err=True)
    warning = open_endpoint_warning(host, args, haproxy_ports_open=profile == "haproxy" and not joins)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    try:
        serve_forever(args, host=host, port=port, address=address, num_cpus=num_cpus, echo=typer.echo,
                      ready_timeout_s=ready_timeout, grpc_port=grpc_port, request_path=profile)
    except AppDoesNotFit as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except (ModelIntegrityError, FileNotFoundError, MlflowException) as e:  # the checkpoint: refused, missing
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def _app_args(checkpoint: str, eta: float, stages: str, max_replicas: int, max_images: int,
              front: Optional[dict] = None) -> AppArgs:
    """The application's arguments; `front`: the guard's (keys file, rate limit, request timeout)."""
    args = AppArgs(checkpoint=checkpoint, eta=eta, stages=stages, max_images=max_images, **(front or {}))
    args.coarse.autoscaling_config["max_replicas"] = max(1, max_replicas)
    args.fused.autoscaling_config["max_replicas"] = max(1, max_replicas)
    args.fine.autoscaling_config["max_replicas"] = max(1, round(0.75 * max_replicas))
    for cfg in (args.coarse.autoscaling_config, args.fine.autoscaling_config, args.fused.autoscaling_config):
        cfg["min_replicas"] = min(cfg["min_replicas"], cfg["max_replicas"])
        cfg["initial_replicas"] = min(cfg["initial_replicas"], cfg["max_replicas"])
    return args
