"""StreamingRecognize: live partial results and a final result per utterance.

One :class:`RecognitionStream` per gRPC stream. Audio arrives in pieces (raw PCM at a
declared rate, or an encoded byte stream) and is decoded to 16 kHz mono by
:mod:`gateway.asr.audio`; Silero VAD runs frame by frame (32 ms) on it:

- speech starts when a frame's probability reaches ``threshold``; the utterance audio starts
  ``speech_pad_ms`` earlier;
- while the caller speaks, the utterance so far is decoded greedily every
  ``partial_interval_s`` of new audio (the first time after ``FIRST_PARTIAL_S`` of speech),
  at most one partial decode in flight per stream; each partial is sent with a stability
  (share of its text that agrees with the previous partial). Decodes of all streams share a
  :class:`DecodeGate`: finals go first, then first partials; later partials are skipped while
  the gate is full, and so is a first partial that would have to queue with an expected
  wait (queue x recent decode time) over ``MAX_PARTIAL_WAIT_S``: under load partials thin
  out and finals stay prompt;
- a pause (probabilities below ``neg_threshold`` for ``min_silence_ms``) ends the utterance.
  To answer quickly after the pause, a *speculative final* decode starts once the pause has
  lasted ``SPECULATIVE_DELAY_MS`` (its audio ends there): if the pause holds, that decode (or a
  later one) is the final; if speech resumes it serves as a partial;
- an utterance reaching ``max_segment_s`` is cut at its quietest point, finalised, and the
  rest starts the next utterance;
- half-close: the open utterance is finalised with all audio received, then the stream ends
  after the last final. Cancellation / deadline: decodes in flight are cancelled and their
  Triton sequences released.

Results are emitted in order: a partial of an utterance is dropped when the final of an
earlier one is still pending. Times are seconds since the start of the stream. A hotword
scorer (``StreamingOptions.scorer``, built once per stream) biases every decode, partials
and finals; ITN of the results is the servicer's (gateway/service/server.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from gateway.asr.audio import SAMPLE_RATE
from gateway.asr.audio_stream import ContainerStream, PcmStream
from gateway.asr.decoding import TokenScorer
from gateway.asr.transcriber import ChunkResult, Segment, Transcriber, TranscribeOptions, Word, join_text
from gateway.asr.vad import FRAME_SAMPLES, SileroVad, VadOptions, quietest_point

log = logging.getLogger("gateway.asr.streaming")

STREAMING_VAD = VadOptions(min_silence_ms=300, speech_pad_ms=200)
DEFAULT_STREAM_BEAM_SIZE = 1
FIRST_PARTIAL_S = 0.3  # speech before the first partial of an utterance
DEFAULT_PARTIAL_INTERVAL_S = 0.5
MIN_PARTIAL_INTERVAL_S = 0.1
SPECULATIVE_DELAY_MS = 150  # pause length at which the speculative final starts
MAX_PARTIAL_WAIT_S = 1.5  # a first partial that must queue and is expected later than this is skipped
INLINE_VAD_FRAMES = 32  # VAD runs on the event loop up to this many frames per piece, else in a thread


PRIORITY_FINAL = 0  # decode slots go to finals first,
PRIORITY_FIRST_PARTIAL = 1  # then to the first partial of an utterance,
PRIORITY_PARTIAL = 2  # then to later partials


class StreamConfigError(ValueError):
    """The stream's configuration or audio is unusable (INVALID_ARGUMENT)."""


