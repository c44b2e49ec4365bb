"""infra/: every manifest parses and carries what its kind needs; the Serve config passes Ray Serve's own
schema and names the deployments serve.app builds; the cluster-launcher YAML passes Ray's launcher
schema; the Dockerfiles build from CUDA / install the project; infra/README.md documents each file.
The security properties (auth, pod security, network policies, identities): test_infra_security.py."""
from __future__ import annotations

import copy
import re
import shlex

import pytest
import yaml

from tests.unit.infra_manifests import (
    INFRA,
    LAUNCHER,
    MANIFESTS,
    ROOT,
    all_k8s,
    by_kind,
    containers,
    docs,
    namespace_of,
    pod_templates,
    project_image,
)

GPU = "nvidia.com/gpu"
MLFLOW_URI = "http://mlflow.cfvit-mlflow.svc.cluster.local:5000"


def test_infra_tree_has_every_piece():
    rel = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    for needed in ("kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml",
                   "kuberay/rayservice.yaml", "aws/cluster.yaml", "docker/Dockerfile", "README.md"):
        assert needed in rel
    kinds = {d["kind"] for _, d in all_k8s()}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "StatefulSet", "Job", "Namespace",
            "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_manifest_has_k8s_basics(path):
    for doc in docs(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path
        assert isinstance(doc.get("kind"), str) and doc["kind"], path
        meta = doc.get("metadata") or {}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("name", "")), (path, meta)
        if doc["kind"] == "Namespace":
            assert meta["name"] == namespace_of(path), path
        else:
            assert meta.get("namespace") == namespace_of(path), (path, doc["kind"], meta)
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1"


# --------------------------------------------------------------------------- Ray cluster specs


def _check_resources(container: dict) -> dict:
    res = container["resources"]
    for side in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[side]), (container["name"], side)
    return res


def check_ray_cluster_spec(spec: dict, ray_version: str) -> dict:
    """Shared by RayCluster.spec, RayJob.spec.rayClusterSpec, RayService.spec.rayClusterConfig."""
    assert spec["rayVersion"] == ray_version, "rayVersion must match the Ray in the image/venv"
    assert spec["authOptions"] == {"mode": "token"}, "Ray token authentication must be on (KubeRay >= 1.5.1)"
    head = spec["headGroupSpec"]
    # KubeRay passes rayStartParams as `--key=value` strings; non-strings are rejected by the CRD.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), head["rayStartParams"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    (head_c,) = containers(head["template"])
    assert head_c["image"] == project_image()
    _check_resources(head_c)
    assert 8265 in {p["containerPort"] for p in head_c["ports"]}

    groups = {}
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        (c,) = containers(group["template"])
        assert c["image"] == project_image(), name
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

    ((_, doc),) = [(p, d) for p, d in by_kind("RayCluster")]
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

    (doc,) = [d for d in docs(INFRA / "kuberay" / name) if d["kind"] == "RayJob"]
    spec = doc["spec"]
    assert spec["entrypoint"] == entrypoint
    argv = shlex.split(entrypoint)
    assert (ROOT / argv[argv.index("--config") + 1]).is_file(), "the job's config file is not in the repo"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/opt/cfvit"  # WORKDIR of infra/docker/Dockerfile
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], ray.__version__)
    module = ROOT / argv[argv.index("-m") + 1].replace(".", "/")
    assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), \
        f"python -m {argv[argv.index('-m') + 1]}: no such module in the repo"


def _serve_config() -> tuple[dict, dict]:
    ((_, doc),) = by_kind("RayService")
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
    from ray.serve._private.build_app import build_app as build_graph

    from serve.app import build_app
    from serve.settings import AppArgs

    _, cfg = _serve_config()
    (app,) = cfg["applications"]
    args = AppArgs(**app["args"])
    assert args.coarse.num_gpus > 0 and args.fine.num_gpus > 0
    # build_app reads an alias from the registry (there is none here): give it the version it would pin.
    built = build_graph(build_app({**app["args"], "checkpoint": "models:/cfvit-deit-s/1"}), name=app["name"])
    names = {d.name for d in built.deployments}
    assert {d["name"] for d in app["deployments"]} <= names, names


# --------------------------------------------------------------------------- MLflow on Kubernetes


