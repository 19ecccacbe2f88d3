"""A step's logits -> what the client gets: top-k log-probs and ids, log-probs of extra ids."""
from typing import NamedTuple

import numpy as np

from .errors import RequestError
from .logit_rules import NEG_INF, apply_rules
from .topk import topk_rows


class StepOutput(NamedTuple):
    """The outputs of one step, with the batch dim of 1 of the wire contract."""
    topk_logprobs: np.ndarray   # f32 [1, K, k], best first
    topk_ids: np.ndarray        # i32 [1, K, k]
    extra_logprobs: np.ndarray  # f32 [1, K, E] (-inf for extra id -1)


def empty_output(top_k: int) -> StepOutput:
    """The answer to a step with zero beams (an END that only frees the sequence)."""
    return StepOutput(np.zeros((1, 0, top_k), np.float32), np.zeros((1, 0, top_k), np.int32),
                      np.zeros((1, 0, 0), np.float32))


def log_normalizers(rows: np.ndarray) -> np.ndarray:
    """logsumexp of every row of rows [R, V] as [R, 1] (rows of -inf only give -inf, not NaN)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = rows.max(axis=1, keepdims=True)
        m[~np.isfinite(m)] = 0
        tmp = np.subtract(rows, m)
        np.exp(tmp, out=tmp)
        return m + np.log(tmp.sum(axis=1, keepdims=True))


def score(members, logits: np.ndarray) -> None:
    """Rules, log_softmax, top-k and extra ids of logits [N, K, V] (row n = members[n], modified
    in place); sets each member's `output`, or its `error` and `code`."""
    N, K, V = logits.shape
    for n, step in enumerate(members):
        apply_rules(step.seq, step, logits[n])
    rows = logits.reshape(N * K, V)
    lse = log_normalizers(rows).reshape(N, K, 1)
    top = _topk_by_member(members, logits, rows)
    for n, step in enumerate(members):
        try:
            ids, vals = top[n]
            topk_lp = (vals - lse[n]).astype(np.float32)
            extra = _extra_logprobs(step.extra, logits[n], lse[n], V)
            step.output = StepOutput(np.ascontiguousarray(topk_lp[np.newaxis]),
                                     np.ascontiguousarray(ids[np.newaxis].astype(np.int32)),
                                     np.ascontiguousarray(extra[np.newaxis]))
        except RequestError as error:
            step.error, step.code = str(error), error.code


def _topk_by_member(members, logits: np.ndarray, rows: np.ndarray) -> dict:
    """{n: (ids [K, k], values [K, k])}: one top-k call per distinct k among the members."""
    N, K, V = logits.shape
    by_k = {}
    for n, step in enumerate(members):
        by_k.setdefault(min(step.top_k, V), []).append(n)
    top = {}
    for k, ns in by_k.items():
        sub = logits[ns].reshape(len(ns) * K, V) if len(ns) != N else rows
        ids, vals = topk_rows(sub, k)
        for j, n in enumerate(ns):
            top[n] = (ids[j * K:(j + 1) * K], vals[j * K:(j + 1) * K])
    return top


def _extra_logprobs(extra, logits: np.ndarray, lse: np.ndarray, V: int) -> np.ndarray:
    """Log-probs [K, E] of the extra ids [K, E] (-1 = none -> -inf) of one sequence."""
    K = logits.shape[0]
    if extra is None or not extra.size:
        return np.zeros((K, 0), dtype=np.float32)
    if extra.max() >= V:
        raise RequestError(f"extra_ids must be < vocabulary size {V}")
    valid = extra >= 0
    got = np.take_along_axis(logits, np.where(valid, extra, 0), axis=1) - lse
    return np.where(valid, got, NEG_INF).astype(np.float32)
