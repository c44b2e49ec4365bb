"""The one way the jobs start or join Ray, with Ray's token authentication on for what they start.

A local Ray's GCS listens on the machine's address, not only on loopback: without a token, anyone who
can reach that port can run code as this user. Every Ray instance the project starts therefore runs
with `RAY_AUTH_MODE=token`, the token taken the way Ray takes it (`RAY_AUTH_TOKEN`, else the file
`RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token`, made owner-only when missing).
`RAY_AUTH_MODE=disabled` turns it off.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import socket
from pathlib import Path
from typing import Optional

import ray
from ray._raylet import AuthenticationTokenLoader, Config  # Ray's own token state, refreshed below

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
logger = logging.getLogger(__name__)


def joins_cluster(address: Optional[str] = None) -> bool:
    """Whether `init_ray(address)` joins a running cluster (`address`, else $RAY_ADDRESS) rather than starting one."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: Optional[str] = None, *, min_cpus: Optional[float] = None, num_cpus: Optional[int] = None,
             log_to_driver: bool = True, private: bool = False) -> bool:
    """Join `address` (else $RAY_ADDRESS), else start a local Ray with `num_cpus` logical CPUs, or at least
    `min_cpus` (never fewer than the machine's cores), with token authentication unless
    `RAY_AUTH_MODE=disabled`. Returns True when this process started Ray (and so must stop it).

    `private=True` starts a new local instance even if another one runs on this machine (`cfvit serve`)."""
    if ray.is_initialized():
        return False
    if joins_cluster(address):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return False
    cpus = num_cpus or (max(os.cpu_count() or 1, int(math.ceil(min_cpus))) if min_cpus else None)
    if local_auth_wanted():
        use_token_auth(default_token_path() if token_source() is None else None)
    else:
        logger.warning("Ray token authentication is off (RAY_AUTH_MODE=%s): whoever reaches this machine's Ray "
                       "ports can run code as this user", os.environ.get(AUTH_MODE_ENV))
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls: without it
    # the terminal fills with "Failed to query Ray Train Controller actor state". Its workers are told
    # where it is: with two Ray instances on one machine, "auto" would not know which to ask.
    port = free_port()
    ray.init(address="local" if private else None, num_cpus=cpus, include_dashboard=True, dashboard_port=port,
             log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    return True


def local_auth_wanted() -> bool:
    """Token authentication for a Ray this process starts: on unless RAY_AUTH_MODE says otherwise."""
    return os.environ.get(AUTH_MODE_ENV, "token").strip().lower() == "token"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_source() -> Optional[str]:
    """Where Ray would take the token from (the variable, or the file), or None when there is none."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV
    if os.environ.get(TOKEN_PATH_ENV):
        return os.environ[TOKEN_PATH_ENV]
    path = default_token_path()
    return str(path) if path.is_file() and path.read_text().strip() else None


def write_token(path: Path) -> Path:
    """A new random token (256 bits, as `ray get-auth-token --generate` makes) in a file only its owner
    can read; an existing file is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def use_token_auth(token_path: Optional[Path] = None) -> None:
    """Token authentication for this process and every process it starts from now on: RAY_AUTH_MODE=token
    and, given `token_path`, the token from that file (made when missing). Ray reads the mode into its
    config and caches the token once per process; both are refreshed here, as `ray.init` itself does when
    it turns authentication on."""
    os.environ[AUTH_MODE_ENV] = "token"
    if token_path is not None:
        write_token(Path(token_path))
        if Path(token_path) != default_token_path():
            os.environ[TOKEN_PATH_ENV] = str(token_path)
            os.environ.pop(TOKEN_ENV, None)
    refresh_auth_state()


def refresh_auth_state() -> None:
    """Make this process's Ray see the RAY_AUTH_* variables as they are now."""
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
