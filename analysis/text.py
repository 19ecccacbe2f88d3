"""Transcript normalisation: what every matcher in analysis/ sees.

Whisper base often writes Mandarin in traditional characters, with full-width or Arabic
digits, and in Chinese numerals elsewhere (十二号, 三栋). Rules and the gazetteer are
written once, for simplified Chinese with Arabic digits, so the transcript is brought to
that form first: NFKC (full-width -> ASCII), traditional -> simplified (zhconv), Chinese
numerals before a measure word -> digits, whitespace collapsed.

When the transcript comes as timed segments, each is normalised on its own and the
offsets are kept, so a character offset in the normalised text maps back to the time in
the recording where it was said.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import zhconv

_DIGITS = {"零": 0, "〇": 0, "一": 1, "幺": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_UNITS = {"十": 10, "百": 100, "千": 1000}
_NUMERAL_CHARS = "".join(_DIGITS) + "".join(_UNITS)
# Numerals followed by these measure words are addresses, counts or prices: 十二号 -> 12号,
# 三栋 -> 3栋, 报修三次 -> 报修3次. Elsewhere (一下, 三天两头) they stay words.
_MEASURE_WORDS = "号|栋|幢|单元|楼|层|室|次|遍|元|块|弄|巷"
_NUMERAL_BEFORE_MEASURE = re.compile(rf"([{_NUMERAL_CHARS}]+)(?=({_MEASURE_WORDS}))")
# Whisper hears 栋 (building) as 东/洞/动/冻 after a number: 5东 -> 5栋, 三洞 -> 三栋. Not before
# direction or road words (3东门, 东路).
_BUILDING_HOMOPHONE = re.compile(rf"(\d+|[{_NUMERAL_CHARS}]+)[东洞动冻](?![西南北方边门路街部区站侧])")
_SPACES = re.compile(r"\s+")
# Sentence ends and clause breaks, after NFKC (，-> , ！-> ! ？-> ?).
SENTENCE_BREAK = re.compile(r"[。!?;；…\n]+")
CLAUSE_BREAK = re.compile(r"[。!?;；…,、:\n]+")


def chinese_numeral_to_int(numeral: str) -> int | None:
    """十二 -> 12, 一百零五 -> 105, 三 -> 3, 一二三 -> 123 (digit by digit); None if not a number."""
    if not numeral or any(ch not in _DIGITS and ch not in _UNITS for ch in numeral):
        return None
    if not any(ch in _UNITS for ch in numeral):
        return int("".join(str(_DIGITS[ch]) for ch in numeral))
    total, current = 0, 0
    for ch in numeral:
        if ch in _DIGITS:
            current = _DIGITS[ch]
        else:
            total += (current or 1) * _UNITS[ch]  # 十二: a bare 十 means 10
            current = 0
    return total + current


def _numerals_to_digits(text: str) -> str:
    def replace(match: re.Match) -> str:
        value = chinese_numeral_to_int(match.group(1))
        return match.group(1) if value is None else str(value)

    return _NUMERAL_BEFORE_MEASURE.sub(replace, text)


def normalize(text: str) -> str:
    """Simplified Chinese, ASCII digits and punctuation, numerals before measure words as digits."""
    text = unicodedata.normalize("NFKC", text)
    text = zhconv.convert(text, "zh-cn")
    text = _BUILDING_HOMOPHONE.sub(lambda match: match.group(1) + "栋", text)
    text = _numerals_to_digits(text)
    return _SPACES.sub(" ", text).strip()


@dataclass(frozen=True)
class TimedSpan:
    """A segment of the recording: [start_s, end_s) and where its text sits in the normalised text."""

    start_s: float
    end_s: float
    char_start: int
    char_end: int


@dataclass(frozen=True)
class NormalizedTranscript:
    """The normalised text, the transcript it came from and (for timed input) its segments."""

    text: str
    original: str
    spans: tuple[TimedSpan, ...] = field(default=())
    truncated: bool = False

    def time_at(self, char_offset: int) -> float | None:
        """Where in the recording this character was said, or None for untimed text.

        Segments carry only start and end times, so the position inside a segment is
        interpolated by characters: an estimate good to a second or two, enough to
        jump to the place in the audio."""
        if not self.spans:
            return None
        starts = [span.char_start for span in self.spans]
        span = self.spans[max(0, bisect.bisect_right(starts, char_offset) - 1)]
        length = max(1, span.char_end - span.char_start)
        share = min(1.0, max(0.0, (char_offset - span.char_start) / length))
        return round(span.start_s + share * max(0.0, span.end_s - span.start_s), 2)


def _truncate(text: str, max_chars: int) -> tuple[str, bool]:
    return (text[:max_chars], True) if len(text) > max_chars else (text, False)


def normalize_transcript(text: str, max_chars: int) -> NormalizedTranscript:
    normalized, truncated = _truncate(normalize(text), max_chars)
    return NormalizedTranscript(text=normalized, original=text, truncated=truncated)


def normalize_segments(segments: Iterable[Mapping], max_chars: int) -> NormalizedTranscript:
    """Segments as the gateway returns them ({start_s, end_s, text}), joined with a clause break."""
    pieces: list[str] = []
    originals: list[str] = []
    spans: list[TimedSpan] = []
    position = 0
    for segment in segments:
        original = str(segment.get("text", ""))
        piece = normalize(original)
        originals.append(original)
        if not piece:
            continue
        if pieces and not CLAUSE_BREAK.match(piece[-1:]) and not CLAUSE_BREAK.search(pieces[-1][-1:]):
            pieces[-1] += ","  # segments are spoken phrases: keep them apart for the summary
            position += 1
        start = position
        pieces.append(piece)
        position += len(piece)
        spans.append(TimedSpan(float(segment.get("start_s", 0.0)), float(segment.get("end_s", 0.0)), start, position))
    text, truncated = _truncate("".join(pieces), max_chars)
    kept = tuple(span for span in spans if span.char_start < len(text))
    return NormalizedTranscript(text=text, original="".join(originals), spans=kept, truncated=truncated)


def split_sentences(text: str) -> list[tuple[int, str]]:
    """(offset, sentence) for each non-empty sentence; clause breaks split too long runs."""
    sentences = []
    start = 0
    for match in CLAUSE_BREAK.finditer(text + "。"):
        piece = text[start:match.start()]
        if piece.strip():
            sentences.append((start + len(piece) - len(piece.lstrip()), piece.strip()))
        start = match.end()
    return sentences


def cjk_ratio(text: str) -> float:
    """Share of letters that are CJK ideographs (0 for text without letters)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for ch in letters if "\u4e00" <= ch <= "\u9fff") / len(letters)
