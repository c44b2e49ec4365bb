"""`cfvit bench failover`: the Serve app on a multi-node Ray cluster on this machine, under steady load, loses a
whole node; how many requests fail, what the clients see, and how long until every replica runs again.

The cluster is benchmarks/local_cluster.py's (`ray.cluster_utils.Cluster`, one raylet per node, as Ray's own
fault-tolerance tests do; no S3 or MLflow needed here): a
head (the controller, the HTTP proxy and the ingress, pinned by a `head` resource) and two worker nodes
(`worker` resource), each coarse and fine replica on its own worker node (`max_replicas_per_node: 1`). After
`before_s` of load from `clients` closed-loop clients, worker node B is removed without warning (its raylet
and every process on it killed); a replacement node joins at once, as a cluster autoscaler would add one,
and Serve restarts the lost replicas there. Every request is booked with its start, end, status and error.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List, Optional

import httpx
import numpy as np
import ray
from ray import serve
from ray.util.state import list_actors

from benchmarks.burst import labelled_images
from benchmarks.local_cluster import LocalStack
from cfvit_common.ray_env import free_port
from serve.app import build_app


def app_args(checkpoint: str, eta: float, stages: str = "split") -> Dict[str, Any]:
    stage = {"num_cpus": 0.5, "torch_threads": 1, "autoscaling_config": None, "num_replicas": 2,
             "max_replicas_per_node": 1, "resources": {"worker": 1}, "max_batch_size": 16}
    args: Dict[str, Any] = {"checkpoint": checkpoint, "eta": eta, "stages": stages, "ingress_num_cpus": 0,
                            "ingress_resources": {"head": 0.01}, "ingress_autoscaling_config": None,
                            "shadow_fraction": 0.0}
    if stages == "split":
        args.update(coarse=stage, fine=stage)
    else:
        args["fused"] = stage
    return args


def _replica_nodes(app: str) -> Dict[str, List[str]]:
    """Node id of every running replica, per deployment (from the Serve actors' placement)."""
    out: Dict[str, List[str]] = {}
    # this cluster's address: another Ray on the machine (a test session) must not be asked instead
    address = ray.get_runtime_context().gcs_address
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000):
        name = a.get("name") or ""
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            out.setdefault(name.split("#")[1], []).append(a["node_id"])
    return out


def _deployment_states(app: str) -> Dict[str, str]:
    """'HEALTHY 2 RUNNING'-like summary per deployment of the app (empty while it is unknown)."""
    st = serve.status().applications.get(app)
    if st is None:
        return {}
    return {name: f"{d.status.value} " + " ".join(f"{n} {str(getattr(k, 'value', k))}" for k, n in d.replica_states.items())
            for name, d in st.deployments.items()}


def _all_running(states: Dict[str, str], want: Dict[str, int]) -> bool:
    return all(states.get(name, "").startswith("HEALTHY") and f"{n} RUNNING" in states[name] for name, n in want.items())


async def _load(url: str, files: List[bytes], clients: int, stop_at: float, t0: float) -> List[Dict[str, Any]]:
    records: List[Dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=30) as client:
        async def worker(k: int):
            i = k
            while time.monotonic() < stop_at:
                start = time.monotonic() - t0
                rec: Dict[str, Any] = {"start": start}
                try:
                    r = await client.post(url, content=files[i % len(files)], headers={"content-type": "image/png"})
                    rec["status"] = r.status_code
                    if r.status_code != 200:
                        rec["body"] = r.text[:300]
                except httpx.HTTPError as e:
                    rec["status"], rec["body"] = 0, type(e).__name__
                rec["end"] = time.monotonic() - t0
                records.append(rec)
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return records


