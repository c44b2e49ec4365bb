"""`cfvit bench serve --autoscale`: Serve's replica autoscaling and Ray's cluster autoscaler, watched under an
open-loop load (benchmarks/burst.py's client): steady, a step to several times that, back down, then the same
load of harder images (the coarse stage sees the same traffic, the fine stage all of it).

Nodes come from Ray's own autoscaler on its fake multi-node provider (what Ray's autoscaler tests run without a
cloud): a head with few CPUs and a worker node type of 1 CPU; a replica that cannot be placed makes the
autoscaler start a worker node (a raylet on this machine), and a node idle for `idle_timeout_s` is removed.
With `nodes=False` it runs on one local Ray instead (replicas only). The cluster is started in its own
session and stopped with everything it started; `ray stop` is never run (it would stop every Ray on the
machine).

"Harder" images: the checkpoint's coarse confidences of the test images, measured here first; the default η
is put at the `hard_share` quantile, so the images under it go on to the fine stage and the others exit.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict

import numpy as np
import psutil
import ray
from ray import serve

import cfvit
from benchmarks.autoscale_report import DEPLOYMENTS, figures, phase_bounds, with_samples
from benchmarks.burst import arrivals, failures, labelled_images, open_loop, per_second
from benchmarks.local_cluster import stop_process
from benchmarks.serve import _deploy, pixels_and_confidences
from cfvit_common.checkpoints import resolve_checkpoint
from cfvit_common.ray_env import free_port, use_token_auth
from serve.runner import start_ray


@dataclass
class AutoscaleSettings:
    """One `cfvit bench serve --autoscale` run: the load, the autoscaling overrides and the cluster."""

    checkpoint: str
    rate: float = 10.0  # requests/s in the steady, down and hard phases
    step_factor: float = 4.0  # load during the step ÷ steady load
    durations: tuple = (15.0, 45.0, 60.0, 45.0)  # seconds of steady, step, down, hard (0: skip the phase)
    hard_share: float = 0.2  # share of images that go on to the fine stage, before the hard phase (then all)
    target_ms: float = 500.0  # the p99 target the figures measure against
    slo_mode: bool = False  # SLO mode on, with target_ms as its p99 target
    nodes: bool = True  # Ray's autoscaler on the fake multi-node provider; False: one local Ray
    head_cpus: int = 1  # `ray start` takes whole CPUs
    worker_cpus: int = 1
    max_workers: int = 2
    idle_timeout_s: float = 20.0  # a worker node idle this long is removed
    replica_cpus: float = 0.4  # the ingress (0.1) and one replica of each stage fill the head
    max_replicas: tuple = (2, 3, 2)  # ingress, coarse, fine
    target_ongoing: int = 2  # stage replicas; the ingress holds each request for its whole path: 4× this
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 15.0
    look_back_period_s: float = 5.0
    batch_size: int = 8
    port: int = 8123
    sample_s: float = 0.5
    seed: int = 0


def autoscaling(s: AutoscaleSettings, max_replicas: int, target: int) -> Dict[str, Any]:
    return {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas,
            "target_ongoing_requests": target, "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s,
            "metrics_interval_s": min(1.0, s.look_back_period_s / 2)}


def app_args(s: AutoscaleSettings, eta: float) -> Dict[str, Any]:
    """The split application with the bench's autoscaling overrides (short delays, fractional CPUs)."""
    ingress_max, coarse_max, fine_max = s.max_replicas
    stage = {"num_cpus": s.replica_cpus, "torch_threads": 1, "max_batch_size": s.batch_size}
    args = {"checkpoint": s.checkpoint, "eta": eta, "stages": "split", "shadow_fraction": 0.0,
            "ingress_num_cpus": 0.1, "ingress_autoscaling_config": autoscaling(s, ingress_max, 4 * s.target_ongoing),
            "coarse": {**stage, "autoscaling_config": autoscaling(s, coarse_max, s.target_ongoing)},
            "fine": {**stage, "autoscaling_config": autoscaling(s, fine_max, s.target_ongoing)}}
    if s.slo_mode:
        args.update(latency_slo_ms=s.target_ms, slo_window_s=2.0, slo_check_s=0.5, slo_min_samples=10)
    return args


def image_schedule(s: AutoscaleSettings, times: np.ndarray, bounds: Dict[str, tuple]) -> tuple:
    """η at the `hard_share` quantile of the images' coarse confidences, and for each arrival an image:
    hard (under η) with probability `hard_share`, in the hard phase always."""
    files, labels = labelled_images(1000)
    model = cfvit.load(str(resolve_checkpoint(s.checkpoint))).eval()
    _, conf = pixels_and_confidences(model, files)
    conf = conf.numpy()
    eta = float(np.quantile(conf, s.hard_share))
    hard, easy = np.flatnonzero(conf < eta), np.flatnonzero(conf >= eta)
    if not len(hard) or not len(easy):
        raise ValueError(f"the checkpoint's coarse confidences do not split at the {s.hard_share:g} quantile "
                         "(every image is as confident as the others): no hard images to send")
    rng = np.random.default_rng(s.seed)
    hard_lo = bounds.get("hard", (np.inf, np.inf))[0]
    pick = [rng.choice(hard) if t >= hard_lo or rng.random() < s.hard_share else rng.choice(easy) for t in times]
    return eta, [files[i] for i in pick], labels[pick]


