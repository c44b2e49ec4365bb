"""Create or update the MLflow basic-auth users that the cluster's clients log in as.

Run by the Job in infra/mlflow/users-job.yaml (inside the cfvit-mlflow image) once the server answers.
Safe to re-run: a user that exists gets the password from its folder, which is how passwords rotate.
Each folder holds the files `username` and `password` (a mounted Kubernetes Secret); the admin's folder
gives the credentials the calls are made with. Every user set here is left a non-admin: what it may do
is the server's default permission (basic_auth.ini) plus what it creates or is granted.

    python mlflow_users.py --tracking-uri http://mlflow:5000 --admin /etc/mlflow-admin \
        --user /etc/mlflow-users/trainer --user /etc/mlflow-users/serve
"""
from __future__ import annotations

import argparse
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient


def read_credentials(folder: Path) -> Tuple[str, str]:
    """(username, password) from `folder/username` and `folder/password`; refuses empty ones."""
    try:
        username = (folder / "username").read_text().strip()
        password = (folder / "password").read_text().strip()
    except OSError as err:
        raise SystemExit(f"{folder}: cannot read the credentials ({err})") from err
    if not username or not password:
        raise SystemExit(f"{folder}: empty username or password")
    return username, password


def wait_for_server(tracking_uri: str, timeout_s: float) -> None:
    """Poll the server's /health (open without credentials) until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{tracking_uri}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{tracking_uri}/health did not answer within {timeout_s:.0f} s")
        time.sleep(2)


def ensure_user(client: AuthServiceClient, username: str, password: str) -> str:
    """Create `username`, or set its password if it exists; either way not an admin. What was done."""
    try:
        client.create_user(username, password)
        done = "created"
    except RestException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(username, password)
        done = "password updated"
    client.update_user_admin(username, False)
    return done


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--admin", type=Path, required=True, help="folder with the admin's username/password")
    parser.add_argument("--user", type=Path, action="append", required=True,
                        help="folder with a user's username/password (repeat for each user)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("--tracking-uri or MLFLOW_TRACKING_URI is required")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    tracking_uri = args.tracking_uri.rstrip("/")
    admin_name, admin_password = read_credentials(args.admin)
    users = [read_credentials(folder) for folder in args.user]
    if admin_name in {name for name, _ in users}:
        raise SystemExit(f"user {admin_name!r} is the admin: give the clients users of their own")
    # The auth client sends the credentials MLflow's clients read from these variables.
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin_name, admin_password
    wait_for_server(tracking_uri, args.timeout)
    client = AuthServiceClient(tracking_uri)
    for name, password in users:
        try:
            done = ensure_user(client, name, password)
        except MlflowException as err:  # the server's answer: a too short password, 401/403 for the admin
            raise SystemExit(f"{name}: {err.message}") from err
        print(f"{name}: {done}", flush=True)


if __name__ == "__main__":
    main()
