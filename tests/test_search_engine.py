"""Whole-window beam search inside the server (model_repository/engine/search.py), run on the
real decoder engine and the exported fp32 Whisper graphs without tritonserver: windows searched
together share decoder calls and still give exactly what each gives alone, which is what the
gateway's own search over the same engine gives; bad windows fail alone."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import gateway.asr.decoding as search_module
from gateway.asr.decoding import DecodingOptions, StepOutput, beam_search
from gateway.asr.families import load_family
from gateway.asr.features import log_mel_spectrogram
from model_repository.engine.decoder import DecoderEngine
from model_repository.engine.errors import CANCELLED, UNAVAILABLE
from model_repository.engine.search import BatchedSearch as _BatchedSearch
from model_repository.engine.search import SearchRequestError, WindowJob, polled
from model_repository.engine.state import Step
from tests.conftest import load_clip_audio, model_dir_path, sample_clips
from tests.test_decoder_engine import Log, config

ort = pytest.importorskip("onnxruntime")
MODEL_DIR = model_dir_path()
ONNX_DIR = MODEL_DIR / "onnx" / "fp32"
MAX_NEW_TOKENS = 40
WAIT_S = 120


@pytest.fixture(scope="module")
def family():
    if not (ONNX_DIR / "decoder_step.onnx").exists():
        pytest.fail(f"no exported whisper model in {MODEL_DIR} (make export)")
    return load_family(MODEL_DIR)


@pytest.fixture(scope="module")
def engine(family):
    engine = DecoderEngine(str(ONNX_DIR), config("whisper", max_sequences=16, sequence_idle_timeout_s=60), Log())
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def windows(family):
    """(encoder output [1, S, d], language) of the first window of each sample clip."""
    session = ort.InferenceSession(str(ONNX_DIR / "encoder.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for clip in sample_clips()[:4]:
        audio = load_clip_audio(clip.path)[: 30 * 16000]
        features = log_mel_spectrogram(audio, n_mels=family.n_mels)[np.newaxis]
        out.append((session.run(None, {"input_features": features})[0], clip.language))
    return out


def BatchedSearch(engine, **limits):
    """The server's search over the gateway's search module (what render.py deploys)."""
    return _BatchedSearch(engine, search_module, **limits)


def spec(family, language: str, **changes) -> dict:
    values = {"prompt": family.prompt_ids(language, "transcribe", 1500, timestamps=False), "beam_size": 5,
              "max_new_tokens": MAX_NEW_TOKENS, "max_length": family.max_length, "eot_ids": list(family.eos_ids),
              "suppress_ids": list(family.suppress_ids), "begin_suppress_ids": list(family.begin_suppress_ids)}
    values.update(changes)
    return values


def search_all(search: BatchedSearch, jobs: list[tuple]) -> list:
    """Submit every window at once, each (encoder output, options[, cancelled]); [(result,
    error)] in submission order."""
    outcomes = [None] * len(jobs)
    finished = threading.Event()

    def reply(i):
        def done(result, error):
            outcomes[i] = (result, error)
            if all(o is not None for o in outcomes):
                finished.set()
        return done

    for i, (enc, options, *cancelled) in enumerate(jobs):
        search.submit(search.job(enc, options, reply(i), *cancelled))
    assert finished.wait(WAIT_S), "the search did not answer every window"
    return outcomes


class DirectSession:
    """The gateway's DecoderSession over the engine itself, one step at a time (no batching)."""

    def __init__(self, engine, enc, options):
        self.engine, self.enc, self.options, self.started = engine, enc, options, False
        self.cid = 7_000_000 + id(self) % 1_000_000

    async def step(self, input_ids, parent_beams, top_k, extra_ids):
        inputs = {"input_ids": np.asarray(input_ids, np.int64)[None], "top_k": np.array([[top_k]], np.int32)}
        if not self.started:
            inputs.update(encoder_output=self.enc, suppress_ids=np.array([self.options["suppress_ids"]], np.int32),
                          begin_suppress_ids=np.array([self.options["begin_suppress_ids"]], np.int32))
        elif parent_beams is not None:
            inputs["parent_beams"] = np.asarray(parent_beams, np.int32)[None]
        step = Step(0, self.cid, start=not self.started)
        self.started = True
        self.engine.parse(step, inputs)
        self.engine.execute([step])
        assert step.error is None, step.error
        out = step.output
        return StepOutput(out.topk_logprobs[0], out.topk_ids[0].astype(np.int64), out.extra_logprobs[0])

    async def close(self):
        step = Step(0, self.cid, end=True)
        self.engine.parse(step, {"input_ids": np.zeros((1, 0, 1), np.int64)})
        self.engine.execute([step])


def test_windows_searched_together_equal_each_alone_and_share_decoder_calls(engine, family, windows):
    jobs = [(enc, spec(family, language)) for enc, language in windows]
    search = BatchedSearch(engine, max_windows=8)
    try:
        together = search_all(search, jobs)
        rounds_together = search.rounds
        alone = [search_all(search, [job])[0] for job in jobs]
    finally:
        search.close()
    assert all(error is None for _, error in together + alone)
    assert [r.tokens for r, _ in together] == [r.tokens for r, _ in alone]
    for (a, _), (b, _) in zip(together, alone):
        assert a.sum_logprob == pytest.approx(b.sum_logprob, abs=1e-3)
    steps = sum(r.n_steps for r, _ in together)
    # searched together, the windows' steps shared rounds (decoder calls); alone each ran by itself
    assert rounds_together < steps
    assert max(r.mean_round_steps for r, _ in together) > 1.5
    assert all(r.mean_round_steps == 1.0 for r, _ in alone)
    assert len(engine.table) == 0, "every window's sequence is freed once its search ends"


