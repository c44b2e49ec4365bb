"""`cfvit serve`: start (or join) Ray, deploy the application, block, and shut down cleanly on SIGINT/SIGTERM."""
from __future__ import annotations

import signal
import sys
import time
from typing import Optional

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from cfvit_common.checkpoints import pin_checkpoint, resolve_checkpoint
from cfvit_common.ray_env import free_port, init_ray, joins_cluster

from .app import build_app
from .grpc_api import SERVICER_FUNCTION
from .placement import READY_TIMEOUT_S, deploy
from .request_path import apply_profile, profile_title
from .settings import AppArgs


class _Stop(Exception):
    """Raised in the main thread by the SIGINT/SIGTERM handler."""


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


def start_ray(address: Optional[str], num_cpus: Optional[int] = None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a private local instance (never
    silently joining someone else's). Returns True when this process started Ray (and so must stop it)."""

    return init_ray(address, num_cpus=num_cpus, log_to_driver=False, private=True)


def serve_forever(app_args: AppArgs, host: str, port: int, address: Optional[str] = None,
                  num_cpus: Optional[int] = None, name: str = "cfvit", echo=print,
                  ready_timeout_s: float = READY_TIMEOUT_S, grpc_port: Optional[int] = None,
                  request_path: str = "default") -> None:
    """Serve until SIGINT/SIGTERM; `grpc_port`: also the gRPC API (serve/proto/cfvit.proto) on that port;
    `request_path`: the profile of serve/request_path.py for a Ray started here (a joined cluster keeps the
    one its processes were started with). Raises AppDoesNotFit when the cluster cannot place the application
    (at once on a Ray started here, else after `ready_timeout_s`), having stopped what it started."""
    # Signals raise in the main thread from here on; a second signal during shutdown is ignored so the
    # clean-up finishes (SIGKILL remains for the impatient).
    # The checkpoint first, before anything starts: an alias pinned to its version, downloaded into this node's
    # cache (the local replicas load it from there) and, for a registered version, checked against its digests.
    app_args = app_args.model_copy(update={"checkpoint": pin_checkpoint(app_args.checkpoint)})
    resolve_checkpoint(app_args.checkpoint)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    started = False
    try:
        joining = joins_cluster(address)
        if not joining:
            apply_profile(request_path, free_port)
        started = start_ray(address, num_cpus)
        echo("request path: as the joined cluster's Ray processes were started (serve/request_path.py)"
             if joining else profile_title(request_path))
        # Ray's core installs its own (aborting) SIGTERM handler in ray.init: take the signals back.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _raise_stop)
        # The proxy's own limit, a second after the application's (which answers 408 as JSON), catches what
        # never reaches an ingress replica (a queue in front of busy replicas).
        grpc_options = (gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION])
                        if grpc_port else None)
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": app_args.request_timeout_s + 1},
                    grpc_options=grpc_options)
        deploy(build_app(app_args), app_args, name, "/", fixed_cluster=started, timeout_s=ready_timeout_s)
        url = f"http://{host}:{port}/"
        echo(f"CF-ViT is serving at {url}  (API docs: {url}docs) — Ctrl-C to stop")
        if grpc_port:
            echo(f"gRPC: cfvit.v1.Classifier/Classify at {host}:{grpc_port} (serve/grpc_client.py)")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt) as e:
        echo(f"received {e or 'SIGINT'}: shutting down")
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                if started:
                    serve.shutdown()
                else:
                    serve.delete(name)
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
            for s, h in previous.items():
                signal.signal(s, h)
        echo("stopped")
        sys.stdout.flush()
