"""Beam search over a stateful decoder session (openai-whisper semantics).

The model lives behind :class:`DecoderSession`: the server keeps the KV cache, and
each step only sends the newest token of every live beam plus the index of the row
(of the previous step) that beam continues. The session answers with the top-k
log-probs of each row, and the log-probs of extra token ids a :class:`TokenScorer`
(hotword context graph) asks about.

Search (``openai/whisper`` ``BeamSearchDecoder`` + ``MaximumLikelihoodRanker``):

- step 1 sends the prompt as one row; later steps send ``[K, 1]`` tokens;
- every live beam proposes its ``beam_size + 1`` best next tokens; candidates are
  ranked by summed log-prob; walking down that ranking, candidates ending in EOT go
  to the finished list and the others become the next beams until ``beam_size`` of
  them are kept (fewer if too few candidates are finite, so K can shrink);
- the search stops when ``round(beam_size * patience)`` hypotheses finished, when no
  live beam is left, or at the length limit (prompt + generated tokens, EOT
  included, reach ``max_length`` or ``len(prompt) + max_new_tokens``);
- finished hypotheses are ranked by ``sum_logprob / length`` (``length_penalty`` None)
  or ``sum_logprob / ((5 + length) / 6) ** length_penalty`` (GNMT), where length
  excludes EOT; if none finished, the live beams are ranked instead.

``beam_size == 1`` is greedy decoding: the argmax token each step, stop at EOT.

EOT may be several token ids (``eot_id`` a sequence: GLM-ASR ends on any of three); any
of them finishes a hypothesis, exactly as a single EOT does.

Scorer bonuses are capped (``max_biased_logprob``, default 0): a bonus may lift a token
at most to that log-prob, i.e. biasing can make a token look certain but never better
than certain. Without the cap a list of names earns more than the audio costs, so a
hypothesis gains by spelling names that were never said (repetition loops of listed
terms). The search keeps the bookkeeping exact: per hypothesis it tracks the bonus
actually *granted* to the scorer's unfinished match (``-finish(state)`` is the nominal
one) and to completed matches; when a match breaks or the hypothesis ends unfinished,
exactly what was granted is taken back, and a completed match keeps what was granted
to its tokens (plus its completion bonus, capped by the completing token's room). Where the
model's best next token is EOT no bonus is granted at all: a bonus picks between spellings
of what was said, it must not append listed names after the speech ended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The one beam-size limit of the project: every request, stream and option is checked against it.
MAX_BEAM_SIZE = 16


class DecodingOptionsError(ValueError):
    """Invalid decoding options."""


class InvalidPromptError(ValueError):
    """The prompt is empty or leaves no room to generate within max_length."""


class DecodingError(RuntimeError):
    """The decoder session returned something the search cannot use."""


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 5  # 1 = greedy
    patience: float = 1.0  # stop after round(beam_size * patience) finished hypotheses
    length_penalty: float | None = None  # None: divide by length; alpha in [0, 1]: GNMT penalty
    max_new_tokens: int | None = None  # generated tokens (EOT included); None: up to max_length
    # a scorer bonus lifts a token's log-prob at most to this (natural log), and none is
    # granted where the model's best next token is EOT; None: the scorer's bonus as is
    max_biased_logprob: float | None = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int):
            raise DecodingOptionsError(f"beam_size must be an int, got {self.beam_size!r}")
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise DecodingOptionsError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {self.beam_size}")
        if not (isinstance(self.patience, (int, float)) and math.isfinite(self.patience) and self.patience > 0):
            raise DecodingOptionsError(f"patience must be a finite number > 0, got {self.patience!r}")
        if self.length_penalty is not None and not (
            isinstance(self.length_penalty, (int, float)) and 0.0 <= self.length_penalty <= 1.0
        ):
            raise DecodingOptionsError(
                f"length_penalty must be None or in [0, 1], got {self.length_penalty!r}"
            )
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise DecodingOptionsError(f"max_new_tokens must be None or an int >= 1, got {self.max_new_tokens!r}")
        if self.max_biased_logprob is not None and not (
            isinstance(self.max_biased_logprob, (int, float))
            and not isinstance(self.max_biased_logprob, bool)
            and math.isfinite(self.max_biased_logprob)
            and self.max_biased_logprob <= 0.0
        ):
            raise DecodingOptionsError(
                f"max_biased_logprob must be None or a finite log-prob <= 0, got {self.max_biased_logprob!r}"
            )

    @property
    def max_candidates(self) -> int:
        """Finished hypotheses that end the search (1 for greedy)."""
        if self.beam_size == 1:
            return 1
        return max(1, round(self.beam_size * self.patience))

    @property
    def top_k(self) -> int:
        """Candidates asked for per live beam and step."""
        return self.beam_size + 1


@dataclass(frozen=True)
class StepOutput:
    """One decoder step for K rows: log-probs after suppression, best first."""

    topk_logprobs: np.ndarray  # float32 [K, k]
    topk_ids: np.ndarray  # int [K, k]
    extra_logprobs: np.ndarray | None = None  # float32 [K, E], columns match extra_ids


@runtime_checkable
class DecoderSession(Protocol):
    """One decoding sequence (one audio window) on a stateful decoder."""

    async def step(
        self,
        input_ids: np.ndarray,  # int64 [K, T]
        parent_beams: np.ndarray | None,  # int32 [K]: row of the previous step each row continues
        top_k: int,
        extra_ids: np.ndarray | None,  # int32 [K, E], -1 = none
    ) -> StepOutput: ...

    async def close(self) -> None: ...


@runtime_checkable
class TokenScorer(Protocol):
    """Per-beam bonus added to model log-probs during search (e.g. a hotword context graph).

    States are opaque and must be immutable (beams that share a prefix share them).
    Bonuses change which hypotheses win, never the reported log-probs.
    """

    def initial_state(self) -> Any: ...

    def extra_ids(self, state: Any) -> Sequence[int]:
        """Token ids whose log-probs this beam needs next step even outside the top-k."""
        ...

    def advance(self, state: Any, token_id: int) -> tuple[float, Any]:
        """Bonus for appending ``token_id`` (not EOT) and the state after it."""
        ...

    def finish(self, state: Any) -> float:
        """Bonus when the hypothesis ends (EOT or length limit): minus the bonus earned by
        the unfinished match of ``state`` (0 when nothing is pending). The search also reads
        it as the nominal pending bonus of a state to keep capped bonuses exact."""
        ...


@dataclass
class DecodingResult:
    tokens: list[int]  # generated tokens, without the prompt and without EOT
    sum_logprob: float  # model log-prob of tokens (+ EOT when finished)
    avg_logprob: float  # sum_logprob / (len(tokens) + 1 if finished else len(tokens))
    token_logprobs: list[float]  # one per token in `tokens`
    finished: bool  # ended with EOT (False: stopped by the length limit)
    score: float  # ranking score (length-normalised, scorer bonuses included)
    eot_logprob: float | None = None  # log-prob of the final EOT when finished
    n_steps: int = 0  # decoder steps run
    eot_token: int | None = None  # which EOT id ended it (several with multi-EOS models)


@dataclass(frozen=True)
class _Bonus:
    """Scorer bonus of a hypothesis: nominal pending (the scorer's) and what was granted."""

    nominal_pending: float = 0.0  # -scorer.finish(state)
    granted_pending: float = 0.0  # granted to the unfinished match (taken back if it breaks)
    granted_committed: float = 0.0  # granted to completed matches (kept)

    @property
    def granted(self) -> float:
        return self.granted_pending + self.granted_committed

    def step(self, nominal_bonus: float, nominal_pending: float, room: float) -> _Bonus:
        """After a token whose nominal bonus is ``nominal_bonus`` and after which the scorer's
        pending bonus is ``nominal_pending``; at most ``room`` (>= 0) may be granted to it."""
        pending_rise = nominal_pending - self.nominal_pending
        completed = max(0.0, nominal_bonus - pending_rise)  # nominal bonus of matches completed now
        kept = min(self.granted_pending, max(0.0, nominal_pending))
        freed = self.granted_pending - kept  # granted to a match that completed or broke
        converted = min(freed, completed)  # a completed match keeps what its tokens were granted
        grant_completed = min(completed - converted, room)
        grant_pending = min(max(0.0, pending_rise), room - grant_completed, max(0.0, nominal_pending) - kept)
        return _Bonus(
            nominal_pending=nominal_pending,
            granted_pending=kept + max(0.0, grant_pending),
            granted_committed=self.granted_committed + converted + grant_completed,
        )


_NO_BONUS = _Bonus()


@dataclass(frozen=True)
class _Hypothesis:
    tokens: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    sum_logprob: float  # model log-probs only
    score: float  # sum_logprob + granted scorer bonuses: what the search ranks by
    state: Any = None  # scorer state
    eot_logprob: float | None = None
    eot_token: int | None = None
    bonus: _Bonus = _NO_BONUS


@dataclass
class _Candidate:
    sort_key: tuple[float, int, int]  # (-score, parent row, rank in row): deterministic ties
    row: int  # row of the parent in this step
    parent: _Hypothesis
    token: int
    logprob: float
    score: float
    state: Any = None  # scorer state after the token
    bonus: _Bonus = _NO_BONUS


def _length_normalised(score: float, length: int, length_penalty: float | None) -> float:
    if length_penalty is None:
        return score / max(length, 1)
    return score / (((5 + length) / 6) ** length_penalty)


def _extra_ids_matrix(beams: Sequence[_Hypothesis], scorer: TokenScorer | None) -> np.ndarray | None:
    if scorer is None:
        return None
    rows = [list(dict.fromkeys(int(t) for t in scorer.extra_ids(b.state))) for b in beams]
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return None
    matrix = np.full((len(rows), width), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


def _check_output(out: StepOutput, n_rows: int, extra_ids: np.ndarray | None) -> None:
    logprobs, ids = np.asarray(out.topk_logprobs), np.asarray(out.topk_ids)
    if logprobs.ndim != 2 or logprobs.shape != ids.shape or logprobs.shape[0] != n_rows:
        raise DecodingError(
            f"step returned topk_logprobs {logprobs.shape} / topk_ids {ids.shape}; expected [{n_rows}, k]"
        )
    if np.isnan(logprobs).any():
        raise DecodingError("step returned NaN log-probs")
    if extra_ids is not None:
        extra = None if out.extra_logprobs is None else np.asarray(out.extra_logprobs)
        if extra is None or extra.shape != extra_ids.shape:
            got = None if extra is None else extra.shape
            raise DecodingError(f"step returned extra_logprobs {got}; expected {extra_ids.shape}")
        if np.isnan(extra[extra_ids >= 0]).any():
            raise DecodingError("step returned NaN extra log-probs")


def _eot_set(eot_id: int | Sequence[int]) -> frozenset[int]:
    """The end-of-text ids: one id or a non-empty sequence of ids."""
    if isinstance(eot_id, (int, np.integer)) and not isinstance(eot_id, bool):
        return frozenset((int(eot_id),))
    try:
        ids = frozenset(int(t) for t in eot_id)
    except TypeError:
        raise DecodingOptionsError(f"eot_id must be an int or a sequence of ints, got {eot_id!r}") from None
    if not ids:
        raise DecodingOptionsError("eot_id must name at least one token id")
    return ids


def _candidates(
    beams: Sequence[_Hypothesis],
    out: StepOutput,
    extra_ids: np.ndarray | None,
    eot_ids: frozenset[int],
    scorer: TokenScorer | None,
    max_biased_logprob: float | None,
) -> list[_Candidate]:
    """Every finite (beam, next token) pair, best score first."""
    logprobs = np.asarray(out.topk_logprobs, dtype=np.float64)
    ids = np.asarray(out.topk_ids)
    extra_lp = None if extra_ids is None else np.asarray(out.extra_logprobs, dtype=np.float64)
    candidates = []
    for row, beam in enumerate(beams):
        # where the model's best next token ends the text, a bonus may not keep the
        # hypothesis going: biasing chooses between spellings, it does not add speech
        model_ends_here = ids.shape[1] > 0 and int(ids[row, 0]) in eot_ids
        proposals: dict[int, float] = {}
        for token, lp in zip(ids[row].tolist(), logprobs[row].tolist()):
            proposals.setdefault(token, lp)
        if extra_ids is not None:
            for token, lp in zip(extra_ids[row].tolist(), extra_lp[row].tolist()):
                if token >= 0:
                    proposals.setdefault(token, lp)
        for rank, (token, lp) in enumerate(proposals.items()):
            if not math.isfinite(lp):  # suppressed (-inf)
                continue
            score = beam.score + lp
            state, bonus = beam.state, beam.bonus
            if scorer is not None:
                if token in eot_ids:
                    score -= beam.bonus.granted_pending  # an unfinished match gives back what it got
                else:
                    nominal, state = scorer.advance(beam.state, token)
                    if max_biased_logprob is None:  # uncapped: the scorer's nominal bonus
                        room = math.inf
                    elif model_ends_here:
                        room = 0.0
                    else:
                        room = max(0.0, max_biased_logprob - lp)
                    bonus = beam.bonus.step(nominal, -scorer.finish(state), room)
                    score += bonus.granted - beam.bonus.granted
            candidates.append(_Candidate((-score, row, rank), row, beam, token, lp, score, state, bonus))
    candidates.sort(key=lambda c: c.sort_key)
    return candidates


def _extend(cand: _Candidate) -> _Hypothesis:
    parent = cand.parent
    return _Hypothesis(
        tokens=parent.tokens + (cand.token,),
        token_logprobs=parent.token_logprobs + (cand.logprob,),
        sum_logprob=parent.sum_logprob + cand.logprob,
        score=cand.score,
        state=cand.state,
        bonus=cand.bonus,
    )


def _finish(cand: _Candidate) -> _Hypothesis:
    parent = cand.parent
    return _Hypothesis(
        tokens=parent.tokens,
        token_logprobs=parent.token_logprobs,
        sum_logprob=parent.sum_logprob + cand.logprob,
        score=cand.score,
        state=parent.state,
        eot_logprob=cand.logprob,
        eot_token=cand.token,
    )


def _to_result(hyp: _Hypothesis, rank_score: float, n_steps: int) -> DecodingResult:
    finished = hyp.eot_logprob is not None
    n_scored = len(hyp.tokens) + (1 if finished else 0)
    return DecodingResult(
        tokens=list(hyp.tokens),
        sum_logprob=hyp.sum_logprob,
        avg_logprob=hyp.sum_logprob / n_scored if n_scored else 0.0,
        token_logprobs=list(hyp.token_logprobs),
        finished=finished,
        score=rank_score,
        eot_logprob=hyp.eot_logprob,
        n_steps=n_steps,
        eot_token=hyp.eot_token,
    )


async def beam_search(
    session: DecoderSession,
    prompt_ids: Sequence[int],
    options: DecodingOptions,
    eot_id: int | Sequence[int],
    max_length: int,
    *,
    scorer: TokenScorer | None = None,
) -> DecodingResult:
    """Best hypothesis after the prompt; see the module docstring for the search rules.

    ``eot_id``: the end-of-text id, or several (any of them ends a hypothesis)."""
    eot_ids = _eot_set(eot_id)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InvalidPromptError("prompt_ids is empty; it must hold at least <|startoftranscript|>")
    limit = max_length
    if options.max_new_tokens is not None:
        limit = min(limit, len(prompt) + options.max_new_tokens)
    if len(prompt) >= limit:
        raise InvalidPromptError(
            f"prompt of {len(prompt)} tokens leaves no room to generate within {limit} tokens"
        )

    beam_size = options.beam_size
    max_candidates = options.max_candidates
    root_state = scorer.initial_state() if scorer is not None else None
    beams = [_Hypothesis(tokens=(), token_logprobs=(), sum_logprob=0.0, score=0.0, state=root_state)]
    finished: list[_Hypothesis] = []
    input_ids = np.asarray([prompt], dtype=np.int64)
    parent_beams: np.ndarray | None = None
    n_steps = 0

    while True:
        extra_ids = _extra_ids_matrix(beams, scorer)
        out = await session.step(input_ids, parent_beams, options.top_k, extra_ids)
        n_steps += 1
        _check_output(out, len(beams), extra_ids)

        next_beams: list[_Hypothesis] = []
        parent_rows: list[int] = []
        newly_finished: list[_Hypothesis] = []
        for cand in _candidates(beams, out, extra_ids, eot_ids, scorer, options.max_biased_logprob):
            if cand.token in eot_ids:
                newly_finished.append(_finish(cand))
            else:
                next_beams.append(_extend(cand))
                parent_rows.append(cand.row)
                if len(next_beams) == beam_size:
                    break
        for hyp in newly_finished:  # already best first
            if len(finished) >= max_candidates:
                break
            finished.append(hyp)

        generated = len(beams[0].tokens) + 1  # every beam grows by one token per step
        if len(finished) >= max_candidates or not next_beams or len(prompt) + generated >= limit:
            break
        # Row k of the next step continues row parent_rows[k] of this one: the server
        # reorders (and, after the prompt step, expands) its KV cache accordingly.
        input_ids = np.asarray([[h.tokens[-1]] for h in next_beams], dtype=np.int64)
        parent_beams = np.asarray(parent_rows, dtype=np.int32)
        beams = next_beams

    if finished:
        pool = finished
    else:
        # Nothing ended with EOT (length limit): rank the live beams instead.
        live = next_beams or beams
        pool = [
            _Hypothesis(h.tokens, h.token_logprobs, h.sum_logprob, h.score - h.bonus.granted_pending, h.state)
            for h in live
        ]
        if not any(h.tokens for h in pool):
            raise DecodingError("every candidate had log-prob -inf: no hypothesis to return")
    ranked = [(_length_normalised(h.score, len(h.tokens), options.length_penalty), h) for h in pool]
    best_score, best = max(ranked, key=lambda item: item[0])  # first of equal scores wins
    return _to_result(best, best_score, n_steps)
