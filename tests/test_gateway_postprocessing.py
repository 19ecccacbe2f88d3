"""Hotwords, ITN and ticket analysis through the real gateway (gRPC) and Triton."""

from __future__ import annotations

import json

import grpc
import pytest

from gateway.protocol import asr_pb2
from tests.conftest import PROJECT_ROOT, cer, normalize_for_cer, sample_clips

HOTWORD_DIR = PROJECT_ROOT / "data" / "hotwords"
CALLS_DIR = PROJECT_ROOT / "data" / "calls"


def _hotword_clips(limit: int):
    lines = (HOTWORD_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


def test_hotwords_raise_term_recall(asr_stub):
    found_without = found_with = total = 0
    for clip in _hotword_clips(6):
        audio = (HOTWORD_DIR / clip["audio"]).read_bytes()
        base = dict(audio_content=audio, language="zh", beam_size=5, disable_server_hotwords=True)
        plain = asr_stub.Transcribe(asr_pb2.TranscribeRequest(**base), timeout=120)
        boosted = asr_stub.Transcribe(
            asr_pb2.TranscribeRequest(**base, hotwords=[asr_pb2.Hotword(phrase=t, weight=1.0) for t in clip["terms"]]),
            timeout=120,
        )
        for term in clip["terms"]:
            total += 1
            found_without += normalize_for_cer(term) in normalize_for_cer(plain.text)
            found_with += normalize_for_cer(term) in normalize_for_cer(boosted.text)
    assert found_with > found_without, f"recall {found_without}/{total} -> {found_with}/{total}"


def test_unrelated_hotword_list_leaves_other_speech_alone(asr_stub):
    # The example server lists (103 Beijing names) on speech that mentions none of them. Before
    # bonuses were capped (DecodingOptions.max_biased_logprob), 一二三...十 came out as
    # 12345市民服務熱線12345市民服務熱衷...; now nothing listed may appear and the text stays
    # close to the plain one.
    from gateway.asr.hotwords import load_hotword_file

    phrases = [hw.phrase for path in sorted((PROJECT_ROOT / "config" / "hotwords.example").glob("*.txt"))
               for hw in load_hotword_file(path)]
    assert len(phrases) > 90
    hotwords = [asr_pb2.Hotword(phrase=p, weight=1.0) for p in phrases]
    clips = {c.name: c.path for c in sample_clips() if c.language == "zh"}
    clips["call_03_E009"] = CALLS_DIR / "call_03_E009.flac"
    for name, path in clips.items():
        audio = path.read_bytes()
        base = dict(audio_content=audio, language="zh", beam_size=5, disable_server_hotwords=True,
                    vad=asr_pb2.VadConfig(disabled=True))  # one window: the loops showed without VAD
        plain = asr_stub.Transcribe(asr_pb2.TranscribeRequest(**base), timeout=120).text
        listed = asr_stub.Transcribe(asr_pb2.TranscribeRequest(**base, hotwords=hotwords), timeout=120).text
        inserted = [p for p in phrases if normalize_for_cer(p) in normalize_for_cer(listed)
                    and normalize_for_cer(p) not in normalize_for_cer(plain)]
        assert not inserted, (name, inserted, listed)
        assert len(normalize_for_cer(listed)) <= len(normalize_for_cer(plain)) + 3, (name, plain, listed)
        assert cer(listed, plain) <= 0.1, (name, plain, listed)


@pytest.mark.parametrize(
    "hotword, message",
    [(asr_pb2.Hotword(phrase="", weight=1.0), "empty"), (asr_pb2.Hotword(phrase="朝阳区", weight=50.0), "weight")],
)
def test_bad_hotwords_are_invalid_argument(asr_stub, hotword, message):
    audio = (HOTWORD_DIR / "hw_000.flac").read_bytes()
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=audio, language="zh", hotwords=[hotword]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details().lower()


def test_itn_keeps_raw_text_and_adds_normalized(asr_stub):
    audio = (CALLS_DIR / "call_01_E006.flac").read_bytes()
    raw = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=audio, language="zh", beam_size=1), timeout=120)
    with_itn = asr_stub.Transcribe(
        asr_pb2.TranscribeRequest(audio_content=audio, language="zh", beam_size=1, itn=True), timeout=120
    )
    assert with_itn.text == raw.text
    assert with_itn.normalized_text
    assert raw.normalized_text == ""
    assert all(s.normalized_text for s in with_itn.segments if s.text)


def test_transcribe_with_analyze_returns_a_ticket(asr_stub):
    audio = (CALLS_DIR / "call_01_E006.flac").read_bytes()
    response = asr_stub.Transcribe(
        asr_pb2.TranscribeRequest(
            audio_content=audio, language="zh", beam_size=1, analyze=True,
            ticket_metadata={"received_at": "2026-11-16T08:50:00", "file": "call_01_E006.flac"},
        ),
        timeout=120,
    )
    ticket = response.ticket
    assert ticket.machine_generated
    assert ticket.category == "住房物业", response.text
    assert ticket.urgency in ("high", "medium", "low")
    assert ticket.details["transcript"] == response.text


