"""deploy/kubernetes/ and deploy/container/Dockerfile, checked as far as a machine without a cluster
and without a container engine allows.

- Debian's kubectl (kubernetes-client, unpacked into the venv by deploy/bootstrap-debian.sh; any
  kubectl on PATH otherwise, named in the output) runs `kubectl create --dry-run=client
  --validate=false -f deploy/kubernetes/`. A client-side dry run still asks the server which
  resource each kind is (API discovery); kubectl is given its discovery cache instead — the
  documents /api and /apis answer for the kinds used — and a server address where nothing listens,
  so any request it makes fails the test. That cache is recorded data in place of a server.
- Every object is decoded into the official client's typed model (kubernetes.client.models), with
  every field name checked against the model (what --validate would catch: a misspelt field) and the
  models' own required-field checks.
- What the agent reads: the ConfigMap's config.yaml loads and validates with the DaemonSet's
  environment; the example policy passes the policy loader; RBAC, mounts, labels and ports are the
  ones docs and the Prometheus config rely on.
- The Dockerfile: what it copies exists, its extras exist, its Debian packages exist in Debian 12.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_module, skip_or_fail

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
DEBIAN_KUBECTL = Path(sys.prefix) / "opt" / "kubernetes-client" / "usr" / "bin" / "kubectl"
NOWHERE = "127.0.0.1:1"   # the kubeconfig's server: nothing listens on port 1
# API discovery for the kinds in deploy/kubernetes/ (group/version → [(resource, kind, namespaced)])
DISCOVERY = {
    "v1": [("namespaces", "Namespace", False), ("serviceaccounts", "ServiceAccount", True),
           ("configmaps", "ConfigMap", True), ("services", "Service", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True), ("deployments", "Deployment", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False)],
}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def find(kind: str, name: str | None = None) -> dict:
    matches = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} objects"
    return matches[0]


def kubectl() -> tuple[str, str]:
    if DEBIAN_KUBECTL.exists():
        return str(DEBIAN_KUBECTL), "Debian's kubernetes-client"
    other = shutil.which("kubectl")
    if other:
        return other, f"{other} (Debian's kubernetes-client was not unpacked into the venv)"
    pytest.fail("no kubectl: deploy/bootstrap-debian.sh unpacks Debian's kubernetes-client into the venv")


def write_discovery_cache(home: Path) -> tuple[Path, Path]:
    cache = home / "cache"
    base = cache / "discovery" / NOWHERE.replace(":", "_")
    groups = []
    for group_version, resources in DISCOVERY.items():
        group, _, version = group_version.rpartition("/")
        entry = {"groupVersion": group_version, "version": version}
        groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
        (base / group_version).mkdir(parents=True, exist_ok=True)
        (base / group_version / "serverresources.json").write_text(json.dumps({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": [{"name": r, "singularName": "", "namespaced": ns, "kind": k,
                           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                          for r, k, ns in resources]}))
    (base / "servergroups.json").write_text(json.dumps({"kind": "APIGroupList", "apiVersion": "v1",
                                                        "groups": groups}))
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": f"https://{NOWHERE}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "nobody", "user": {"token": "none"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "nobody"}}]}))
    return kubeconfig, cache


def run_kubectl(tmp_path: Path, target: Path) -> subprocess.CompletedProcess:
    binary, _ = kubectl()
    kubeconfig, cache = write_discovery_cache(tmp_path)
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    return subprocess.run([binary, "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache), "create",
                           "--dry-run=client", "--validate=false", "-f", str(target)],
                          capture_output=True, text=True, env=env, timeout=60)


def test_kubectl_create_dry_run_accepts_every_manifest(tmp_path):
    done = run_kubectl(tmp_path, MANIFESTS)
    print(f"kubectl: {kubectl()[1]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "namespace/tcpmesh-system created (dry run)",
        "serviceaccount/tcpmesh-agent created (dry run)",
        "clusterrole.rbac.authorization.k8s.io/tcpmesh-agent created (dry run)",
        "clusterrolebinding.rbac.authorization.k8s.io/tcpmesh-agent created (dry run)",
        "configmap/tcpmesh-config created (dry run)",
        "configmap/tcpmesh-policies created (dry run)",
        "daemonset.apps/tcpmesh-agent created (dry run)",
        "serviceaccount/tcpmesh-issuer created (dry run)",
        "clusterrole.rbac.authorization.k8s.io/tcpmesh-issuer created (dry run)",
        "clusterrolebinding.rbac.authorization.k8s.io/tcpmesh-issuer created (dry run)",
        "configmap/tcpmesh-issuer-config created (dry run)",
        "deployment.apps/tcpmesh-issuer created (dry run)",
        "service/tcpmesh-issuer created (dry run)",
    ]


def test_kubectl_rejects_a_kind_that_does_not_exist(tmp_path):
    """The dry run is not a rubber stamp: an unknown kind fails (kubectl tries the server and finds nothing)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: DaemonSett\nmetadata: {name: x, namespace: tcpmesh-system}\n")
    done = run_kubectl(tmp_path, bad)
    assert done.returncode != 0


