"""Requests -> the core's options, with the one set of limits the service enforces.

Every RPC that takes audio, a beam size, VAD, hotword or ITN settings goes through here, so a
limit is written once. Client mistakes raise RequestError (INVALID_ARGUMENT)."""

from __future__ import annotations

from dataclasses import replace

from gateway.asr import itn
from gateway.asr.audio import ALLOWED_DEMUXERS, MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ
from gateway.asr.audio_stream import ContainerStream, PcmStream
from gateway.asr.decoding import MAX_BEAM_SIZE
from gateway.asr.hotword_lists import HotwordRegistry
from gateway.asr.hotwords import HotwordError
from gateway.asr.streaming import (
    DEFAULT_PARTIAL_INTERVAL_S,
    DEFAULT_STREAM_BEAM_SIZE,
    STREAMING_VAD,
    StreamConfigError,
    StreamingOptions,
)
from gateway.asr.transcriber import DEFAULT_BEAM_SIZE, TranscribeOptions
from gateway.asr.vad import VadOptions, VadOptionsError
from gateway.protocol import asr_pb2

MIB = 1024 * 1024
MAX_TICKET_TEXT_BYTES = 1 * MIB
ITN_TIME_FORMATS = ("24h", "chinese")
CHANNEL_MODES = (asr_pb2.CHANNEL_MODE_UNSPECIFIED, asr_pb2.CHANNEL_MODE_DOWNMIX, asr_pb2.CHANNEL_MODE_SEPARATE)
RAW_ENCODINGS = {
    asr_pb2.RawAudio.S16LE: "s16le",
    asr_pb2.RawAudio.F32LE: "f32le",
}


MAX_QUOTED_CHARS = 40  # a client's value quoted in a status message, at most
MAX_LANGUAGE_CHARS = 16  # "zh", "yue", "haw", "en-US": longer is not a language code


class RequestError(ValueError):
    """A client error that maps to INVALID_ARGUMENT."""


class AdmissionError(RuntimeError):
    """The gateway is at a configured limit (RESOURCE_EXHAUSTED) or not ready (UNAVAILABLE), with a retry hint."""

    def __init__(self, message: str, code, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:g} s")
        self.code = code
        self.retry_after_s = retry_after_s


class MissingRoleError(RuntimeError):
    """The caller's API key lacks a role this request needs (PERMISSION_DENIED)."""


class StreamIdleError(RuntimeError):
    """A stream sent nothing for longer than the idle timeout (DEADLINE_EXCEEDED)."""