def run_failover(checkpoint: str, clients: int = 8, before_s: float = 8.0, after_s: float = 30.0, eta: float = 0.5,
                 stages: str = "split", port: Optional[int] = None, warmup_s: float = 3.0) -> Dict[str, Any]:
    port = port or free_port()
    with LocalStack(nodes=2, services=False) as stack:
        ray.init(address=stack.cluster.address, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            return _serve_and_kill(stack, checkpoint, clients, before_s, after_s, eta, stages, port, warmup_s)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _serve_and_kill(stack, checkpoint: str, clients: int, before_s: float, after_s: float, eta: float, stages: str,
                    port: int, warmup_s: float) -> Dict[str, Any]:
    serve.run(build_app(app_args(checkpoint, eta, stages)), name="failover", route_prefix="/")
    want = {"CoarseStage": 2, "FineStage": 2} if stages == "split" else {"FusedStage": 2}
    placed = _replica_nodes("failover")
    victim = stack.workers[1].node_id
    files, box = labelled_images(64, start=0)[0], {}
    t0 = time.monotonic() + warmup_s  # t = 0: the end of the (unbooked) warm-up
    stop_at = t0 + before_s + after_s
    url = f"http://127.0.0.1:{port}/v1/classify?eta={eta}"
    load = threading.Thread(target=lambda: box.update(r=asyncio.run(_load(url, files, clients, stop_at, t0))))
    load.start()
    events = _kill_and_replace(stack, victim, want, t0, before_s, stop_at)  # Ray's node API: main thread
    load.join()
    records = [r for r in box.get("r", []) if r["start"] >= 0]
    result = summarize(records, events, clients, before_s)
    result.update(stages=stages, clients=clients, placement_before=placed, victim_node=victim,
                  placement_after=_replica_nodes("failover"))
    return result


def _kill_and_replace(stack, victim: str, want: Dict[str, int], t0: float, before_s: float, stop_at: float) -> Dict:
    """At t0 + before_s remove the victim node without warning, add a replacement, and note when every
    replica runs again (on distinct nodes)."""
    events: Dict[str, Any] = {}
    time.sleep(max(0.0, t0 + before_s - time.monotonic()))
    events["kill"] = time.monotonic() - t0
    stack.kill_node(victim)
    stack.add_node()
    events["replacement_joined"] = time.monotonic() - t0
    first = list(want)[0]
    while time.monotonic() < stop_at:
        nodes = _replica_nodes("failover").get(first, [])
        events["last_states"] = states = _deployment_states("failover")
        if _all_running(states, want) and len(set(nodes)) >= want[first] and victim not in nodes:
            events["all_running"] = time.monotonic() - t0
            break
        time.sleep(0.25)
    return events


def summarize(records: List[Dict[str, Any]], events: Dict[str, Any], clients: int, before_s: float) -> Dict[str, Any]:
    """Failures around the kill, status codes, recovery: when every replica ran again and when throughput
    (2-s windows) was back to 90 % of what it was before the kill."""
    kill = events.get("kill", before_s)
    failed = [r for r in records if r["status"] != 200]
    in_flight = [r for r in records if r["start"] <= kill <= r["end"]]
    running = events.get("all_running")
    codes: Dict[str, int] = {}
    for r in failed:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    before = [r for r in records if r["status"] == 200 and r["end"] <= kill]
    rate_before = len(before) / max(kill, 1e-9)
    back = None
    ends = np.array([r["end"] for r in records if r["status"] == 200])
    for t in np.arange(kill, max(ends.max() if len(ends) else kill, kill) - 2.0, 0.5):
        if ((ends >= t) & (ends < t + 2.0)).sum() / 2.0 >= 0.9 * rate_before:
            back = float(t + 2.0)
            break
    return {"requests": len(records), "failed": len(failed), "status_codes": codes,
            "in_flight_at_kill": len(in_flight), "failed_in_flight": sum(r["status"] != 200 for r in in_flight),
            "failed_after_replicas_back": sum(r["status"] != 200 for r in failed if running and r["start"] > running),
            "bodies": sorted({r.get("body", "")[:160] for r in failed})[:5], "events": events,
            "replicas_back_s": None if running is None else running - kill,
            "throughput_back_s": None if back is None else back - kill, "rate_before": rate_before,
            "last_failure_s": max((r["end"] for r in failed), default=kill) - kill}


def print_failover(res: Dict[str, Any]) -> None:
    def s(v):
        return "never" if v is None else f"{v:.1f} s"

    print(f"{res['stages']}, {res['clients']} clients: {res['requests']} requests, {res['failed']} failed "
          f"{res['status_codes'] or ''}; in flight at the kill {res['in_flight_at_kill']} "
          f"({res['failed_in_flight']} of them failed); failed after every replica ran again: "
          f"{res['failed_after_replicas_back']}")
    print(f"after the kill: replicas all running again {s(res['replicas_back_s'])}, throughput back to 90 % "
          f"{s(res['throughput_back_s'])}, last failure {res['last_failure_s']:.1f} s; before: "
          f"{res['rate_before']:.1f} req/s")
    for b in res["bodies"]:
        print(f"  client saw: {b}")
