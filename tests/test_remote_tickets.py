"""One ticket history for replicated gateways: a gateway started with --ticket-service forwards
AnalyzeTicket, CorrectTicket and Transcribe's analysis to the gateway that owns the history
(gateway/service/remote_tickets.py), against a real Triton and two real gateways.

The owner listens with TLS, client certificates and API keys (as the workbench pod's `records`
container does in Kubernetes); the forwarder reaches it with its own key (roles analyze,
correct, delegate), which the owner names in --ticket-forwarders.
"""

from __future__ import annotations

import json
import sqlite3

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from gateway.clients.channel import ChannelSecurity, open_channel
from gateway.launch.local import GatewayProcess
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.service import server
from gateway.service.auth import digest
from gateway.service.ticket_service import SEGMENTS_KEY
from tests.conftest import PROJECT_ROOT
from tests.test_reliability_gateway import START_TIMEOUT_S, gateway_process
from tests.test_security_gateway import make_certificates

OWNER_KEYS = {  # name -> (key, roles)
    "reviewer": ("key-owner-reviewer-0123456789", ["transcribe", "analyze", "correct"]),
    "replicas": ("key-owner-replicas-0123456789", ["analyze", "correct", "delegate"]),  # the forwarder's
}
FORWARDER_KEYS = {
    "agent": ("key-fwd-agent-0123456789", ["transcribe", "analyze", "correct"]),
    "workbench": ("key-fwd-workbench-0123456789", ["transcribe", "analyze", "correct", "delegate"]),
    "listener": ("key-fwd-listener-0123456789", ["transcribe"]),
}
GAS_LEAK = "阳光花园3栋2单元楼道里煤气味特别重，怀疑哪家燃气泄漏了"
GAS_LEAK_AGAIN = "你好，阳光花园3栋那个单元一进去就闻到一股臭鸡蛋的味道，好多住户都闻到了"
LITTER = "江北区铁路新村门口的垃圾桶满了好几天了没人清运，臭得要命"
CALL = PROJECT_ROOT / "data" / "calls" / "call_01_E006.flac"


def _key_file(path, keys: dict) -> None:
    entries = [{"name": name, "sha256": digest(key), "roles": roles} for name, (key, roles) in keys.items()]
    path.write_text(json.dumps({"keys": entries}))  # JSON is YAML


@pytest.fixture(scope="module")
def pair(triton, model_dir, tmp_path_factory):
    """(owner, forwarder, folder): two gateways on one Triton; the owner keeps the history."""
    folder = tmp_path_factory.mktemp("remote_tickets")
    certs = make_certificates(folder)
    owner_keys, forwarder_keys, key_file = folder / "owner_keys.yaml", folder / "forwarder_keys.yaml", folder / "replicas.key"
    _key_file(owner_keys, OWNER_KEYS)
    _key_file(forwarder_keys, FORWARDER_KEYS)
    key_file.write_text(OWNER_KEYS["replicas"][0] + "\n")
    owner_dir, forwarder_dir = folder / "owner", folder / "forwarder"
    owner_dir.mkdir()
    forwarder_dir.mkdir()
    client_tls = ChannelSecurity(tls_ca=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"])
    owner = gateway_process(model_dir, triton.grpc_url, owner_dir, [
        "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]), "--tls-client-ca", str(certs["ca.pem"]),
        "--api-keys", str(owner_keys), "--audit-log", str(owner_dir / "audit.jsonl"),
        "--ticket-forwarders", "replicas", "--decode-workers", "0",
    ], credentials=client_tls.credentials())
    # no --history-db: a gateway with --ticket-service keeps none (the two options exclude each other)
    forwarder = GatewayProcess(model_dir, triton.grpc_url, log_path=forwarder_dir / "gateway.log", extra_args=[
        "--api-keys", str(forwarder_keys), "--decode-workers", "0",
        "--ticket-service", owner.address, "--ticket-service-ca", str(certs["ca.pem"]),
        "--ticket-service-client-cert", str(certs["client.pem"]), "--ticket-service-client-key", str(certs["client.key"]),
        "--ticket-service-api-key-file", str(key_file),
        "--ticket-service-timeout-s", "300",  # far over the calls' deadlines: an UNAVAILABLE below is no timeout
    ])
    try:
        forwarder.start(timeout_s=START_TIMEOUT_S)
        yield owner, forwarder, folder, certs
    finally:
        forwarder.stop()
        owner.stop()


def _owner_stub(pair, name: str = "reviewer"):
    owner, _, _, certs = pair
    security = ChannelSecurity(tls_ca=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"],
                               token=OWNER_KEYS[name][0])
    return open_channel(owner.address, security)


def _forwarder_stub(pair, name: str):
    return open_channel(pair[1].address, ChannelSecurity(token=FORWARDER_KEYS[name][0]))


def _history(pair, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(f"file:{pair[2] / 'owner' / 'history.sqlite'}?mode=ro", uri=True) as history:
        return history.execute(sql, params).fetchall()


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def test_a_ticket_analysed_through_the_forwarder_is_in_the_owners_history(pair):
    metadata = {"ticket_id": "HL-remote-1", "received_at": "2027-02-01T09:00:00", "caller": "13800000000"}
    with _forwarder_stub(pair, "agent") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        ticket = stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=LITTER, metadata=metadata, record=True), timeout=120)
        assert ticket.ticket_id == "HL-remote-1" and ticket.category and ticket.machine_generated
        again = asr_pb2.AnalyzeTicketRequest(text="另一段完全不同的文字", metadata=metadata, record=True)
        error = _error(lambda: stub.AnalyzeTicket(again, timeout=120))  # the owner's answer, passed on
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "HL-remote-1" in error.details()
        assert stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=LITTER), timeout=120).category == ticket.category  # record=false
    [(stored,)] = _history(pair, "SELECT ticket_json FROM tickets WHERE ticket_id = ?", "HL-remote-1")
    assert json.loads(stored)["metadata"] == {"caller": "13800000000"}
    with _owner_stub(pair) as channel:  # recorded at the owner: its own clients see it there
        request = asr_pb2.AnalyzeTicketRequest(text=LITTER, metadata={"ticket_id": "HL-remote-1"}, record=True)
        assert _error(lambda: asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(request, timeout=120)).code() == grpc.StatusCode.ALREADY_EXISTS