class Sampler:
    """Replicas RUNNING per deployment (Serve's controller) and alive Ray nodes, every `every_s`, in a thread."""

    def __init__(self, app: str, every_s: float):
        self.app, self.every_s, self.samples = app, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def start(self, t0: float) -> "Sampler":
        self.t0 = t0
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def take(self) -> Dict[str, Any]:
        deployments = serve.status().applications[self.app].deployments
        replicas = {}
        for short, name in DEPLOYMENTS.items():
            states = deployments[name].replica_states if name in deployments else {}
            replicas[short] = sum(n for st, n in states.items() if getattr(st, "value", st) == "RUNNING")
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        return {"t": round(time.perf_counter() - self.t0, 2), "replicas": replicas, "nodes": nodes}

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.samples.append(self.take())
            except Exception as e:  # a slow controller must not end the run: note it, sample again
                self.samples.append({"t": round(time.perf_counter() - self.t0, 2), "error": repr(e)[:200]})


def cluster_config(s: AutoscaleSettings, gcs_address: str) -> Dict[str, Any]:
    """The fake multi-node provider's cluster config (the wheel lacks Ray's example.yaml): one worker type."""
    return {
        "cluster_name": "cfvit-autoscale", "max_workers": s.max_workers, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": s.head_cpus}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": s.worker_cpus, "object_store_memory": 150 * 2**20},
                               "node_config": {}, "min_workers": 0, "max_workers": s.max_workers}},
        "upscaling_speed": 1.0, "idle_timeout_minutes": s.idle_timeout_s / 60, "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": []}


class FakeCluster:
    """`ray start --head --block` with the autoscaler on the fake multi-node provider, in its own session and
    temporary folder; closing stops it and every process it started (the worker nodes' raylets too)."""

    def __init__(self, s: AutoscaleSettings):
        self.s, self.proc = s, None
        self.root = Path(tempfile.mkdtemp(prefix="cfvit-as-", dir="/tmp"))  # short: Ray's sockets live here
        self.address = f"{ray.util.get_node_ip_address()}:{free_port()}"

    def __enter__(self) -> "FakeCluster":
        cfg = self.root / "cluster.json"
        cfg.write_text(json.dumps(cluster_config(self.s, self.address)))
        use_token_auth(self.root / "auth_token")  # the cluster's own token: this driver, the head, its nodes
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_TMPDIR": str(self.root), "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        env.pop("RAY_ADDRESS", None)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--autoscaling-config={cfg}",
               f"--port={self.address.rsplit(':', 1)[1]}", f"--num-cpus={self.s.head_cpus}",
               f"--temp-dir={self.root}", "--include-dashboard=false", f"--object-store-memory={300 * 2**20}"]
        self.log = open(self.root / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        stop_process(self.proc, timeout=30)
        for p in family:  # the autoscaler's worker nodes are not in the head's session
            try:
                if p.is_running():
                    p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.log.close()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


    def connect(self, timeout_s: float = 180) -> None:
        """ray.init to the head once its GCS answers; fails with the head's log when `ray start` exits."""
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while not _listening(host, int(port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                tail = (self.root / "head.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the autoscaling cluster's head did not start:\n{tail}")
            time.sleep(1)
        ray.init(address=self.address, log_to_driver=False)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def run_autoscale(s: AutoscaleSettings) -> Dict[str, Any]:
    """Start the cluster, deploy, send the schedule while sampling replicas and nodes; the per-second rows and
    the figures."""
    bounds = phase_bounds(s.durations)
    r = s.rate
    times = arrivals([(d, r * s.step_factor if name == "step" else r) for name, d in zip(bounds, s.durations)
                      if d > 0], s.seed)
    eta, files, labels = image_schedule(s, times, bounds)
    cluster = FakeCluster(s) if s.nodes else None
    started = False
    try:
        if cluster is not None:
            cluster.__enter__()
            cluster.connect()
        else:
            started = start_ray(None)
        serve.start(http_options={"host": "127.0.0.1", "port": s.port}, proxy_location="HeadOnly")
        info = _deploy(app_args(s, eta), "autoscale", s.port)
        url = f"http://127.0.0.1:{s.port}/v1/classify"
        asyncio.run(open_loop(url, files, labels, arrivals([(3.0, r)], s.seed + 1)))  # warm-up, not counted
        sampler = Sampler("autoscale", s.sample_s).start(time.perf_counter())
        try:
            records = asyncio.run(open_loop(url, files, labels, times))
        finally:
            sampler.stop()
    finally:
        if ray.is_initialized() and (started or cluster is not None):
            serve.shutdown()
            ray.shutdown()
        if cluster is not None:
            cluster.close()
    samples = [x for x in sampler.samples if "error" not in x]
    rows = with_samples(per_second(records), samples)
    return {"settings": {**asdict(s), "eta": eta}, "model": info.get("model"), "phases": bounds,
            "target_ms": s.target_ms, "per_second": rows, "samples": sampler.samples,
            "figures": figures(rows, samples, bounds, s.target_ms), **failures(records)}
