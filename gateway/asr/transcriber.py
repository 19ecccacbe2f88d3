"""Audio (16 kHz float32) -> text through Triton: VAD chunks, features, encoder, beam search.

Long audio is segmented by Silero VAD (:mod:`gateway.asr.vad`) into chunks of at most 30 s of
speech (silence between utterances left out, long speech split at its quietest point); the
chunks of a recording (and of every channel of a stereo call) are decoded concurrently so
Triton's dynamic batcher (encoder) and sequence batcher (decoder) combine them. With VAD
disabled the audio is cut into consecutive 30 s windows instead.

Times (seconds of the original recording):

- without ``word_timestamps`` a chunk is one segment, from its first to its last voiced VAD
  frame;
- with ``word_timestamps`` the decoder runs in Whisper's timestamp mode (the Triton decoder
  applies openai-whisper's ``ApplyTimestampRules`` to the full distribution, per beam) and
  every timestamp pair is a segment. Segment bounds are aligned with VAD speech inside the
  segment (see snap_to_voiced). Word times inside a segment are interpolated, not aligned:
  the segment's voiced time is shared among its words in proportion to their characters
  (unvoiced frames count a tenth). Word confidence is the mean probability of its tokens.

Times are clamped to the chunk they come from, so they are monotonic and inside the audio.
"""

from __future__ import annotations

import asyncio
import logging
import math
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.asr.decoding import MAX_BEAM_SIZE, DecodingOptions, DecodingResult, TokenScorer
from gateway.asr.features import N_SAMPLES, SAMPLE_RATE
from gateway.asr.families import FamilyMismatchError, ModelFamily, check_deployed, load_family
from gateway.asr.tokenizer import WhisperTokenizer
from gateway.asr.window_decoder import TritonWindowDecoder, WindowDecoder, WindowOptions
from gateway.asr.vad import (
    FRAME_S,
    FRAME_SAMPLES,
    SileroVad,
    SpeechChunk,
    VadOptions,
    fixed_windows,
    plan_chunks,
    speech_mask,
)

log = logging.getLogger(__name__)

DEFAULT_BEAM_SIZE = 5
WINDOW_S = N_SAMPLES / SAMPLE_RATE
UNVOICED_WEIGHT = 0.1  # share of an unvoiced frame in word-time interpolation
SNAP_TAIL_S = 0.6  # a segment bound this close to the far end of its stretch of speech ...
SNAP_GAP_S = 0.3  # ... moves across a pause at least this long (see snap_to_voiced)
JOIN_MARGIN_S = 0.2  # a segment is split at a join that lies at least this far inside it
MISSED_SPEECH_S = 0.5  # a piece with this much speech that no segment covers is decoded again
NO_SPACE_LANGUAGES = ("zh", "ja", "yue", "th", "lo", "my")  # words are characters, not spaces
CHANNEL_MODES = ("downmix", "separate")


class ModelMismatchError(RuntimeError):
    """The model deployed in Triton is not the one the gateway's model directory describes."""


class VadUnavailableError(RuntimeError):
    """VAD segmentation was asked for but the gateway has no VAD model."""


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # None: detect per chunk
    beam_size: int = DEFAULT_BEAM_SIZE
    task: str = "transcribe"
    word_timestamps: bool = False  # Whisper timestamp tokens -> segments and word times
    vad: VadOptions | None = VadOptions()  # None: fixed 30 s windows
    # Hotword context graph (gateway.asr.hotwords) applied inside beam search; None: no biasing.
    # Scorer states are immutable, so one scorer serves every chunk of a request.
    scorer: TokenScorer | None = None
    # cap on the scorer's bonus (gateway.asr.decoding.DecodingOptions.max_biased_logprob)
    max_biased_logprob: float | None = DecodingOptions.max_biased_logprob

    def __post_init__(self) -> None:
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {self.beam_size}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {self.task!r}")