class DecodeGate:
    """At most ``capacity`` stream decodes at once, shared by all streams; a freed slot goes to
    the waiter with the lowest priority value (finals before partials), then the oldest."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._busy = 0
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()
        self.decode_s = 0.0  # moving average of how long a slot is held (one decode)

    def record(self, seconds: float) -> None:
        self.decode_s = seconds if self.decode_s == 0.0 else 0.8 * self.decode_s + 0.2 * seconds

    def expected_wait_s(self, priority: int) -> float:
        """Rough time until a new request of ``priority`` would finish."""
        ahead = sum(1 for p, _, f in self._waiters if p <= priority and not f.done())
        queued = max(0, self._busy + ahead - self.capacity + 1)
        return (queued / self.capacity + 1.0) * self.decode_s

    async def acquire(self, priority: int) -> None:
        if self._busy < self.capacity and not self._waiters:
            self._busy += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            raise

    @property
    def has_free_slot(self) -> bool:
        return self._busy < self.capacity and not self._waiters

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot passes on; _busy stays
                return
        self._busy -= 1


@dataclass(frozen=True)
class StreamingOptions:
    language: str | None = None
    beam_size: int = DEFAULT_STREAM_BEAM_SIZE  # finals; partials are greedy
    word_timestamps: bool = False
    vad: VadOptions = STREAMING_VAD
    interim_results: bool = True
    partial_interval_s: float = DEFAULT_PARTIAL_INTERVAL_S
    # Hotword context graph for every decode of the stream (partials and finals), built once
    # per stream; None: no biasing. Scorer states are immutable, so decodes can share it.
    scorer: TokenScorer | None = None

    def __post_init__(self) -> None:
        if not MIN_PARTIAL_INTERVAL_S <= self.partial_interval_s <= 30.0:
            raise StreamConfigError(
                f"partial_interval_s must be in {MIN_PARTIAL_INTERVAL_S}..30, got {self.partial_interval_s}"
            )


@dataclass
class StreamResult:
    """One partial or final result (times in seconds since the start of the stream)."""

    utterance: int
    text: str
    is_final: bool
    stability: float
    start_s: float
    end_s: float
    language: str
    confidence: float = 0.0
    avg_logprob: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    audio_received_s: float = 0.0
    model_text: str = ""  # the model's own text where `text` was converted (gateway.asr.script)


@dataclass
class _Decode:
    """A decode of [start, end) samples of the current utterance."""

    start: int
    end: int
    beam_size: int
    task: asyncio.Task
    partial: bool  # launched as a partial (emit it when it completes)


class _Audio:
    """Stream samples kept from ``start`` (absolute sample index) on, in pieces."""

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.start = 0
        self.end = 0

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self.pieces.append(samples)
            self.end += samples.shape[0]

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        out = np.empty(b - a, dtype=np.float32)
        pos = self.start
        for piece in self.pieces:
            lo, hi = max(a, pos), min(b, pos + piece.shape[0])
            if lo < hi:
                out[lo - a : hi - a] = piece[lo - pos : hi - pos]
            pos += piece.shape[0]
            if pos >= b:
                break
        return out

    def trim(self, keep_from: int) -> None:
        """Forget whole pieces that end before ``keep_from``."""
        while self.pieces and self.start + self.pieces[0].shape[0] <= keep_from:
            self.start += self.pieces.pop(0).shape[0]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RecognitionStream:
    """State of one StreamingRecognize call; see the module docstring."""

    def __init__(
        self,
        transcriber: Transcriber,
        vad: SileroVad,
        options: StreamingOptions,
        decoder: PcmStream | ContainerStream,
        emit: Callable[[StreamResult], Awaitable[None]],
        *,
        max_duration_s: float | None = None,
        decode_gate: DecodeGate | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.transcriber = transcriber
        self.options = options
        self.decoder = decoder
        self.emit = emit
        self.max_duration_s = max_duration_s
        self._gate = decode_gate
        self._language = options.language  # partials reuse the language the last final found
        self._on_error = on_error
        self._vad = vad.stream()
        vo = options.vad
        self._enter = vo.threshold
        self._leave = vo.exit_threshold
        self._min_silence_frames = max(1, round(vo.min_silence_ms / 1000 * SAMPLE_RATE / FRAME_SAMPLES))
        self._spec_frames = max(1, min(self._min_silence_frames - 1,
                                       round(min(SPECULATIVE_DELAY_MS, vo.speech_pad_ms) / 1000 * SAMPLE_RATE / FRAME_SAMPLES)))
        self._pad = int(vo.speech_pad_ms / 1000 * SAMPLE_RATE)
        self._max_len = int(vo.max_segment_s * SAMPLE_RATE)
        self._min_speech_frames = math.ceil(vo.min_speech_ms / 1000 * SAMPLE_RATE / FRAME_SAMPLES)
        self._first_partial = int(FIRST_PARTIAL_S * SAMPLE_RATE)
        self._partial_step = int(options.partial_interval_s * SAMPLE_RATE)
        self._audio = _Audio()
        self._probs: list[float] = []  # per frame from frame self._probs_start on
        self._probs_start = 0
        self._frames = 0  # VAD frames processed
        self._last_end = 0  # end sample of the last finalised utterance
        # current utterance
        self._utt_start: int | None = None
        self._speech_start = 0  # first speech frame of the utterance (sample)
        self._utt_index = 0
        self._speech_frames = 0
        self._silence_from: int | None = None
        self._decodes: list[_Decode] = []
        self._partial_text = ""
        self._partials_sent = 0
        self._partials_launched = 0
        self._last_partial_end = 0
        self._partial_end = 0  # audio end of the last partial sent
        # finals in order
        self._final_chain: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ input
    @property
    def audio_received_s(self) -> float:
        return self._audio.end / SAMPLE_RATE

    async def push(self, data: bytes) -> None:
        """A piece of the stream's bytes."""
        self._raise_error()
        samples = self.decoder.feed(data)
        await self._process(samples)

    async def finish(self) -> None:
        """Half-close: decode the rest, finalise the open utterance, wait for every final."""
        self._raise_error()
        tail = await asyncio.to_thread(self.decoder.finish)
        await self._process(tail)
        if self._utt_start is not None:
            speech_end = self._audio.end if self._silence_from is None else self._silence_from * FRAME_SAMPLES
            self._finalise(self._audio.end, speech_end)
        if self._final_chain is not None:
            await asyncio.shield(self._final_chain)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._raise_error()

    async def close(self) -> None:
        """Cancel everything in flight (cancellation, deadline, errors)."""
        close = getattr(self.decoder, "close", None)
        if close is not None:
            close()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    async def _process(self, samples: np.ndarray) -> None:
        if samples.size == 0:
            return
        if self.max_duration_s is not None and (self._audio.end + samples.shape[0]) / SAMPLE_RATE > self.max_duration_s:
            raise StreamConfigError(
                f"stream is longer than {self.max_duration_s:.1f} s; at most {self.max_duration_s:.1f} s is accepted"
            )
        self._audio.append(samples)
        if samples.shape[0] > INLINE_VAD_FRAMES * FRAME_SAMPLES:
            probs = await asyncio.to_thread(self._vad.push, samples)
        else:
            probs = self._vad.push(samples)
        for p in probs.tolist():
            self._probs.append(p)
            self._on_frame(self._frames, p)
            self._frames += 1
        self._maybe_partial()
        self._trim()

    # ------------------------------------------------------------------ VAD state machine
    def _on_frame(self, f: int, p: float) -> None:
        frame_end = (f + 1) * FRAME_SAMPLES
        if self._utt_start is None:
            if p >= self._enter:
                self._utt_start = max(f * FRAME_SAMPLES - self._pad, self._last_end, self._audio.start)
                self._speech_start = f * FRAME_SAMPLES
                self._speech_frames = 1
                self._silence_from = None
            return
        if p >= self._enter:
            self._silence_from = None
            self._speech_frames += 1
        elif p < self._leave:
            if self._silence_from is None:
                self._silence_from = f
            silent = f - self._silence_from + 1
            speech_end = self._silence_from * FRAME_SAMPLES
            if silent == self._spec_frames:
                self._speculate(frame_end, speech_end)
            if silent >= self._min_silence_frames:
                self._finalise(min(speech_end + self._pad, frame_end), speech_end)
                return
        else:
            self._speech_frames += 1
        if self._utt_start is not None and frame_end - self._utt_start >= self._max_len:
            lo = self._utt_start + self._max_len // 2
            cut = quietest_point(self._audio.slice(lo, frame_end), None, 0, frame_end - lo) + lo
            self._finalise(cut, cut, continues=True)

    def _speculate(self, end: int, speech_end: int) -> None:
        """Start the decode that will be the final if the pause holds (a partial if it does not)."""
        if any(d.end >= speech_end and d.beam_size == self.options.beam_size for d in self._decodes):
            return
        self._launch(end, self.options.beam_size, partial=False, emit_partial=self.options.interim_results)

    def _maybe_partial(self) -> None:
        if not self.options.interim_results or self._utt_start is None or self._silence_from is not None:
            return
        if self._speech_frames < 3 or any(d.partial and not d.task.done() for d in self._decodes):
            return
        end = self._audio.end
        if self._partials_launched == 0:
            if end - self._speech_start < self._first_partial:
                return
        elif end - self._last_partial_end < self._partial_step:
            return
        elif self._gate is not None and not self._gate.has_free_slot:
            return  # under load later partials wait for a free slot instead of queueing (they would be stale)
        if self._gate is not None and self._partials_launched == 0 and not self._gate.has_free_slot \
                and self._gate.expected_wait_s(PRIORITY_FIRST_PARTIAL) > MAX_PARTIAL_WAIT_S:
            return  # it would come after the final: leave the machine to the finals
        self._last_partial_end = end
        self._partials_launched += 1
        self._launch(end, DEFAULT_STREAM_BEAM_SIZE, partial=True)

    # ------------------------------------------------------------------ decoding
    def _decode_options(self, beam_size: int, partial: bool) -> TranscribeOptions:
        return TranscribeOptions(
            language=self._language if partial else self.options.language,
            beam_size=beam_size,
            word_timestamps=self.options.word_timestamps,
            vad=None,
            scorer=self.options.scorer,
        )

    def _voiced(self, start: int, end: int) -> np.ndarray:
        f0 = start // FRAME_SAMPLES
        n = -(-(end - start) // FRAME_SAMPLES)
        a = f0 - self._probs_start
        values = np.asarray(self._probs[max(a, 0) : max(a, 0) + n], dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        mask[: values.shape[0]] = values >= self._enter
        return mask

    async def _decode(self, audio: np.ndarray, voiced: np.ndarray, beam_size: int, priority: int) -> ChunkResult:
        partial = priority != PRIORITY_FINAL
        if self._gate is None:
            return await self.transcriber.decode_audio(audio, self._decode_options(beam_size, partial), voiced=voiced)
        await self._gate.acquire(priority)
        started = time.perf_counter()
        try:
            options = self._decode_options(beam_size, partial)  # (the language may have been found meanwhile)
            result = await self.transcriber.decode_audio(audio, options, voiced=voiced, slot_held=True)
            self._gate.record(time.perf_counter() - started)
            return result
        finally:
            self._gate.release()

    def _launch(self, end: int, beam_size: int, *, partial: bool, emit_partial: bool | None = None) -> _Decode:
        start = self._utt_start
        # the audio is taken now: the buffer may be trimmed before the task runs
        audio, voiced = self._audio.slice(start, end), self._voiced(start, end)
        if not partial:
            priority = PRIORITY_FINAL
        else:
            priority = PRIORITY_FIRST_PARTIAL if self._partials_sent == 0 else PRIORITY_PARTIAL
        task = asyncio.create_task(self._decode(audio, voiced, beam_size, priority))
        decode = _Decode(start, end, beam_size, task, partial)
        self._decodes.append(decode)
        self._track(task)
        if partial if emit_partial is None else emit_partial:
            utterance = self._utt_index
            task.add_done_callback(lambda t: self._on_partial_done(t, decode, utterance))
        return decode

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            if self._on_error is not None:
                self._on_error(error)

    def _on_partial_done(self, task: asyncio.Task, decode: _Decode, utterance: int) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._fail(error)
            return
        if utterance != self._utt_index or (self._final_chain is not None and not self._final_chain.done()):
            return  # its utterance ended (the final covers it) or an earlier final is pending
        if decode.end <= self._partial_end:
            return  # a partial over more audio was sent already
        result = self._result(task.result(), decode.start, decode.end, final=False)
        if not result.text:
            return
        agreed = _common_prefix(self._partial_text, result.text)
        result.stability = round(agreed / max(len(result.text), 1), 3)
        self._partial_text = result.text
        self._partial_end = decode.end
        self._partials_sent += 1
        self._track(asyncio.create_task(self._emit_safe(result)))

    async def _emit_safe(self, result: StreamResult) -> None:
        try:
            await self.emit(result)
        except Exception as error:  # noqa: BLE001 - reported by the servicer
            self._fail(error)

    def _finalise(self, end: int, speech_end: int, *, continues: bool = False) -> None:
        start = self._utt_start
        utterance = self._utt_index
        enough_speech = self._speech_frames >= self._min_speech_frames
        reusable = [
            d for d in self._decodes
            if d.start == start and d.end >= speech_end and d.beam_size == self.options.beam_size
            and not d.task.cancelled()
        ]
        for d in self._decodes:  # partials in flight that the final supersedes
            if d.partial and d not in reusable and not d.task.done():
                d.task.cancel()
        had_partials = self._partials_sent > 0
        if enough_speech or had_partials:
            decode = min(reusable, key=lambda d: d.end) if reusable else self._launch(end, self.options.beam_size, partial=False)
            previous = self._final_chain
            self._final_chain = asyncio.create_task(
                self._emit_final(previous, decode, utterance, had_partials, end)
            )
            self._track(self._final_chain)
            self._utt_index += 1
        else:
            for d in self._decodes:
                if not d.task.done():
                    d.task.cancel()
        self._decodes = []
        self._last_end = end
        self._silence_from = None
        self._partial_text = ""
        self._partials_sent = 0
        self._partials_launched = 0
        if continues:
            self._utt_start = end
            self._speech_start = end
            self._speech_frames = 1
            self._last_partial_end = end
        else:
            self._utt_start = None
            self._speech_frames = 0

    async def _emit_final(self, previous: asyncio.Task | None, decode: _Decode, utterance: int, had_partials: bool, end: int) -> None:
        try:
            if previous is not None:
                await asyncio.shield(previous)
            decoded = await asyncio.shield(decode.task)
            if self.options.language is None and decoded.result is not None and decoded.result.tokens:
                self._language = decoded.language
            result = self._result(decoded, decode.start, max(decode.end, end), final=True)
            result.utterance = utterance
            if result.text or had_partials:
                await self.emit(result)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - reported by the servicer
            self._fail(error)

    def _result(self, decoded: ChunkResult, start: int, end: int, *, final: bool) -> StreamResult:
        offset = start / SAMPLE_RATE
        segments: list[Segment] = decoded.segments
        text = join_text([s.text for s in segments], decoded.language)
        words = [
            replace(w, start_s=round(offset + w.start_s, 3), end_s=round(offset + w.end_s, 3))
            for s in segments for w in s.words
        ]
        if segments:
            start_s, end_s = offset + segments[0].start_s, offset + segments[-1].end_s
        else:
            start_s, end_s = offset, end / SAMPLE_RATE
        res = decoded.result
        avg = float(res.avg_logprob) if res is not None and res.tokens else 0.0
        return StreamResult(
            utterance=self._utt_index,
            text=text,
            is_final=final,
            stability=1.0 if final else 0.0,
            start_s=round(start_s, 3),
            end_s=round(max(end_s, start_s), 3),
            language=decoded.language,
            confidence=float(math.exp(avg)) if res is not None and res.tokens else 0.0,
            avg_logprob=avg,
            token_ids=[t for s in segments for t in s.token_ids],
            words=words,
            audio_received_s=self.audio_received_s,
        )

    def _trim(self) -> None:
        """Keep the open utterance and the pad before the next one; nothing older."""
        keep = self._utt_start if self._utt_start is not None else max(self._audio.end - self._pad - FRAME_SAMPLES, 0)
        self._audio.trim(keep)
        drop = self._audio.start // FRAME_SAMPLES - self._probs_start
        if drop > 0:
            del self._probs[:drop]
            self._probs_start += drop