def _secret_refs(container: dict) -> set:
    return {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_mlflow_server_postgres_and_s3():
    deployments = {d["metadata"]["name"]: d for _, d in by_kind("Deployment")}
    (mlflow_c,) = containers(deployments["mlflow"]["spec"]["template"])
    _check_resources(mlflow_c)
    args = mlflow_c["args"]
    assert args[0] == "server"
    backend = next(a.split("=", 1)[1] for a in args if a.startswith("--backend-store-uri="))
    # No credential in the arguments: libpq takes PGUSER / PGPASSWORD from the environment, from the Secret.
    assert re.fullmatch(r"postgresql://[a-z0-9.-]+:5432/mlflow", backend), backend
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    env = {e["name"]: e for e in mlflow_c["env"]}
    for var in re.findall(r"\$\((\w+)\)", " ".join(args)):  # every $(VAR) Kubernetes must expand
        assert var in env, var
    assert env["PGUSER"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "username"}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}

    (sts,) = [d for _, d in by_kind("StatefulSet")]
    (pg,) = containers(sts["spec"]["template"])
    _check_resources(pg)
    assert pg["image"].startswith("postgres:")
    # PostgreSQL reads the same Secret as files (POSTGRES_*_FILE), not from its environment.
    assert not _secret_refs(pg)
    pg_env = {e["name"]: e.get("value") for e in pg["env"]}
    mounts = {m["mountPath"]: m["name"] for m in pg["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    for var, key in (("POSTGRES_USER_FILE", "username"), ("POSTGRES_PASSWORD_FILE", "password")):
        folder, _, name = pg_env[var].rpartition("/")
        assert name == key and volumes[mounts[folder]]["secret"]["secretName"] == "mlflow-postgres", var
    host = f"//{sts['spec']['serviceName']}.{namespace_of(INFRA / 'mlflow')}.svc"
    assert host in backend

    # Services select the pods they front, and the URI the Ray pods use names the mlflow Service.
    services = {d["metadata"]["name"]: d for _, d in by_kind("Service")}
    workloads = list(deployments.values()) + [sts]
    for name, svc in services.items():
        assert any(
            svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads
        ), name
    assert services["mlflow"]["spec"]["ports"][0]["port"] == 5000
    mlflow_host = f"{services['mlflow']['metadata']['name']}.{namespace_of(INFRA / 'mlflow')}.svc"
    assert MLFLOW_URI.startswith(f"http://{mlflow_host}")
    ((_, raycluster),) = by_kind("RayCluster")
    env = {e["name"]: e for e in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI


def test_service_accounts_exist():
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for _, d in by_kind("ServiceAccount")}
    used = set()
    for path, doc in all_k8s():
        for _, template in pod_templates(doc):
            used.add((namespace_of(path), template["spec"].get("serviceAccountName", "default")))
    assert used and used <= accounts, (used, accounts)


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


def _from_image(dockerfile) -> str:
    (image,) = re.findall(r"^FROM (\S+)", dockerfile.read_text(), flags=re.M)
    return image


def _constraint(package: str) -> str:
    text = (ROOT / "requirements" / "constraints.txt").read_text()
    (version,) = re.findall(rf"^{re.escape(package)}==(\S+)$", text, flags=re.M | re.I)
    return version


def _final_user(dockerfile) -> str:
    return re.findall(r"^USER (\S+)$", dockerfile.read_text(), flags=re.M)[-1]


def test_project_dockerfile():
    dockerfile = INFRA / "docker" / "Dockerfile"
    # An explicit base image tag (no build-arg indirection, no `latest`): what the image is built from is
    # what the file says.
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", _from_image(dockerfile))
    text = dockerfile.read_text()
    assert re.search(r"^COPY .*\. /opt/cfvit$", text, flags=re.M)
    assert re.search(r"^WORKDIR /opt/cfvit$", text, flags=re.M)
    # The project at the tested versions (Ray's auth defaults differ between releases), torch as setup.sh.
    assert 'pip install -c requirements/constraints.txt ".[ray]"' in text
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for pin in re.findall(r'"(torch(?:vision)?==[^"]+)"', setup):
        assert f'"{pin}"' in text, pin
    # It runs as the non-root uid the manifests' runAsUser names.
    assert _final_user(dockerfile) == "1000"
    # The build context must not ship the virtualenvs, git history or credentials.
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".venv-checkov", ".git", ".env", "**/*.pem", ".aws", ".ray"} <= set(ignored)


def test_mlflow_dockerfile():
    dockerfile = INFRA / "mlflow" / "Dockerfile"
    text = dockerfile.read_text()
    assert "psycopg2" in text and "boto3" in text
    assert re.search(r"^ARG MLFLOW_VERSION=(\S+)$", text, flags=re.M).group(1) == _constraint("mlflow")
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in text and "-c /opt/mlflow/constraints.txt" in text
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", _from_image(dockerfile))
    assert _final_user(dockerfile) == "10001"
    # The users Job runs the script where the image puts it; the default command serves with auth on.
    (job,) = [d for _, d in by_kind("Job")]
    (container,) = containers(job["spec"]["template"])
    assert f"COPY infra/mlflow/mlflow_users.py {container['command'][-1]}" in text
    assert '"--app-name", "basic-auth"' in text


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
    cluster = docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    groups = {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]}
    budgets = docs(INFRA / "kuberay" / "pdb.yaml")
    assert {b["kind"] for b in budgets} == {"PodDisruptionBudget"}
    selected = {}
    for b in budgets:
        labels = b["spec"]["selector"]["matchLabels"]
        assert labels["ray.io/cluster"] == cluster["metadata"]["name"]
        selected[labels.get("ray.io/group", labels.get("ray.io/node-type"))] = b["spec"]["maxUnavailable"]
    assert selected.pop("head") == 0
    assert selected == {g: 1 for g in groups}
