"""What a decision rests on: a word or phrase of the transcript and where it was said."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Evidence:
    text: str          # the words as found in the normalised transcript (or an example sentence)
    kind: str          # keyword | phrase | example | cue | place
    char_offset: int   # position in the normalised transcript; -1 when not from the transcript
    start_s: float | None = None  # where in the recording the segment holding it starts

    def at_time(self, start_s: float | None) -> "Evidence":
        return replace(self, start_s=start_s)

    def to_dict(self) -> dict:
        return {"text": self.text, "kind": self.kind, "char_offset": self.char_offset, "start_s": self.start_s}
