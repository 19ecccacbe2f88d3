"""docker-compose and the Kubernetes manifests: Triton reachable only from the gateway, probes,
resources, autoscaling on a gateway metric; manifests validated against the Kubernetes schemas
bundled in kubernetes-validate (nothing downloaded) (issue 12, items 3 and 5)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from gateway.service import metrics
from tests.conftest import PROJECT_ROOT

K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest release the manifests must run on (grpc probes: 1.27+)


def manifests() -> list[dict]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return documents


def by_kind(kind: str, name: str) -> dict:
    [found] = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("document", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_the_kubernetes_schema(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_mistakes():
    broken = copy.deepcopy(by_kind("Deployment", "asr-gateway"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    typo = copy.deepcopy(by_kind("Service", "triton"))
    typo["spec"]["selectr"] = typo["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def test_probes_and_resources():
    gateway = by_kind("Deployment", "asr-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051}  # grpc.health.v1, no key needed
    assert gateway["livenessProbe"]["grpc"] == {"port": 50051}
    assert "--host=0.0.0.0" in gateway["args"] and "--api-keys=/auth/api_keys.yaml" in gateway["args"]
    assert any(a.startswith("--tls-cert=") for a in gateway["args"])
    triton = by_kind("Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for container in (gateway, triton):
        assert set(container["resources"]) == {"requests", "limits"}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_autoscaling_on_a_metric_the_gateway_exports():
    hpa = by_kind("HorizontalPodAutoscaler", "asr-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "asr-gateway"
    [metric] = hpa["spec"]["metrics"]
    exported = {m.name for m in metrics.REGISTRY.collect()}
    assert metric["pods"]["metric"]["name"] in exported


def test_only_the_gateway_reaches_triton():
    policy = by_kind("NetworkPolicy", "triton-from-gateway-only")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}
    grpc_rules = [rule for rule in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 8001} in rule["ports"]]
    assert [rule["from"] for rule in grpc_rules] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "asr-gateway"}}}]]
    assert by_kind("Service", "triton")["spec"]["type"] == "ClusterIP"


def test_compose_publishes_the_gateway_only():
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    triton, gateway = compose["services"]["triton"], compose["services"]["gateway"]
    assert "ports" not in triton and triton["networks"] == ["inference"]
    assert compose["networks"]["inference"]["internal"] is True
    assert "inference" in gateway["networks"] and gateway["ports"] == ["50051:50051"]
    assert "--host=0.0.0.0" in gateway["command"]  # the gateway binds 127.0.0.1 unless told


def _containers(deployment: str) -> dict[str, dict]:
    return {c["name"]: c for c in by_kind("Deployment", deployment)["spec"]["template"]["spec"]["containers"]}


def _arg(container: dict, name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


def test_every_container_runs_unprivileged_with_resources():
    for deployment in (d for d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] != "triton"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container["securityContext"]["runAsNonRoot"] is True, container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
            assert set(container["resources"]) == {"requests", "limits"}, container["name"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]


def test_the_workbench_runs_beside_the_one_gateway_that_writes_the_history():
    deployment = by_kind("Deployment", "asr-workbench")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}  # one writer
    containers = _containers("asr-workbench")
    web, records = containers["workbench"], containers["records"]
    # the workbench's gRPC goes to the gateway in its pod, which listens on loopback only
    assert _arg(web, "gateway") == f"127.0.0.1:{_arg(records, 'port')}" and _arg(records, "host") == "127.0.0.1"
    assert records["readinessProbe"]["exec"]["command"][-1] == _arg(web, "gateway")  # a kubelet grpc probe cannot reach loopback
    assert web["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert _arg(records, "triton") == "triton:8001" and _arg(records, "api-keys").startswith("/auth/")
    # one history file on one volume: written by records, read by the workbench
    assert _arg(web, "history-db") == _arg(records, "history-db")
    mounts = {c: {m["name"]: m["mountPath"] for m in containers[c]["volumeMounts"]} for c in containers}
    assert mounts["workbench"]["history"] == mounts["records"]["history"] and _arg(web, "history-db").startswith(mounts["records"]["history"] + "/")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["history"]["persistentVolumeClaim"]["claimName"]
    assert by_kind("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]  # SQLite: one host
    # users and the gateway key from a Secret, TLS like the gateway's
    assert volumes["config"]["secret"]["secretName"] == "asr-workbench"
    assert _arg(web, "users").startswith(mounts["workbench"]["config"]) and _arg(web, "gateway-api-key-file").startswith(mounts["workbench"]["config"])
    assert _arg(web, "tls-cert").startswith(mounts["workbench"]["tls"]) and "secret" in volumes["tls"]
    service = by_kind("Service", "asr-workbench")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https"]


def test_triton_admits_only_gateways():
    """Every policy on Triton's pods, together: its gRPC port from the asr-gateway pods and from the
    workbench pod (whose `records` container is a gateway), nothing else."""
    sources = []
    for policy in (d for d in manifests() if d["kind"] == "NetworkPolicy"):
        if policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}:
            for rule in policy["spec"]["ingress"]:
                if {"protocol": "TCP", "port": 8001} in rule["ports"]:
                    sources += [peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]]
    assert sorted(sources) == ["asr-gateway", "asr-workbench"]
    assert "records" in _containers("asr-workbench") and _containers("asr-workbench")["records"]["image"].startswith("asr-gateway:")
    [only] = by_kind("NetworkPolicy", "asr-workbench-https-only")["spec"]["ingress"]
    assert only["ports"] == [{"protocol": "TCP", "port": 8080}]
