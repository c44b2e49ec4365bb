"""`cfvit bench …`: every benchmark's command (the root `cfvit` adds this group).

Only typer is imported at module level: each command loads its benchmark (torch, Ray, …) when it runs,
so `cfvit --help` answers at once.
"""
from __future__ import annotations

import contextlib
import json
import signal
from typing import List, Optional

import typer
from rich.console import Console

from cfvit_common.tables import compact_table

app = typer.Typer(help="Benchmarks that print a table.", no_args_is_help=True)


def _write_json(path: Optional[str], figures: dict) -> None:
    """`--json PATH`: the figures as JSON too."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2, default=str)


def _parse_sets(items: list[str]) -> dict:
    from jobs.train.config import ConfigError, parse_set  # pydantic + yaml: only for the verb that takes --set

    try:
        return parse_set(items)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@app.command("throughput")
def bench_throughput(
    model: str = typer.Option("cfvit_deit_small_patch16_224", help="Registered model name."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    batches: int = typer.Option(10, help="Batches in the timed stream."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (cuda when available)."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone and both stages."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
):
    """Images/s of the backbone vs CF-ViT at exit fractions 0, .25, .5, .76, 1 (with the ideal ratio)."""
    import torch

    from .throughput import throughput

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    res = throughput(model, batch_size=batch_size, n_batches=batches, device=device, bf16=bf16, compile=compile)
    table = throughput_table(res, model, batch_size, batches, bf16, compile)
    console = Console()
    console.print(table)
    st = res["stages"]
    console.print(f"coarse stage alone: {st['coarse_images_per_s']:,.1f} img/s with the class-attention row "
                  f"(SDPA), {st['coarse_naive_images_per_s']:,.1f} img/s materialising every attention matrix "
                  f"({st['coarse_images_per_s'] / st['coarse_naive_images_per_s']:.2f}x); fine stage alone: "
                  f"{st['fine_images_per_s']:,.1f} img/s")
    _write_json(json_out, {**res, "rows": [r.__dict__ | {"of_ideal": r.of_ideal} for r in res["rows"]]})


def throughput_table(res: dict, model: str, batch_size: int, batches: int, bf16: bool, compile: bool):
    """`cfvit bench throughput`: one row for the backbone, one per exit fraction of CF-ViT."""
    s = res["settings"]
    table = compact_table("", "exit", "η", "img/s", "GFLOPs", "speed-up", "FLOPs×", "ideal", "of ideal",
                          title=f"{model} · batch {batch_size} × {batches} · {'bf16' if bf16 else 'fp32'} · "
                                f"{'compiled' if compile else 'eager'}\n{s['device_name']}")
    for r in res["rows"]:
        table.add_row("CF-ViT" if r.exit_fraction is not None else r.name,
                      "" if r.exit_fraction is None else f"{r.exit_fraction:.2f}",
                      "" if r.eta is None else f"{r.eta:.4g}", f"{r.images_per_s:,.1f}", f"{r.gflops:.2f}",
                      f"{r.speedup:.2f}x", f"{r.flops_ratio:.2f}x",
                      "" if r.ideal_speedup is None else f"{r.ideal_speedup:.2f}x",
                      "" if r.of_ideal is None else f"{r.of_ideal:.2f}")
    return table


@app.command("train")
def bench_train_cmd(
    model: str = typer.Option("cfvit_tiny_fmnist", help="Registered CF-ViT model name."),
    set_: list[str] = typer.Option([], "--set", help="Model constructor override, e.g. depth=4."),
    batch_size: int = typer.Option(64, help="Images per training step."),
    steps: int = typer.Option(10, help="Timed steps (after 3 warm-up steps)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="bf16 autocast (default: on for CUDA)."),
    zero: Optional[str] = typer.Option(None, help="Also measure with DeepSpeed at these ZeRO stages, e.g. 0,1,2."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
):
    """Training images/s of CF-ViT vs its backbone alone (same dims, batch, optimizer, precision)."""
    from .train_step import bench_train

    overrides = _parse_sets(set_)
    res = bench_train(model, overrides, batch_size=batch_size, steps=steps, device=device, bf16=bf16,
                      zero_stages=[int(z) for z in zero.split(",")] if zero else [])
    t = compact_table("variant", "step ms", "images/s", "÷ backbone", "peak GPU MiB",
                      title=f"training step: {res['model']} batch {batch_size} on {res['device']}"
                            f" ({'bf16' if res['bf16'] else 'fp32'})")
    for r in res["rows"]:
        t.add_row(r["variant"], f"{r['step_ms']:.1f}", f"{r['images_per_s']:.1f}", f"{r['ratio']:.3f}x",
                  f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-")
    Console().print(t)
    Console().print(f"goal: CF-ViT step time <= 1.3x the backbone's -> "
                    f"{'met' if res['cfvit_ratio'] <= 1.3 else 'NOT met'} ({res['cfvit_ratio']:.3f}x, "
                    f"selection phase; {res['split_all_ratio']:.3f}x while every patch is split)")
    _write_json(json_out, res)


@app.command("train-failover")
def bench_train_failover_cmd(
    fault: str = typer.Option("node,s3", help="node (kill a worker's node), s3 (pause the S3 server), or both."),
    epochs: int = typer.Option(3, min=2, help="Epochs of each job."),
    fault_epoch: int = typer.Option(2, min=1, help="The epoch (1-based) in which the fault is injected."),
    kill_at: float = typer.Option(0.3, min=0.0, max=0.95, help="How far into that epoch the node dies (share "
                                  "of its steps)."),
    pause_at: float = typer.Option(1.0, min=0.0, max=1.0, help="How far into that epoch S3 pauses (1: as the "
                                   "epoch's checkpoint is written; the pause runs into the next epoch's reads)."),
    pause: float = typer.Option(20.0, min=1.0, help="Seconds the S3 server stays paused (SIGSTOP)."),
    replace_after: float = typer.Option(5.0, min=0.0, help="Seconds until a replacement node joins."),
    n_train: int = typer.Option(1024, min=128, help="Training images in S3."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    logs: Optional[str] = typer.Option(None, "--logs", help="Write each job's whole log into this folder."),
    timeout: float = typer.Option(480.0, min=60, help="Seconds each job may take before it is stopped."),
):
    """A job submitted with `cfvit submit` to a local multi-node cluster (S3, MLflow) survives losing a
    worker's node and a paused S3 server: epochs repeated, restarts, recovery time (docs/RELIABILITY.md)."""
    from .train_failover import print_train_failover, run_train_failover

    cases = tuple(c.strip() for c in fault.split(",") if c.strip())
    if not cases or set(cases) - {"node", "s3"}:
        raise typer.BadParameter(f"--fault takes node, s3 or node,s3; got {fault!r}")
    if fault_epoch > epochs:
        raise typer.BadParameter(f"--fault-epoch {fault_epoch} is past the last epoch ({epochs})")
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the stack's S3, MLflow and Ray nodes are stopped
    signal.signal(signal.SIGTERM, _interrupt)
    res = run_train_failover(cases, kill_at=kill_at, pause_at=pause_at, epochs=epochs, fault_epoch=fault_epoch,
                             pause_s=pause, replace_after_s=replace_after, n_train=n_train, log_dir=logs,
                             timeout_s=timeout)
    _write_json(json_out, res)  # first: the figures survive a printing problem
    print_train_failover(res)
    if any(r["status"] != "SUCCEEDED" or "t" not in r["fault"] for r in res.values()):
        raise typer.Exit(1)


