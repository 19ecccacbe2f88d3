"""docker-compose and the Kubernetes manifests: Triton reachable only from the gateway, probes,
resources, autoscaling on a gateway metric; manifests validated against the Kubernetes schemas
bundled in kubernetes-validate (nothing downloaded) (issue 12, items 3 and 5)."""

from __future__ import annotations

import argparse
import copy

import kubernetes_validate
import pytest
import yaml

from gateway.service import metrics, remote_tickets
from tests.conftest import PROJECT_ROOT

K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest release the manifests must run on


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
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "5s"  # must be a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    typo = copy.deepcopy(by_kind("Service", "triton"))
    typo["spec"]["selectr"] = typo["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def test_probes_and_resources():
    gateway = by_kind("Deployment", "asr-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert "--host=0.0.0.0" in gateway["args"] and "--api-keys=/auth/api_keys.yaml" in gateway["args"]
    assert any(a.startswith("--tls-cert=") for a in gateway["args"])
    # grpc.health.v1 (no API key needed) over TLS: an exec probe, since a kubelet grpc probe speaks plaintext only
    for probe in (gateway["readinessProbe"], gateway["livenessProbe"]):
        command = probe["exec"]["command"]
        assert command[:3] == ["python", "-m", "gateway.clients.healthcheck"] and command[-1] == "127.0.0.1:50051"
        assert "--tls-ca=/tls/ca.crt" in command
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
    # the workbench's gRPC goes to the gateway in its pod (over TLS: records also serves the replicas)
    assert _arg(web, "gateway") == f"127.0.0.1:{_arg(records, 'port')}"
    assert records["readinessProbe"]["exec"]["command"][-1] == _arg(web, "gateway")  # a kubelet grpc probe speaks no TLS
    assert any(a.startswith("--tls-ca=") for a in records["readinessProbe"]["exec"]["command"])
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


def _volumes(deployment: str) -> dict[str, dict]:
    return {v["name"]: v for v in by_kind("Deployment", deployment)["spec"]["template"]["spec"]["volumes"]}


def _mounted_at(deployment: str, container: dict, path: str) -> dict:
    """The volume that holds ``path`` in ``container``."""
    [name] = [m["name"] for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    return _volumes(deployment)[name]


def test_the_replicas_send_their_tickets_to_the_one_history():
    """The replicated gateways keep no history: --ticket-service points at a Service for records,
    over TLS with a key of their own, which records names in --ticket-forwarders (issue 14)."""
    gateway = _containers("asr-gateway")["gateway"]
    records = _containers("asr-workbench")["records"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--history-db")
    remote_tickets.add_arguments(parser)
    options, _ = parser.parse_known_args(gateway["args"])
    assert options.history_db is None and not any(a.startswith("--audit-log") for a in gateway["args"])
    # the address is the Service in front of records' gRPC port
    host, port = options.ticket_service.split(":")
    service = by_kind("Service", host)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == by_kind("Deployment", "asr-workbench")["spec"]["selector"]["matchLabels"]
    [service_port] = service["spec"]["ports"]
    assert service_port["port"] == int(port)
    [container_port] = [p for p in records["ports"] if p["name"] == service_port["targetPort"]]
    assert container_port["containerPort"] == int(_arg(records, "port")) and _arg(records, "host") == "0.0.0.0"
    # records: TLS, API keys, the replicas' key trusted to pass its callers' names on
    assert _arg(records, "api-keys").startswith("/auth/") and _arg(records, "tls-cert").startswith("/records-tls/")
    records_tls = _mounted_at("asr-workbench", records, _arg(records, "tls-cert"))["secret"]["secretName"]
    [forwarder] = _arg(records, "ticket-forwarders").split(",")
    assert f"new-key {forwarder} --roles analyze,correct,delegate" in (K8S_DIR / "gateway.yaml").read_text(encoding="utf-8")
    # the replicas: records' CA (never its private key) and their key from Secrets
    sources = {s["secret"]["name"]: s["secret"]["items"] for s in _mounted_at("asr-gateway", gateway, str(options.ticket_service_ca))["projected"]["sources"]}
    assert sources[records_tls] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert str(options.ticket_service_ca).endswith("/ca.crt") and str(options.ticket_service_api_key_file).endswith("/api-key")
    key_volume = _mounted_at("asr-gateway", gateway, str(options.ticket_service_api_key_file))
    assert {s["secret"]["name"] for s in key_volume["projected"]["sources"]} == {records_tls, "asr-ticket-forwarder"}
    web = _containers("asr-workbench")["workbench"]
    web_ca = _mounted_at("asr-workbench", web, _arg(web, "gateway-ca"))["secret"]
    assert web_ca["secretName"] == records_tls and web_ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_records_admits_only_the_gateways_on_grpc():
    """Every policy on the workbench pod, together: HTTPS from anywhere (the ingress), records'
    gRPC port only from the asr-gateway pods."""
    admitted: dict[int, list] = {}
    for policy in (d for d in manifests() if d["kind"] == "NetworkPolicy"):
        if policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "asr-workbench"}:
            for rule in policy["spec"]["ingress"]:
                for port in rule["ports"]:
                    admitted.setdefault(port["port"], []).extend(
                        [peer["podSelector"]["matchLabels"] for peer in rule["from"]] if "from" in rule else ["anyone"]
                    )
    records_port = int(_arg(_containers("asr-workbench")["records"], "port"))
    assert admitted == {8080: ["anyone"], records_port: [{"app.kubernetes.io/name": "asr-gateway"}]}
