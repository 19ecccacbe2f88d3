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