@app.command("serve")
def bench_serve(
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint to serve (as for `cfvit serve`)."),
    model: Optional[str] = typer.Option(None, help="Instead of --checkpoint: a registered model with random "
                                        "weights, e.g. cfvit_deit_small_patch16_224 or cfvit_tiny32_fmnist."),
    concurrency: str = typer.Option("1,4,16,32", help="Closed-loop client counts, comma-separated."),
    duration: float = typer.Option(10.0, help="Seconds of load at each concurrency level."),
    warmup: float = typer.Option(2.0, help="Seconds of unmeasured load before each level."),
    eta: float = typer.Option(0.5, min=0.0, max=1.0001, help="η of the CF-ViT requests (unless --exit-rate)."),
    exit_rate: Optional[float] = typer.Option(
        None, min=0.0, max=1.0, help="Pick η so this share of the bench images exits at the coarse stage."),
    images: int = typer.Option(256, help="Distinct test images cycled through."),
    image_px: Optional[int] = typer.Option(None, min=8, help="Send px×px RGB noise PNGs instead of the model's "
                                           "own test images (224: ≈151 KB each)."),
    replicas: int = typer.Option(1, help="Replicas per split stage; fused and backbone get twice as many."),
    batch_size: int = typer.Option(16, help="max_batch_size of every stage, and the offline batch size."),
    system: Optional[List[str]] = typer.Option(
        None, help="A deployment to load (repeatable): '[NAME:]split|fused|backbone [key=value ...]', "
                   "e.g. 'local:fused model_in_ingress=true'. Default: split, fused, backbone."),
    per_request: int = typer.Option(1, "--images-per-request", min=1, max=1024,
                                    help="Images in each request (>1: the JSON batch form over HTTP)."),
    transport: str = typer.Option("http", help="http (POST /v1/classify) or grpc (cfvit.v1.Classifier/Classify)."),
    floor: bool = typer.Option(False, "--floor", help="Also measure Ray Serve's own no-op ingress and no-op + one "
                               "handle hop under the same load, printed beside the app's systems."),
    serve_env: Optional[List[str]] = typer.Option(
        None, "--serve-env", help="Request-path profile (repeatable; a fresh Ray for each): default, optimized "
                                  "(RAY_SERVE_THROUGHPUT_OPTIMIZED: direct ingress), haproxy (serve/request_path.py)."),
    offline: bool = typer.Option(True, "--offline/--no-offline", help="Measure the offline reference first."),
    port: int = typer.Option(8123, help="HTTP port of the deployments under test."),
    grpc_port: int = typer.Option(9123, help="gRPC port of the proxy."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    burst: bool = typer.Option(False, "--burst", help="Instead: an open-loop traffic step (steady, burst, "
                               "steady) against the first --system (default split), SLO mode off then on."),
    rate: float = typer.Option(20.0, min=0.1, help="--burst: steady requests/s (one labelled image each)."),
    burst_factor: float = typer.Option(3.0, min=1.0, help="--burst: load during the burst ÷ steady load."),
    phases: str = typer.Option("15,20,20", help="--burst: seconds of steady load, burst, steady again."),
    slo_ms: float = typer.Option(100.0, min=1.0, help="--burst: SLO mode's p99 target."),
    min_eta: Optional[float] = typer.Option(None, help="--burst: SLO mode's floor η (default: the table's lowest)."),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="--burst: SLO mode's floor as accuracy."),
    plot: Optional[str] = typer.Option(None, help="--burst/--autoscale: write the figures over time to this PNG."),
    autoscale: bool = typer.Option(False, "--autoscale", help="Instead: autoscaling watched (split app): steady "
                                   "load, a step, back down, then harder images; replicas, nodes, p99, η per second."),
    as_phases: str = typer.Option("15,45,60,45", "--as-phases", help="--autoscale: seconds of steady load, the "
                                  "step, back down, harder images (0 skips a phase)."),
    step_factor: float = typer.Option(4.0, min=1.0, help="--autoscale: load during the step ÷ steady load."),
    hard_share: float = typer.Option(0.2, min=0.01, max=0.99, help="--autoscale: share of images that go on to "
                                     "the fine stage before the hard phase (then all of them)."),
    nodes: bool = typer.Option(True, "--nodes/--no-nodes", help="--autoscale: Ray's autoscaler on its fake "
                               "multi-node provider (worker nodes of 1 CPU), or one local Ray."),
    max_workers: int = typer.Option(2, min=1, help="--autoscale: most worker nodes the autoscaler may add."),
    idle_timeout: float = typer.Option(20.0, min=1.0, help="--autoscale: seconds an idle worker node stays."),
    slo_mode: bool = typer.Option(False, "--slo-mode", help="--autoscale: SLO mode on (p99 target --slo-ms)."),
    verbose: bool = typer.Option(False, "--verbose", help="Stream Ray's and Serve's logs here too."),
    log_dir: str = typer.Option("outputs/logs", help="Folder of the run's log file (Ray's and Serve's lines)."),
):
    """Throughput, p50/p99 latency, CPU per request and per-hop timings of CF-ViT deployments vs the plain
    backbone, same hardware, next to the offline ratio of the same checkpoint and (--floor) Ray Serve's own
    request path; or, with --burst, a traffic step. Exits 1 when a system failed every request."""
    from .serve import DEFAULT_SYSTEMS, ServeBenchSettings, label, random_checkpoint, run_bench
    from .serve_report import answered_nothing, print_report

    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give --checkpoint or --model (one of them)")
    if transport not in ("http", "grpc"):
        raise typer.BadParameter(f"--transport is http or grpc, got {transport!r}")
    checkpoint = checkpoint or random_checkpoint(model)
    if autoscale:
        from .autoscale import AutoscaleSettings

        try:
            durations = tuple(float(p) for p in as_phases.split(","))
        except ValueError:
            durations = ()
        if len(durations) != 4 or min(durations) < 0 or durations[1] <= 0:
            raise typer.BadParameter(f"--as-phases wants four seconds (the step's above 0), got {as_phases!r}")
        settings = AutoscaleSettings(checkpoint=checkpoint, rate=rate, step_factor=step_factor, durations=durations,
                                     hard_share=hard_share, target_ms=slo_ms, slo_mode=slo_mode, nodes=nodes,
                                     max_workers=max_workers, idle_timeout_s=idle_timeout, batch_size=batch_size,
                                     port=port)
        with _terminal(verbose, log_dir) as console:
            _bench_autoscale(settings, plot, json_out, console)
        return
    if burst:
        from .burst import BurstSettings

        try:
            steady, burst_s, after = (float(p) for p in phases.split(","))
        except ValueError:
            raise typer.BadParameter(f"--phases wants three numbers of seconds, got {phases!r}") from None
        settings = BurstSettings(checkpoint=checkpoint, rate=rate, burst_factor=burst_factor, steady_s=steady,
                                 burst_s=burst_s, after_s=after, slo_ms=slo_ms, min_eta=min_eta,
                                 max_accuracy_drop=max_accuracy_drop, eta=eta, stages=(system or ["split"])[0],
                                 replicas=replicas, batch_size=batch_size, port=port)
        with _terminal(verbose, log_dir) as console:
            _bench_burst(settings, plot, json_out, console)
        return

    levels: List[int] = [int(c) for c in concurrency.split(",") if c.strip()]
    settings = ServeBenchSettings(checkpoint, levels=levels, duration_s=duration, warmup_s=warmup, eta=eta,
                                  exit_rate=exit_rate, n_images=images, replicas=replicas, port=port,
                                  grpc_port=grpc_port, systems=system or DEFAULT_SYSTEMS, batch_size=batch_size,
                                  per_request=per_request, transport=transport, floor=floor,
                                  profiles=serve_env or ["default"], image_px=image_px, offline=offline)
    with _terminal(verbose, log_dir) as console:
        result = run_bench(settings)
        _write_json(json_out, result)  # first: the figures survive a printing problem
        print_report(result, console)
        failed = answered_nothing(result)
        if failed:
            _fail(console, f"{', '.join(label(f) for f in failed)} failed every request (see above)")


