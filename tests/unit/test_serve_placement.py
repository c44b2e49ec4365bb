"""What the Serve application reserves (serve/placement.py) against what a cluster has: the development config
fits the 2-core machine the README targets, the production RayService fits its own cluster, and one that does
not fit is refused with the numbers."""
from __future__ import annotations

import pytest
import yaml

from serve.placement import AppDoesNotFit, app_demand, check_fits, total, unplaceable
from serve.settings import AppArgs
from tests.unit.infra_manifests import ROOT, by_kind, containers

TWO_CORES = [{"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9}]  # `serve run` on the README's machine


def _dev_args() -> AppArgs:
    (app,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    return AppArgs(**app["args"])


def test_the_development_config_fits_two_cores_started_and_scaled_up():
    args = _dev_args()
    assert unplaceable(app_demand(args), TWO_CORES) == []
    assert unplaceable(app_demand(args, scaled_up=True), TWO_CORES) == []  # no replica waits for ever
    # …with the shape of production: the fine stage scales less far than the coarse one
    assert args.fine.autoscaling_config["max_replicas"] < args.coarse.autoscaling_config["max_replicas"]


def test_the_former_development_sizes_did_not_fit():
    """1 + 1 + 0.25 CPUs: what made `serve run serve/config.yaml` wait for ever on two cores."""
    args = AppArgs(checkpoint="x", coarse={"num_cpus": 1}, fine={"num_cpus": 1}, ingress_num_cpus=0.25)
    with pytest.raises(AppDoesNotFit) as e:
        check_fits(app_demand(args), TWO_CORES)
    msg = str(e.value)
    assert "asks for {CPU: 2.25}" in msg and "CPU 2.25 (the cluster has 2)" in msg
    assert "CoarseStage 1 × {CPU: 1}; FineStage 1 × {CPU: 1}; CFViTIngress 1 × {CPU: 0.25}" in msg


def test_each_topology_reserves_its_own_deployments():
    assert [r.deployment for r in app_demand(AppArgs(checkpoint="x"))] == ["CoarseStage", "FineStage", "CFViTIngress"]
    fused = app_demand(AppArgs(checkpoint="x", stages="fused", fused={"num_cpus": 1.5}))
    assert [(r.deployment, r.per_replica) for r in fused][0] == ("FusedStage", {"CPU": 1.5})
    backbone = app_demand(AppArgs(checkpoint="x", stages="backbone", coarse={"num_replicas": 3,
                                                                              "autoscaling_config": None}))
    assert (backbone[0].deployment, backbone[0].replicas) == ("BackboneStage", 3)


def test_a_replica_larger_than_every_node_or_a_missing_gpu_is_refused():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    big = AppArgs(checkpoint="x", coarse={"num_cpus": 3})  # 3.6 CPUs in all fit 4, one replica fits no node
    assert unplaceable(app_demand(big), nodes) == [
        "one CoarseStage replica needs {CPU: 3}, more than any one node has"]
    gpu = AppArgs(checkpoint="x", fine={"num_gpus": 0.5})
    assert "GPU 0.5 (the cluster has 0)" in unplaceable(app_demand(gpu), nodes)[0]


def _rayservice():
    ((_, doc),) = by_kind("RayService")
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = cfg["applications"]
    args = app["args"]
    # Serve applies the config's per-deployment autoscaling over what build_app sets
    over = {d["name"]: d["autoscaling_config"] for d in app["deployments"] if "autoscaling_config" in d}
    args = AppArgs(**{**args, "coarse": {**args["coarse"], "autoscaling_config": over["CoarseStage"]},
                      "fine": {**args["fine"], "autoscaling_config": over["FineStage"]},
                      "ingress_autoscaling_config": over["CFViTIngress"]})
    return doc["spec"]["rayClusterConfig"], args


def _nodes(spec: dict, count: str) -> list[dict]:
    """Each pod's Ray resources: rayStartParams, else the container's limits (what Ray detects)."""
    out = []
    head = spec["headGroupSpec"]
    groups = [(1, head)] + [(g[count], g) for g in spec["workerGroupSpecs"]]
    for n, group in groups:
        params = group["rayStartParams"]
        limits = containers(group["template"])[0]["resources"]["limits"]
        node = {"CPU": float(params.get("num-cpus", limits["cpu"])),
                "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        out += [node] * int(n)
    return out


def test_the_rayservice_starts_on_its_smallest_cluster_and_scales_within_its_largest():
    spec, args = _rayservice()
    assert unplaceable(app_demand(args), _nodes(spec, "minReplicas")) == []
    assert total(app_demand(args))["GPU"] > 0  # production sizes: the stages run on the A100s
    # at max_replicas the stages need more GPUs than the smallest cluster: the autoscaler adds pods up to
    # maxReplicas, and all of them hold the scaled-up application
    assert unplaceable(app_demand(args, scaled_up=True), _nodes(spec, "minReplicas"))
    assert unplaceable(app_demand(args, scaled_up=True), _nodes(spec, "maxReplicas")) == []
