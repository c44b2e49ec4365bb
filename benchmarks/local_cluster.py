"""A multi-node Ray cluster on this machine with the services a real one shares: moto's S3 server (the only
storage the nodes share: data, checkpoints), an MLflow server (runs, registered models), and
`ray.cluster_utils.Cluster` nodes (one raylet each, as Ray's own fault-tolerance tests use), the head with
the dashboard so that `cfvit submit` works against it.

Locked down as the Kubernetes manifests are: the Ray nodes run with token authentication (a token of the
stack's own, in a file only its owner reads), and MLflow runs its basic-auth app with an admin whose
password is generated at start, a read-only user (`cfvit-serve`) and an editing user (`cfvit-trainer`),
made by infra/mlflow/mlflow_users.py as the users Job makes them. The nodes' environment carries the
editing user and the S3 keys, as a pod's mounted Secrets and identity would: nothing travels in a
runtime_env.

    python -m benchmarks.local_cluster --nodes 2      # prints the addresses and the variables to export;
                                                      # Ctrl-C stops everything

Each worker node declares `trainer: 1` (one training worker per node with `scaling.worker_resources`) and
`worker: 4` (Serve replicas); the head declares `head: 1` and keeps the drivers. `cfvit bench
train-failover` and `cfvit bench failover` build on it; docs/RELIABILITY.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ray.cluster_utils import Cluster

from benchmarks.serve import png_files
from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from cfvit_common.ray_env import free_port, refresh_auth_state, write_token
from cfvit_common.storage import s3_client

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
WORKER_NODE_RESOURCES = {"trainer": 1, "worker": 4}
USERS_SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "mlflow_users.py"
TRAINER, SERVER = "cfvit-trainer", "cfvit-serve"  # the users infra/mlflow makes


# ------------------------------------------------------------------ processes
def wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None) -> None:
    """Until `url` answers below 500; fails early (with the log's tail) when `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:  # an answer, though not a 2xx: the server is up
            if e.code < 500:
                return
            time.sleep(0.3)
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a server started in its own session (the whole group: mlflow forks workers); SIGCONT first in
    case it was paused."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def start_mlflow_server(root: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`mlflow server` (sqlite backend, proxied local artifacts under `root`) on a free loopback port."""
    port = free_port()  # the timeout: slow on a busy 2-core box
    return _start_server(_mlflow_command(root, port), root, "server.log", port, "/health", timeout)


@dataclass(frozen=True)
class MlflowUser:
    username: str
    password: str

    def env(self) -> Dict[str, str]:
        """How MLflow's clients take a user: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def write(self, folder: Path) -> Path:
        """The user as infra/mlflow's Secrets mount it: files `username` and `password`, owner-only."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, value in (("username", self.username), ("password", self.password)):
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value + "\n")
        return folder


def start_mlflow_auth_server(root: Path, timeout: float = 300) -> tuple[subprocess.Popen, str, Dict[str, MlflowUser]]:
    """`mlflow server --app-name basic-auth` as infra/mlflow runs it: every request but /health needs a user,
    `default_permission = READ`, the admin from the environment with a password generated here (never
    MLflow's old default), then infra/mlflow/mlflow_users.py makes `cfvit-trainer` and `cfvit-serve`
    (non-admins). Returns the server, its URL and the users by name ("admin", TRAINER, SERVER)."""
    root.mkdir(parents=True, exist_ok=True)
    users = {name: MlflowUser(name, secrets.token_urlsafe(24)) for name in ("admin", TRAINER, SERVER)}
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    clean = {k: v for k, v in os.environ.items() if k not in MlflowUser("", "").env()}
    env = {**clean, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": users["admin"].password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    port = free_port()
    proc, url = _start_server([*_mlflow_command(root, port), "--app-name", "basic-auth"], root, "server.log", port,
                              "/health", timeout, env=env)
    folders = {name: user.write(root / "users" / name) for name, user in users.items()}
    made = subprocess.run([sys.executable, str(USERS_SCRIPT), "--tracking-uri", url, "--admin", str(folders["admin"]),
                           "--user", str(folders[TRAINER]), "--user", str(folders[SERVER]), "--timeout", "60"],
                          capture_output=True, text=True, timeout=300, env=clean)
    if made.returncode != 0:
        stop_process(proc)
        raise RuntimeError(f"creating the MLflow users failed: {made.stderr[-2000:]}")
    return proc, url, users


def mlflow_http(method: str, url: str, body: Optional[dict] = None,
                user: Optional[MlflowUser] = None) -> tuple[int, dict]:
    """One raw request to an MLflow server (REST API), as `user` (basic auth) or anonymous: (status, JSON)."""
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + b64encode(f"{user.username}:{user.password}".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text or b"{}")
    except ValueError:
        return status, {"text": text.decode(errors="replace")[:500]}


def _mlflow_command(root: Path, port: int) -> List[str]:
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]