def unknown_fields(data, model_name: str, where: str) -> list[str]:
    """Field names in ``data`` that the official client's model does not have (recursively)."""
    from kubernetes import client

    model = getattr(client.models, model_name, None)
    if model is None or not isinstance(data, dict):
        return []
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = []
    for key, value in data.items():
        if key not in by_json:
            problems.append(f"{where}.{key} (no such field in {model_name})")
            continue
        kind = model.openapi_types[by_json[key]]
        if kind.lower().startswith("list[") and isinstance(value, list):
            problems += [p for i, item in enumerate(value) for p in unknown_fields(item, kind[5:-1], f"{where}.{key}[{i}]")]
        elif kind.lower().startswith("dict(") or kind == "object":
            continue
        else:
            problems += unknown_fields(value, kind, f"{where}.{key}")
    return problems


def test_every_object_fits_the_official_clients_models():
    client = require_module("kubernetes.client", "install the kubernetes extra (make setup does)")

    api = client.ApiClient()
    for source, doc in documents():
        model = ("V1" + doc["kind"])
        assert doc["apiVersion"] in ("v1", "apps/v1", "rbac.authorization.k8s.io/v1"), source
        assert unknown_fields(doc, model, f"{source}:{doc['kind']}") == []
        typed = api._ApiClient__deserialize(doc, model)   # the models' own required-field checks run here
        assert typed.metadata.name == doc["metadata"]["name"]
    # and the check would see a misspelt field
    daemonset = find("DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropogation"] = "None"
    assert unknown_fields(daemonset, "V1DaemonSet", "x") == [
        "x.spec.template.spec.containers[0].volumeMounts[0].mountPropogation (no such field in V1VolumeMount)"]