@contextlib.contextmanager
def _terminal(verbose: bool, log_dir: str):
    """A console on the terminal while Ray's and Serve's lines go to a log file (or, `verbose`, here too)."""
    from cfvit_common.logs import log_path, routed_logs

    path = None if verbose else log_path(log_dir, "bench-serve")
    with routed_logs(path, verbose) as term:
        console = Console(file=term, width=80)
        if path:
            console.print(f"Ray's and Serve's logs: {path}", markup=False, highlight=False, soft_wrap=True)
        yield console


def _fail(console, message: str) -> None:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _bench_burst(settings, plot: Optional[str], json_out: Optional[str], console) -> None:
    from .burst import answered_nothing, plot_burst, print_burst, run_burst

    result = run_burst(settings)
    failed = answered_nothing(result)
    _finish(result, json_out, lambda r: print_burst(r, console), plot_burst, plot,
            f"the {' and '.join(failed)} run(s) failed every request" if failed else None, console)


def _bench_autoscale(settings, plot: Optional[str], json_out: Optional[str], console) -> None:
    from .autoscale import run_autoscale
    from .autoscale_report import plot_autoscale, print_autoscale

    result = run_autoscale(settings)
    _finish(result, json_out, lambda r: print_autoscale(r, console), plot_autoscale, plot,
            "every request failed" if result["sent"] and result["failed"] == result["sent"] else None, console)