def test_analyze_and_correct_ticket_rpcs(asr_stub):
    ticket = asr_stub.AnalyzeTicket(
        asr_pb2.AnalyzeTicketRequest(text="江北区铁路新村门口的垃圾桶满了好几天了没人清运，臭得要命", record=True), timeout=60
    )
    assert ticket.category == "环境卫生" and ticket.district == "江北区" and ticket.department
    corrected = asr_stub.CorrectTicket(
        asr_pb2.CorrectTicketRequest(ticket_id=ticket.ticket_id, field="urgency", value="high", corrected_by="审核员"), timeout=30
    )
    assert json.loads(corrected.new_value) == "high" and json.loads(corrected.old_value) == ticket.urgency
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.CorrectTicket(
            asr_pb2.CorrectTicketRequest(ticket_id="HL-nope", field="urgency", value="high", corrected_by="x"), timeout=30
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.CorrectTicket(
            asr_pb2.CorrectTicketRequest(ticket_id=ticket.ticket_id, field="urgency", value="whenever", corrected_by="x"), timeout=30
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_analyze_empty_text(asr_stub):
    ticket = asr_stub.AnalyzeTicket(asr_pb2.AnalyzeTicketRequest(text=""), timeout=60)
    assert ticket.machine_generated and ticket.category


def test_zh_transcripts_are_simplified_with_the_model_text_kept(asr_stub):
    from gateway.asr.script import to_simplified

    # Whisper base writes this call in traditional characters (城區, 燈...)
    audio = (CALLS_DIR / "call_03_E009.flac").read_bytes()
    base = dict(audio_content=audio, language="zh", beam_size=5)
    default = asr_stub.Transcribe(asr_pb2.TranscribeRequest(**base), timeout=120)
    kept = asr_stub.Transcribe(asr_pb2.TranscribeRequest(**base, keep_model_script=True), timeout=120)
    assert default.text and to_simplified(default.text) == default.text
    assert kept.text == (default.model_text or default.text)
    assert kept.model_text == ""  # nothing converted, nothing kept twice
    for segment, model_segment in zip(default.segments, kept.segments):
        assert to_simplified(segment.text) == segment.text
        assert (segment.model_text or segment.text) == model_segment.text
    if default.model_text:
        assert to_simplified(default.model_text) == default.text


def test_simplify_transcript_keeps_times_and_other_languages():
    from gateway.asr.script import simplify_transcript
    from gateway.asr.transcriber import Segment, Transcript, Word

    words = [Word(text="路燈", start_s=0.0, end_s=0.5, confidence=0.9), Word(text="壞了", start_s=0.5, end_s=1.0, confidence=0.8)]
    segment = Segment(start_s=0.0, end_s=1.0, text="路燈壞了", confidence=0.8, avg_logprob=-0.2, words=words)
    zh = simplify_transcript(Transcript(text="路燈壞了", segments=[segment], duration_s=1.0, language="zh"))
    assert (zh.text, zh.model_text) == ("路灯坏了", "路燈壞了")
    assert (zh.segments[0].text, zh.segments[0].model_text) == ("路灯坏了", "路燈壞了")
    assert [w.text for w in zh.segments[0].words] == ["路灯", "坏了"]
    assert [(w.start_s, w.end_s) for w in zh.segments[0].words] == [(0.0, 0.5), (0.5, 1.0)]
    yue = Transcript(text="佢哋喺度", segments=[], duration_s=1.0, language="yue")
    assert simplify_transcript(yue) is yue
    plain = simplify_transcript(Transcript(text="路灯坏了", segments=[], duration_s=1.0, language="zh"))
    assert plain.model_text == ""


def test_zh_stream_results_are_simplified_with_the_model_text_kept(asr_stub):
    from gateway.asr.script import to_simplified
    from tests.test_streaming import finals, run_stream

    data = (CALLS_DIR / "call_03_E009.flac").read_bytes()  # written in traditional characters by Whisper base
    results = {}
    for keep in (False, True):
        config = asr_pb2.StreamingConfig(container="flac", language="zh", keep_model_script=keep)
        results[keep] = finals(run_stream(asr_stub, config, data, bytes_per_s=len(data) / 8.0, realtime=False, chunk_s=0.5))
    assert results[False] and len(results[False]) == len(results[True])
    assert any(result.model_text for result in results[False])  # something was converted
    for default, kept in zip(results[False], results[True]):
        assert to_simplified(default.text) == default.text
        assert kept.model_text == "" and kept.text == (default.model_text or default.text)
