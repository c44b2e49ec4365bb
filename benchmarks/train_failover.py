"""`cfvit bench train-failover`: a training job submitted with `cfvit submit` to a multi-node Ray cluster on
this machine (benchmarks/local_cluster.py: moto's S3 server as the only shared storage, an MLflow server),
its two workers on different nodes, survives a fault injected mid-epoch:

- `node`: the node of one worker is removed without warning (its raylet and every process on it killed);
  a replacement node joins `replace_after_s` later, as a cluster autoscaler would add one. Ray Train
  restarts the worker group (`checkpoint.max_failures`) from the last S3 checkpoint.
- `s3`: the S3 server is paused (SIGSTOP) for `pause_s` and resumed; reads and the checkpoint upload wait it
  out (the S3 filesystem's request timeout, cfvit_common/storage.py), without a restart.

The job's log is polled while it runs; every line is stamped when first seen (≤ ~1 s late). What must hold
and what is measured: job SUCCEEDED with all its epochs, each epoch completed once (the log's epoch lines
and MLflow's `train_loss` history), a registered model, complete checkpoints in S3; the time from the
fault to training again.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional

from mlflow.tracking import MlflowClient

import cfvit
from benchmarks.local_cluster import SERVER, TRAINER, LocalStack, mlflow_http, upload_fashion_mnist
from cfvit.checkpoint import CheckpointError
from cfvit_common.checkpoints import resolve_checkpoint
from jobs.ops.submit import connect

ROOT = Path(__file__).resolve().parents[1]
DATA_BUCKET, RUNS_BUCKET = "cfvit-data", "cfvit-runs"
CKPT_FILES = {"train_state.json", "model/config.json", "model/model.safetensors",
              "deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"}
LINES = {
    "progress": re.compile(r"\[cfvit-progress\] (\{.*\})"),
    "worker": re.compile(r"\[worker\] rank (\d+) on node ([0-9a-f]+)"),
    "epoch": re.compile(r"\bepoch (\d+)/(\d+)  loss"),
    "resume": re.compile(r"\[resume\] from the checkpoint of epoch (\d+): continuing at epoch (\d+)"),
    "slow_checkpoint": re.compile(r"\[checkpoint\] epoch (\d+): rank (\d+) took ([\d.]+) s"),
    "reported": re.compile(r"Checkpoint successfully created at: .*/(checkpoint_[\w.-]+)\)"),  # Ray Train's
}


def job_name(case: str) -> str:
    """The job's name, which is also its checkpoint run name; its registered model is `cfvit-<name>`."""
    return f"failover-{case}"