def start_s3_server(root: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """moto's S3 server as its own process (so it can be paused with SIGSTOP) on a free loopback port."""
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return _start_server(cmd, root, "s3.log", port, "/moto-api/", timeout)


def _start_server(cmd: List[str], root: Path, log_name: str, port: int, health: str,
                  timeout: float, env: Optional[Dict[str, str]] = None) -> tuple[subprocess.Popen, str]:
    """Run `cmd` in its own session from `root` (output to `root/log_name`) until `health` answers; its URL."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / log_name
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}{health}", timeout=timeout, proc=proc, log=log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


# ------------------------------------------------------------------ data
def class_folders(names) -> List[str]:
    """ImageFolder class folder names whose sorted order is the label order: `00_T-shirt_top`, …"""
    return [f"{i:02d}_{n.replace('/', '_').replace(' ', '_')}" for i, n in enumerate(names)]


def upload_fashion_mnist(client, bucket: str, prefix: str, split: str = "train", n: int = 256,
                         offset: int = 0) -> List[str]:
    """Put `n` Fashion-MNIST images as PNGs in ImageFolder layout, s3://bucket/prefix/<class>/<i>.png.
    Returns the class folder names (label order)."""

    images, labels = load_fashion_mnist(split)
    folders = class_folders(FASHION_MNIST_CLASSES)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for i, body in zip(range(offset, offset + n), png_files(images[offset:offset + n])):
        client.put_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{folders[labels[i]]}/{i:06d}.png", Body=body)
    return folders


# ------------------------------------------------------------------ the stack
class LocalStack:
    """S3 + MLflow + a head and `nodes` worker nodes. Use as a context manager; everything it started is
    stopped on exit, nothing else (no `ray stop`)."""

    def __init__(self, nodes: int = 2, node_cpus: int = 2, head_cpus: int = 1, root: Optional[Path] = None,
                 services: bool = True):
        self.nodes, self.node_cpus, self.head_cpus, self.services = nodes, node_cpus, head_cpus, services
        self._own_root = root is None  # a temp folder it made is removed on close
        self.root = Path(root or tempfile.mkdtemp(prefix="cfvit-stack-"))
        self.cluster, self.workers, self._procs = None, [], []
        self.s3_proc = self.s3_url = self.mlflow_uri = self.dashboard_url = None
        self.mlflow_users: Dict[str, MlflowUser] = {}
        self.token_path = self.root / "ray" / "auth_token"
        self._saved_env: Dict[str, Optional[str]] = {}

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:

        # The nodes' processes inherit these: every Ray worker reaches S3 and MLflow as a pod with credentials
        # would (the S3 keys, the editing MLflow user), the cluster's token, and jobs run this interpreter
        # (`python` from PATH).
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(write_token(self.token_path))}
        if self.services:
            self.s3_proc, self.s3_url = start_s3_server(self.root / "s3")
            self._procs.append(self.s3_proc)
            proc, self.mlflow_uri, self.mlflow_users = start_mlflow_auth_server(self.root / "mlflow")
            self._procs.append(proc)
            env.update(AWS_TEST_ENV, AWS_ENDPOINT_URL=self.s3_url, MLFLOW_TRACKING_URI=self.mlflow_uri,
                       **self.mlflow_users[TRAINER].env())
        self._set_env(env)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # the drivers here join this cluster, with its token
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ.pop(name, None)
        refresh_auth_state()  # this process's own Ray client: token mode, the stack's token
        port = free_port()
        # Every port the head opens is chosen free: with Ray's defaults, another Ray on the machine (a test
        # session) holds the job agent's port 52365 and jobs are refused ("No available agent").
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.head_cpus, "resources": {"head": 1}, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": port, "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()})
        self.dashboard_url = f"http://127.0.0.1:{port}"
        for _ in range(self.nodes):
            self.add_node()
        self.cluster.wait_for_nodes()

    def add_node(self):
        """A worker node, as a cluster autoscaler would add one (must run in the main thread)."""
        node = self.cluster.add_node(num_cpus=self.node_cpus, resources=dict(WORKER_NODE_RESOURCES))
        self.workers.append(node)
        return node

    def kill_node(self, node_id: str) -> None:
        """Remove the worker node with this id without warning: its raylet and every process on it die."""
        node = next((n for n in self.workers if n.node_id == node_id), None)
        if node is None:
            raise ValueError(f"no worker node {node_id} in this cluster (the head cannot be removed)")
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def pause_s3(self) -> None:
        os.kill(self.s3_proc.pid, signal.SIGSTOP)

    def resume_s3(self) -> None:
        os.kill(self.s3_proc.pid, signal.SIGCONT)

    def s3_client(self):
        return s3_client()  # this stack's endpoint and credentials are in the environment

    def exports(self) -> Dict[str, str]:
        """What a shell needs to use this stack (`cfvit submit`, `cfvit train --set …`), the editing MLflow user
        included."""
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.s3_url, "MLFLOW_TRACKING_URI": self.mlflow_uri,
                **(self.mlflow_users[TRAINER].env() if self.mlflow_users else {}),
                "RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def close(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            self.cluster = None
            for proc in reversed(self._procs):
                stop_process(proc)
            self._procs.clear()
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            refresh_auth_state()

    def _set_env(self, env: Dict[str, str]) -> None:
        for k, v in env.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="A multi-node Ray cluster with S3 (moto) and MLflow on this machine.")
    p.add_argument("--nodes", type=int, default=2, help="worker nodes besides the head (default 2)")
    p.add_argument("--node-cpus", type=int, default=2, help="logical CPUs of each worker node")
    args = p.parse_args(argv)
    with LocalStack(nodes=args.nodes, node_cpus=args.node_cpus) as stack:
        print(f"Ray head (dashboard, jobs): {stack.dashboard_url}   nodes: 1 head + {args.nodes} workers")
        print(f"S3 (moto): {stack.s3_url}   MLflow: {stack.mlflow_uri}   (their files: {stack.root}, removed "
              f"on exit)")
        env_file = stack.root / "stack.env"  # owner-only: it holds the editing MLflow user's password
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in stack.exports().items())
        print(f"set -a; . {env_file}; set +a      # Ray token, MLflow user {TRAINER}, S3 keys, addresses")
        print("Ctrl-C stops everything.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping…")


if __name__ == "__main__":
    main()
