"""Rules applied to a step's logits before log_softmax: suppression and Whisper's timestamp rules."""
from typing import NamedTuple, Optional

import numpy as np

from .errors import RequestError

NEG_INF = np.float32(-np.inf)


def suppress(seq, logits: np.ndarray) -> None:
    """-inf on the sequence's suppress ids, and on its begin-suppress ids at its first step;
    logits [K, V] of one sequence, in place."""
    V = logits.shape[-1]
    if seq.suppress is not None:
        logits[:, seq.suppress[seq.suppress < V]] = NEG_INF
    if seq.steps == 0 and seq.begin_suppress is not None:
        logits[:, seq.begin_suppress[seq.begin_suppress < V]] = NEG_INF


def apply_rules(seq, step, logits: np.ndarray) -> None:
    """Every rule of the sequence on its logits [K, V] (in place), in the contract's order."""
    suppress(seq, logits)
    if seq.ts_rules is not None:
        seq.ts_rules.apply(logits, beam_history(seq, step))


def beam_history(seq, step) -> np.ndarray:
    """Tokens [K, n] each beam of `step` generated before this step's logits (the prompt excluded).

    Kept per sequence and reordered by parent_beams like the cache. A step's history only
    becomes the sequence's history once the step is committed (seq.steps moved on), so a
    retried step starts over from the committed one."""
    if seq.ts_pending is not None and seq.ts_pending[0] == seq.steps - 1:
        seq.history = seq.ts_pending[1]
    if step.start or seq.history is None:
        history = np.zeros((step.K, 0), np.int64)
    else:
        base = seq.history if step.parents is None else seq.history[step.parents]
        history = np.concatenate([base, step.ids[0].astype(np.int64)], axis=1)
    seq.ts_pending = (seq.steps, history)
    return history


class TimestampRules(NamedTuple):
    """openai-whisper's ApplyTimestampRules (input `timestamp_rules` of a START request)."""
    ts_begin: int       # id of <|0.00|>; every id >= it is a timestamp
    no_ts: int          # id of <|notimestamps|>
    max_initial: int    # the first timestamp is <= ts_begin + max_initial (-1: unbounded)
    eot: int

    @classmethod
    def parse(cls, arr: np.ndarray, vocab: Optional[int]) -> "TimestampRules":
        """timestamp_rules [1, 4] = (timestamp_begin, no_timestamps id, max initial timestamp index
        (-1: none), eot id); raises RequestError on a bad shape or ids outside the vocabulary."""
        if arr.shape != (1, 4):
            raise RequestError(f"timestamp_rules must be [1, 4] (timestamp_begin, no_timestamps, "
                               f"max_initial_timestamp_index, eot), got {list(arr.shape)}")
        ts_begin, no_ts, max_initial, eot = (int(v) for v in arr.reshape(-1))
        limit = vocab or (1 << 31)
        if not (0 < ts_begin < limit and 0 <= no_ts < limit and 0 <= eot < ts_begin and max_initial >= -1):
            raise RequestError(f"timestamp_rules {arr.reshape(-1).tolist()} are not valid token ids for a "
                               f"vocabulary of {vocab}")
        return cls(ts_begin, no_ts, max_initial, eot)

    def apply(self, logits: np.ndarray, history: np.ndarray) -> None:
        """The rules on logits [K, V] (after suppression, in place) given each beam's tokens [K, n]."""
        if self.no_ts < logits.shape[1]:
            logits[:, self.no_ts] = NEG_INF
        for k in range(logits.shape[0]):
            self._apply_row(logits[k], history[k])

    def _apply_row(self, row: np.ndarray, tokens: np.ndarray) -> None:
        ts_begin = self.ts_begin
        last_ts = tokens.size >= 1 and tokens[-1] >= ts_begin
        penultimate_ts = tokens.size < 2 or tokens[-2] >= ts_begin
        if last_ts:
            if penultimate_ts:  # a pair is complete: text (or EOT) next
                row[ts_begin:] = NEG_INF
            else:  # a segment just ended: another timestamp or EOT, no text
                row[:self.eot] = NEG_INF
        stamps = tokens[tokens >= ts_begin]
        if stamps.size:  # timestamps never decrease; a segment has a nonzero length
            last = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
            row[ts_begin:last] = NEG_INF
        if tokens.size == 0:  # the first token is a timestamp, at most max_initial
            row[:ts_begin] = NEG_INF
            if self.max_initial >= 0:
                row[ts_begin + self.max_initial + 1:] = NEG_INF
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            stamp_part = row[ts_begin:]
            top = stamp_part.max() if stamp_part.size else NEG_INF
            if np.isfinite(top):
                stamp_lse = top + np.log(np.exp(stamp_part - top).sum())
                if stamp_lse > row[:ts_begin].max():  # timestamps together beat every text token
                    row[:ts_begin] = NEG_INF
