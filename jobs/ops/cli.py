"""`cfvit submit …` (Ray job submission) and `cfvit shards …` (ImageFolder → WebDataset shards).

Only typer and rich are imported at module level: the job (torch, Ray, MLflow) loads when the command
runs, so `cfvit --help` answers at once.
"""
from __future__ import annotations

import time
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer()
submit_app = typer.Typer(help="Submit, follow, stop and list jobs on a Ray cluster (Ray job submission API).",
                        no_args_is_help=True)
app.add_typer(submit_app, name="submit")

AddressOpt = typer.Option(
    None, "--address", "-a", envvar="RAY_ADDRESS", help="Ray dashboard address, e.g. http://127.0.0.1:8265."
)
InsecureTokenOpt = typer.Option(
    False, "--allow-insecure-token", help="Send the Ray token over plain http to a non-loopback address (it "
    "crosses the network in clear; default: only https or 127.0.0.1, e.g. through kubectl port-forward)."
)


def _fail(exc) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@submit_app.command("run", context_settings={"allow_interspersed_args": False})
def run_cmd(
    entrypoint: List[str] = typer.Argument(None, help="The job's command, after `--`."),
    address: Optional[str] = AddressOpt,
    working_dir: str = typer.Option(".", "--working-dir", "-w", help="Uploaded as the job's working dir ('' for none)."),
    env: Optional[List[str]] = typer.Option(None, "--env", "-e", help="KEY=VALUE environment variable (repeatable)."),
    pip: Optional[List[str]] = typer.Option(None, "--pip", help="Extra pip requirement for the job (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Extra working-dir exclude pattern."),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="Job id to use (default: generated)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return without following logs."),
    allow_local_outputs: bool = typer.Option(False, "--allow-local-outputs", help="Submit even if the job would "
                                             "keep checkpoints or MLflow data in its (temporary) working dir."),
    allow_insecure_token: bool = InsecureTokenOpt,
) -> None:
    """Submit a job: `cfvit submit run --address URL -- python -m jobs.train --config C`.

    A training/tuning job whose checkpoints or MLflow store would land in the job's working directory (which
    Ray deletes with its session) is refused, with the `--set`/`--env` that fixes it; so is an `--env` that
    looks like a credential (the nodes hold those, not the job's runtime_env)."""
    from .outputs import ALLOW_ENV, check_entrypoint
    from .submit import SubmitError, build_runtime_env, connect, follow, parse_env, submit, wait

    try:
        env_vars = parse_env(env)
        if allow_local_outputs:
            env_vars[ALLOW_ENV] = "1"  # the job itself checks too
        problems = check_entrypoint(list(entrypoint or []), env_vars, working_dir or None)
        if problems:
            raise SubmitError("refusing to submit: the job's results would vanish with its working directory:\n  "
                              + "\n  ".join(problems) + "\n  (--allow-local-outputs submits anyway)")
        runtime_env = build_runtime_env(working_dir, env_vars, pip, exclude)
        client = connect(address, allow_insecure_token)
        job_id = submit(client, list(entrypoint or []), runtime_env, submission_id)
        typer.echo(f"submitted {job_id} to {client.get_address()}", err=True)
        if no_wait:
            typer.echo(job_id)
            return
        try:
            follow(client, job_id)
        except KeyboardInterrupt:
            typer.echo(f"\nstopped following; {job_id} keeps running (cfvit submit stop {job_id})", err=True)
            raise typer.Exit(130)
        final = wait(client, job_id)
    except SubmitError as exc:
        raise _fail(exc)
    typer.echo(f"job {job_id}: {final}", err=True)
    if final != "SUCCEEDED":
        raise typer.Exit(1)


@submit_app.command("status")
def status_cmd(job_id: str = typer.Argument(..., help="Submission id."), address: Optional[str] = AddressOpt,
               allow_insecure_token: bool = InsecureTokenOpt) -> None:
    """Show a job's status (and its message when it failed)."""
    from .submit import SubmitError, connect, info

    try:
        details = info(connect(address, allow_insecure_token), job_id)
    except SubmitError as exc:
        raise _fail(exc)
    typer.echo(f"{job_id}: {details.status}")
    if details.message:
        typer.echo(details.message)


@submit_app.command("logs")
def logs_cmd(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: Optional[str] = AddressOpt,
    follow_: bool = typer.Option(False, "--follow", "-f", help="Stream until the job finishes."),
    allow_insecure_token: bool = InsecureTokenOpt,
) -> None:
    """Print a job's logs so far, or stream them with --follow."""
    from .submit import SubmitError, connect, follow, logs

    try:
        client = connect(address, allow_insecure_token)
        if follow_:
            follow(client, job_id)
        else:
            typer.echo(logs(client, job_id), nl=False)
    except SubmitError as exc:
        raise _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@submit_app.command("stop")
def stop_cmd(job_id: str = typer.Argument(..., help="Submission id."), address: Optional[str] = AddressOpt,
             allow_insecure_token: bool = InsecureTokenOpt) -> None:
    """Ask the cluster to stop a job."""
    from .submit import SubmitError, connect, stop

    try:
        client = connect(address, allow_insecure_token)
        stopped = stop(client, job_id)
    except SubmitError as exc:
        raise _fail(exc)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@submit_app.command("list")
def list_cmd(address: Optional[str] = AddressOpt, allow_insecure_token: bool = InsecureTokenOpt) -> None:
    """List the cluster's jobs, newest first."""
    from .submit import SubmitError, connect, list_jobs

    try:
        jobs = list_jobs(connect(address, allow_insecure_token))
    except SubmitError as exc:
        raise _fail(exc)
    table = Table("submission id", "status", "started", "entrypoint")
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        table.add_row(job.submission_id or job.job_id or "-", str(job.status), started, job.entrypoint)
    Console().print(table)


@app.command("shards", help="Convert an ImageFolder tree (local or s3://) into WebDataset .tar shards.")
def shards_cmd(
    src: str = typer.Argument(..., help="ImageFolder root: a local path or s3://bucket/prefix."),
    dst: str = typer.Argument(..., help="Output folder for the .tar shards: local path or s3://bucket/prefix."),
    shard_size: int = typer.Option(1000, "--shard-size", "-n", help="Images per shard."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Shuffle files before sharding (seeded)."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Publish a new version over a shard set already in "
                                   "DST (readers keep the current one until the new one is complete)."),
    keep: int = typer.Option(2, "--keep", min=1, help="Versions to keep, the new one included; older ones are "
                             "deleted once the new one is published."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Downscale images whose longer side exceeds "
                                           "N px to N (aspect kept, JPEG q90); cheaper decode, lower-res crops."),
) -> None:
    """Convert an ImageFolder tree into WebDataset shards with Ray Data."""
    from .shards import ShardError, convert

    try:
        report = convert(src, dst, shard_size=shard_size, shuffle=shuffle, seed=seed, overwrite=overwrite,
                         max_side=max_side, keep=keep)
    except ShardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"wrote {report.num_samples} images of {len(report.classes)} classes "
        f"as {len(report.shards)} shards to {report.dst}, version {report.version} (manifest published last)"
        + (f"; deleted older version(s) {', '.join(report.pruned)}" if report.pruned else "")
    )
