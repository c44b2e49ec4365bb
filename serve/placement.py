"""Deploying the application so that a cluster that cannot place it says so: what each deployment's starting
replicas reserve (`app_demand`), refused at once when a cluster of fixed size cannot hold it (`check_fits`),
and a bounded wait for the application to run that ends with Serve's own word on each deployment, the
resources asked for and those the cluster has (`deploy`). Without it `serve.run` waits for ever, logging
"taken more than 30s to be scheduled" every 30 s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import ray
from ray import serve
from ray.serve.schema import ApplicationStatus

from .settings import AppArgs, StageOptions

INGRESS = "CFViTIngress"
STAGES = {"split": (("CoarseStage", "coarse"), ("FineStage", "fine")), "fused": (("FusedStage", "fused"),),
          "backbone": (("BackboneStage", "coarse"),)}  # the deployment each topology runs, and its options
READY_TIMEOUT_S = 300.0  # loading a large checkpoint from S3 or MLflow takes a while; a placement never comes


class AppDoesNotFit(RuntimeError):
    """The Serve application cannot be placed (or did not start) on this cluster."""


@dataclass(frozen=True)
class Reservation:
    deployment: str
    replicas: int  # replicas Serve starts with
    per_replica: dict[str, float]  # Ray resources of one replica

    def describe(self) -> str:
        return f"{self.deployment} {self.replicas} × {_fmt(self.per_replica)}"


def _replicas(autoscaling: Optional[dict], fixed: int, scaled_up: bool) -> int:
    if not autoscaling:
        return fixed
    if scaled_up:
        return int(autoscaling.get("max_replicas", 1))
    return int(autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1) or 0)


def _resources(cpus: float, gpus: float, custom: dict) -> dict[str, float]:
    out = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}), **{k: float(v) for k, v in custom.items()}}
    return {k: v for k, v in out.items() if v}


def app_demand(args: AppArgs, scaled_up: bool = False) -> list[Reservation]:
    """What the application reserves when it starts (each deployment's starting replicas × their resources),
    or, `scaled_up`, with every deployment at its max_replicas."""
    out = []
    for name, block in STAGES[args.stages]:
        o: StageOptions = getattr(args, block)
        out.append(Reservation(name, _replicas(o.autoscaling_config, o.num_replicas, scaled_up),
                               _resources(o.num_cpus, o.num_gpus, o.resources)))
    out.append(Reservation(INGRESS, _replicas(args.ingress_autoscaling_config, 1, scaled_up),
                           _resources(args.ingress_num_cpus, 0, args.ingress_resources)))
    return out


def total(demand: list[Reservation]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in demand:
        for k, v in r.per_replica.items():
            out[k] = out.get(k, 0.0) + r.replicas * v
    return out


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}" if res else "{}"


def _asked(demand: list[Reservation]) -> str:
    return f"{_fmt(total(demand))} ({'; '.join(r.describe() for r in demand)})"


def unplaceable(demand: list[Reservation], nodes: list[dict[str, float]]) -> list[str]:
    """Why `demand` cannot be placed on nodes of these total resources, or [] when it can: the sum over the
    cluster, and each replica within one node. Ignores what other work holds now (the wait sees that)."""
    have: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            have[k] = have.get(k, 0.0) + v
    eps = 1e-9
    why = [f"{k} {v:g} (the cluster has {have.get(k, 0):g})" for k, v in sorted(total(demand).items())
           if v > have.get(k, 0.0) + eps]
    for r in demand:
        if r.replicas and not any(all(n.get(k, 0.0) + eps >= v for k, v in r.per_replica.items()) for n in nodes):
            why.append(f"one {r.deployment} replica needs {_fmt(r.per_replica)}, more than any one node has")
    return why


def check_fits(demand: list[Reservation], nodes: list[dict[str, float]], name: str = "cfvit") -> None:
    """Raise AppDoesNotFit, with the numbers, when a cluster of these nodes can never hold `demand`."""
    why = unplaceable(demand, nodes)
    if why:
        raise AppDoesNotFit(f"the Serve application {name!r} asks for {_asked(demand)}; too much: {'; '.join(why)}. "
                            "Lower the replicas' num_cpus / num_gpus (coarse, fine, fused, ingress_num_cpus) or "
                            "their starting replicas, or add nodes")


def cluster_nodes() -> list[dict[str, float]]:
    """Each live node's total Ray resources."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def deploy(app, args: AppArgs, name: str = "cfvit", route_prefix: str = "/", *, fixed_cluster: bool,
           timeout_s: float = READY_TIMEOUT_S, poll_s: float = 1.0) -> None:
    """Deploy `app` (built from `args`) and wait until Serve reports it RUNNING. `fixed_cluster` (a Ray this
    process started): an application that can never fit is refused before it is deployed. Raises
    AppDoesNotFit when it fails to deploy or is not running after `timeout_s`, with Serve's messages."""
    demand = app_demand(args)
    if fixed_cluster:
        check_fits(demand, cluster_nodes(), name)
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise AppDoesNotFit(f"the Serve application {name!r} is {status.status.value}: {_messages(status)}")
        if time.monotonic() > deadline:
            raise AppDoesNotFit(
                f"the Serve application {name!r} is not running after {timeout_s:.0f} s"
                + (f" ({status.status.value}: {_messages(status)})" if status is not None else "")
                + f". It asks for {_asked(demand)}; the cluster has {_of(ray.cluster_resources(), demand)}, "
                f"{_of(ray.available_resources(), demand)} of it free now")
        time.sleep(poll_s)


def _of(resources: dict, demand: list[Reservation]) -> str:
    """The cluster's amounts of the resources the application asks for (not memory, node labels, …)."""
    return _fmt({k: float(resources.get(k, 0.0)) for k in total(demand)})


def _messages(status) -> str:
    parts = [status.message] if status.message else []
    for dep, d in status.deployments.items():
        if d.message:
            parts.append(f"{dep} {d.status.value}: {d.message}")
    return " | ".join(p.strip() for p in parts) or "no message from Serve"