@dataclass
class Word:
    text: str
    start_s: float
    end_s: float
    confidence: float  # mean token probability
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Segment:
    start_s: float
    end_s: float
    text: str
    confidence: float
    avg_logprob: float
    token_ids: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    channel: int = 0
    speaker: str = ""
    model_text: str = ""  # what the model wrote, where ``text`` was converted (script.py)


@dataclass
class Transcript:
    text: str
    segments: list[Segment]
    duration_s: float
    language: str
    chunks: int = 0  # recogniser calls (VAD chunks or windows)
    model_text: str = ""  # what the model wrote, where ``text`` was converted (script.py)


@dataclass
class ChunkResult:
    """One decoded chunk, times in seconds of the chunk's own audio."""

    segments: list[Segment]
    language: str
    result: DecodingResult | None


def join_text(texts: list[str], language: str) -> str:
    texts = [t.strip() for t in texts if t and t.strip()]
    return ("" if language in NO_SPACE_LANGUAGES else " ").join(texts)


class Transcriber:
    """Runs the whole recognition path for one audio array (or each channel of one)."""

    def __init__(
        self,
        client,
        model_dir: Path,
        *,
        max_concurrent_windows: int = 4,
        vad: SileroVad | None = None,
        window_decoder: WindowDecoder | None = None,
        server_search: bool = True,
        server_encode: bool = True,
    ) -> None:
        """``client``: a TritonAsrClient for the stepwise path, unused when ``window_decoder``
        (another backend behind the WindowDecoder seam) is given. ``server_search``: windows
        are searched inside Triton when it serves the `search` model (False: stepwise);
        ``server_encode``: ... from their features, encoded there too, when the model takes them."""
        self.client = client
        self.model_dir = Path(model_dir)
        # The family (whisper, glm_asr) supplies prompt, EOS ids, suppress lists, detokenizer:
        # one decoding loop serves every family.
        self.family: ModelFamily = load_family(self.model_dir)
        self.model_info = self.family.model_info
        self.model_name: str = self.family.model_name
        self.tokenizer = self.family.tokenizer
        self.n_mels: int = self.family.n_mels
        self.max_length: int = self.family.max_length
        if self.family.supports_timestamps:
            self.timestamp_begin: int = int(self.model_info["timestamp_begin"])
            self.time_precision: float = float(self.model_info.get("time_precision", 0.02))
        self.vad = vad
        self.window_decoder: WindowDecoder = window_decoder or TritonWindowDecoder(
            client, self.family, server_search=server_search, server_encode=server_encode)
        self._window_slots = asyncio.Semaphore(max_concurrent_windows)

    async def check_deployment(self) -> None:
        deployed = await self.window_decoder.deployed_model()
        try:
            check_deployed(self.family, deployed)
        except FamilyMismatchError as error:
            raise ModelMismatchError(str(error)) from error

    def validate_language(self, language: str | None) -> None:
        self.family.validate(language)  # raises UnknownLanguageError

    # ------------------------------------------------------------------ offline
    async def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        *,
        channel_labels: list[str] | None = None,
    ) -> Transcript:
        """``audio`` float32 [n] (one channel) or [channels, n] (each channel transcribed on its
        own; segments carry ``channel`` and ``speaker`` = ``channel_labels[channel]``)."""
        self.validate_language(options.language)
        if options.vad is not None and self.vad is None:
            raise VadUnavailableError("this gateway has no VAD model; disable VAD in the request or install it")
        channels = [audio] if audio.ndim == 1 else list(audio)
        duration_s = audio.shape[-1] / SAMPLE_RATE
        labels = list(channel_labels or [])
        plans = await asyncio.gather(*(self._plan(ch, options) for ch in channels))
        jobs = []
        for index, (samples, (chunks, mask)) in enumerate(zip(channels, plans)):
            speaker = labels[index] if index < len(labels) else ""
            for chunk in chunks:
                jobs.append(self._transcribe_chunk(samples, chunk, mask, options, index, speaker))
        results = await asyncio.gather(*jobs)
        segments = [s for segs, _ in results for s in segs]
        segments.sort(key=lambda s: (s.start_s, s.channel))
        languages = [language for _, language in results if language]
        language = options.language or (max(set(languages), key=languages.count) if languages else "")
        if not language:  # families that do not report a language (glm_asr): guess from the script
            language = self.family.language_of(" ".join(s.text for s in segments))
        return Transcript(
            text=join_text([s.text for s in segments], language),
            segments=segments,
            duration_s=duration_s,
            language=language,
            chunks=len(jobs),
        )

    async def _plan(self, samples: np.ndarray, options: TranscribeOptions) -> tuple[list[SpeechChunk], np.ndarray | None]:
        if samples.shape[0] == 0:
            return [], None
        if options.vad is None:
            return fixed_windows(samples.shape[0], WINDOW_S), None
        return await asyncio.to_thread(self._vad_plan, samples, options.vad)

    def _vad_plan(self, samples: np.ndarray, vad_options: VadOptions) -> tuple[list[SpeechChunk], np.ndarray]:
        probs = self.vad.speech_probs(samples)
        chunks, regions = plan_chunks(samples, probs, vad_options)
        return chunks, speech_mask(regions, probs.shape[0])

    async def _transcribe_chunk(
        self,
        samples: np.ndarray,
        chunk: SpeechChunk,
        mask: np.ndarray | None,
        options: TranscribeOptions,
        channel: int,
        speaker: str,
        *,
        retry: bool = True,
    ) -> tuple[list[Segment], str]:
        async with self._window_slots:
            audio = chunk.audio(samples)
            voiced = chunk.frame_values(mask) if mask is not None else None
            decoded = await self.decode_audio(audio, options, voiced=voiced, joins=chunk.joins_s(), slot_held=True)
            del audio
        segments = decoded.segments
        missed = missed_pieces(chunk, segments, voiced) if retry and options.word_timestamps and voiced is not None else []
        chunk_end_s = chunk.n_samples / SAMPLE_RATE
        for seg in segments:
            seg.start_s = round(chunk.to_original_s(min(seg.start_s, chunk_end_s), prefer_next=True), 3)
            seg.end_s = round(max(chunk.to_original_s(min(seg.end_s, chunk_end_s), prefer_next=False), seg.start_s), 3)
            for word in seg.words:
                word.start_s = round(chunk.to_original_s(min(word.start_s, chunk_end_s), prefer_next=True), 3)
                word.end_s = round(max(chunk.to_original_s(min(word.end_s, chunk_end_s), prefer_next=False), word.start_s), 3)
            seg.channel = channel
            seg.speaker = speaker
        if missed:
            # Speech no segment covers (Whisper skipped it, e.g. another language than the one
            # detected for the chunk): decode those pieces again on their own, once.
            extra, _ = await self._transcribe_chunk(
                samples, SpeechChunk(tuple(missed)), mask, options, channel, speaker, retry=False
            )
            segments = sorted(segments + extra, key=lambda seg: seg.start_s)
        return segments, decoded.language

    # ------------------------------------------------------------------ one chunk
    async def decode_audio(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        *,
        voiced: np.ndarray | None = None,
        joins: tuple[float, ...] = (),
        slot_held: bool = False,
    ) -> ChunkResult:
        """Decode up to 30 s of audio; segment times in seconds of ``audio``.

        ``voiced``: per-VAD-frame speech mask of ``audio`` (refines times), or None.
        ``joins``: times where pieces of the recording were joined (a segment is split there).
        """
        if audio.shape[0] > N_SAMPLES:
            raise ValueError(f"decode_audio takes at most {N_SAMPLES} samples, got {audio.shape[0]}")
        if not slot_held:
            async with self._window_slots:
                return await self.decode_audio(audio, options, voiced=voiced, joins=joins, slot_held=True)
        timestamps = options.word_timestamps and self.family.supports_timestamps
        window = WindowOptions(
            language=options.language,
            task=options.task,
            beam_size=options.beam_size,
            timestamps=timestamps,
            scorer=options.scorer,
            max_biased_logprob=options.max_biased_logprob,
        )
        decoded = await self.window_decoder.decode_window(audio, window)
        result, language = decoded.result, decoded.language
        duration_s = audio.shape[0] / SAMPLE_RATE
        if timestamps:
            segments = self._timestamped_segments(result, duration_s, voiced, language, joins)
        else:
            segments = self._plain_segment(result, duration_s, voiced)
        return ChunkResult(segments=segments, language=language, result=result)

    def _plain_segment(self, result: DecodingResult, duration_s: float, voiced: np.ndarray | None) -> list[Segment]:
        text = self.family.decode(result.tokens).strip()
        if not text and not result.tokens:
            return []
        start, end = snap_to_voiced(0.0, duration_s, voiced)
        return [
            Segment(
                start_s=start,
                end_s=end,
                text=text,
                confidence=float(math.exp(result.avg_logprob)) if result.tokens else 0.0,
                avg_logprob=float(result.avg_logprob),
                token_ids=[int(t) for t in result.tokens],
            )
        ]

    def _timestamped_segments(
        self,
        result: DecodingResult,
        duration_s: float,
        voiced: np.ndarray | None,
        language: str,
        joins: tuple[float, ...] = (),
    ) -> list[Segment]:
        segments = []
        previous_end = 0.0
        for start, end, tokens, logprobs in split_at_timestamps(
            result.tokens, result.token_logprobs, self.timestamp_begin, self.time_precision, duration_s
        ):
            if not self.tokenizer.decode(tokens).strip():
                continue
            start = max(start, previous_end)
            end = max(end, start)
            start, end = snap_to_voiced(start, end, voiced, floor=previous_end)
            words, spans = self._words(tokens, logprobs, start, end, voiced, language)
            # a segment that runs across a join (silence left out between two utterances) is
            # split there: its words go to the side their middle is on
            inner = [j for j in joins if start + JOIN_MARGIN_S < j < end - JOIN_MARGIN_S]
            groups: list[list[int]] = [[]]
            edge = iter(inner)
            next_join = next(edge, None)
            for i, word in enumerate(words):
                while next_join is not None and (word.start_s + word.end_s) / 2 > next_join:
                    next_join = next(edge, None)
                    if groups[-1]:
                        groups.append([])
                groups[-1].append(i)
            for group in groups if words else []:
                if not group:
                    continue
                lo, hi = spans[group[0]][0], spans[group[-1]][1]
                part_tokens, part_lps = tokens[lo:hi], logprobs[lo:hi]
                part_words = [words[i] for i in group]
                if len(groups) == 1:
                    seg_start, seg_end = start, end
                else:
                    seg_start, seg_end = snap_to_voiced(part_words[0].start_s, part_words[-1].end_s, voiced)
                avg = float(np.mean(part_lps)) if part_lps else 0.0
                segments.append(
                    Segment(
                        start_s=seg_start,
                        end_s=seg_end,
                        text=self.tokenizer.decode(part_tokens).strip(),
                        confidence=float(math.exp(avg)),
                        avg_logprob=avg,
                        token_ids=[int(t) for t in part_tokens],
                        words=part_words,
                    )
                )
            previous_end = end
        return segments

    def _words(
        self,
        tokens: list[int],
        logprobs: list[float],
        start: float,
        end: float,
        voiced: np.ndarray | None,
        language: str,
    ) -> tuple[list[Word], list[tuple[int, int]]]:
        """Words with interpolated times, and the range of ``tokens`` each one holds."""
        groups = split_words(self.tokenizer, tokens, language)
        if not groups:
            return [], []
        weights = [max(len(text.strip()), 1) for text, _ in groups]
        bounds = interpolate_times(start, end, weights, voiced)
        words, spans = [], []
        position = 0
        for (text, ids), (w_start, w_end) in zip(groups, bounds):
            probs = [math.exp(lp) for lp in logprobs[position : position + len(ids)]]
            spans.append((position, position + len(ids)))
            position += len(ids)
            words.append(
                Word(
                    text=text.strip(),
                    start_s=w_start,
                    end_s=w_end,
                    confidence=float(np.mean(probs)) if probs else 0.0,
                    token_ids=[int(t) for t in ids],
                )
            )
        return words, spans