def test_corrections_through_the_forwarder_are_recorded_as_its_caller(pair):
    _, _, folder, _ = pair
    with _owner_stub(pair) as channel:  # recorded directly at the owner
        request = asr_pb2.AnalyzeTicketRequest(text=LITTER, metadata={"ticket_id": "HL-remote-2"}, record=True)
        asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(request, timeout=120)
    with _forwarder_stub(pair, "agent") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        correct = asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-2", field="urgency", value="high", corrected_by="someone else")
        assert stub.CorrectTicket(correct, timeout=60).corrected_by == "agent"  # the forwarder's caller, not "agent via replicas"
    with _forwarder_stub(pair, "workbench") as channel:  # a front end naming its user: "<user> via <its key>", as locally
        stub = asr_pb2_grpc.AsrStub(channel)
        correct = asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-2", field="category", value="环境卫生", corrected_by="x")
        reply = stub.CorrectTicket(correct, timeout=60, metadata=[("x-on-behalf-of-bin", "王芳".encode())])
        assert reply.corrected_by == "王芳 via workbench" and json.loads(reply.new_value) == "环境卫生"
    assert _history(pair, "SELECT field, corrected_by FROM corrections WHERE ticket_id = 'HL-remote-2' ORDER BY rowid") == [
        ("urgency", "agent"), ("category", "王芳 via workbench"),
    ]
    last = json.loads((folder / "owner" / "audit.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert {"ticket_id": "HL-remote-2", "corrected_by": "王芳 via workbench", "forwarded_by": "replicas"}.items() <= last.items()


def test_errors_come_back_as_the_local_path_gives_them(pair):
    with _owner_stub(pair) as channel:
        request = asr_pb2.AnalyzeTicketRequest(text=LITTER, metadata={"ticket_id": "HL-remote-3"}, record=True)
        asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(request, timeout=120)
    cases = [
        asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-missing", field="urgency", value="high"),
        asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-missing", field="no-such-field", value="high"),  # unknown id first
        asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-3", field="urgency", value="urgent!"),
        asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-3", field="no-such-field", value="x"),
    ]
    analyze = asr_pb2.AnalyzeTicketRequest(text=LITTER, metadata={SEGMENTS_KEY: "not json"})
    with _owner_stub(pair) as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        direct = [(e.code(), e.details()) for e in [_error(lambda r=r: stub.CorrectTicket(r, timeout=60)) for r in cases]]
        direct.append((lambda e: (e.code(), e.details()))(_error(lambda: stub.AnalyzeTicket(analyze, timeout=60))))
    with _forwarder_stub(pair, "agent") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        forwarded = [(e.code(), e.details()) for e in [_error(lambda r=r: stub.CorrectTicket(r, timeout=60)) for r in cases]]
        forwarded.append((lambda e: (e.code(), e.details()))(_error(lambda: stub.AnalyzeTicket(analyze, timeout=60))))
    assert forwarded == direct
    assert [code for code, _ in direct] == [grpc.StatusCode.NOT_FOUND] * 2 + [grpc.StatusCode.INVALID_ARGUMENT] * 3
    with _forwarder_stub(pair, "listener") as channel:  # the forwarder's own keys and roles decide first
        error = _error(lambda: asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=LITTER), timeout=60))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_duplicate_through_the_forwarder_links_to_a_ticket_recorded_at_the_owner(pair):
    with _owner_stub(pair) as channel:
        first = asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(
            text=GAS_LEAK, metadata={"ticket_id": "HL-remote-gas-1", "received_at": "2027-03-01T08:00:00"}, record=True), timeout=120)
    assert first.duplicate_of == ""
    with _forwarder_stub(pair, "agent") as channel:
        second = asr_pb2_grpc.AsrStub(channel).AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(
            text=GAS_LEAK_AGAIN, metadata={"ticket_id": "HL-remote-gas-2", "received_at": "2027-03-01T08:40:00"}, record=True), timeout=120)
    assert second.duplicate_of == "HL-remote-gas-1" and second.duplicate_score > 0
    assert _history(pair, "SELECT duplicate_of FROM tickets WHERE ticket_id = 'HL-remote-gas-2'") == [("HL-remote-gas-1",)]