def _finish(result, json_out: Optional[str], show, plot_result, plot: Optional[str], failure: Optional[str],
            console) -> None:
    """A load run's end: the JSON first (the figures survive a printing problem), the tables, the plot; exit 1
    with `failure` when the run answered nothing."""
    _write_json(json_out, result)
    show(result)
    if plot:
        plot_result(result, plot)
    if failure:
        _fail(console, f"{failure} (see above)")


@app.command("failover")
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
    from .failover import print_failover, run_failover

    if stages not in ("split", "fused"):
        raise typer.BadParameter("--stages must be split or fused")
    res = run_failover(checkpoint, clients, before, after, eta, stages)
    print_failover(res)
    _write_json(json_out, res)


@app.command("calibrate")
def bench_calibrate(
    samples: int = typer.Option(50_000, min=1, help="Validation samples."),
    classes: int = typer.Option(1000, min=2, help="Classes."),
    repeats: int = typer.Option(3, min=1),
    json_out: Optional[str] = typer.Option(None, "--json"),
):
    """Seconds to calibrate N samples: every η's exact accuracy/GFLOPs + the η per budget (goal < 1 s)."""
    from .calibrate import bench

    res = bench(samples, classes, repeats=repeats)
    t = compact_table("samples", "classes", "budgets", "points", "best s", "median s", "goal",
                      title="calibration time (random probabilities; the validation pass not included)")
    t.add_row(f"{res['samples']:,}", str(res["classes"]), str(res["budgets"]), f"{res['operating_points']:,}",
              f"{res['seconds_best']:.3f}", f"{res['seconds_median']:.3f}",
              "[green]< 1 s ✓[/green]" if res["seconds_best"] < 1 else "[red]< 1 s ✗[/red]")
    Console().print(t)
    _write_json(json_out, res)