def job_sets(case: str, stack, epochs: int) -> List[str]:
    """The job's `--set`s: the shipped fmnist_tiny config on the S3 data, a small model, one worker per node."""
    name = job_name(case)
    sets = {
        "name": name, "data.train": f"s3://{DATA_BUCKET}/fmnist/train",
        "data.val": f"s3://{DATA_BUCKET}/fmnist/val", "data.train_limit": "null", "data.val_limit": "null",
        # the 56-px model: epochs long enough for the fault to land inside one
        "model.name": "cfvit_tiny_fmnist", "model.overrides": "{depth: 2, embed_dim: 48, num_heads: 2}",
        "optim.batch_size": 64,
        "deepspeed.micro_batch_size": 32, "schedule.epochs": epochs, "schedule.split_fraction": 0.34,
        "scaling.num_workers": 2, "scaling.worker_resources": "{trainer: 1}",
        "scaling.placement_strategy": "STRICT_SPREAD",
        "checkpoint.storage_path": f"s3://{RUNS_BUCKET}/checkpoints", "checkpoint.run_name": name,
        "checkpoint.max_failures": 3, "checkpoint.num_to_keep": epochs, "checkpoint.slow_write_s": 5,
        "mlflow.tracking_uri": stack.mlflow_uri, "mlflow.experiment": "cfvit-failover",
        "mlflow.registered_model": f"cfvit-{name}", "log.progress_every_s": 1,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def submit_job(stack, case: str, sets: List[str]) -> str:
    """`cfvit submit run --no-wait` as a user types it; returns the job id. The nodes hold the S3 keys and the
    MLflow user (as pods would): `--env` names only the tracking server, which `cfvit submit` checks."""
    cmd = [sys.executable, "-m", "cfvit_cli", "submit", "run", "--address", stack.dashboard_url, "--no-wait",
           "--submission-id", f"{job_name(case)}-{int(time.time())}", f"--env=MLFLOW_TRACKING_URI={stack.mlflow_uri}",
           "--",
           "python", "-m", "jobs.train", "--config", "jobs/configs/fmnist_tiny.yaml",
           *[a for s in sets for a in ("--set", s)]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"cfvit submit failed: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


class JobWatch:
    """The job's log as events: each matched line with the time (s after submission) it was first seen."""
    def __init__(self, client, job_id: str, t0: float):
        self.client, self.job_id, self.t0 = client, job_id, t0
        self.events: List[Dict[str, Any]] = []
        self._offset = 0  # characters of the log read (whole lines only)
        self.status = "PENDING"

    def poll(self) -> List[dict]:
        """Read the new lines; returns where training is by them: {epoch, step} per progress record, and
        {epoch, step: None} per epoch line (the epoch is over, its checkpoint being written)."""
        self.status = str(self.client.get_job_status(self.job_id))
        text = self.client.get_job_logs(self.job_id)
        end = text.rfind("\n") + 1  # a line still being written is read next time
        lines, self._offset = text[self._offset:end].splitlines(), max(self._offset, end)
        now, new = time.monotonic() - self.t0, []
        for line in lines:
            for kind, rx in LINES.items():
                m = rx.search(line)
                if m:
                    self.events.append({"kind": kind, "t": now, "groups": m.groups()})
                    if kind == "progress":
                        new.append(json.loads(m.group(1)))
                    elif kind == "epoch":
                        new.append({"epoch": int(m.group(1)), "step": None})
        return new

    def worker_nodes(self, after: float = -1.0) -> Dict[int, str]:
        return {int(e["groups"][0]): e["groups"][1] for e in self.events if e["kind"] == "worker" and e["t"] > after}


def run_case(stack, case: str, *, epochs: int = 3, fault_epoch: int = 2, at_fraction: float = 0.3,
             kill_rank: int = 1, replace_after_s: float = 5.0, pause_s: float = 20.0, n_train: int = 1024,
             n_val: int = 256, timeout_s: float = 480.0, log_dir: Optional[str] = None) -> Dict[str, Any]:
    """Submit one job, inject `case` (node | s3) when epoch `fault_epoch` (1-based) is `at_fraction` done
    (1: when its training is over, as its checkpoint is being written)."""

    client = connect(stack.dashboard_url)
    steps = n_train // 64  # optimizer steps per epoch: global batch 64
    t0 = time.monotonic()
    job_id = submit_job(stack, case, job_sets(case, stack, epochs))
    watch, fault = JobWatch(client, job_id, t0), {}
    deadline = t0 + timeout_s
    threshold = None if at_fraction >= 1 else at_fraction * steps
    while time.monotonic() < deadline:
        records = watch.poll()
        if watch.status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        if records and "t" not in fault and "missed" not in fault:
            _trigger(stack, watch, fault, records, case, kill_rank, fault_epoch, threshold, steps)
        _follow_up(stack, fault, case, t0, replace_after_s, pause_s)
        time.sleep(0.5)
    else:  # out of time: stop the job rather than leave it running on the cluster
        client.stop_job(job_id)
        watch.status = "TIMED OUT"
    _follow_up(stack, fault, case, t0, 0.0, 0.0)  # whatever the end: S3 running, the lost node replaced
    return summarize(stack, watch, case, fault, epochs, t0, log_dir)


def _trigger(stack, watch: JobWatch, fault: dict, records: List[dict], case: str, kill_rank: int,
             epoch: int, threshold: Optional[float], steps: int) -> None:
    """Inject the fault on the first due record of this look at the log. The log arrives in bursts (worker
    output is forwarded by each node's log monitor), so a burst may hold both the due step and the epoch's
    end: then the moment has passed, and nothing is injected rather than a fault in the wrong place."""
    due = next((p for p in records if _due(p, epoch, threshold)), None)
    passed = any(p["epoch"] > epoch or (threshold is not None and p["epoch"] == epoch and p["step"] is None)
                 for p in records)
    ready = case != "node" or kill_rank in watch.worker_nodes()
    if due is not None and ready and not passed:
        fault.update(_inject(stack, watch, case, kill_rank), epoch=epoch,
                     step=steps if due["step"] is None else due["step"], steps=steps, t=time.monotonic() - watch.t0)
    elif passed:
        last = records[-1]
        fault["missed"] = (f"epoch {epoch} went by between two looks at the log (this look ended at epoch "
                           f"{last['epoch']}, step {last['step']}; rank {kill_rank}'s node "
                           f"{'known' if ready else 'not yet in the log'})")


def _due(p: dict, epoch: int, step: Optional[float]) -> bool:
    """`step` of `epoch` reached; `step` None: the epoch's line, printed as its checkpoint is being written."""
    if p["epoch"] != epoch:
        return False
    return p["step"] is None if step is None else (p["step"] is not None and p["step"] >= step)


def _inject(stack, watch: JobWatch, case: str, kill_rank: int) -> Dict[str, Any]:
    if case == "node":
        nodes = watch.worker_nodes()
        victim = nodes[kill_rank]
        stack.kill_node(victim)
        return {"victim_node": victim, "victim_rank": kill_rank, "nodes_before": nodes}
    stack.pause_s3()
    return {"paused": True}


def _follow_up(stack, fault: dict, case: str, t0: float, replace_after_s: float, pause_s: float) -> None:
    """The second half of a fault, on time: a replacement node joins; the S3 server resumes."""
    if "t" not in fault:
        return
    now = time.monotonic() - t0
    if case == "node" and "replaced_t" not in fault and now >= fault["t"] + replace_after_s:
        stack.add_node()
        fault["replaced_t"] = time.monotonic() - t0
    if case == "s3" and "resumed_t" not in fault and now >= fault["t"] + pause_s:
        stack.resume_s3()
        fault["resumed_t"] = time.monotonic() - t0


def summarize(stack, watch: JobWatch, case: str, fault: dict, epochs: int, t0: float,
              log_dir: Optional[str] = None) -> Dict[str, Any]:
    """What the job did around the fault, from its log, MLflow and the S3 bucket."""
    ev = watch.events
    completed = [int(e["groups"][0]) for e in ev if e["kind"] == "epoch"]
    resumes = [e for e in ev if e["kind"] == "resume"]
    ft = fault.get("t")
    after = [e for e in ev if e["kind"] == "progress" and ft is not None and e["t"] > ft
             and (case == "s3" or any(ft < r["t"] <= e["t"] for r in resumes))]
    out = {
        "case": case, "job_id": watch.job_id, "status": watch.status, "wall_s": time.monotonic() - t0,
        "epochs": epochs, "epoch_lines": completed,
        "epochs_repeated": sum(max(0, completed.count(k) - 1) for k in set(completed)),
        "restarts": len(resumes), "resumed_at_epoch": [int(r["groups"][1]) for r in resumes],
        "fault": {k: v for k, v in fault.items() if k != "paused"},
        "training_again_s": None if not after or ft is None else after[0]["t"] - ft,
        # node: when the restarted group's workers reported in, and when rank 0 had loaded the checkpoint
        "workers_back_s": _first_after(ev, "worker", ft), "resumed_s": _first_after(ev, "resume", ft),
        # Ray Train's "Checkpoint successfully created" lines (one per rank, after the upload): the folder
        # and when the bench saw the line, s after the fault
        "checkpoints_reported_s": [[e["groups"][0], round(e["t"] - ft, 1)] for e in ev
                                   if e["kind"] == "reported" and ft is not None],
        "slow_checkpoints": [{"epoch": int(e["groups"][0]), "rank": int(e["groups"][1]),
                              "seconds": float(e["groups"][2])} for e in ev if e["kind"] == "slow_checkpoint"],
    }
    if case == "node" and ft is not None:
        out["nodes_after"] = watch.worker_nodes(after=ft)
    out.update(_mlflow_facts(stack.mlflow_uri, job_name(case)))
    out["model_permissions"] = _model_permissions(stack, f"cfvit-{job_name(case)}")
    out["checkpoints"] = _checkpoints(stack, job_name(case))
    log = watch.client.get_job_logs(watch.job_id)
    if log_dir:  # the whole job log, for reading what Ray Train did
        out["job_log"] = str(Path(log_dir) / f"{watch.job_id}.log")
        Path(out["job_log"]).write_text(log)
    if out["status"] != "SUCCEEDED":
        out["log_tail"] = log[-4000:]
    return out


def _first_after(events: List[dict], kind: str, t: Optional[float]) -> Optional[float]:
    return next((e["t"] - t for e in events if t is not None and e["kind"] == kind and e["t"] > t), None)


def _mlflow_facts(uri: str, job: str) -> Dict[str, Any]:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("cfvit-failover")
    runs = client.search_runs([exp.experiment_id], f"tags.`cfvit.job` = '{job}'", order_by=["start_time DESC"],
                              max_results=1) if exp else []
    if not runs:
        return {"mlflow_run": None}
    run = runs[0]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    seconds = {m.step + 1: round(m.value, 1) for m in client.get_metric_history(run.info.run_id, "epoch_seconds")}
    versions = client.search_model_versions(f"name='cfvit-{job}'")
    return {"mlflow_run": run.info.run_id, "mlflow_status": run.info.status, "train_loss_steps": steps,
            "epoch_seconds": seconds, "val_fine_top1": run.data.metrics.get("val_fine_top1"),
            "registered_versions": sorted(int(v.version) for v in versions if v.run_id == run.info.run_id)}


def _model_permissions(stack, model: str) -> Dict[str, Optional[str]]:
    """What each client user may do with the registered model, as the admin asks the server (its effective
    permission): the editing user that registered it MANAGEs it, the read-only user READs it."""
    out = {}
    for name in (TRAINER, SERVER):
        query = urllib.parse.urlencode({"username": name, "resource_type": "registered_model", "resource_id": model})
        status, body = mlflow_http("GET", f"{stack.mlflow_uri}/api/3.0/mlflow/users/permissions/get?{query}",
                                   user=stack.mlflow_users["admin"])
        out[name] = body.get("permission") if status == 200 else None
    return out


def _checkpoints(stack, run_name: str) -> List[Dict[str, Any]]:
    """Each checkpoint folder in S3: its epoch (train_state.json), whether every file is there, and whether
    its exported model loads."""
    s3 = stack.s3_client()
    prefix = f"checkpoints/{run_name}/"
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=RUNS_BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    folders: Dict[str, set] = {}
    for k in keys:
        rest = k[len(prefix):]
        if rest.startswith("checkpoint_") and "/" in rest:
            d, f = rest.split("/", 1)
            folders.setdefault(d, set()).add(f)
    out = []
    for d, files in sorted(folders.items()):
        state = json.loads(s3.get_object(Bucket=RUNS_BUCKET, Key=f"{prefix}{d}/train_state.json")["Body"].read()) \
            if "train_state.json" in files else {}
        out.append({"folder": d, "epoch": state.get("epoch", -1) + 1, "complete": CKPT_FILES <= files,
                    "model_loads": _loads(f"s3://{RUNS_BUCKET}/{prefix}{d}/model") if "model/config.json" in files
                    else False})
    return out


def _loads(uri: str) -> bool:
    try:
        cfvit.load(resolve_checkpoint(uri))
        return True
    except (CheckpointError, OSError, ValueError):
        return False


def run_train_failover(cases=("node", "s3"), kill_at: float = 0.3, pause_at: float = 1.0, **kw) -> Dict[str, Any]:
    """Start the stack (head + 2 worker nodes, S3, MLflow), put the data in S3, run each case in turn: the
    node killed `kill_at` into the epoch, S3 paused `pause_at` into it (1: during its checkpoint write)."""

    n_train, n_val = kw.get("n_train", 1024), kw.get("n_val", 256)
    with LocalStack(nodes=2) as stack:
        s3 = stack.s3_client()
        upload_fashion_mnist(s3, DATA_BUCKET, "fmnist/train", "train", n=n_train)
        upload_fashion_mnist(s3, DATA_BUCKET, "fmnist/val", "test", n=n_val)
        s3.create_bucket(Bucket=RUNS_BUCKET)
        return {case: run_case(stack, case, at_fraction=kill_at if case == "node" else pause_at, **kw)
                for case in cases}


def print_train_failover(res: Dict[str, Any], echo=print) -> None:
    """A few lines per case, within 80 columns."""
    for case, r in res.items():
        f = r["fault"]
        if "t" not in f:
            echo(f"{case}: NO FAULT INJECTED ({f.get('missed', 'the job ended first')}); job {r['status']}")
            if "log_tail" in r:
                echo(r["log_tail"][-1500:])
            continue
        what = (f"rank {f.get('victim_rank')}'s node killed" if case == "node"
                else f"S3 paused {f.get('resumed_t', 0) - f.get('t', 0):.0f} s")
        when = (f"as epoch {f['epoch']}'s checkpoint was written" if f["step"] == f["steps"]
                else f"at epoch {f['epoch']}, step {f['step']}/{f['steps']}")
        echo(f"{case}: {what} {when} -> {r['status']}, {r['wall_s']:.0f} s")
        repeated = "none" if not r["epochs_repeated"] else r["epochs_repeated"]
        echo(f"  epochs done {_ints(r['epoch_lines'])} ({repeated} repeated); restarts {r['restarts']}"
             + (f", resumed at epoch {_ints(r['resumed_at_epoch'])}" if r["restarts"] else ""))
        again = "never" if r["training_again_s"] is None else f"{r['training_again_s']:.1f} s"
        echo(f"  training again after {again}" + ("" if case != "node" or r["resumed_s"] is None else
             f": new node {f['replaced_t'] - f['t']:.0f} s, workers {r['workers_back_s']:.0f} s, "
             f"ckpt loaded {r['resumed_s']:.0f} s"))
        echo("  seconds per epoch " + " / ".join(f"{v:.1f}" for _, v in sorted(r.get("epoch_seconds", {}).items())))
        ok = sum(c["complete"] and c["model_loads"] for c in r["checkpoints"])
        echo(f"  MLflow epochs {_ints(r.get('train_loss_steps') or [])}; model versions "
             f"{_ints(r.get('registered_versions') or []) or 'none'}; checkpoints whole+loadable "
             f"{ok}/{len(r['checkpoints'])}")
        epoch_of = {c["folder"]: c["epoch"] for c in r["checkpoints"]}
        seen: Dict[Any, List[str]] = {}
        for d, t in r["checkpoints_reported_s"]:
            if t > 0:  # seen after the pause began (t is when the bench saw the line)
                seen.setdefault(epoch_of.get(d, "?"), []).append(f"{t:.0f}")
        if case == "s3" and seen:
            echo("  checkpoint reports, s after the pause: "
                 + "; ".join(f"epoch {e}: {', '.join(ts)}" for e, ts in seen.items()))
        for c in r["slow_checkpoints"]:
            echo(f"  slow checkpoint write: epoch {c['epoch']}, rank {c['rank']}, {c['seconds']:.1f} s")
        if "log_tail" in r:
            echo(r["log_tail"][-1500:])


def _ints(values) -> str:
    return ",".join(str(v) for v in values)