# --------------------------------------------------------------------------- helpers
def missed_pieces(chunk: SpeechChunk, segments: list[Segment], voiced: np.ndarray) -> list[tuple[int, int]]:
    """Pieces of ``chunk`` (original samples) holding at least MISSED_SPEECH_S of speech
    (``voiced``, chunk frames) of which less than half lies inside a segment (chunk times)."""
    covered = np.zeros(voiced.shape[0], dtype=bool)
    for seg in segments:
        covered[int(seg.start_s / FRAME_S) : int(math.ceil(seg.end_s / FRAME_S))] = True
    missed = []
    offset = 0
    for s, e in chunk.pieces:
        a, b = offset // FRAME_SAMPLES, -(-(offset + e - s) // FRAME_SAMPLES)
        offset += e - s
        speech = voiced[a:b]
        spoken = int(speech.sum())
        if spoken * FRAME_S >= MISSED_SPEECH_S and int((speech & covered[a:b]).sum()) < spoken / 2:
            missed.append((s, e))
    return missed


def split_at_timestamps(
    tokens: list[int],
    logprobs: list[float],
    timestamp_begin: int,
    time_precision: float,
    duration_s: float,
) -> list[tuple[float, float, list[int], list[float]]]:
    """Whisper timestamp-mode output -> (start, end, text tokens, their log-probs) per segment.

    ``<|t0|> text <|t1|><|t1|> text <|t2|>``: a timestamp after text closes the segment, a
    timestamp before text opens one. Text left open at the end (length limit, or a single
    timestamp ending) runs to ``duration_s``. Times are clamped to [0, duration_s].
    """
    out = []
    start = None
    text: list[int] = []
    lps: list[float] = []
    last_time = 0.0
    for token, lp in zip(tokens, logprobs):
        if token >= timestamp_begin:
            t = min(max((token - timestamp_begin) * time_precision, 0.0), duration_s)
            if text:
                seg_start = start if start is not None else last_time
                out.append((seg_start, max(t, seg_start), text, lps))
                text, lps = [], []
                start = None
            else:
                start = t
            last_time = t
        else:
            if start is None and not text:
                start = last_time
            text.append(int(token))
            lps.append(float(lp))
    if text:
        seg_start = start if start is not None else last_time
        out.append((seg_start, max(duration_s, seg_start), text, lps))
    return out


