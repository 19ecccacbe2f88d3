"""The workbench's only way to the ASR and the ticket analysis: the gateway's gRPC API."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.tls import channel_credentials

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class GatewayClient:
    def __init__(self, address: str, *, ca_file: Path | None = None, api_key: str | None = None, timeout_s: float = 600.0,
                 client_cert: Path | None = None, client_key: Path | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        # a gateway with --api-keys: the workbench's key (roles transcribe, analyze, correct, delegate)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if ca_file:
            # a gateway with --tls-client-ca (mutual TLS) also wants the workbench's own certificate
            credentials = channel_credentials(ca_file, client_cert, client_key)
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = asr_pb2_grpc.AsrStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def _metadata_for(self, user: str) -> tuple | None:
        """The key, and the logged-in user it acts for (gateway/service/auth.py, delegation): the
        gateway records a correction as "<user> via <key name>". Without a key there is no
        delegation; CorrectTicket then takes the request's corrected_by."""
        if self._metadata is None:
            return None
        return (*self._metadata, ("x-on-behalf-of-bin", user.encode("utf-8")))

    async def transcribe_and_record(self, audio: bytes, metadata: dict[str, str], user: str, language: str = "zh") -> asr_pb2.TranscribeResponse:
        request = asr_pb2.TranscribeRequest(
            audio_content=audio, language=language, word_timestamps=True, itn=True,
            analyze=True, record_ticket=True, ticket_metadata=metadata,
        )
        return await self._stub.Transcribe(request, timeout=self.timeout_s, metadata=self._metadata_for(user))

    async def transcribe_pcm(self, pcm: bytes, hotwords: list[str], user: str, language: str = "zh") -> asr_pb2.TranscribeResponse:
        request = asr_pb2.TranscribeRequest(
            raw_audio=asr_pb2.RawAudio(pcm=pcm, sample_rate_hz=16000, encoding=asr_pb2.RawAudio.S16LE, channels=1),
            language=language, word_timestamps=True, itn=True,
            hotwords=[asr_pb2.Hotword(phrase=phrase) for phrase in hotwords],
        )
        return await self._stub.Transcribe(request, timeout=self.timeout_s, metadata=self._metadata_for(user))

    async def correct(self, ticket_id: str, field: str, value: str, by: str) -> asr_pb2.CorrectTicketResponse:
        request = asr_pb2.CorrectTicketRequest(ticket_id=ticket_id, field=field, value=value, corrected_by=by)
        return await self._stub.CorrectTicket(request, timeout=30.0, metadata=self._metadata_for(by))


def segments_of(reply: asr_pb2.TranscribeResponse, offset_s: float = 0.0) -> list[dict]:
    """The segments and words of a Transcribe reply as the ticket page's script reads them; times
    shifted by offset_s (re-recognition of a range: times in seconds of the whole recording)."""
    return [
        {"start_s": s.start_s + offset_s, "end_s": s.end_s + offset_s, "text": s.text, "confidence": s.confidence,
         "words": [{"text": w.text, "start_s": w.start_s + offset_s, "end_s": w.end_s + offset_s, "confidence": w.confidence} for w in s.words]}
        for s in reply.segments
    ]


def error_text(error: grpc.aio.AioRpcError) -> str:
    """A message for the page (the gateway's reason; never a traceback)."""
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return "识别服务暂不可用，请稍后重试"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "识别超时，请稍后重试"
    if code == grpc.StatusCode.PERMISSION_DENIED and "x-on-behalf-of" in details:
        return "核对台的识别服务密钥缺少 delegate 角色，无法以登录用户的名义操作（见 README 安全一节）"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return "核对台未获识别服务授权（检查 --gateway-api-key-file）"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"工单不存在：{details}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"无法处理：{details}"
    return f"识别服务出错（{code.name}）：{details}"
