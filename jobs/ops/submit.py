"""`cfvit submit`: run training/tuning jobs on a Ray cluster through Ray's job submission API.

A thin wrapper on :class:`ray.job_submission.JobSubmissionClient` (the dashboard's HTTP API, port
8265): upload the project as the job's ``working_dir``, pass environment variables, follow the logs
and report the final status.

    cfvit submit run --address http://127.0.0.1:8265 --env MLFLOW_TRACKING_URI=http://mlflow:5000 \\
        -- python -m jobs.train --config jobs/configs/imagenet_deit_s.yaml
    cfvit submit status raysubmit_XXXX      # address from RAY_ADDRESS
    cfvit submit logs raysubmit_XXXX --follow
    cfvit submit stop raysubmit_XXXX
    cfvit submit list

Errors (unreachable cluster, unknown job id, bad ``--env``) are one line on stderr and exit code 1.
Ray is imported inside the functions so that ``cfvit --help`` stays fast.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ray.job_submission import JobSubmissionClient

# Never upload these with the working dir: Ray also honours .gitignore, but a checkout without one
# (or a copied tree) would otherwise ship a virtualenv or local MLflow store to the cluster.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.egg-info", "mlruns", "mlflow.db", "outputs"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0  # how long a submit waits for a just-started cluster's job agent


class SubmitError(Exception):
    """A user-facing error: printed as one line, no traceback."""


# --------------------------------------------------------------------------- pure helpers


def parse_env(pairs: Optional[List[str]]) -> Dict[str, str]:
    """``["K=V", ...]`` → ``{"K": "V"}``; the value may contain ``=``, the key may not be empty."""
    env: Dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key.strip()] = value
    return env


def build_runtime_env(
    working_dir: Optional[str],
    env: Dict[str, str],
    pip: Optional[List[str]] = None,
    excludes: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """The job's runtime environment: working dir (uploaded by the client), env vars, pip packages."""
    runtime_env: Dict[str, Any] = {}
    if working_dir:
        path = Path(working_dir).expanduser().resolve()
        if not path.is_dir():
            raise SubmitError(f"working dir {working_dir!r} is not a directory")
        runtime_env["working_dir"] = str(path)
        runtime_env["excludes"] = DEFAULT_EXCLUDES + list(excludes or [])
    if env:
        runtime_env["env_vars"] = dict(env)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def resolve_address(address: Optional[str]) -> str:
    """``--address`` or ``RAY_ADDRESS``; a bare ``host:port`` is taken as the dashboard's HTTP address."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if "://" not in address and address != "auto":
        address = f"http://{address}"
    return address


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- client calls


def auth_headers() -> Dict[str, str]:
    """Bearer token for clusters with Ray token authentication (on by default since Ray 2.5x).

    Ray's client only sends a token when ``RAY_AUTH_MODE=token`` is exported; we also send it when a
    token exists (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, where ``ray start``
    keeps it) unless ``RAY_AUTH_MODE=disabled``. Clusters without auth ignore the header.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            return {}
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: Optional[str]):
    """A connected JobSubmissionClient, or SubmitError with a one-line reason."""
    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers() or None)
    except Exception as exc:  # ConnectionError, or ValueError for a malformed address
        reason = _short(exc)
        if "Authentication" in reason:
            reason += " (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)"
        raise SubmitError(f"cannot reach the Ray job server at {url}: {reason}") from None


def _call(client, what: str, job_id: Optional[str], fn, *args):
    """Run a client call, turning Ray's HTTP errors into SubmitError (404 → unknown job)."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        if job_id is not None and ("404" in str(exc) or "does not exist" in str(exc)):
            raise SubmitError(f"no job {job_id!r} on {client.get_address()}") from None
        raise SubmitError(f"{what} failed: {_short(exc)}") from None
    except ConnectionError as exc:
        raise SubmitError(f"lost the connection to {client.get_address()}: {_short(exc)}") from None


def submit(
    client,
    entrypoint: List[str],
    runtime_env: Dict[str, Any],
    submission_id: Optional[str] = None,
    metadata: Optional[Dict[str, str]] = None,
) -> str:
    """Submit ``entrypoint`` (argv list, shell-quoted for the job) and return the submission id."""
    if not entrypoint:
        raise SubmitError("no entrypoint: put the command after `--`, e.g. `-- python -m jobs.train --config C`")
    command = entrypoint[0] if len(entrypoint) == 1 else shlex.join(entrypoint)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return _call(
                client,
                "submit",
                None,
                lambda: client.submit_job(
                    entrypoint=command,
                    runtime_env=runtime_env or None,
                    submission_id=submission_id,
                    metadata=metadata,
                ),
            )
        except SubmitError as exc:
            # A cluster that has just started answers 500 "No available agent to submit job, please try
            # again later" until its job agent registers: nothing was created, so asking again is safe.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def status(client, job_id: str) -> str:
    return str(_call(client, "status", job_id, client.get_job_status, job_id))


def info(client, job_id: str):
    return _call(client, "status", job_id, client.get_job_info, job_id)


def logs(client, job_id: str) -> str:
    return _call(client, "logs", job_id, client.get_job_logs, job_id)


def stop(client, job_id: str) -> bool:
    return bool(_call(client, "stop", job_id, client.stop_job, job_id))


def list_jobs(client):
    return _call(client, "list", None, client.list_jobs)


def follow(client, job_id: str, out=None) -> None:
    """Stream the job's logs until it reaches a terminal state (websocket ``tail_job_logs``)."""
    info(client, job_id)  # fail fast with "no job" rather than a websocket error

    out = out or sys.stdout  # looked up per call: CLI runners swap sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as exc:
        raise SubmitError(f"log stream for {job_id} broke: {_short(exc)}") from None


def wait(client, job_id: str, timeout_s: float = 30.0) -> str:
    """Poll until the status is terminal; the log stream can close a moment before it flips."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(client, job_id)
        if current in TERMINAL or time.monotonic() > deadline:
            return current
        time.sleep(0.5)