def test_rbac_is_read_only_on_what_the_source_watches_for_the_agents_service_account():
    role = find("ClusterRole", "tcpmesh-agent")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "nodes", "services"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
    # every resource the Kubernetes source lists and watches is granted (a missing one: 403 at start)
    require_module("kubernetes", "install the kubernetes extra (make setup does)")
    from kubernetes.client import ApiClient

    from agent.registry.kubernetes.source import KubernetesSource

    source = KubernetesSource(ApiClient(), "worker-1", "cluster.local", "/sys/fs/cgroup", lambda registry: None)
    assert {w.kind for w in source.watches} == {r for rule in role["rules"] for r in rule["resources"]}
    binding = find("ClusterRoleBinding", "tcpmesh-agent")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = find("ServiceAccount", "tcpmesh-agent")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert find("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_the_daemonset_has_host_network_privilege_and_the_host_mounts():
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True and container["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/sys/fs/cgroup", "/sys/fs/bpf", "/run/tcpmesh"):
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    # what deploy/prometheus/prometheus-kubernetes.yml discovers
    assert pod.get("hostNetwork") and find("DaemonSet")["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/name"] == "tcpmesh-agent"
    assert {"name": "admin", "containerPort": 15020, "protocol": "TCP"} in container["ports"]


def test_the_configmap_config_loads_with_the_daemonsets_environment(tmp_path):
    from agent.config import load_config

    config_text = find("ConfigMap", "tcpmesh-config")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(config_text)
    (container,) = find("DaemonSet")["spec"]["template"]["spec"]["containers"]
    field_values = {"spec.nodeName": "worker-1", "status.hostIP": "10.0.0.11", "metadata.uid": "u"}
    env = {e["name"]: field_values[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in container["env"]}
    config = load_config(tmp_path / "config.yaml", environ=env)
    assert config.registry.source == "kubernetes" and config.node.name == "worker-1"
    assert config.admin.address == config.node.address == config.capture.redirect_address == "10.0.0.11"
    # the node guard is on: kubepods comes from the start line, the agent's netns is exempt
    assert config.capture.guard_exempt_host_network is True
    assert "TCPMESH_CAPTURE_PODS_CGROUP=" in container["args"][0] and "kubepods-cgroup" in container["args"][0]
    assert "exec /usr/local/bin/tcpmesh run --config /etc/tcpmesh/config/config.yaml" in container["args"][0]


def test_the_config_is_a_watched_directory_mount_so_a_configmap_edit_reaches_the_running_agent(tmp_path):
    """No subPath (the kubelet never updates a subPath file: every change would be a rolling restart that
    ends the node's flows); the --config file lies in the mounted directory; the ConfigMap turns
    config_file.watch on (tests/integration/test_kubernetes_config_reload.py: the swap applied)."""
    from agent.config import config_from_mapping

    pod = find("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in mount and mount["readOnly"] is True, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == "tcpmesh-config"
    config_path = container["args"][0].split("--config ")[1].split()[0]
    assert config_path == f"{mount['mountPath']}/config.yaml", config_path
    doc = yaml.safe_load(find("ConfigMap", "tcpmesh-config")["data"]["config.yaml"])
    assert config_from_mapping(doc).config_file.watch is True


def test_the_images_default_command_reads_the_config_where_the_daemonset_mounts_it():
    """`docker run tcpmesh/agent` (or a manifest that keeps the image's command) reads the path of
    docs/install-kubernetes.md. Seen failing before: CMD named /etc/tcpmesh/config.yaml, which nothing mounts."""
    (cmd,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    argv = json.loads(cmd[len("CMD "):])
    (container,) = find("DaemonSet")["spec"]["template"]["spec"]["containers"]
    daemonset_path = container["args"][0].split("--config ")[1].split()[0]
    assert argv == ["run", "--config", daemonset_path], argv
    assert f"--config\n{daemonset_path}" in (REPO / "docs/install-kubernetes.md").read_text().replace(" ", "\n")


def test_the_example_policy_loads(tmp_path):
    from agent.policy.loader import load_paths

    for name, text in find("ConfigMap", "tcpmesh-policies")["data"].items():
        (tmp_path / name).write_text(text)
    policies = load_paths([tmp_path])
    assert [p.key for p in policies.authorization] == ["data/orders-db"]


def test_the_dockerfile_copies_what_exists_and_installs_packages_debian_12_has():
    text = DOCKERFILE.read_text()
    assert text.splitlines()[[i for i, l in enumerate(text.splitlines()) if l.startswith("FROM")][0]] == \
        "FROM debian:12-slim"
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY")]
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "kubernetes = [" in pyproject and 'src[kubernetes]"' in text
    install = text.split("apt-get install -y --no-install-recommends", 1)[1].split("&&", 1)[0]
    packages = install.replace("\\", " ").split()
    if not list(Path("/var/lib/apt/lists").glob("*Packages*")):
        skip_or_fail("no apt package lists on this machine: run apt-get update")
    if subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True).returncode != 0:
        missing = [p for p in packages if subprocess.run(["apt-cache", "show", p], capture_output=True).returncode]
        assert missing == [], f"not packages of this Debian: {missing}"


# ---- the Kubernetes schemas, offline (kubernetes-validate carries them) -----------------------------
# The Kubernetes minors tcpmesh supports: the official client's floor (pyproject: kubernetes>=29)
# through the newest schemas kubernetes-validate ships. docs/install-kubernetes.md names the same.
OLDEST_MINOR, NEWEST_MINOR = "1.29.0", "1.37.0"


@pytest.mark.parametrize("version", [OLDEST_MINOR, NEWEST_MINOR])
def test_every_manifest_validates_against_the_kubernetes_schemas_strictly(version):
    """Each document of deploy/kubernetes/ against that minor's OpenAPI schema, strict: an unknown or
    misspelt field, a wrong type or a missing required field fails, naming the file and the path."""
    kv = require_module("kubernetes_validate", "pip install -e '.[test]' (kubernetes-validate)")
    problems = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                problems.append(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: "
                                f"{'.'.join(str(p) for p in exc.path)}: {exc.message}")
    assert not problems, f"Kubernetes {version} schema:\n" + "\n".join(problems)


def test_the_schema_check_catches_a_misspelt_field():
    kv = require_module("kubernetes_validate", "pip install -e '.[test]' (kubernetes-validate)")
    daemonset = next(d for d in yaml.safe_load_all((MANIFESTS / "03-daemonset.yaml").read_text())
                     if d and d["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(daemonset, NEWEST_MINOR, strict=True)


def test_the_issuer_runs_two_replicas_behind_a_service_with_a_config_that_loads(tmp_path):
    """deploy/kubernetes/04-issuer.yaml: 2 replicas, the Service reaches the issuer port, the ConfigMap's
    issuer.yaml loads with the issuer's own validation, the CA comes from a Secret mounted read only with
    mode 0400 (the issuer refuses a key group or others may read), RBAC is exactly what the issuer calls."""
    from agent.issuer.config import issuer_config_from_mapping

    deployment = find("Deployment", "tcpmesh-issuer")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["tcpmesh", "issuer", "run"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = issuer_config_from_mapping(yaml.safe_load(find("ConfigMap", "tcpmesh-issuer-config")["data"]["issuer.yaml"]))
    assert ports["issuer"] == config.listen.port and config.registry.source == "kubernetes"
    assert config.tokens.key_file == ""   # no ledger shared by the replicas: no one-time tokens here
    ca_volume = next(v for v in pod["volumes"] if v["name"] == "ca")
    assert ca_volume["secret"]["defaultMode"] == 0o400
    mount = next(m for m in container["volumeMounts"] if m["name"] == "ca")
    assert mount["readOnly"] and mount["mountPath"] == config.ca_dir
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = find("Service", "tcpmesh-issuer")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == config.listen.port
    rules = find("ClusterRole", "tcpmesh-issuer")["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                     {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
                     {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    # what the issuer's Kubernetes source watches is exactly what its role grants (a missing one: 403 forever)
    require_module("kubernetes", "install the kubernetes extra (make setup does)")
    from agent.issuer.metrics import IssuerMetrics
    from agent.issuer.run import RegistryHolder, kubernetes_registry_source
    from prometheus_client import CollectorRegistry

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://{NOWHERE}"}}],
        "users": [{"name": "u", "user": {"token": "none"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    source = kubernetes_registry_source(replace(config, registry=replace(config.registry, kubeconfig=str(kubeconfig))),
                                        RegistryHolder(), IssuerMetrics(CollectorRegistry()))
    assert {w.kind for w in source.watches} == {"pods", "nodes"}
    # a 403 on a watch names the issuer's ServiceAccount and this role's rule, not the agent's 01-rbac.yaml
    assert all("tcpmesh-issuer" in w.forbidden_hint and "01-rbac" not in w.forbidden_hint.split(";")[0]
               for w in source.watches)


def test_the_daemonset_holds_no_signing_key_and_attests_with_a_projected_token(tmp_path):
    """No node CA material on the node: the agent runs identity.mode issuer and joins by attestation with
    a pod-bound token for the issuer's audience, short-lived; the issuer checks that very audience and
    service account; the node SVID lives in memory only."""
    from agent.config import load_config
    from agent.issuer.config import issuer_config_from_mapping

    pod = find("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not [v for v in volumes.values() if "node-ca" in yaml.safe_dump(v)], "a node CA volume is left"
    (tmp_path / "config.yaml").write_text(find("ConfigMap", "tcpmesh-config")["data"]["config.yaml"])
    identity = load_config(tmp_path / "config.yaml", environ={"TCPMESH_NODE_NAME": "worker-1",
                                                             "TCPMESH_NODE_ADDRESS": "10.0.0.11",
                                                             "TCPMESH_CAPTURE_REDIRECT_ADDRESS": "10.0.0.11"}).identity
    assert identity.mode == "issuer" and not identity.issuer.bootstrap_token_file

    def volume_of(path: str) -> dict:
        directory = str(Path(path).parent)
        assert directory in mounts, f"{path}: nothing is mounted at {directory}"
        return volumes[mounts[directory]["name"]]

    (source,) = volume_of(identity.issuer.service_account_token_file)["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert Path(identity.issuer.service_account_token_file).name == token["path"]
    assert token["expirationSeconds"] <= 3600     # short: the kubelet refreshes it at 80 % of its life
    assert volume_of(identity.issuer.ca_bundle)["configMap"]["name"] == "tcpmesh-trust-bundle"
    credential = volumes[mounts[identity.issuer.credential_dir]["name"]]
    assert credential["emptyDir"]["medium"] == "Memory"
    issuer = issuer_config_from_mapping(yaml.safe_load(find("ConfigMap", "tcpmesh-issuer-config")["data"]["issuer.yaml"]))
    k8s = issuer.attestation.kubernetes
    assert k8s.enabled and k8s.exclusive and k8s.audience == token["audience"]
    assert issuer.node_svid_ttl_seconds <= 900   # a copied node SVID is good for minutes, not hours
    assert (k8s.namespace, k8s.service_account) == (find("ServiceAccount", "tcpmesh-agent")["metadata"]["namespace"],
                                                    pod["serviceAccountName"])
    service = find("Service", "tcpmesh-issuer")
    assert identity.issuer.addresses == [f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:"
                                         f"{service['spec']['ports'][0]['port']}"]
