"""The decoder engine (model_repository/engine/) run directly, without tritonserver.

Synthetic inputs check the parts one by one (batching planner, buffer pool, cache gather with
the beam reorder, timestamp rules, top-k); the exported fp32 graphs of both families
(build/models/whisper-base, build/models/glm-asr-tiny; make export) check whole steps against
ONNX Runtime run directly on the unmodified graphs.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from model_repository.engine.config import DecoderSettings
from model_repository.engine.decoder import DecoderEngine
from model_repository.engine.errors import RequestError
from model_repository.engine.kv_cache import CAP_STEP, Slab, gather
from model_repository.engine.logit_rules import TimestampRules
from model_repository.engine.planner import plan
from model_repository.engine.pool import BufferPool
from model_repository.engine.runners import RUNNERS, StepRunner
from model_repository.engine.state import Sequence, Step
from model_repository.engine.topk import topk_rows

ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIR = ROOT / "model_repository" / "engine"


def _model_dir(env: str, default: str) -> Path:
    path = Path(os.environ.get(env, ROOT / "build" / "models" / default))
    return path if path.is_absolute() else ROOT / path


WHISPER_DIR = _model_dir("ASR_MODEL_DIR", "whisper-base")
GLM_DIR = _model_dir("ASR_GLM_MODEL_DIR", "glm-asr-tiny")
ATOL = 2e-3  # fp32: the engine's per-layer graph and padded caches against the plain graph
# int8 sequences run together against each alone: the weights' matmuls quantize their activations
# with one scale per call (dynamic quantization), so a batch moves log-probs (0.35 measured on
# these random encoder outputs); a sequence fed another's state would be off by whole units
INT8_BATCHED_ATOL = 0.6

ort = pytest.importorskip("onnxruntime")


class Log:
    """The logger interface the engine uses (pb_utils.Logger in Triton), recording messages."""

    def __init__(self):
        self.lines = []

    def _log(self, level, message):
        self.lines.append((level, message))

    def log_info(self, message):
        self._log("info", message)

    def log_warn(self, message):
        self._log("warn", message)

    def log_error(self, message):
        self._log("error", message)

    def log_verbose(self, message):
        self._log("verbose", message)


def config(family: str, **params) -> dict:
    values = {"family": family, "intra_op_threads": "2", "warmup": "0", **params}
    return {"parameters": {k: {"string_value": str(v)} for k, v in values.items()}}


# --------------------------------------------------------------------------- layering
def test_engine_imports_nothing_of_triton_or_the_project():
    for path in ENGINE_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top != "triton_python_backend_utils", f"{path} imports {name}"
                assert top not in ("gateway", "export", "analysis", "model_repository", "tests"), \
                    f"{path} imports {name} (the engine only imports itself relatively)"


def test_every_family_is_one_registered_runner():
    assert set(RUNNERS) == {"whisper", "glm_asr"}
    for family, runner in RUNNERS.items():
        assert issubclass(runner, StepRunner) and runner.family == family
        assert set(runner.graphs) == {"encoder", "decoder"}
        assert "decoder_step.onnx" in runner.graphs["decoder"]


# --------------------------------------------------------------------------- planner
class Member:
    def __init__(self, row):
        self.row = row


def plan_rows(rows, views=True, max_runs=2, max_dummy_fraction=0.25):
    members = [Member(r) for r in rows]
    calls = plan(members, lambda m: m.row, views=views, max_runs=max_runs, max_dummy_fraction=max_dummy_fraction)
    return [([None if m is None else m.row for m in slots], view) for slots, view in calls]


def test_planner_feeds_consecutive_rows_as_one_view_call():
    assert plan_rows([3, 4, 5, 6]) == [([3, 4, 5, 6], True)]
    assert plan_rows([]) == []


def test_planner_fills_a_few_missing_rows_with_dummies():
    # 8 members, 2 holes <= max(1, 0.25 * 8): one call over rows 0..9
    assert plan_rows([0, 1, 2, 4, 5, 6, 8, 9]) == [([0, 1, 2, None, 4, 5, 6, None, 8, 9], True)]
    assert plan_rows([0, 2]) == [([0, None, 2], True)]  # one hole is always fine


def test_planner_splits_into_runs_then_copies_when_fragmented():
    assert plan_rows([0, 1, 2, 10, 11, 12]) == [([0, 1, 2], True), ([10, 11, 12], True)]
    assert plan_rows([0, 1, 5, 6, 10, 11]) == [([0, 1, 5, 6, 10, 11], False)]  # 3 runs > max_runs
    assert plan_rows([0, 1, 5, 6, 10, 11], max_runs=3) == [([0, 1], True), ([5, 6], True), ([10, 11], True)]


def test_planner_makes_one_call_without_per_layer_cross_inputs():
    assert plan_rows([0, 5, 9], views=False) == [([0, 5, 9], False)]


# --------------------------------------------------------------------------- buffer pool
def test_pool_reuses_the_smallest_buffer_that_fits():
    pool = BufferPool(1 << 20)
    small, big = pool.get((10,), np.float32), pool.get((100,), np.float32)
    assert small.base.size == 12 and big.base.size == 125  # 25% headroom
    pool.put(big)
    pool.put(small)
    assert pool.bytes == (12 + 125) * 4
    again = pool.get((11,), np.float32)     # fits the small one (12 elements)
    assert again.base is small.base and pool.bytes == 125 * 4
    other = pool.get((11,), np.float64)     # another dtype: fresh memory
    assert other.base is not big.base
    reshaped = pool.get((5, 20), np.float32)
    assert reshaped.base is big.base and reshaped.shape == (5, 20) and pool.bytes == 0


def test_pool_evicts_oldest_beyond_its_budget_and_keeps_only_plain_buffers():
    pool = BufferPool(1000)
    first, second, third = (np.empty(100, np.float32) for _ in range(3))  # 400 bytes each
    for buf in (first, second, third):
        pool.put(buf)
    assert pool.bytes == 800  # the oldest (first) went
    assert np.shares_memory(pool.free[0], second) and np.shares_memory(pool.free[1], third)
    pool.put(np.empty(1000, np.float32))        # over the whole budget: not kept
    pool.put(np.empty((10, 10), np.float32)[:, ::2])  # not contiguous: not kept
    readonly = np.empty(10, np.float32)
    readonly.flags.writeable = False
    pool.put(readonly)
    assert pool.bytes == 800
    pool.clear()
    assert pool.bytes == 0 and not pool.free


# --------------------------------------------------------------------------- cache gather
def cached_seq(L=2, K=3, H=2, P=5, dh=4, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, 1, K, H, CAP_STEP, dh)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    seq = Sequence(1, None, None, 0.0)
    seq.kv, seq.kv_idx, seq.length, seq.beams = Slab(k, v, CAP_STEP), 0, P, K
    seq.kv.live = 1
    step = Step(0, cid=1)
    step.seq, step.K, step.T = seq, K, 1
    return seq, step


def test_gather_reorders_beams_by_parent_index_and_pads_with_zeros():
    seq, step = cached_seq()
    step.parents = np.array([2, 0, 2])
    pool = BufferPool(1 << 24)
    slab, new = gather([step, None], 3, 1, (2, 2, 4), None, np.float32, pool)  # a new member: a new slab
    assert new and slab.k.shape == (2, 2, 3, 2, CAP_STEP, 4)
    np.testing.assert_array_equal(slab.k[:, 0, :, :, :5], seq.kv.k[:, 0, [2, 0, 2], :, :5])
    np.testing.assert_array_equal(slab.v[:, 0, :, :, :5], seq.kv.v[:, 0, [2, 0, 2], :, :5])
    assert not slab.k[:, 0, :, :, 5:].any() and not slab.k[:, 1].any()  # padding and the dummy row


@pytest.mark.parametrize("parents", [[2, 0, 2], [1, 0, 2], [0, 0, 1]])
def test_gather_reorders_the_same_batch_in_place(parents):
    seq, step = cached_seq()
    before_k, before_v = seq.kv.k.copy(), seq.kv.v.copy()
    step.parents = np.array(parents)
    slab, new = gather([step], 3, 1, (2, 2, 4), None, np.float32, BufferPool(1 << 24))
    assert slab is seq.kv and not new
    # beam k holds what beam parents[k] held (a swap reads both sources before writing)
    np.testing.assert_array_equal(slab.k[:, 0, :, :, :5], before_k[:, 0, parents, :, :5])
    np.testing.assert_array_equal(slab.v[:, 0, :, :, :5], before_v[:, 0, parents, :, :5])
    np.testing.assert_array_equal(slab.k[:, 0, :, :, 5:], before_k[:, 0, :, :, 5:])  # past the cache: untouched


def test_gather_runs_in_place_when_nothing_moves():
    seq, step = cached_seq()
    pool = BufferPool(1 << 24)
    slab, new = gather([step], 3, 1, (2, 2, 4), None, np.float32, pool)
    assert slab is seq.kv and not new
    seq.length = CAP_STEP  # full: the next step needs a bigger slab
    slab, new = gather([step], 3, 1, (2, 2, 4), None, np.float32, pool)
    assert new and slab.cap == 2 * CAP_STEP


# --------------------------------------------------------------------------- timestamp rules
TS = TimestampRules(ts_begin=10, no_ts=9, max_initial=2, eot=8)  # ids 0..7 text, 8 eot, 9 <|notimestamps|>


def allowed(history, logits=None):
    """Ids left finite by the rules; by default text (and eot) logits beat the timestamps."""
    if logits is None:
        logits = np.zeros((1, 20), np.float32)
        logits[0, :9] = 5.0
    logits = logits.copy()
    TS.apply(logits, np.array([history], np.int64).reshape(1, -1))
    return [int(i) for i in np.flatnonzero(np.isfinite(logits[0]))]


def test_timestamp_rules_first_token_is_an_early_timestamp():
    assert allowed([]) == [10, 11, 12]


def test_timestamp_rules_pairs_and_order():
    assert allowed([10, 3]) == [0, 1, 2, 3, 4, 5, 6, 7, 8] + list(range(11, 20))  # text, eot or a later stamp
    assert allowed([10, 3, 12]) == [8] + list(range(12, 20))   # segment end: a stamp >= it or eot
    assert allowed([10, 3, 12, 12]) == list(range(9))          # a pair: text or eot, <|notimestamps|> never


def test_timestamp_rules_force_timestamps_when_they_win_together():
    logits = np.zeros((1, 20), np.float32)
    logits[0, :10] = -5.0  # every text token far below the timestamps' logsumexp
    assert allowed([10, 3], logits) == list(range(11, 20))


def test_timestamp_rules_input_is_validated():
    assert TimestampRules.parse(np.array([[10, 9, 2, 8]]), 20) == TS
    with pytest.raises(RequestError, match=r"must be \[1, 4\]"):
        TimestampRules.parse(np.array([10, 9, 2, 8]), 20)
    with pytest.raises(RequestError, match="not valid token ids"):
        TimestampRules.parse(np.array([[10, 9, 2, 11]]), 20)  # eot after timestamp_begin


def test_topk_rows_equals_a_full_sort():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 5000)).astype(np.float32)
    x[0, 100:110] = 9.0  # ties
    x[1, :] = -np.inf
    x[1, 4999] = 0.0
    for k in (1, 5, 19, 40, 5000):  # 1..19: block-maxima path (ties: lower id first), then the general one
        ids, vals = topk_rows(x, k)
        order = np.argsort(-x, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(vals, np.take_along_axis(x, order, 1))
        np.testing.assert_array_equal(np.take_along_axis(x, ids, 1), vals)
        if k * 4 <= 5000 // 64:
            np.testing.assert_array_equal(ids[[0, 2, 3, 4, 5]], order[[0, 2, 3, 4, 5]])
        assert ids[1, 0] == 4999


# --------------------------------------------------------------------------- whisper graphs
def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def new_step(engine, cid, ids, start=False, end=False, **inputs):
    step = Step(0, cid=cid, start=start, end=end)
    arrays = {"input_ids": np.asarray(ids, np.int64)[np.newaxis]}
    for name, value in inputs.items():
        arrays[name] = np.asarray(value)
    engine.parse(step, arrays)
    return step


def run(engine, *steps, now=None):
    engine.execute(list(steps), now=now)
    return steps


class DirectWhisper:
    """decoder_init + decoder_step with ONNX Runtime on the plain graphs: the contract itself."""

    def __init__(self, onnx_dir: Path):
        self.variant = onnx_dir.name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.init = ort.InferenceSession(str(onnx_dir / "decoder_init.onnx"), opts, providers=["CPUExecutionProvider"])
        self.step = ort.InferenceSession(str(onnx_dir / "decoder_step.onnx"), opts, providers=["CPUExecutionProvider"])

    def sequence(self, enc):
        cross = dict(zip([o.name for o in self.init.get_outputs()], self.init.run(None, {"encoder_output": enc})))
        L, _, H, _, dh = cross["cross_v"].shape  # [L, N, H, S, dh] in every variant
        empty = np.zeros((L, 1, 1, H, 0, dh), np.float32)  # [L, N, K, H, P, dh]
        return {"cross": cross, "pk": empty, "pv": empty}

    def advance(self, state, ids, parents=None):
        """ids [K, T] -> log-probs [K, V] after reordering the cache by parents."""
        if parents is not None:
            state["pk"], state["pv"] = np.take(state["pk"], parents, axis=2), np.take(state["pv"], parents, axis=2)
        logits, nk, nv = self.step.run(None, {
            "input_ids": np.asarray(ids, np.int64)[np.newaxis], "past_length": np.array([state["pk"].shape[4]]),
            "past_k": state["pk"], "past_v": state["pv"], **state["cross"]})
        state["pk"], state["pv"] = np.concatenate([state["pk"], nk], 4), np.concatenate([state["pv"], nv], 4)
        return log_softmax(logits[0])


def assert_topk(output, ref_lp, k, atol=ATOL):
    """The engine's top-k (ids, log-probs) equal the reference's (ids may swap on near-ties)."""
    ids, lp = output.topk_ids[0], output.topk_logprobs[0]
    assert ids.shape == (ref_lp.shape[0], k)
    for b in range(ref_lp.shape[0]):
        np.testing.assert_allclose(lp[b], ref_lp[b][ids[b]], atol=atol)
        np.testing.assert_allclose(lp[b], np.sort(ref_lp[b])[::-1][:k], atol=atol)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def whisper(request):
    """The engine on one exported variant: int8 has the 8-bit cross-attention (four cross tensors)."""
    onnx_dir = WHISPER_DIR / "onnx" / request.param
    if not (onnx_dir / "decoder_step.onnx").exists():
        pytest.skip(f"no exported whisper model in {WHISPER_DIR} (make export)")
    info = json.loads((WHISPER_DIR / "model_info.json").read_text())
    log = Log()
    engine = DecoderEngine(str(onnx_dir), config("whisper", max_sequences=3, sequence_idle_timeout_s=5), log)
    yield engine, DirectWhisper(onnx_dir), info, log
    engine.close()


def encoder_output(i: int, frames=1500, width=512) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    return (rng.standard_normal((1, frames, width)) * 0.5).astype(np.float32)


def test_whisper_steps_equal_direct_onnxruntime_with_beam_reorder(whisper):
    engine, direct, info, _ = whisper
    prefix = [info["sot"], info["lang_to_id"]["en"], info["transcribe"], info["no_timestamps"]]
    enc = encoder_output(0)
    ref = direct.sequence(enc)
    (start,) = run(engine, new_step(engine, 11, [prefix], start=True, encoder_output=enc, top_k=[[4]]))
    assert start.error is None, start.error
    assert_topk(start.output, direct.advance(ref, [prefix]), 4)
    first = start.output.topk_ids[0, 0, :3].tolist()
    (expand,) = run(engine, new_step(engine, 11, [[t] for t in first], parent_beams=[[0, 0, 0]], top_k=[[4]]))
    assert_topk(expand.output, direct.advance(ref, [[t] for t in first], parents=[0, 0, 0]), 4)
    parents = [2, 0, 2]
    nxt = [int(expand.output.topk_ids[0, p, j]) for j, p in enumerate(parents)]
    extra = [[nxt[0], 11, -1]] * 3
    (reorder,) = run(engine, new_step(engine, 11, [[t] for t in nxt], parent_beams=[parents], top_k=[[4]],
                                      extra_ids=[extra]))
    ref_lp = direct.advance(ref, [[t] for t in nxt], parents=parents)
    assert_topk(reorder.output, ref_lp, 4)
    np.testing.assert_allclose(reorder.output.extra_logprobs[0, :, :2], ref_lp[:, [nxt[0], 11]], atol=ATOL)
    assert (reorder.output.extra_logprobs[0, :, 2] == -np.inf).all()
    run(engine, new_step(engine, 11, np.zeros((0, 1)), end=True))
    assert 11 not in engine.table.seqs


def test_whisper_batched_sequences_keep_their_own_state_and_reuse_their_slab(whisper):
    engine, direct, info, _ = whisper
    atol = ATOL if direct.variant == "fp32" else INT8_BATCHED_ATOL
    prefix = [info["sot"], info["transcribe"], info["no_timestamps"]]
    encs = [encoder_output(1), encoder_output(2)]
    refs = [direct.sequence(e) for e in encs]
    steps = run(engine, *[new_step(engine, 21 + i, [prefix], start=True, encoder_output=e) for i, e in enumerate(encs)])
    for s, ref in zip(steps, refs):
        assert_topk(s.output, direct.advance(ref, [prefix]), 5, atol)
    seqs = [engine.table.seqs[21], engine.table.seqs[22]]
    assert [s.row for s in seqs] == [0, 1] and seqs[0].kv is seqs[1].kv  # one slab for the batch
    for _ in range(2):
        slab = seqs[0].kv
        tokens = [int(s.output.topk_ids[0, 0, 0]) for s in steps]
        steps = run(engine, *[new_step(engine, 21 + i, [[t]]) for i, t in enumerate(tokens)])
        for s, ref, t in zip(steps, refs, tokens):
            assert_topk(s.output, direct.advance(ref, [[t]]), 5, atol)
        assert seqs[0].kv is slab and seqs[1].kv is slab  # same batch, no reorder: in place
    run(engine, *[new_step(engine, 21 + i, np.zeros((0, 1)), end=True) for i in range(2)])
    assert not engine.table.seqs and not engine.table.cross.owner


def test_whisper_errors_have_their_codes_and_fail_alone(whisper):
    engine, _, info, _ = whisper
    prefix = [info["sot"], info["transcribe"], info["no_timestamps"]]
    (missing,) = run(engine, new_step(engine, 31, [[1]]))
    assert missing.code == "NOT_FOUND" and "no decoder state" in missing.error
    no_enc = new_step(engine, 32, [prefix], start=True)
    assert no_enc.code == "INVALID_ARG" and "encoder_output" in no_enc.error
    steps = run(engine, *[new_step(engine, 40 + i, [prefix], start=True, encoder_output=encoder_output(3))
                          for i in range(4)])
    assert [s.error is None for s in steps] == [True, True, True, False]  # max_sequences=3
    assert steps[3].code == "UNAVAILABLE" and "max_sequences" in steps[3].error
    bad, good = run(engine, new_step(engine, 40, [[1]], extra_ids=[[[10 ** 7]]]), new_step(engine, 41, [[1]]))
    assert "extra_ids" in bad.error and good.error is None
    (parents,) = run(engine, new_step(engine, 40, [[1], [2]], parent_beams=[[0, 5]]))
    assert "parent_beams must index" in parents.error
    assert engine.table.seqs[40].length == len(prefix)  # failed steps change nothing
    run(engine, *[new_step(engine, 40 + i, np.zeros((0, 1)), end=True) for i in range(4)])


def test_idle_sequences_are_evicted(whisper):
    engine, _, info, log = whisper
    now = 1000.0
    run(engine, new_step(engine, 51, [[info["sot"]]], start=True, encoder_output=encoder_output(4)), now=now)
    engine.table.last_active = now
    (gone,) = run(engine, new_step(engine, 51, [[1]]), now=now + 6)  # idle 6 s > 5 s
    assert gone.code == "NOT_FOUND" and "evicted" in gone.error
    assert any("evicted idle sequences 51" in m for _, m in log.lines)
    engine.table.evict_idle(now + 12)  # nothing live and idle: the memory goes back
    assert engine.table.cross.empty and engine.pool.bytes == 0


def test_timestamp_rules_through_the_engine(whisper):
    engine, direct, info, _ = whisper
    prefix = [info["sot"], info["transcribe"]]
    ts_begin = info["timestamp_begin"]
    rules = [[ts_begin, info["no_timestamps"], 5, info["eot"]]]
    (start,) = run(engine, new_step(engine, 61, [prefix], start=True, encoder_output=encoder_output(5),
                                    timestamp_rules=rules, top_k=[[8]]))
    ids = start.output.topk_ids[0, 0]
    finite = np.isfinite(start.output.topk_logprobs[0, 0])
    assert ((ids[finite] >= ts_begin) & (ids[finite] <= ts_begin + 5)).all() and finite[0]
    stamp = int(ids[0])
    (text,) = run(engine, new_step(engine, 61, [[stamp]], top_k=[[8]]))
    assert int(text.output.topk_ids[0, 0, 0]) != info["no_timestamps"]
    out = text.output  # after one timestamp: no earlier timestamp
    bad = (out.topk_ids[0, 0] >= ts_begin) & (out.topk_ids[0, 0] < stamp) & np.isfinite(out.topk_logprobs[0, 0])
    assert not bad.any()
    run(engine, new_step(engine, 61, np.zeros((0, 1)), end=True))


# --------------------------------------------------------------------------- glm_asr graphs
@pytest.fixture(scope="module")
def glm():
    onnx_dir = GLM_DIR / "onnx" / "fp32"
    if not (onnx_dir / "embed_tokens.onnx").exists():
        pytest.skip(f"no exported glm_asr model in {GLM_DIR} (make export)")
    info = json.loads((GLM_DIR / "model_info.json").read_text())
    prompt = json.loads((GLM_DIR / "prompt.json").read_text())
    engine = DecoderEngine(str(onnx_dir), config("glm_asr", audio_token_id=info["audio_token_id"]), Log(),
                           DecoderSettings(family="glm_asr", warmup=True))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {name: ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
                for name in ("embed_tokens", "decoder_step")}
    yield engine, sessions, info, prompt
    engine.close()


def test_glm_asr_steps_equal_direct_onnxruntime(glm):
    engine, sessions, info, prompt = glm
    A, D = 7, int(info["d_model"])
    audio = (np.random.default_rng(9).standard_normal((1, A, D)) * 0.5).astype(np.float32)
    ids = prompt["prefix_ids"] + [info["audio_token_id"]] * A + prompt["suffix_ids"]
    (start,) = run(engine, new_step(engine, 71, [ids, ids], start=True, encoder_output=audio))
    assert start.error is None, start.error
    emb = sessions["embed_tokens"].run(None, {"input_ids": np.array([[ids, ids]], np.int64)})[0]
    mask = np.array(ids) == info["audio_token_id"]
    emb[0][:, mask] = audio[0]
    L, H, dh = engine.runner.kv_dims
    empty = np.zeros((L, 1, 2, H, 0, dh), np.float32)
    logits, nk, nv = sessions["decoder_step"].run(None, {
        "inputs_embeds": emb, "past_length": np.zeros(1, np.int64), "past_k": empty, "past_v": empty})
    assert_topk(start.output, log_softmax(logits[0]), 5)
    nxt = [int(start.output.topk_ids[0, 1, 0]), int(start.output.topk_ids[0, 1, 1])]
    (step,) = run(engine, new_step(engine, 71, [[nxt[0]], [nxt[1]]], parent_beams=[[1, 0]]))
    emb = sessions["embed_tokens"].run(None, {"input_ids": np.array([[[nxt[0]], [nxt[1]]]], np.int64)})[0]
    logits, _, _ = sessions["decoder_step"].run(None, {
        "inputs_embeds": emb, "past_length": np.array([len(ids)]),
        "past_k": nk[:, :, [1, 0]], "past_v": nv[:, :, [1, 0]]})
    assert_topk(step.output, log_softmax(logits[0]), 5)
    run(engine, new_step(engine, 71, np.zeros((0, 1)), end=True))


def test_glm_asr_start_needs_one_placeholder_per_audio_embedding(glm):
    engine, _, info, prompt = glm
    audio = np.zeros((1, 3, int(info["d_model"])), np.float32)
    ids = prompt["prefix_ids"] + [info["audio_token_id"]] * 2 + prompt["suffix_ids"]
    (start,) = run(engine, new_step(engine, 81, [ids], start=True, encoder_output=audio))
    assert start.code == "INVALID_ARG" and "audio placeholders" in start.error
    assert 81 not in engine.table.seqs
