"""一句话摘要: an extractive one-line summary of the call.

The clause with the most evidence (category words, urgency cues, place names) is the
core; a short neighbour clause is added when it fits, and the address is put in front
when the chosen words do not contain it. Nothing is generated: every word is the
caller's (after normalisation), so the summary never claims what was not said.
"""

from __future__ import annotations

from typing import Sequence

from analysis.evidence import Evidence
from analysis.text import split_sentences

_GREETINGS = ("你好", "您好", "喂", "hello", "请问", "我想反映", "我要反映", "我想投诉", "我要投诉", "我想问一下", "我想咨询")


def _strip_greeting(clause: str) -> str:
    stripped = clause
    changed = True
    while changed:
        changed = False
        for greeting in _GREETINGS:
            if stripped.lower().startswith(greeting) and len(stripped) > len(greeting) + 2:
                stripped = stripped[len(greeting):].lstrip(" ,，、")
                changed = True
    return stripped


def summarize(text: str, evidence: Sequence[Evidence], place_label: str | None, max_chars: int) -> str:
    clauses = split_sentences(text)
    if not clauses:
        return ""
    scores = []
    for index, (offset, clause) in enumerate(clauses):
        end = offset + len(clause)
        hits = sum(1 for item in evidence if item.kind != "place" and offset <= item.char_offset < end)
        # Earlier clauses win ties: callers say what is wrong first, then elaborate.
        scores.append((hits, -index))
    best = max(range(len(clauses)), key=lambda index: scores[index])
    pieces = [_strip_greeting(clauses[best][1])]
    length = len(pieces[0])
    for neighbour in (best + 1, best - 1):
        if 0 <= neighbour < len(clauses) and length + len(clauses[neighbour][1]) + 1 <= max_chars * 0.8:
            clause = _strip_greeting(clauses[neighbour][1])
            pieces = pieces + [clause] if neighbour > best else [clause] + pieces
            length += len(clause) + 1
            break
    summary = "，".join(pieces)
    if place_label and place_label not in summary:
        summary = f"{place_label}：{summary}"
    if len(summary) > max_chars:
        summary = summary[: max_chars - 1] + "…"
    return summary