def test_the_server_search_equals_the_gateways_search_over_the_same_engine(engine, family, windows):
    enc, language = windows[0]
    options = spec(family, language)
    search = BatchedSearch(engine)
    try:
        (server, error), = search_all(search, [(enc, options)])
    finally:
        search.close()
    assert error is None
    decoding = DecodingOptions(beam_size=5, max_new_tokens=MAX_NEW_TOKENS)

    async def gateway_search():
        session = DirectSession(engine, enc, options)
        try:
            return await beam_search(session, options["prompt"], decoding, eot_id=options["eot_ids"],
                                     max_length=family.max_length)
        finally:
            await session.close()

    gateway = asyncio.run(gateway_search())
    assert server.tokens == gateway.tokens and server.tokens
    assert server.token_logprobs == pytest.approx(gateway.token_logprobs, abs=1e-4)
    assert server.finished == gateway.finished and server.n_steps == gateway.n_steps


def test_a_bad_window_fails_alone(engine, family, windows):
    enc, language = windows[0]
    with pytest.raises(SearchRequestError, match="beam_size"):
        WindowJob(enc, spec(family, language, beam_size=0), lambda *a: None, search_module)
    with pytest.raises(SearchRequestError, match="lack 'prompt'"):
        WindowJob(enc, {"beam_size": 5}, lambda *a: None, search_module)
    with pytest.raises(SearchRequestError, match=r"\[1, S, d\]"):
        WindowJob(enc[0], spec(family, language), lambda *a: None, search_module)
    search = BatchedSearch(engine)
    try:
        bad_prompt = spec(family, language, prompt=[10 ** 7])  # not a token id: the first step says so
        (good, good_error), (bad, bad_error) = search_all(search, [(enc, spec(family, language)), (enc, bad_prompt)])
    finally:
        search.close()
    assert good_error is None and good.tokens
    assert bad is None and "input_ids" in str(bad_error)
    assert len(engine.table) == 0, "closed, the search has freed every sequence"


def test_windows_beyond_the_limits_wait_in_order_or_are_refused(engine, family, windows):
    jobs = [(enc, spec(family, language)) for enc, language in windows[:3]]
    search = BatchedSearch(engine, max_windows=1, max_waiting=8)
    try:
        one_at_a_time = search_all(search, jobs)
    finally:
        search.close()
    assert all(error is None for _, error in one_at_a_time)
    assert all(r.mean_round_steps == 1.0 for r, _ in one_at_a_time)  # never two windows in a round

    search = BatchedSearch(engine, max_windows=1, max_waiting=0)
    try:
        first, refused = search_all(search, jobs[:2])
    finally:
        search.close()
    assert first[1] is None
    assert refused[0] is None and getattr(refused[1], "code", None) == UNAVAILABLE


def test_cancellation_is_polled_at_most_once_per_interval_and_stays_true():
    """The search model asks Triton's is_cancelled (an IPC) through polled(): once per interval,
    the last answer in between, and a True is never asked again."""
    now = [0.0]
    answers = iter([False, True])
    asked = []

    def is_cancelled() -> bool:
        asked.append(now[0])
        return next(answers)

    cancelled = polled(is_cancelled, interval_s=0.2, clock=lambda: now[0])
    seen = []
    for t in (0.0, 0.1, 0.19, 0.2, 0.25, 0.5, 9.0):
        now[0] = t
        seen.append(cancelled())
    assert asked == [0.0, 0.2]
    assert seen == [False, False, False, True, True, True, True]


def test_a_cancelled_window_stops_at_its_next_step_and_frees_its_cache(engine, family, windows):
    enc, language = windows[0]
    asked = []

    def cancelled_after_three_steps() -> bool:
        asked.append(1)
        return len(asked) > 3

    log = Log()
    search = BatchedSearch(engine, logger=log)
    try:
        outcomes = search_all(search, [(enc, spec(family, language), cancelled_after_three_steps),
                                       (enc, spec(family, language))])
    finally:
        search.close()
    (cancelled, cancel_error), (other, other_error) = outcomes
    assert cancelled is None and getattr(cancel_error, "code", None) == CANCELLED
    # asked when it starts and before each step: two steps ran, the third was refused
    assert len(asked) == 4
    assert ("info", "search: window cancelled by its client after 2 steps") in log.lines
    assert other_error is None and other.tokens  # the window beside it is unaffected
    assert len(engine.table) == 0


def test_the_heap_is_trimmed_between_rounds_at_most_once_per_interval(engine, family, windows, monkeypatch):
    """search_heap_trim_ms (render.py): the loop hands the C heap's free pages back between
    rounds, at most once per interval, and only when asked; the results do not change."""
    import model_repository.engine.search as server_search

    trims = []
    monkeypatch.setattr(server_search, "release_free_heap", lambda: trims.append(time.perf_counter()))
    jobs = [(enc, spec(family, language)) for enc, language in windows[:2]]
    plain = BatchedSearch(engine)
    try:
        untrimmed = search_all(plain, jobs)
    finally:
        plain.close()
    assert trims == []
    interval_s = 0.05
    trimming = BatchedSearch(engine, heap_trim_s=interval_s)
    try:
        trimmed = search_all(trimming, jobs)
    finally:
        trimming.close()
    assert trims, "no trim in a search of two windows"
    assert all(b - a >= interval_s for a, b in zip(trims, trims[1:]))
    assert [r.tokens for r, _ in trimmed] == [r.tokens for r, _ in untrimmed]
