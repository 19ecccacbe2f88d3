"""Sound-alike matching of place names, for what the ASR mis-heard.

Whisper base writes unfamiliar names as other characters with the same or similar sound:
滨湖区 -> 冰湖去, 柳岸路 -> 流暗露, 高新区 -> 高兴去, 幸福家园 -> 幸福家人. Comparing toneless
pinyin with the usual "fuzzy" pairs merged (zh/z, ch/c, sh/s, n/l, -ng/-n, as Chinese input
methods do) finds them again. A match must sound alike syllable by syllable; names of
four or more syllables may differ in one syllable if the rest are the same characters; an
index built with `half_heard` also takes one syllable sharing only its initial or its final
(望江越 for 望江苑, 无光小区 for 湖光小区).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

_NOT_HAN = "_"


def _fuzzy(syllable: str) -> str:
    for retroflex, plain in (("zh", "z"), ("ch", "c"), ("sh", "s")):
        if syllable.startswith(retroflex):
            syllable = plain + syllable[2:]
            break
    if syllable.startswith("n") and not syllable.startswith("ng"):
        syllable = "l" + syllable[1:]
    if syllable.endswith("ng") and len(syllable) > 2:
        syllable = syllable[:-1]
    return syllable


TABLE_PATH = Path(__file__).resolve().parent / "pinyin_table.txt"


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, str] | None:
    """Character -> toneless pinyin (first reading) from pinyin_table.txt: 0.2 MB instead of
    the 56 MB pypinyin keeps resident with its phrase dictionaries."""
    try:
        lines = TABLE_PATH.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return {line[0]: line[1:] for line in lines if line and not line.startswith("#")}


@functools.lru_cache(maxsize=1)
def _converter():
    table = _table()
    if table:
        return lambda text: [table.get(ch, _NOT_HAN) for ch in text]
    try:
        from pypinyin import Style, lazy_pinyin
    except ImportError:  # optional: without it names must be heard right
        return None
    return lambda text: lazy_pinyin(text, style=Style.NORMAL, errors=lambda chunk: [_NOT_HAN] * len(chunk))


def write_table(path: Path = TABLE_PATH) -> int:
    """(Re)write pinyin_table.txt from pypinyin (needs pypinyin installed); returns the character count."""
    from pypinyin.contrib.tone_convert import to_normal
    from pypinyin.pinyin_dict import pinyin_dict

    lines = [f"{chr(code)}{to_normal(pinyin_dict[code].split(',')[0]).replace('ü', 'v')}"
             for code in range(0x3400, 0xA000) if code in pinyin_dict]
    header = ("# Toneless pinyin of each CJK character (its first reading), from pypinyin's pinyin_dict.\n"
              "# Written by analysis/phonetic.py write_table(); read instead of importing pypinyin (56 MB resident).\n")
    path.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def syllables(text: str) -> list[str] | None:
    """One fuzzy toneless syllable per character ('_' for non-Han); None without pypinyin."""
    convert = _converter()
    if convert is None:
        return None
    result = [_fuzzy(item) if item != _NOT_HAN else _NOT_HAN for item in convert(text)]
    return result if len(result) == len(text) else None  # alignment lost: do not guess


# Initials after _fuzzy (zh/ch/sh merged into z/c/s, n into l); the rest of a syllable is its final.
_INITIALS = frozenset("bpmfdtlgkhjqxzcsryw")


def rhymes(a: str, b: str) -> bool:
    """Two fuzzy syllables with the same final (湖 hu / 无 wu / 骨 gu, 开 kai / 台 tai): what the
    ASR makes of a syllable whose initial it half hears. A shared initial is not enough
    (滨海区 is not 滨湖区)."""
    if _NOT_HAN in (a, b) or not a or not b:
        return False
    return _final(a) == _final(b)


def _final(syllable: str) -> str:
    return syllable[1:] if syllable[0] in _INITIALS else syllable


def _initial(syllable: str) -> str:
    return syllable[0] if syllable[0] in _INITIALS else ""


# Grammatical characters: where the text has one it is most likely the word itself
# (打车软件也叫不到车), not a name's syllable heard half right.
FUNCTION_CHARACTERS = frozenset("也了的地得是在就都还又和把被给着过吗呢吧啊呀嘛哦么不没很")


def half_alike(a: str, b: str) -> bool:
    """Two fuzzy syllables sharing their initial or their final (望江苑 yuan / 望江越 yue, 码头 tou
    / 马桐 ton, 湖光 hu / 无光 wu): one half of the syllable heard right."""
    if _NOT_HAN in (a, b) or not a or not b:
        return False
    return _final(a) == _final(b) or (_initial(a) != "" and _initial(a) == _initial(b))


@dataclass(frozen=True)
class SoundMatch:
    name: str       # the gazetteer name
    heard: str      # the characters in the transcript
    offset: int


class PhoneticIndex:
    def __init__(self, names: Iterable[str], allow_one_differing: bool = True, half_heard: str | None = None) -> None:
        """allow_one_differing: names of four or more syllables may differ in one (see above).

        half_heard: also match a name one of whose syllables is only half alike (half_alike:
        same initial or same final), the others alike, unless that syllable's character is one
        of these (the generic 路 of 建设路 must not make 建设了 a road)."""
        self._allow_one_differing = allow_one_differing
        self._half_heard = half_heard
        self._by_first: dict[str, list[tuple[str, list[str]]]] = {}
        self._by_second: dict[str, list[tuple[str, list[str]]]] = {}
        for name in sorted(set(names), key=len, reverse=True):
            sounds = syllables(name)
            if sounds and len(sounds) >= 3 and _NOT_HAN not in sounds:  # two syllables match too much
                self._by_first.setdefault(sounds[0], []).append((name, sounds))
                if half_heard is not None:  # a half-heard first syllable: found by the second
                    self._by_second.setdefault(sounds[1], []).append((name, sounds))

    def _candidates(self, sounds: list[str], position: int) -> list[tuple[str, list[str]]]:
        found = self._by_first.get(sounds[position], [])
        if self._half_heard is None or position + 1 >= len(sounds):
            return found
        more = [item for item in self._by_second.get(sounds[position + 1], ()) if item[1][0] != sounds[position]]
        return sorted([*found, *more], key=lambda item: len(item[0]), reverse=True) if more else found

    def _alike(self, name: str, target: list[str], heard: str, sounds: list[str]) -> bool:
        differing = [index for index, (a, b) in enumerate(zip(sounds, target)) if a != b]
        if not differing:
            return True
        if len(differing) != 1:
            return False
        index = differing[0]
        same_chars = sum(1 for a, b in zip(heard, name) if a == b)
        if self._allow_one_differing and index > 0 and len(target) >= 4 and same_chars >= len(target) - 1:
            return True
        return (self._half_heard is not None and name[index] not in self._half_heard
                and heard[index] not in FUNCTION_CHARACTERS and half_alike(sounds[index], target[index]))

    @property
    def available(self) -> bool:
        return bool(self._by_first)

    def find(self, text: str, protected: frozenset[int] = frozenset()) -> list[SoundMatch]:
        """Non-overlapping sound-alike matches, longest names first at each position.

        `protected`: character positions already holding a correctly written name
        (南湖大道 must not become 南湖街道 because they differ in one syllable)."""
        sounds = syllables(text)
        if not sounds or not self._by_first:
            return []
        matches, position = [], 0
        while position < len(sounds):
            found = None
            for name, target in self._candidates(sounds, position):
                heard = text[position:position + len(target)]
                if len(heard) < len(target) or heard == name:
                    continue  # exact matches are the caller's job
                if any(index in protected for index in range(position, position + len(target))):
                    continue
                if self._alike(name, target, heard, sounds[position:position + len(target)]):
                    found = SoundMatch(name, heard, position)
                    break
            if found:
                matches.append(found)
                position += len(found.name)
            else:
                position += 1
        return matches
