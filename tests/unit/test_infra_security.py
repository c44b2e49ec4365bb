"""infra/'s trust boundary, read from the manifests and the launcher config: Ray token authentication on
every Ray cluster, restricted pods, least-privilege identities, network policies that let only the
cluster's own pods and the KubeRay operator reach a head, MLflow behind basic auth with credentials from
Secrets (the MLflow user set-up script itself: test_mlflow_users.py)."""
from __future__ import annotations

import configparser
import re

import pytest
import yaml

from tests.unit.infra_manifests import (
    INFRA,
    LAUNCHER,
    RAY_KINDS,
    all_k8s,
    by_kind,
    containers,
    namespace_of,
    pod_templates,
    ray_cluster_spec,
)

OPERATOR = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIAL", re.I)
# What KubeRay's in-tree autoscaler needs (KubeRay ray-operator/controllers/ray/common/rbac.go, BuildRole).
AUTOSCALER_RULES = {("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "patch"),
                    ("", "pods/resize", "patch"), ("ray.io", "rayclusters", "get"), ("ray.io", "rayclusters", "patch")}


def _every_pod():
    """(where, namespace, role, pod template) for every pod the manifests create."""
    for path, doc in all_k8s():
        for role, template in pod_templates(doc):
            yield f"{path.name}:{doc['metadata']['name']}:{role}", namespace_of(path), role, template


def _ray_resources():
    return [(p, d) for p, d in all_k8s() if d["kind"] in RAY_KINDS]


def _is_credential(name: str) -> bool:
    """A variable that holds a secret (not one that names where a secret is: *_PATH, *_FILE)."""
    return bool(CREDENTIAL.search(name)) and not name.endswith(("_PATH", "_FILE"))


def _runtime_env_vars(doc: dict) -> set:
    """Names of the env_vars a Ray resource puts in a runtime_env (RayJob runtimeEnvYAML, Serve apps)."""
    spec = doc["spec"]
    envs = [yaml.safe_load(spec["runtimeEnvYAML"])] if "runtimeEnvYAML" in spec else []
    if "serveConfigV2" in spec:
        envs += [app.get("runtime_env", {}) for app in yaml.safe_load(spec["serveConfigV2"])["applications"]]
    return {name for env in envs for name in env.get("env_vars", {})}


# --------------------------------------------------------------------------- Ray token authentication


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_every_ray_cluster_has_token_auth(kind):
    found = by_kind(kind)
    assert found, kind
    for _, doc in found:
        assert ray_cluster_spec(doc)["authOptions"] == {"mode": "token"}, doc["metadata"]["name"]


def test_operator_install_is_recent_enough_for_auth_options():
    readme = (INFRA / "README.md").read_text()
    (version,) = re.findall(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", readme)
    assert tuple(int(x) for x in version.split(".")) >= (1, 5, 1), "authOptions needs KubeRay >= 1.5.1"


def test_aws_launcher_has_token_auth_and_a_loopback_dashboard():
    config = yaml.safe_load(LAUNCHER.read_text())
    env = dict(opt.split(" ", 1)[1].split("=", 1) for opt in config["docker"]["run_options"] if opt.startswith("-e "))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in config["file_mounts"], "the token file is not copied to the nodes"
    assert config["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]] == "~/.ray/auth_token"
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not any(_is_credential(name) for name in env), "credentials belong in files, not docker -e"


# --------------------------------------------------------------------------- pods


def test_namespaces_enforce_restricted_pod_security():
    namespaces = {d["metadata"]["name"]: d["metadata"]["labels"] for _, d in by_kind("Namespace")}
    assert set(namespaces) == {namespace for _, namespace, _, _ in _every_pod()}
    for name, labels in namespaces.items():
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", name


def _check_container_security(where: str, container: dict) -> None:
    sc = container.get("securityContext", {})
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and "add" not in sc["capabilities"], where


def test_every_pod_is_restricted():
    pods = list(_every_pod())
    assert len(pods) >= 15
    for where, _, _, template in pods:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in spec["containers"] + spec.get("initContainers", []):
            _check_container_security(f"{where}:{container['name']}", container)
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, where


def test_ray_containers_write_only_to_empty_dirs():
    """Ray writes its sessions under /tmp/ray, temp files under /tmp, caches under $HOME: emptyDirs on a
    read-only root. The autoscaler sidecar KubeRay adds gets the same restrictions and a writable /tmp."""
    for path, doc in _ray_resources():
        for role, template in pod_templates(doc):
            empty = {v["name"] for v in template["spec"]["volumes"] if "emptyDir" in v}
            (container,) = containers(template)
            mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty}
            needed = {"/tmp", "/home/ray"} | ({"/tmp/ray"} if role != "submitter" else set())
            assert needed <= mounted, (path.name, role, mounted)
        cluster = ray_cluster_spec(doc)
        if cluster.get("enableInTreeAutoscaling"):
            options = cluster["autoscalerOptions"]
            _check_container_security(f"{path.name}:autoscaler", options)
            assert "/tmp" in {m["mountPath"] for m in options["volumeMounts"]}


def test_every_image_has_an_explicit_version_tag():
    for where, _, _, template in _every_pod():
        for container in template["spec"]["containers"]:
            name, _, tag = container["image"].rpartition(":")
            assert name and "/" not in tag and re.fullmatch(r"v?\d+(\.\d+)+[\w.-]*", tag), (where, container["image"])


# --------------------------------------------------------------------------- identities


def test_head_and_workers_have_their_own_service_accounts():
    accounts = {d["metadata"]["name"]: d for _, d in by_kind("ServiceAccount")}
    for path, doc in _ray_resources():
        for role, template in pod_templates(doc):
            spec = template["spec"]
            expected = {"head": "cfvit-ray-head", "submitter": "cfvit-ray-submitter"}.get(role, "cfvit-ray-worker")
            assert spec["serviceAccountName"] == expected, (path.name, role)
            assert accounts[expected]["automountServiceAccountToken"] is False, expected
    for account in accounts.values():
        assert account.get("automountServiceAccountToken") is False, account["metadata"]


def test_only_the_autoscaler_gets_the_api_token_and_the_autoscaler_rights():
    (binding,) = [d for _, d in by_kind("RoleBinding")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cfvit-ray-head", "namespace": "cfvit"}]
    (role,) = [d for _, d in by_kind("Role") if d["metadata"]["name"] == binding["roleRef"]["name"]]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == AUTOSCALER_RULES
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    for path, doc in _ray_resources():
        cluster = ray_cluster_spec(doc)
        head = cluster["headGroupSpec"]["template"]["spec"]
        token_volumes = {v["name"] for v in head["volumes"]
                         if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
        (ray_head,) = head["containers"]
        assert not {m["name"] for m in ray_head["volumeMounts"]} & token_volumes, path.name
        if cluster.get("enableInTreeAutoscaling"):
            mounts = {m["mountPath"]: m["name"] for m in cluster["autoscalerOptions"]["volumeMounts"]}
            assert mounts.get(SA_TOKEN_PATH) in token_volumes, path.name
        else:
            assert not token_volumes, f"{path.name}: nothing in a head without autoscaler needs the API"


# --------------------------------------------------------------------------- network policies


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is understood here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _policies(namespace: str, labels: dict, direction: str):
    """The policies of `namespace` that select a pod with `labels` for `direction` (Ingress / Egress)."""
    for _, doc in by_kind("NetworkPolicy"):
        spec = doc["spec"]
        if doc["metadata"]["namespace"] == namespace and direction in spec["policyTypes"] \
                and _selects(spec["podSelector"], labels):
            yield doc


def _peer_allows(peer: dict, own_namespace: str, namespace: str, labels: dict) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
    else:
        ns_ok = namespace == own_namespace
    return ns_ok and _selects(peer.get("podSelector", {}), labels)


def _ports(namespace: str, labels: dict, direction: str, peer_ns: str, peer_labels: dict) -> set:
    """Ports on which a pod (namespace, labels) lets traffic in from (Ingress) or out to (Egress) a pod
    (peer_ns, peer_labels), by Kubernetes' rules: a pod no policy selects is open; otherwise the union of
    the selecting policies' rules. {'*'}: every port."""
    policies = list(_policies(namespace, labels, direction))
    if not policies:
        return {"*"}
    side, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    ports = set()
    for policy in policies:
        for rule in policy["spec"].get(side, []):
            peers = rule.get(peers_key)
            if peers is None or any(_peer_allows(p, namespace, peer_ns, peer_labels) for p in peers):
                ports |= {p["port"] for p in rule["ports"]} if "ports" in rule else {"*"}
    return ports


def _ingress_ports(namespace: str, labels: dict, peer_ns: str, peer_labels: dict) -> set:
    return _ports(namespace, labels, "Ingress", peer_ns, peer_labels)


def _flow_open(src: tuple, dst: tuple, port: int) -> bool:
    """Both ends allow a connection from pod `src` to pod `dst` (each a (namespace, labels)) on `port`."""
    out = _ports(*src, "Egress", *dst)
    into = _ports(*dst, "Ingress", *src)
    return bool(out & {port, "*"}) and bool(into & {port, "*"})


def test_each_namespace_denies_by_default():
    for namespace in ("cfvit", "cfvit-mlflow"):
        assert any(not d["spec"]["podSelector"] and set(d["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                   and not d["spec"].get("ingress") and not d["spec"].get("egress")
                   for _, d in by_kind("NetworkPolicy") if d["metadata"]["namespace"] == namespace), namespace


def test_a_head_answers_its_own_cluster_and_the_operator_only():
    stranger_pods = [("cfvit", {"app.kubernetes.io/name": "cfvit-ray", "app.kubernetes.io/instance": "other"}),
                     ("cfvit-mlflow", {"app.kubernetes.io/name": "mlflow"}), ("default", {"app": "anything"})]
    for path, doc in _ray_resources():
        head_labels = ray_cluster_spec(doc)["headGroupSpec"]["template"]["metadata"]["labels"]
        own = [(role, t["metadata"]["labels"]) for role, t in pod_templates(doc)]
        for role, labels in own:
            expected = {8265} if role == "submitter" else {"*"}
            assert _ingress_ports("cfvit", head_labels, "cfvit", labels) == expected, (path.name, role)
        assert _ingress_ports("cfvit", head_labels, *OPERATOR) == {8265}, path.name
        for namespace, labels in stranger_pods:
            assert not _ingress_ports("cfvit", head_labels, namespace, labels), (path.name, namespace, labels)
        # Once KubeRay marks the pod ready to serve, the Serve HTTP port (and only it) opens to anyone.
        serving = {**head_labels, "ray.io/serve": "true"}
        assert _ingress_ports("cfvit", serving, "default", {"app": "anything"}) == {8000}


def test_mlflow_answers_ray_pods_and_postgres_answers_mlflow():
    mlflow, postgres = {"app.kubernetes.io/name": "mlflow"}, {"app.kubernetes.io/name": "mlflow-postgres"}
    ray_pod = {"app.kubernetes.io/name": "cfvit-ray", "app.kubernetes.io/instance": "cfvit"}
    assert _ingress_ports("cfvit-mlflow", mlflow, "cfvit", ray_pod) == {5000}
    assert _ingress_ports("cfvit-mlflow", mlflow, "cfvit-mlflow", {"app.kubernetes.io/name": "mlflow-users"}) == {5000}
    assert not _ingress_ports("cfvit-mlflow", mlflow, "default", {"app.kubernetes.io/name": "cfvit-ray"})
    assert not _ingress_ports("cfvit-mlflow", mlflow, "cfvit", {"app.kubernetes.io/name": "cfvit-ray-submitter"})
    assert _ingress_ports("cfvit-mlflow", postgres, "cfvit-mlflow", mlflow) == {5432}
    for namespace, labels in (("cfvit", ray_pod), ("cfvit-mlflow", {"app.kubernetes.io/name": "mlflow-users"})):
        assert not _ingress_ports("cfvit-mlflow", postgres, namespace, labels), labels


def test_the_flows_the_system_needs_are_open():
    """Default-deny must not break the clusters: each Ray cluster's pods reach each other, its submitter
    its head's Jobs API, every Ray pod MLflow, MLflow PostgreSQL, the users Job MLflow, every pod DNS."""
    mlflow = ("cfvit-mlflow", {"app.kubernetes.io/name": "mlflow"})
    dns = ("kube-system", {"k8s-app": "kube-dns"})
    for path, doc in _ray_resources():
        pods = {role: ("cfvit", t["metadata"]["labels"]) for role, t in pod_templates(doc)}
        ray_pods = {role: pod for role, pod in pods.items() if role != "submitter"}
        for src_role, src in ray_pods.items():
            for dst_role, dst in ray_pods.items():
                assert _flow_open(src, dst, 6379) and _flow_open(src, dst, 12345), (path.name, src_role, dst_role)
            assert _flow_open(src, mlflow, 5000), (path.name, src_role)
            assert _flow_open(src, dns, 53), (path.name, src_role)
        if "submitter" in pods:
            assert _flow_open(pods["submitter"], pods["head"], 8265), path.name
            assert not _flow_open(pods["submitter"], pods["head"], 6379), path.name
    assert _flow_open(mlflow, ("cfvit-mlflow", {"app.kubernetes.io/name": "mlflow-postgres"}), 5432)
    assert _flow_open(("cfvit-mlflow", {"app.kubernetes.io/name": "mlflow-users"}), mlflow, 5000)


def test_pods_never_reach_the_instance_metadata_endpoint():
    """AWS credentials come from IRSA only: no egress rule lets a pod ask the node's instance profile."""
    for _, doc in by_kind("NetworkPolicy"):
        for rule in doc["spec"].get("egress", []):
            assert "to" in rule, doc["metadata"]["name"]
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert "169.254.169.254/32" in peer["ipBlock"].get("except", []), doc["metadata"]["name"]


# --------------------------------------------------------------------------- credentials


def test_credentials_reach_pods_from_secrets_only():
    for where, _, _, template in _every_pod():
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if _is_credential(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (where, env["name"])
    runtime_envs = {path.name: _runtime_env_vars(doc) for path, doc in _ray_resources()}
    assert sum(map(len, runtime_envs.values())) >= 3
    for name, variables in runtime_envs.items():
        # Ray keeps a runtime_env in the GCS and shows it on the dashboard.
        assert not any(map(_is_credential, variables)), (name, variables)


def test_ray_pods_log_in_to_mlflow_as_the_user_of_their_role():
    """Training and tuning edit the registry (mlflow-trainer); Serve only reads it (mlflow-serve). The users
    Job creates exactly the users whose Secrets the Ray pods use."""
    (job,) = [d for _, d in by_kind("Job")]
    job_secrets = {v["secret"]["secretName"] for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    expected = {"RayCluster": "mlflow-trainer", "RayJob": "mlflow-trainer", "RayService": "mlflow-serve"}
    for path, doc in _ray_resources():
        for role, template in pod_templates(doc):
            if role == "submitter":
                continue
            env = {e["name"]: e for e in containers(template)[0]["env"]}
            for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": expected[doc["kind"]], "key": key}, (path.name, role, var)
                assert ref["name"] in job_secrets


def test_mlflow_runs_basic_auth_with_its_admin_from_a_secret():
    (deployment,) = [d for _, d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (server,) = containers(deployment["spec"]["template"])
    assert "--app-name=basic-auth" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin", var
    folder, _, ini_name = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rpartition("/")
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [d for _, d in by_kind("ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"]]
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][ini_name])
    assert ini["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert "admin_password" not in ini["mlflow"] and "@" not in ini["mlflow"]["database_uri"]
    auth_db = ini["mlflow"]["database_uri"].rsplit("/", 1)[1]
    (init,) = [d for _, d in by_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-postgres-init"]
    assert any(f"CREATE DATABASE {auth_db};" in sql for sql in init["data"].values())
