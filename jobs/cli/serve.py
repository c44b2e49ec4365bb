"""`cfvit serve` and `cfvit bench serve`. Only typer loads at import."""
from typing import List, Optional

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
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
    ):
        """Serve a checkpoint over HTTP (Ray Serve): POST /v1/classify, GET /v1/model, a page at /."""
        from serve.runner import serve_forever

        serve_forever(_app_args(checkpoint, eta, stages, max_replicas, max_images), host=host, port=port,
                      address=address, num_cpus=num_cpus, echo=typer.echo)

    _register_failover(bench)

    @bench.command("serve")
    def bench_serve(
        checkpoint: str = typer.Option(..., help="Checkpoint to serve (as for `cfvit serve`)."),
        concurrency: str = typer.Option("1,4,16,32", help="Closed-loop client counts, comma-separated."),
        duration: float = typer.Option(10.0, help="Seconds of load at each concurrency level."),
        warmup: float = typer.Option(2.0, help="Seconds of unmeasured load before each level."),
        eta: float = typer.Option(0.5, min=0.0, max=1.0001, help="η of the CF-ViT requests (unless --exit-rate)."),
        exit_rate: Optional[float] = typer.Option(
            None, min=0.0, max=1.0, help="Pick η so this share of the bench images exits at the coarse stage."),
        images: int = typer.Option(256, help="Distinct test images cycled through."),
        replicas: int = typer.Option(1, help="Replicas per split stage; fused and backbone get twice as many."),
        batch_size: int = typer.Option(16, help="max_batch_size of every stage, and the offline batch size."),
        system: Optional[List[str]] = typer.Option(
            None, help="A deployment to load (repeatable): '[NAME:]split|fused|backbone [key=value ...]', "
                       "e.g. 'f32:split wire_dtype=float32 handoff=ingress'. Default: split, fused, backbone."),
        per_request: int = typer.Option(1, "--images-per-request", min=1, max=1024,
                                        help="Images in each request (>1: the JSON batch form)."),
        port: int = typer.Option(8123, help="HTTP port of the deployments under test."),
        json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
        burst: bool = typer.Option(False, "--burst", help="Instead: an open-loop traffic step (steady, burst, "
                                   "steady) against the first --system (default split), SLO mode off then on."),
        rate: float = typer.Option(20.0, min=0.1, help="--burst: steady requests/s (one labelled image each)."),
        burst_factor: float = typer.Option(3.0, min=1.0, help="--burst: load during the burst ÷ steady load."),
        phases: str = typer.Option("15,20,20", help="--burst: seconds of steady load, burst, steady again."),
        slo_ms: float = typer.Option(100.0, min=1.0, help="--burst: SLO mode's p99 target."),
        min_eta: Optional[float] = typer.Option(None, help="--burst: SLO mode's floor η (default: the table's lowest)."),
        max_accuracy_drop: Optional[float] = typer.Option(None, help="--burst: SLO mode's floor as accuracy."),
        plot: Optional[str] = typer.Option(None, help="--burst: write p99, η and top-1 over time to this PNG."),
    ):
        """Throughput, p50/p99 latency and per-hop timings of CF-ViT deployments vs the plain backbone,
        same hardware, next to the offline ratio of the same checkpoint (or, with --burst, a traffic step)."""
        from benchmarks.serve import DEFAULT_SYSTEMS, print_report, run_bench

        if burst:
            _bench_burst(checkpoint, rate, burst_factor, phases, slo_ms, min_eta, max_accuracy_drop, eta,
                         (system or ["split"])[0], replicas, batch_size, port, plot, json_out)
            return

        levels: List[int] = [int(c) for c in concurrency.split(",") if c.strip()]
        result = run_bench(checkpoint, levels=levels, duration_s=duration, warmup_s=warmup, eta=eta,
                           exit_rate=exit_rate, n_images=images, replicas=replicas, port=port,
                           systems=system or DEFAULT_SYSTEMS, batch_size=batch_size, per_request=per_request)
        print_report(result)
        _write_json(json_out, result)


def _register_failover(bench: typer.Typer) -> None:
    @bench.command("failover")
    def bench_failover(
        checkpoint: str = typer.Option(..., help="Checkpoint to serve (a local folder: every node reads it)."),
        clients: int = typer.Option(8, min=1, help="Closed-loop clients."),
        before: float = typer.Option(8.0, min=1.0, help="Seconds of load before the node is killed."),
        after: float = typer.Option(30.0, min=5.0, help="Seconds of load after it."),
        eta: float = typer.Option(0.5, min=0.0, max=1.0001),
        stages: str = typer.Option("split", help="split | fused"),
        json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    ):
        """Kill a whole Ray node (of a local 3-node cluster) under load: failed requests, what the clients saw,
        time until every replica runs again (docs/RELIABILITY.md)."""
        from benchmarks.failover import print_failover, run_failover

        if stages not in ("split", "fused"):
            raise typer.BadParameter("--stages must be split or fused")
        res = run_failover(checkpoint, clients, before, after, eta, stages)
        print_failover(res)
        _write_json(json_out, res)


def _bench_burst(checkpoint, rate, factor, phases, slo_ms, min_eta, max_drop, eta, stages, replicas, batch_size,
                 port, plot, json_out) -> None:
    from benchmarks.burst import plot_burst, print_burst, run_burst

    try:
        steady, burst_s, after = (float(p) for p in phases.split(","))
    except ValueError:
        raise typer.BadParameter(f"--phases wants three numbers of seconds, got {phases!r}") from None
    result = run_burst(checkpoint, rate, factor, steady, burst_s, after, slo_ms, min_eta, max_drop, eta, stages,
                       replicas, batch_size, port)
    print_burst(result)
    if plot:
        plot_burst(result, plot)
    _write_json(json_out, result)


def _write_json(path: Optional[str], figures: dict) -> None:
    """`--json PATH`: the figures as JSON too."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(figures, f, indent=2)


def _app_args(checkpoint: str, eta: float, stages: str, max_replicas: int, max_images: int) -> dict:
    from serve.settings import AppArgs

    args = AppArgs(checkpoint=checkpoint, eta=eta, stages=stages, max_images=max_images)
    args.coarse.autoscaling_config["max_replicas"] = max(1, max_replicas)
    args.fused.autoscaling_config["max_replicas"] = max(1, max_replicas)
    args.fine.autoscaling_config["max_replicas"] = max(1, round(0.75 * max_replicas))
    for cfg in (args.coarse.autoscaling_config, args.fine.autoscaling_config, args.fused.autoscaling_config):
        cfg["min_replicas"] = min(cfg["min_replicas"], cfg["max_replicas"])
        cfg["initial_replicas"] = min(cfg["initial_replicas"], cfg["max_replicas"])
    return args.model_dump()
