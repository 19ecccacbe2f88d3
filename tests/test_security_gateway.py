"""TLS with client certificates, API keys with roles, and what the ticket RPCs may reveal or
overwrite, against a real gateway + Triton (issue 12, item 3)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.clients.channel import ChannelSecurity, open_channel
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.service.auth import ApiKeys, AuthConfigError, digest
from tests.conftest import sample_clips
from tests.test_reliability_gateway import gateway_process

KEYS = {  # name -> (key, roles)
    "transcriber": ("key-transcriber-0123456789", ["transcribe"]),
    "reviewer": ("key-reviewer-0123456789", ["transcribe", "analyze", "correct"]),
    "operator": ("key-operator-0123456789", ["admin"]),
    "workbench": ("key-workbench-0123456789", ["transcribe", "analyze", "correct", "delegate"]),
}
TICKET_TEXT = "江北区铁路新村门口的垃圾桶满了好几天了没人清运，臭得要命"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=folder)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def secured(triton, model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    certs = make_certificates(folder)
    keys = folder / "api_keys.yaml"
    entries = [{"name": name, "sha256": digest(key), "roles": roles} for name, (key, roles) in KEYS.items()]
    keys.write_text(json.dumps({"keys": entries}))  # JSON is YAML
    audit = folder / "audit.jsonl"
    client_tls = ChannelSecurity(tls_ca=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"])
    args = ["--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
            "--tls-client-ca", str(certs["ca.pem"]), "--api-keys", str(keys), "--audit-log", str(audit)]
    process = gateway_process(model_dir, triton.grpc_url, folder, args, credentials=client_tls.credentials())
    try:
        yield process, certs, audit
    finally:
        process.stop()


def _stub(secured, name: str | None, *, client_cert: bool = True):
    process, certs, _ = secured
    security = ChannelSecurity(
        tls_ca=certs["ca.pem"],
        client_cert=certs["client.pem"] if client_cert else None,
        client_key=certs["client.key"] if client_cert else None,
        token=KEYS[name][0] if name else "",
    )
    return open_channel(process.address, security)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def _transcribe_request(**kw) -> asr_pb2.TranscribeRequest:
    clip = sample_clips()[0]
    return asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=1, **kw)


def test_health_needs_no_key_but_a_client_certificate(secured):
    with _stub(secured, None) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with _stub(secured, None, client_cert=False) as channel:  # mutual TLS: no certificate, no connection
        assert _code(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    with grpc.insecure_channel(secured[0].address) as channel:  # plaintext to a TLS port
        assert _code(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )


@pytest.mark.parametrize("token", [None, "not-a-key", "x" * 4000])  # 4000: over MAX_KEY_CHARS, under gRPC's 8 KB metadata limit
def test_every_rpc_but_health_needs_a_valid_key(secured, token):
    process, certs, _ = secured
    security = ChannelSecurity(tls_ca=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"],
                               token=token or "")
    with open_channel(process.address, security) as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        calls = [
            lambda: stub.Transcribe(_transcribe_request(), timeout=30),
            lambda: stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=TICKET_TEXT), timeout=30),
            lambda: stub.CorrectTicket(asr_pb2.CorrectTicketRequest(ticket_id="HL-x", field="urgency", value="high"), timeout=30),
            lambda: list(stub.StreamingRecognize(iter([asr_pb2.StreamingRecognizeRequest(config=asr_pb2.StreamingConfig())]), timeout=30)),
            lambda: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)),
        ]
        assert [_code(call) for call in calls] == [grpc.StatusCode.UNAUTHENTICATED] * len(calls)


def test_roles(secured):
    with _stub(secured, "transcriber") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        assert stub.Transcribe(_transcribe_request(), timeout=120).text
        assert _code(lambda: stub.Transcribe(_transcribe_request(analyze=True), timeout=120)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=TICKET_TEXT), timeout=30)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert _code(lambda: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))) == grpc.StatusCode.PERMISSION_DENIED
    with _stub(secured, "operator") as channel:  # admin: everything, reflection included
        replies = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
        assert "asr.v1.Asr" in [s.name for s in replies[0].list_services_response.service]


def test_tickets_are_not_overwritten_and_corrections_are_attributed(secured):
    _, _, audit = secured
    with _stub(secured, "reviewer") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        metadata = {"ticket_id": "HL-security-1"}
        ticket = stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=TICKET_TEXT, metadata=metadata, record=True), timeout=120)
        assert ticket.ticket_id == "HL-security-1"
        again = asr_pb2.AnalyzeTicketRequest(text="另一段完全不同的文字", metadata=metadata, record=True)
        assert _code(lambda: stub.AnalyzeTicket(again, timeout=120)) == grpc.StatusCode.ALREADY_EXISTS

        corrected = stub.CorrectTicket(
            asr_pb2.CorrectTicketRequest(ticket_id="HL-security-1", field="urgency", value="high", corrected_by="someone else"),
            timeout=30,
        )
        assert corrected.corrected_by == "reviewer"  # the key's name, not the request's field
        # an unknown id gives the same answer whatever else is wrong with the request
        for field in ("urgency", "no-such-field"):
            request = asr_pb2.CorrectTicketRequest(ticket_id="HL-does-not-exist", field=field, value="high")
            with pytest.raises(grpc.RpcError) as raised:
                stub.CorrectTicket(request, timeout=30)
            assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such ticket")
    lines = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    assert {"ticket_id": "HL-security-1", "field": "urgency", "new_value": "high", "corrected_by": "reviewer"}.items() <= lines[-1].items()


def test_a_delegate_key_records_the_user_it_acts_for(secured):
    """The workbench's key (role delegate) names its logged-in user; corrections read "<user> via workbench".
    A key without the role that names a user is refused, and so is a malformed name."""
    import asyncio

    from gateway.web.gateway_client import GatewayClient, error_text

    process, certs, audit = secured
    ticket_id = "HL-security-delegate"
    with _stub(secured, "workbench") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=TICKET_TEXT, metadata={"ticket_id": ticket_id}, record=True), timeout=120)
        correct = asr_pb2.CorrectTicketRequest(ticket_id=ticket_id, field="urgency", value="medium", corrected_by="someone else")
        assert stub.CorrectTicket(correct, timeout=30).corrected_by == "workbench"  # no user named: the key
        ascii_user = stub.CorrectTicket(correct, timeout=30, metadata=[("x-on-behalf-of", "lijun")])
        assert ascii_user.corrected_by == "lijun via workbench"
        for metadata in (
            [("x-on-behalf-of-bin", "王\n芳".encode())],  # a control character
            [("x-on-behalf-of-bin", b"\xff\xfe")],  # not UTF-8
            [("x-on-behalf-of", "x" * 65)],
            [("x-on-behalf-of", " ")],
            [("x-on-behalf-of", "lijun"), ("x-on-behalf-of-bin", "王芳".encode())],  # two different users
        ):
            assert _code(lambda: stub.CorrectTicket(correct, timeout=30, metadata=metadata)) == grpc.StatusCode.INVALID_ARGUMENT
    with _stub(secured, "reviewer") as channel:  # correct, but not delegate: may not speak for anyone
        stub = asr_pb2_grpc.AsrStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.CorrectTicket(correct, timeout=30, metadata=[("x-on-behalf-of", "lijun")])
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED and "delegate" in raised.value.details()

    async def through_the_workbench_client(key: str):
        client = GatewayClient(process.address, ca_file=certs["ca.pem"], api_key=KEYS[key][0],
                               client_cert=certs["client.pem"], client_key=certs["client.key"])
        try:
            return await client.correct(ticket_id, "urgency", "high", "王芳")
        except grpc.aio.AioRpcError as error:
            return error
        finally:
            await client.close()

    reply = asyncio.run(through_the_workbench_client("workbench"))
    assert reply.corrected_by == "王芳 via workbench"
    refused = asyncio.run(through_the_workbench_client("reviewer"))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "delegate" in error_text(refused)
    lines = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    assert {"ticket_id": ticket_id, "new_value": "high", "corrected_by": "王芳 via workbench"}.items() <= lines[-1].items()


def test_a_workbench_correction_through_a_keyed_gateway_names_the_operator(secured, tmp_path):
    """The workbench app itself (in-process) over TLS with the workbench's key: the operator who is
    logged in, not the key, is the correction's author."""
    import re
    import sqlite3

    from fastapi.testclient import TestClient

    from gateway.web.app import WebConfig, create_app
    from gateway.web.auth import hash_password
    from tests.test_web_app import _login

    process, certs, _ = secured
    with _stub(secured, "workbench") as channel:
        request = asr_pb2.AnalyzeTicketRequest(text=TICKET_TEXT, metadata={"ticket_id": "HL-security-web"}, record=True)
        asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(request, timeout=120)
    users = tmp_path / "users.yaml"
    users.write_text(f"users:\n  - name: op\n    role: operator\n    password_hash: \"{hash_password('op-pass-123')}\"\n", encoding="utf-8")
    config = WebConfig(
        gateway=process.address, users_file=users, history_db=certs["ca.pem"].parent / "history.sqlite", data_dir=tmp_path / "web",
        gateway_ca=certs["ca.pem"], gateway_client_cert=certs["client.pem"], gateway_client_key=certs["client.key"],
        gateway_api_key=KEYS["workbench"][0],
    )
    with TestClient(create_app(config)) as client:
        _login(client)
        page = client.get("/tickets/HL-security-web").text
        csrf = re.search(r'data-csrf="([^"]+)"', page).group(1)
        reply = client.post("/api/tickets/HL-security-web/correct", json={"field": "urgency", "value": "low"}, headers={"X-CSRF-Token": csrf})
        assert reply.status_code == 200 and reply.json()["corrected_by"] == "op via workbench"
    with sqlite3.connect(config.history_db) as history:  # what export-corrections hands to retraining
        assert history.execute("SELECT corrected_by FROM corrections WHERE ticket_id = 'HL-security-web'").fetchall() == [("op via workbench",)]


def test_cli_client_options(secured):
    from gateway.clients.cli import transcribe_files

    process, certs, _ = secured
    clip = sample_clips()[0]
    security = ChannelSecurity(tls_ca=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"],
                               token=KEYS["transcriber"][0])
    [(_, result, error)] = list(transcribe_files([clip.path], server=process.address, language=clip.language,
                                                 beam_size=1, security=security))
    assert error is None and result["text"]


def test_key_file_is_checked(tmp_path):
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - name: x\n    sha256: abc\n    roles: [transcribe]\n")
    with pytest.raises(AuthConfigError, match="64-hex-digit"):
        ApiKeys.load(bad)
    bad.write_text(f"keys:\n  - name: x\n    sha256: {digest('k')}\n    roles: [root]\n")
    with pytest.raises(AuthConfigError, match="roles"):
        ApiKeys.load(bad)
    example = ApiKeys.load(Path(__file__).resolve().parent.parent / "config" / "api_keys.example.yaml")
    assert example.identify("example-only-do-not-use").roles == {"transcribe"}
    assert example.identify("") is None and example.identify("example-only-do-not-usE") is None