def test_transcribe_with_analysis_is_analysed_at_the_owner_with_its_segments(pair):
    """The forwarded analysis reads the segments (evidence with times), as the owner's own does."""
    metadata = {"ticket_id": "HL-remote-call", "received_at": "2027-04-01T10:00:00"}
    request = asr_pb2.TranscribeRequest(audio_content=CALL.read_bytes(), language="zh", beam_size=1, analyze=True,
                                        record_ticket=True, ticket_metadata=metadata)
    with _forwarder_stub(pair, "agent") as channel:
        forwarded = asr_pb2_grpc.AsrStub(channel).Transcribe(request, timeout=300)
    assert forwarded.ticket.ticket_id == "HL-remote-call" and forwarded.text
    [(stored,)] = _history(pair, "SELECT ticket_json FROM tickets WHERE ticket_id = 'HL-remote-call'")
    assert SEGMENTS_KEY not in json.loads(stored)["metadata"]
    request.record_ticket = False
    with _owner_stub(pair) as channel:
        local = asr_pb2_grpc.AsrStub(channel).Transcribe(request, timeout=300)
    assert local.text == forwarded.text
    compared = ("text", "transcript", "category", "urgency", "summary", "category_evidence", "urgency_evidence", "place")
    forwarded_details, local_details = MessageToDict(forwarded.ticket.details), MessageToDict(local.ticket.details)
    assert {k: forwarded_details.get(k) for k in compared} == {k: local_details.get(k) for k in compared}
    evidence = [*forwarded_details["category_evidence"], *forwarded_details["urgency_evidence"]]
    assert evidence and all(item["start_s"] is not None for item in evidence)  # times: the segments arrived


def test_owner_down_is_unavailable_at_once_and_transcription_goes_on(pair):
    """Last in this module: it stops the owner."""
    owner, forwarder, _, _ = pair
    owner.stop()
    clip = asr_pb2.TranscribeRequest(audio_content=CALL.read_bytes(), language="zh", beam_size=1)
    analyse = asr_pb2.TranscribeRequest(audio_content=CALL.read_bytes(), language="zh", beam_size=1, analyze=True)
    with _forwarder_stub(pair, "agent") as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        calls = [
            lambda: stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=LITTER, record=True), timeout=60),
            lambda: stub.CorrectTicket(asr_pb2.CorrectTicketRequest(ticket_id="HL-remote-1", field="urgency", value="low"), timeout=60),
            lambda: stub.Transcribe(analyse, timeout=300),
        ]
        for call in calls:  # well inside the deadline (and the forwarder's 300 s): not DEADLINE_EXCEEDED
            error = _error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert error.details().startswith("ticket service unavailable: the gateway that keeps the ticket history cannot be reached")
            assert dict(error.trailing_metadata()).get("retry-after-ms") == "2000"
        assert stub.Transcribe(clip, timeout=300).text  # transcription does not need the ticket service
    assert "Traceback" not in forwarder.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize("args, message", [
    (["--ticket-service", "127.0.0.1:1", "--history-db", "x.sqlite"], "exclude each other"),
    (["--ticket-service-api-key-file", "k"], "need --ticket-service"),
    (["--ticket-service", "127.0.0.1:1", "--ticket-service-client-cert", "c.pem"], "go together"),
    (["--ticket-service", "127.0.0.1:1", "--ticket-forwarders", "replicas"], "is for the gateway that keeps the history"),
    (["--ticket-service", "localhost:50051"], "names this gateway itself"),
])
def test_ticket_service_options_are_checked(args, message, capsys):
    with pytest.raises(SystemExit):
        server.main(args)
    assert message in capsys.readouterr().err