def _runs(voiced: np.ndarray) -> list[tuple[int, int]]:
    """Voiced runs [a, b) of frames."""
    padded = np.concatenate([[False], voiced, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def snap_to_voiced(
    start: float, end: float, voiced: np.ndarray | None, floor: float | None = None
) -> tuple[float, float]:
    """Align segment bounds with VAD speech (frames of ``voiced``), within [start, end].

    - a start in silence moves forward to the next speech onset; a start in the last
      ``SNAP_TAIL_S`` of a stretch of speech that a pause of at least ``SNAP_GAP_S`` follows
      moves to the onset after the pause (Whisper often starts a segment where the previous
      one ended, pause included);
    - ends likewise, backwards;
    - with ``floor`` (the previous segment's end), a start less than ``SNAP_TAIL_S`` after the
      onset of its stretch of speech moves back to that onset when it is not before ``floor``.
    Unchanged when the span holds no speech (or there is no VAD).
    """
    if voiced is None or voiced.size == 0 or end <= start:
        return round(start, 3), round(end, 3)
    runs = [(a * FRAME_S, b * FRAME_S) for a, b in _runs(voiced)]
    inside = [(a, b) for a, b in runs if b > start and a < end]
    if not inside:
        return round(start, 3), round(end, 3)
    new_start, new_end = start, end
    first = 0
    a, b = inside[0]
    if start < a:
        new_start = a
    elif b - start <= SNAP_TAIL_S and len(inside) > 1 and inside[1][0] - b >= SNAP_GAP_S:
        new_start, first = inside[1][0], 1
    last = len(inside) - 1
    a, b = inside[last]
    if end > b:
        new_end = b
    elif end - a <= SNAP_TAIL_S and last > first and a - inside[last - 1][1] >= SNAP_GAP_S:
        new_end = inside[last - 1][1]
    new_start, new_end = max(new_start, start), min(new_end, end)
    if floor is not None and new_start == start:
        onset = next((a for a, b in runs if a <= start < b), None)
        if onset is not None and start - onset <= SNAP_TAIL_S and onset >= floor:
            new_start = onset
    if new_end <= new_start:
        return round(start, 3), round(end, 3)
    return round(new_start, 3), round(new_end, 3)


def interpolate_times(
    start: float, end: float, weights: list[int], voiced: np.ndarray | None
) -> list[tuple[float, float]]:
    """Share [start, end] among items in proportion to ``weights``, over voiced time (unvoiced
    frames count ``UNVOICED_WEIGHT``); an item's bounds that fall in a pause move to its edges."""
    total = float(sum(weights))
    cum = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)]) / total
    if voiced is not None and voiced.size and end > start:
        f0 = int(start / FRAME_S)
        f1 = max(int(math.ceil(end / FRAME_S)), f0 + 1)
        edges = np.clip(np.arange(f0, f1 + 1) * FRAME_S, start, end)
        frame_voiced = np.zeros(f1 - f0, dtype=bool)
        inside = voiced[f0 : min(f1, voiced.shape[0])]
        frame_voiced[: inside.shape[0]] = inside
        mass = np.diff(edges) * np.where(frame_voiced, 1.0, UNVOICED_WEIGHT)
        cum_mass = np.concatenate([[0.0], np.cumsum(mass)])
        if cum_mass[-1] > 0:
            times = np.interp(cum * cum_mass[-1], cum_mass, edges)
        else:
            times = start + cum * (end - start)
    else:
        times = start + cum * (end - start)
    times = np.maximum.accumulate(times)
    bounds = [(float(a), float(b)) for a, b in zip(times[:-1], times[1:])]
    if voiced is not None and voiced.size:
        # a word boundary that falls in a pause goes to the pause's edges
        bounds = [snap_to_voiced(a, b, voiced) if b > a else (a, b) for a, b in bounds]
    return [(round(a, 3), round(b, 3)) for a, b in bounds]


def split_words(tokenizer: WhisperTokenizer, tokens: list[int], language: str) -> list[tuple[str, list[int]]]:
    """Text tokens -> (word, its tokens): characters for zh/ja/yue/th/lo/my, else words at spaces
    (punctuation stays with the word before it). Tokens that end inside a UTF-8 character are
    kept with the next ones (openai-whisper's ``split_tokens_on_unicode``)."""
    units: list[tuple[str, list[int]]] = []
    current: list[int] = []
    for token in tokens:
        current.append(int(token))
        text = tokenizer.decode(current)
        if "\ufffd" not in text:
            units.append((text, current))
            current = []
    if current:
        units.append((tokenizer.decode(current), current))
    words: list[tuple[str, list[int]]] = []
    no_space = language in NO_SPACE_LANGUAGES
    for text, ids in units:
        stripped = text.strip()
        punctuation = bool(stripped) and all(ch in string.punctuation or not ch.isalnum() for ch in stripped)
        if words and (punctuation or not stripped or (not no_space and not text.startswith(" "))):
            words[-1] = (words[-1][0] + text, words[-1][1] + ids)
        else:
            words.append((text, ids))
    return words