def quote(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """A client value for a status message: repr, shortened, never echoed in full."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def language(value: str) -> str | None:
    """The requested language code (empty: detect); a value no code can be is refused here."""
    if not value:
        return None
    if len(value) > MAX_LANGUAGE_CHARS or not value.replace("-", "").replace("_", "").isalnum():
        raise RequestError(f"language {quote(value)} is not a language code (e.g. zh, en)")
    return value


def beam_size(value: int, default: int) -> int:
    """The request's beam size (0 = ``default``) checked against the project's one limit."""
    size = value or default
    if not 1 <= size <= MAX_BEAM_SIZE:
        raise RequestError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {value}")
    return size


def pcm_format(what: str, encoding_value: int, sample_rate_hz: int, channels: int) -> str:
    """Checks a raw PCM description (RawAudio or StreamingConfig); returns the encoding name."""
    encoding = RAW_ENCODINGS.get(encoding_value)
    if encoding is None:
        names = ", ".join(asr_pb2.RawAudio.Encoding.Name(v) for v in RAW_ENCODINGS)
        raise RequestError(f"{what}.encoding {encoding_value} is not supported; use one of {names}")
    if sample_rate_hz == 0:
        raise RequestError(f"{what}.sample_rate_hz is required ({MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz)")
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise RequestError(
            f"{what}.sample_rate_hz {sample_rate_hz} Hz is outside {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
        )
    if channels < 0:
        raise RequestError(f"{what}.channels must be >= 0, got {channels}")
    return encoding


def audio_size(n_bytes: int, max_audio_bytes: int) -> None:
    if n_bytes > max_audio_bytes:
        raise RequestError(f"audio is {n_bytes} bytes; this server accepts at most {max_audio_bytes}")


def ticket_text(text: str) -> str:
    if len(text.encode("utf-8")) > MAX_TICKET_TEXT_BYTES:
        raise RequestError(f"text is over {MAX_TICKET_TEXT_BYTES} bytes")
    return text


def vad_options(message, base: VadOptions) -> VadOptions | None:
    """VadConfig (0 = default per field) -> VadOptions over ``base``; None when disabled."""
    if message.disabled:
        return None
    changes = {}
    if message.threshold:
        changes["threshold"] = round(float(message.threshold), 4)
    if message.max_segment_s:
        changes["max_segment_s"] = round(float(message.max_segment_s), 3)
    for name in ("min_silence_ms", "speech_pad_ms", "min_speech_ms"):
        if getattr(message, name):
            changes[name] = int(getattr(message, name))
    try:
        return replace(base, **changes) if changes else base
    except VadOptionsError as error:
        raise RequestError(f"vad: {error}") from error


def hotword_scorer(registry: HotwordRegistry | None, request):
    """Per-request hotwords merged with the server lists; None when there is nothing to boost."""
    if registry is None:
        if request.hotwords:
            raise HotwordError("hotwords are not supported for this model family")
        return None
    requested = {}
    for hotword in request.hotwords:
        requested[hotword.phrase] = hotword.weight or 1.0
    return registry.scorer(
        requested or None,
        use_server_lists=not request.disable_server_hotwords,
        boost=request.hotword_boost or None,
    )


def itn_options(registry: HotwordRegistry | None, request) -> itn.ItnOptions | None:
    """ITN settings of a TranscribeRequest or StreamingConfig; None without ``itn``.

    Protected terms (left as spoken): the server lists' phrases + the request's hotwords.
    """
    if request.itn_time_format not in ("", *ITN_TIME_FORMATS):
        raise RequestError(f"itn_time_format must be '24h' or 'chinese', got {quote(request.itn_time_format)}")
    if not request.itn:
        return None
    server_terms = registry.terms if registry else frozenset()
    protected = server_terms | {h.phrase for h in request.hotwords}
    return itn.ItnOptions(enabled=True, time_format=request.itn_time_format or "24h", protected_terms=protected)


def separate_channels(request) -> bool:
    if request.channel_mode not in CHANNEL_MODES:
        raise RequestError(f"unknown channel_mode {request.channel_mode}")
    return request.channel_mode == asr_pb2.CHANNEL_MODE_SEPARATE


def channel_labels(request, n_channels: int) -> list[str]:
    given = list(request.channel_labels)
    return [given[i] if i < len(given) and given[i] else f"channel {i}" for i in range(n_channels)]


def transcribe_options(request, scorer, *, have_vad: bool) -> TranscribeOptions:
    """A TranscribeRequest -> TranscribeOptions (the scorer is built by the caller, off the loop)."""
    vad = vad_options(request.vad, VadOptions())
    return TranscribeOptions(
        language=language(request.language),
        beam_size=beam_size(request.beam_size, DEFAULT_BEAM_SIZE),
        word_timestamps=request.word_timestamps,
        # no VAD model: fixed 30 s windows (logged at start)
        vad=vad if have_vad else None,
        scorer=scorer,
    )


def streaming_options(config, scorer) -> StreamingOptions:
    """A StreamingConfig -> StreamingOptions (utterances are found by VAD, so it cannot be off)."""
    vad = vad_options(config.vad, STREAMING_VAD)
    if vad is None:
        raise RequestError("vad.disabled is not supported for streams: utterances are found by VAD")
    try:
        return StreamingOptions(
            language=language(config.language),
            beam_size=beam_size(config.beam_size, DEFAULT_STREAM_BEAM_SIZE),
            word_timestamps=config.word_timestamps,
            vad=vad,
            interim_results=config.interim_results if config.HasField("interim_results") else True,
            partial_interval_s=round(config.partial_interval_s, 3) or DEFAULT_PARTIAL_INTERVAL_S,
            scorer=scorer,
        )
    except StreamConfigError as error:
        raise RequestError(str(error)) from error


def stream_decoder(config) -> PcmStream | ContainerStream:
    """The incremental decoder a StreamingConfig asks for: an encoded container, or raw PCM."""
    container = config.container.strip().lower()
    if container:
        if container != "auto" and container not in ALLOWED_DEMUXERS.split(","):
            raise RequestError(f"config.container {quote(config.container)} is not supported; use one of auto,{ALLOWED_DEMUXERS}")
        return ContainerStream("" if container == "auto" else container)
    encoding = pcm_format("config", config.encoding, config.sample_rate_hz, config.channels)
    return PcmStream(config.sample_rate_hz, encoding, config.channels or 1)
