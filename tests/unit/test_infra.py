"""infra/: every manifest parses and carries what its kind needs; the Serve config passes Ray Serve's own
schema and names the deployments serve.app builds; the cluster-launcher YAML passes Ray's launcher
schema; the Dockerfiles build from CUDA / install the project; infra/README.md documents each file."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
LAUNCHER = INFRA / "aws" / "cluster.yaml"
MANIFESTS = sorted(p for p in INFRA.rglob("*.y*ml") if p != LAUNCHER)
NAMESPACE = "cfvit"
GPU = "nvidia.com/gpu"


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def _all_k8s() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in _docs(p)]


def _by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_k8s() if d["kind"] == kind]


def _project_image() -> str:
    return yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]


def test_infra_tree_has_every_piece():
    rel = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    for needed in ("kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml",
                   "kuberay/rayservice.yaml", "aws/cluster.yaml", "docker/Dockerfile", "README.md"):
        assert needed in rel
    kinds = {d["kind"] for _, d in _all_k8s()}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "StatefulSet"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_manifest_has_k8s_basics(path):
    for doc in _docs(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path
        assert isinstance(doc.get("kind"), str) and doc["kind"], path
        meta = doc.get("metadata") or {}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("name", "")), (path, meta)
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, (path, doc["kind"], meta)
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1"


# --------------------------------------------------------------------------- Ray cluster specs


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers, "pod template without containers"
    return containers


def _check_resources(container: dict) -> dict:
    res = container["resources"]
    for side in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[side]), (container["name"], side)
    return res


def check_ray_cluster_spec(spec: dict, ray_version: str) -> dict:
    """Shared by RayCluster.spec, RayJob.spec.rayClusterSpec, RayService.spec.rayClusterConfig."""
    assert spec["rayVersion"] == ray_version, "rayVersion must match the Ray in the image/venv"
    head = spec["headGroupSpec"]
    # KubeRay passes rayStartParams as `--key=value` strings; non-strings are rejected by the CRD.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), head["rayStartParams"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    (head_c,) = _containers(head["template"])
    assert head_c["image"] == _project_image()
    _check_resources(head_c)
    assert 8265 in {p["containerPort"] for p in head_c["ports"]}

    groups = {}
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        (c,) = _containers(group["template"])
        assert c["image"] == _project_image(), name
        groups[name] = (group, c, _check_resources(c))

    gpu_groups = {n: g for n, g in groups.items() if GPU in g[2]["limits"]}
    cpu_groups = {n: g for n, g in groups.items() if GPU not in g[2]["limits"]}
    assert gpu_groups, "no GPU worker group"
    for name, (group, c, res) in gpu_groups.items():
        gpus = res["limits"][GPU]
        assert res["requests"].get(GPU) == gpus, f"{name}: GPU requests must equal limits"
        assert int(gpus) >= 1 and group["rayStartParams"].get("num-gpus") == str(gpus), name
        pod = group["template"]["spec"]
        assert "A100" in " ".join(map(str, pod["nodeSelector"].values())), f"{name}: not pinned to A100 nodes"
        assert any(t["key"] == GPU for t in pod["tolerations"]), f"{name}: no toleration for GPU taints"
    return {"gpu": gpu_groups, "cpu": cpu_groups}


def test_raycluster():
    import ray

    ((_, doc),) = [(p, d) for p, d in _by_kind("RayCluster")]
    groups = check_ray_cluster_spec(doc["spec"], ray.__version__)
    assert groups["cpu"], "no CPU worker group for Ray Data decoding"
    assert doc["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize(
    "name,entrypoint",
    [
        ("rayjob-train.yaml", "python -m jobs.train --config jobs/configs/imagenet_deit_s.yaml"),
        ("rayjob-tune.yaml", "python -m jobs.tune --config jobs/configs/imagenet_deit_s.yaml --budgets 1.5,2.0,2.5"),
    ],
)
def test_rayjobs(name, entrypoint):
    import ray

    (doc,) = _docs(INFRA / "kuberay" / name)
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"] == entrypoint
    argv = shlex.split(entrypoint)
    assert (ROOT / argv[argv.index("--config") + 1]).is_file(), "the job's config file is not in the repo"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/opt/cfvit"  # WORKDIR of infra/docker/Dockerfile
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], ray.__version__)
    module = ROOT / argv[argv.index("-m") + 1].replace(".", "/")
    assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), \
        f"python -m {argv[argv.index('-m') + 1]}: no such module in the repo"


def _serve_config() -> tuple[dict, dict]:
    ((_, doc),) = _by_kind("RayService")
    return doc, yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_rayservice_serve_config_passes_serve_schema():
    import ray
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    doc, cfg = _serve_config()
    schema = ServeDeploySchema.model_validate(cfg)  # Ray Serve's own `serve deploy` schema
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    assert app.args["checkpoint"] == "models:/cfvit-deit-s@production"
    deployments = {d.name: d for d in app.deployments}
    assert {"CoarseStage", "FineStage", "CFViTIngress"} <= set(deployments)
    for name in ("CoarseStage", "FineStage"):
        auto = deployments[name].autoscaling_config
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"], name
    for name, dep in deployments.items():
        if isinstance(dep.autoscaling_config, dict):
            # The schema keeps autoscaling_config a plain dict and Serve ignores unknown keys: catch typos.
            assert set(dep.autoscaling_config) <= set(AutoscalingConfig.model_fields), name
            AutoscalingConfig(**dep.autoscaling_config)
    assert cfg["http_options"]["host"] == "0.0.0.0"  # reachable through the KubeRay serve service
    check_ray_cluster_spec(doc["spec"]["rayClusterConfig"], ray.__version__)


def test_rayservice_matches_the_serve_application():
    """The args pass serve's AppArgs and every deployment named in the config is one build_app makes
    (Serve rejects the whole config on an unknown deployment name)."""
    pytest.importorskip("serve.app")
    from ray.serve._private.build_app import build_app as build_graph
    from serve.app import build_app
    from serve.settings import AppArgs

    _, cfg = _serve_config()
    (app,) = cfg["applications"]
    args = AppArgs(**app["args"])
    assert args.coarse.num_gpus > 0 and args.fine.num_gpus > 0
    built = build_graph(build_app(app["args"]), name=app["name"])
    names = {d.name for d in built.deployments}
    assert {d["name"] for d in app["deployments"]} <= names, names


# --------------------------------------------------------------------------- MLflow on Kubernetes


def test_mlflow_server_postgres_and_s3():
    deployments = {d["metadata"]["name"]: d for _, d in _by_kind("Deployment")}
    (mlflow_c,) = _containers(deployments["mlflow"]["spec"]["template"])
    _check_resources(mlflow_c)
    args = mlflow_c["args"]
    assert args[0] == "server"
    backend = next(a.split("=", 1)[1] for a in args if a.startswith("--backend-store-uri="))
    assert backend.startswith("postgresql://") and "$(DB_PASSWORD)" in backend
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    env = {e["name"]: e for e in mlflow_c["env"]}
    for var in re.findall(r"\$\((\w+)\)", " ".join(args)):  # every $(VAR) Kubernetes must expand
        assert var in env, var

    (sts,) = [d for _, d in _by_kind("StatefulSet")]
    (pg,) = _containers(sts["spec"]["template"])
    _check_resources(pg)
    assert pg["image"].startswith("postgres:")
    secret_refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in (pg, mlflow_c) for e in c["env"] if "valueFrom" in e
    }
    assert secret_refs == {("mlflow-postgres", "username"), ("mlflow-postgres", "password")}
    assert f"@{sts['spec']['serviceName']}.{NAMESPACE}.svc" in backend

    # Services select the pods they front, and the URI the Ray pods use names the mlflow Service.
    services = {d["metadata"]["name"]: d for _, d in _by_kind("Service")}
    workloads = list(deployments.values()) + [sts]
    for name, svc in services.items():
        assert any(
            svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads
        ), name
    assert services["mlflow"]["spec"]["ports"][0]["port"] == 5000
    ((_, raycluster),) = _by_kind("RayCluster")
    env = {e["name"]: e["value"] for e in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"


def test_service_accounts_exist():
    accounts = {d["metadata"]["name"] for _, d in _by_kind("ServiceAccount")}
    used = set()
    for _, doc in _all_k8s():
        for pod in _pod_specs(doc):
            if "serviceAccountName" in pod:
                used.add(pod["serviceAccountName"])
    assert used and used <= accounts, (used, accounts)


def _pod_specs(doc: dict):
    spec = doc.get("spec", {})
    if "template" in spec:
        yield spec["template"]["spec"]
    for key in ("rayClusterSpec", "rayClusterConfig"):
        if key in spec:
            spec = spec[key]
    if "headGroupSpec" in spec:
        yield spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield group["template"]["spec"]


# --------------------------------------------------------------------------- cluster launcher, images


def test_aws_cluster_launcher_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    types = {n["node_config"]["InstanceType"] for n in config["available_node_types"].values()}
    assert types & {"p4d.24xlarge", "p4de.24xlarge"}, "no A100 worker type"
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own `ray up` schema

    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.a100"]["min_workers"] = "two"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def _from_image(dockerfile: Path) -> str:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    (image,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_project_dockerfile():
    dockerfile = INFRA / "docker" / "Dockerfile"
    assert _from_image(dockerfile).startswith("nvidia/cuda:")
    text = dockerfile.read_text()
    assert re.search(r"^COPY .*\. /opt/cfvit$", text, flags=re.M)
    assert re.search(r"^WORKDIR /opt/cfvit$", text, flags=re.M)
    assert 'pip install ".[ray]"' in text
    # The build context must not ship the virtualenv or git history.
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_mlflow_dockerfile_has_backend_drivers():
    text = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert "psycopg2" in text and "boto3" in text and "mlflow==" in text


def test_readme_documents_each_file_with_its_command():
    readme = (INFRA / "README.md").read_text()
    for path in MANIFESTS:
        rel = path.relative_to(ROOT).as_posix()
        assert re.search(rf"kubectl .*apply .*-f {re.escape(rel)}", readme), rel
    assert "ray up infra/aws/cluster.yaml" in readme
    assert "docker build -f infra/docker/Dockerfile" in readme
    assert "docker build -f infra/mlflow/Dockerfile" in readme
    assert "cfvit submit run" in readme and "cfvit shards" in readme


def test_disruption_budgets_select_the_clusters_own_groups():
    """pdb.yaml: the head never, each worker group one pod at a time; selectors name real groups."""
    cluster = _docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    groups = {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]}
    budgets = _docs(INFRA / "kuberay" / "pdb.yaml")
    assert {b["kind"] for b in budgets} == {"PodDisruptionBudget"}
    selected = {}
    for b in budgets:
        labels = b["spec"]["selector"]["matchLabels"]
        assert labels["ray.io/cluster"] == cluster["metadata"]["name"]
        selected[labels.get("ray.io/group", labels.get("ray.io/node-type"))] = b["spec"]["maxUnavailable"]
    assert selected.pop("head") == 0
    assert selected == {g: 1 for g in groups}
