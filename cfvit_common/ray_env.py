"""The one way the jobs start or join Ray."""
from __future__ import annotations

import math
import os
import socket
from typing import Optional

import ray


def init_ray(address: Optional[str] = None, *, min_cpus: Optional[float] = None, num_cpus: Optional[int] = None,
             log_to_driver: bool = True, private: bool = False) -> bool:
    """Join `address` (else $RAY_ADDRESS), else start a local Ray with `num_cpus` logical CPUs, or at least
    `min_cpus` (never fewer than the machine's cores). Returns True when this process started Ray (and so
    must stop it).

    `private=True` starts a new local instance even if another one runs on this machine (`cfvit serve`)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    cpus = num_cpus or (max(os.cpu_count() or 1, int(math.ceil(min_cpus))) if min_cpus else None)
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls: without it
    # the terminal fills with "Failed to query Ray Train Controller actor state". Its workers are told
    # where it is: with two Ray instances on one machine, "auto" would not know which to ask.
    port = free_port()
    ray.init(address="local" if private else None, num_cpus=cpus, include_dashboard=True, dashboard_port=port,
             log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
