"""Reading infra/: the Kubernetes manifests, their pod templates and the Ray clusters they describe.
Shared by the tests of infra/ (test_infra.py, test_infra_security.py, test_checkov.py, test_mlflow_users.py)."""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Iterator, List, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
LAUNCHER = INFRA / "aws" / "cluster.yaml"
CHECKOV_SKIPS = INFRA / "checkov-skips.yaml"
MANIFESTS = sorted(p for p in INFRA.rglob("*.y*ml") if p not in (LAUNCHER, CHECKOV_SKIPS))
# Each folder's manifests live in one namespace: the Ray clusters apart from MLflow and its database.
NAMESPACE_OF_FOLDER = {"kuberay": "cfvit", "mlflow": "cfvit-mlflow"}
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> Tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def docs(path: Path) -> List[dict]:
    """The YAML documents of `path` (parsed once per session; each caller gets its own copy)."""
    found = copy.deepcopy(list(_parsed(path)))
    assert found, f"{path} holds no YAML document"
    return found


def all_k8s() -> List[Tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in docs(p)]


def by_kind(kind: str) -> List[Tuple[Path, dict]]:
    return [(p, d) for p, d in all_k8s() if d["kind"] == kind]


def namespace_of(path: Path) -> str:
    return NAMESPACE_OF_FOLDER[path.relative_to(INFRA).parts[0]]


def ray_cluster_spec(doc: dict) -> dict:
    """The RayClusterSpec of a RayCluster, RayJob (rayClusterSpec) or RayService (rayClusterConfig)."""
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]]


def pod_templates(doc: dict) -> Iterator[Tuple[str, dict]]:
    """(role, pod template) for every pod a document makes: `pod` for Deployments / StatefulSets / Jobs,
    `head`, `worker:<group>` and `submitter` for the Ray custom resources."""
    spec = doc.get("spec", {})
    if doc["kind"] in RAY_KINDS:
        cluster = ray_cluster_spec(doc)
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker:{group['groupName']}", group["template"]
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]
    elif "template" in spec:
        yield "pod", spec["template"]


def containers(pod_template: dict) -> List[dict]:
    found = pod_template["spec"]["containers"]
    assert found, "pod template without containers"
    return found


def project_image() -> str:
    return yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]
