"""Chinese script of transcripts: simplified characters by default.

Whisper writes Mandarin in traditional characters about as often as in simplified ones, while
hotline tickets, ITN and analysis work on simplified text. A zh transcript is converted
character by character (zhconv, offline tables) and the model's own text is kept alongside
in ``model_text``; callers who want the model's script ask for it per request."""

from __future__ import annotations

from dataclasses import replace

import zhconv

from gateway.asr.streaming import StreamResult
from gateway.asr.transcriber import Transcript

SIMPLIFIED_LOCALE = "zh-cn"
SIMPLIFIED_LANGUAGES = ("zh",)  # Cantonese (yue) is written in traditional characters


def to_simplified(text: str) -> str:
    return zhconv.convert(text, SIMPLIFIED_LOCALE) if text else text


def _simplified_words(words):
    return [replace(word, text=to_simplified(word.text)) for word in words]


def simplify_transcript(transcript: Transcript) -> Transcript:
    """``transcript`` with simplified text (segments and words); unchanged for other languages."""
    if transcript.language not in SIMPLIFIED_LANGUAGES:
        return transcript
    segments = []
    for segment in transcript.segments:
        simplified = to_simplified(segment.text)
        words = _simplified_words(segment.words)
        model_text = segment.text if simplified != segment.text else ""
        segments.append(replace(segment, text=simplified, words=words, model_text=model_text))
    text = to_simplified(transcript.text)
    model_text = transcript.text if text != transcript.text else ""
    return replace(transcript, text=text, segments=segments, model_text=model_text)


def simplify_stream_result(result: StreamResult) -> StreamResult:
    """A streaming partial or final with simplified text and words; unchanged for other languages."""
    if result.language not in SIMPLIFIED_LANGUAGES or not result.text:
        return result
    text = to_simplified(result.text)
    words = _simplified_words(result.words)
    return replace(result, text=text, words=words, model_text=result.text if text != result.text else "")
