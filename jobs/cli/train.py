"""`cfvit train` and `cfvit bench train` (a plugin of the root CLI; heavy imports stay inside commands)."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("train")(train_cmd)
    bench.command("train")(bench_train_cmd)
    bench.command("train-failover")(bench_train_failover_cmd)


def train_cmd(
    config: str = typer.Option("fmnist_tiny", "--config", "-c",
                               help="YAML file or shipped config name (jobs/configs/NAME.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value, e.g. schedule.epochs=5 (YAML typed)."),
):
    """Train CF-ViT with Ray Train + DeepSpeed (data by Ray Data, tracking in MLflow)."""
    import json

    from jobs.train.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_)
        from jobs.train.driver import run_training

        out = run_training(cfg)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    m = out.metrics
    typer.echo(json.dumps({"checkpoint": out.checkpoint_path, "mlflow_run_id": out.mlflow_run_id,
                           "registered_model": cfg.mlflow.registered_model, "model_version": out.model_version,
                           **{k: m.get(k) for k in ("epoch", "val_coarse_top1", "val_fine_top1", "images_per_s")}}))


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
    import json

    from rich.console import Console

    from benchmarks.train_step import bench_train
    from .models import parse_sets
    from .tables import compact_table

    overrides = parse_sets(set_)
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
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=2)


def bench_train_failover_cmd(
    fault: str = typer.Option("node,s3", help="node (kill a worker's node), s3 (pause the S3 server), or both."),
    epochs: int = typer.Option(3, min=2, help="Epochs of each job."),
    fault_epoch: int = typer.Option(2, min=1, help="The epoch (1-based) in which the fault is injected."),
    kill_at: float = typer.Option(0.5, min=0.0, max=0.95, help="How far into that epoch the node dies (share "
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
    import json
    import signal

    from benchmarks.train_failover import print_train_failover, run_train_failover

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
    if json_out:  # first: the figures survive a printing problem
        with open(json_out, "w") as f:
            json.dump(res, f, indent=2, default=str)
    print_train_failover(res)
    if any(r["status"] != "SUCCEEDED" or "t" not in r["fault"] for r in res.values()):
        raise typer.Exit(1)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
