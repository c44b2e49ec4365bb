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

Errors (unreachable cluster, unknown job id, bad ``--env``, a refused token) are one line on stderr and
exit code 1.

What crosses to the cluster: the Ray token (``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``
names, else ``~/.ray/auth_token``: Ray's order), only over https or to a loopback address (a port-forward,
``ray dashboard``'s tunnel) unless ``--allow-insecure-token``; ``--env`` settings, never a credential (Ray
keeps a job's runtime_env in its GCS and shows it on the dashboard); the working dir without secrets
(``.env``, ``*.pem``, ``.aws/``, ``.ray/``, …).
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

# Never upload these with the working dir: Ray also honours .gitignore, but a checkout without one
# (or a copied tree) would otherwise ship a virtualenv, a local MLflow store or someone's keys to the cluster.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.egg-info", "mlruns", "mlflow.db", "outputs",
                    ".env", ".env.*", "*.pem", ".aws/", ".ray/", ".mlflow/", ".netrc"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0  # how long a submit waits for a just-started cluster's job agent
# A variable that holds a secret, by its name (not one that says where a secret is: *_PATH, *_FILE).
CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|_KEY$", re.I)
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it (default "
              "~/.ray/auth_token); on KubeRay the token is the Secret named after the cluster, key auth_token "
              "(infra/README.md, \"The Ray token\")")


class SubmitError(Exception):
    """A user-facing error: printed as one line, no traceback."""


# --------------------------------------------------------------------------- pure helpers


def looks_like_credential(name: str) -> bool:
    return bool(CREDENTIAL_NAME.search(name)) and not name.upper().endswith(("_PATH", "_FILE"))


def check_env_names(env: Dict[str, str]) -> None:
    """Refuse credentials in a job's env_vars, and say where they go instead."""
    secret = sorted(k for k in env if looks_like_credential(k))
    if secret:
        raise SubmitError(
            f"refusing --env {', '.join(secret)}: a job's runtime_env is kept in the cluster's GCS and shown on its "
            "dashboard. Give the cluster's nodes the credential instead (Kubernetes: a Secret in the pod's env or a "
            "mounted file, S3 through the service account's IAM role; EC2: the instance profile, a file on the "
            "nodes) and pass only settings with --env (MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, ...)")


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
        check_env_names(env)
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
    """The Ray token as a bearer header, found as Ray finds it: ``RAY_AUTH_TOKEN``, else the file
    ``RAY_AUTH_TOKEN_PATH`` names (unreadable: an error, as in Ray), else ``~/.ray/auth_token``.

    Ray's own client sends a token only when ``RAY_AUTH_MODE=token`` is exported; this one sends it whenever
    one exists, unless ``RAY_AUTH_MODE=disabled``. Clusters without authentication ignore the header.
    """
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token ({exc.strerror})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
    if not token:
        try:
            token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        except OSError:
            return {}
    return {"Authorization": f"Bearer {token}"} if token else {}


def private_transport(url: str) -> bool:
    """Whether a header sent to `url` stays off the network in clear: https, or a loopback address."""
    if url == "auto":  # the cluster started on this machine
        return True
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").lower()
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def connect(address: Optional[str], allow_insecure_token: bool = False):
    """A connected JobSubmissionClient, or SubmitError with a one-line reason. A Ray token is sent only over
    https or to a loopback address, unless `allow_insecure_token`."""
    url = resolve_address(address)
    headers = auth_headers()
    if headers and not allow_insecure_token and not private_transport(url):
        raise SubmitError(
            f"refusing to send the Ray token to {url}: over plain http to another host it crosses the network in "
            "clear. Use https://, or reach the cluster on 127.0.0.1 (kubectl port-forward, `ray dashboard`, an SSH "
            "tunnel); --allow-insecure-token sends it anyway, RAY_AUTH_MODE=disabled sends none")
    try:
        return JobSubmissionClient(url, headers=headers or None)
    except AuthenticationError as exc:
        raise SubmitError(_refused(url, exc)) from None
    except Exception as exc:  # ConnectionError, or ValueError for a malformed address
        raise SubmitError(f"cannot reach the Ray job server at {url}: {_short(exc)}") from None


def _refused(url: str, exc: AuthenticationError) -> str:
    """A 401/403 from the cluster, as what to do about it."""
    why = "the token was not accepted" if "Authentication failed" in str(exc) else "it needs a Ray token"
    return f"the Ray cluster at {url} refused the request ({why}): {TOKEN_HELP}"


def _call(client, what: str, job_id: Optional[str], fn, *args):
    """Run a client call, turning Ray's HTTP errors into SubmitError (404 → unknown job, 401/403 → the token)."""
    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise SubmitError(_refused(client.get_address(), exc)) from None
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
