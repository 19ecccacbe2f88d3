"""Core results -> protobuf messages: one builder per message, shared by every RPC."""

from __future__ import annotations

from gateway.asr.streaming import StreamResult
from gateway.asr.transcriber import Segment, Transcript, Word, join_text
from gateway.protocol import asr_pb2


def words_pb(words: list[Word]) -> list:
    return [
        asr_pb2.Word(text=w.text, start_s=w.start_s, end_s=w.end_s, confidence=w.confidence, token_ids=w.token_ids)
        for w in words
    ]


def segment_pb(segment: Segment, normalized_text: str = "") -> asr_pb2.Segment:
    return asr_pb2.Segment(
        start_s=segment.start_s,
        end_s=segment.end_s,
        text=segment.text,
        confidence=segment.confidence,
        token_ids=segment.token_ids,
        avg_logprob=segment.avg_logprob,
        words=words_pb(segment.words),
        channel=segment.channel,
        speaker=segment.speaker,
        normalized_text=normalized_text,
        model_text=segment.model_text,
    )


def transcribe_response(
    transcript: Transcript, normalized: list[str], *, model_name: str, processing_time_s: float, ticket=None
) -> asr_pb2.TranscribeResponse:
    """``normalized``: the ITN text per segment, or empty without ITN."""
    return asr_pb2.TranscribeResponse(
        text=transcript.text,
        segments=[segment_pb(s, normalized[i] if normalized else "") for i, s in enumerate(transcript.segments)],
        audio_duration_s=transcript.duration_s,
        processing_time_s=processing_time_s,
        model_name=model_name,
        language=transcript.language,
        normalized_text=join_text(normalized, transcript.language) if normalized else "",
        model_text=transcript.model_text,
        ticket=ticket,
    )


def stream_response(result: StreamResult, *, model_name: str, normalized_text: str = "") -> asr_pb2.StreamingRecognizeResponse:
    return asr_pb2.StreamingRecognizeResponse(
        result=asr_pb2.StreamingResult(
            text=result.text,
            is_final=result.is_final,
            stability=result.stability,
            start_s=result.start_s,
            end_s=result.end_s,
            words=words_pb(result.words),
            confidence=result.confidence,
            avg_logprob=result.avg_logprob,
            token_ids=result.token_ids,
            language=result.language,
            utterance=result.utterance,
            normalized_text=normalized_text,
            model_text=result.model_text,
        ),
        audio_received_s=result.audio_received_s,
        model_name=model_name,
    )