@app.command("data")
def bench_data_cmd(
    images: int = typer.Option(256, "--images", "-n", help="Generated ImageNet-sized JPEGs (500x375, ~110 KB)."),
    endpoint: Optional[str] = typer.Option("moto", "--endpoint", help="S3 endpoint URL to read from; 'moto' "
                                           "starts moto's S3 server; '' reads a local folder."),
    max_side: Optional[int] = typer.Option(256, "--max-side", help="Also measure `cfvit shards --max-side N` "
                                           "shards (0: skip)."),
    cpus: int = typer.Option(2, "--cpus", help="Logical CPUs of the local Ray the pipeline runs on."),
    per_core_images: int = typer.Option(128, "--per-core-images", help="Images in the single-process loop."),
    repeats: int = typer.Option(1, "--repeats", help="Passes of the single-process loop."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this file."),
) -> None:
    """Training input images/s (per core and through Ray Data from S3) and the cores a GPU needs."""
    from .data import print_report, run_bench

    if max_side is not None and max_side < 0:
        raise typer.BadParameter(f"--max-side must be at least 1 pixel (0 skips it), got {max_side}")
    try:
        result = run_bench(images, endpoint or None, max_side or None, cpus, per_core_images, repeats)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    print_report(result, typer.echo)
    _write_json(json_out, result)
