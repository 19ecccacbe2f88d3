"""The Triton `encoder` and stateful `decoder` models, served by the real tritonserver.

A repository is rendered (model_repository.render) from the exported model in
$ASR_MODEL_DIR (default build/models/whisper-base) into a temporary directory and served by
build/triton's tritonserver (gateway.launch.triton_process). Results are compared with ONNX Runtime
run directly in this process on the same graphs.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # gateway/, model_repository/ (also when run as plain `pytest`)
    sys.path.insert(0, str(ROOT))
MODEL_DIR = Path(os.environ.get("ASR_MODEL_DIR", ROOT / "build" / "models" / "whisper-base"))
if not MODEL_DIR.is_absolute():
    MODEL_DIR = ROOT / MODEL_DIR
PRECISION = os.environ.get("ASR_TEST_PRECISION", "fp32")
TRITON_DIR = Path(os.environ.get("ASR_TRITON_DIR", ROOT / "build" / "triton"))

# fp32: Triton must reproduce ONNX Runtime run directly. int8 graphs quantize activations per
# tensor at run time (DynamicQuantizeLinear): a 1e-6 change of an input (the padded cache
# attends in another order, other rows share the batch) can flip a rounding step and move a
# log-prob by ~0.1, so int8 is compared loosely (a broken cache is off by far more).
ATOL = 2e-3 if PRECISION == "fp32" else 0.75
MAX_SEQUENCES = 10          # small, so the cap can be tested
IDLE_TIMEOUT_S = 6.0        # model-side eviction (Triton's own idle limit stays at 60 s)

ort = pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not (MODEL_DIR / "model_info.json").exists()
                       or not (MODEL_DIR / "onnx" / PRECISION / "decoder_step.onnx").exists(),
                       reason=f"no exported model in {MODEL_DIR} (make export)"),
    pytest.mark.skipif(not (TRITON_DIR / "bin" / "tritonserver").exists(),
                       reason=f"no tritonserver in {TRITON_DIR} (make setup)"),
]


# --------------------------------------------------------------------------- direct reference
class Reference:
    """The contract computed with onnxruntime in this process."""

    def __init__(self, model_dir: Path, precision: str):
        onnx_dir = model_dir / "onnx" / precision
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(onnx_dir / "encoder.onnx"), opts, providers=providers)
        self.init = ort.InferenceSession(str(onnx_dir / "decoder_init.onnx"), opts, providers=providers)
        self.step = ort.InferenceSession(str(onnx_dir / "decoder_step.onnx"), opts, providers=providers)
        self.info = json.loads((model_dir / "model_info.json").read_text())
        self.suppress = np.array(self.info.get("suppress_tokens", []), dtype=np.int64)
        self.begin_suppress = np.array(self.info.get("begin_suppress_tokens", []), dtype=np.int64)
        lang = self.info.get("lang_to_id", {}).get("en")
        self.prefix = [self.info["sot"]] + ([lang] if lang else []) + [self.info["transcribe"], self.info["no_timestamps"]]
        self.L = int(self.info.get("n_layers", 0)) or self.step.get_inputs()[2].shape[0]

    def encode(self, features: np.ndarray) -> np.ndarray:
        return self.encoder.run(["encoder_output"], {"input_features": features})[0]

    def logprobs(self, logits: np.ndarray, first: bool) -> np.ndarray:
        x = logits.astype(np.float64).copy()
        x[..., self.suppress] = -np.inf
        if first:
            x[..., self.begin_suppress] = -np.inf
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    def recompute(self, enc: np.ndarray, history: list[int], first: bool) -> np.ndarray:
        """log-probs [V] of the next token after ``history``, recomputed from scratch (no cache)."""
        cross = self.cross(enc)
        z = self.empty_past(cross)
        logits, _, _ = self.step.run(None, {
            "input_ids": np.array([[history]], np.int64), "past_length": np.zeros(1, np.int64),
            "past_k": z, "past_v": z, **cross})
        return self.logprobs(logits[0, 0], first)

    def cross(self, enc: np.ndarray) -> dict:
        """decoder_init's outputs by name (cross_k, cross_v or the 8-bit variant's four)."""
        return dict(zip([o.name for o in self.init.get_outputs()], self.init.run(None, {"encoder_output": enc})))

    def empty_past(self, cross: dict) -> np.ndarray:
        _, _, heads, _, head_dim = cross["cross_v"].shape  # [L, N, H, S, dh] in every variant
        return np.zeros((self.L, 1, 1, heads, 0, head_dim), np.float32)

    def sequence(self, enc: np.ndarray) -> "DirectSeq":
        return DirectSeq(self, enc)

    def greedy(self, enc: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
        """Prefill + ``steps`` greedy steps with an incremental cache; (tokens, log-probs per output)."""
        cross = self.cross(enc)
        pk = pv = self.empty_past(cross)
        ids = list(self.prefix)
        new = ids
        tokens, lps = [], []
        for i in range(steps + 1):
            logits, nk, nv = self.step.run(None, {
                "input_ids": np.array([[new]], np.int64), "past_length": np.array([pk.shape[4]], np.int64),
                "past_k": pk, "past_v": pv, **cross})
            pk = np.concatenate([pk, nk], axis=4)
            pv = np.concatenate([pv, nv], axis=4)
            lp = self.logprobs(logits[0, 0], first=(i == 0))
            tok = int(np.argmax(lp))
            tokens.append(tok)
            lps.append(lp)
            new = [tok]
        return tokens, lps


class DirectSeq:
    """The decoder contract step by step with onnxruntime: cache reorder by parent beams + append."""

    def __init__(self, ref: Reference, enc: np.ndarray):
        self.ref = ref
        self.cross = ref.cross(enc)
        self.pk = self.pv = ref.empty_past(self.cross)
        self.first = True

    def step(self, ids, parents=None) -> np.ndarray:
        """ids [K, T] -> log-probs [K, V]."""
        if parents is not None:
            self.pk = np.take(self.pk, parents, axis=2)
            self.pv = np.take(self.pv, parents, axis=2)
        logits, nk, nv = self.ref.step.run(None, {
            "input_ids": np.asarray(ids, np.int64)[np.newaxis], "past_length": np.array([self.pk.shape[4]], np.int64),
            "past_k": self.pk, "past_v": self.pv, **self.cross})
        self.pk = np.concatenate([self.pk, nk], axis=4)
        self.pv = np.concatenate([self.pv, nv], axis=4)
        lp = self.ref.logprobs(logits[0], self.first)
        self.first = False
        return lp


# --------------------------------------------------------------------------- Triton helpers
def _tensor(name, array, datatype):
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


class Seq:
    """One decoder sequence driven through Triton."""

    def __init__(self, client, seq_id: int, enc: np.ndarray, ref: Reference, top_k: int = 5):
        self.client, self.id, self.enc, self.ref, self.top_k = client, seq_id, enc, ref, top_k
        self.started = False

    def step(self, ids: np.ndarray, parents=None, extra=None, end=False):
        ids = np.asarray(ids, dtype=np.int64)
        inputs = [_tensor("input_ids", ids[np.newaxis], "INT64"),
                  _tensor("top_k", np.array([[self.top_k]], np.int32), "INT32")]
        start = not self.started
        if start:
            inputs.append(_tensor("encoder_output", self.enc, "FP32"))
            if self.ref.suppress.size:
                inputs.append(_tensor("suppress_ids", self.ref.suppress[np.newaxis].astype(np.int32), "INT32"))
            if self.ref.begin_suppress.size:
                inputs.append(_tensor("begin_suppress_ids", self.ref.begin_suppress[np.newaxis].astype(np.int32), "INT32"))
        if parents is not None:
            inputs.append(_tensor("parent_beams", np.asarray(parents, np.int32)[np.newaxis], "INT32"))
        if extra is not None:
            inputs.append(_tensor("extra_ids", np.asarray(extra, np.int32)[np.newaxis], "INT32"))
        result = self.client.infer("decoder", inputs, sequence_id=self.id, sequence_start=start, sequence_end=end,
                                   client_timeout=120)
        self.started = True
        return (result.as_numpy("topk_ids")[0], result.as_numpy("topk_logprobs")[0],
                result.as_numpy("extra_logprobs")[0])

    def end(self):
        """Free the sequence (END with zero beams)."""
        self.client.infer("decoder", [_tensor("input_ids", np.zeros((1, 0, 1), np.int64), "INT64")],
                          sequence_id=self.id, sequence_end=True, client_timeout=60)

    def greedy(self, steps: int):
        ids, lps = [], []
        top_ids, top_lp, _ = self.step(np.array([self.ref.prefix]))
        for i in range(steps + 1):
            ids.append(int(top_ids[0, 0]))
            lps.append((top_ids[0], top_lp[0]))
            if i < steps:
                top_ids, top_lp, _ = self.step(np.array([[ids[-1]]]))
        return ids, lps


_next_id = iter(range(1000, 10**6))


def new_id() -> int:
    return next(_next_id)


def stats(client, model: str, expect_inferences: int | None = None) -> tuple[int, int]:
    """(inference_count, execution_count); Triton records them just after responding, so wait
    (briefly) until ``expect_inferences`` is reached when given."""
    deadline = time.monotonic() + 5.0
    while True:
        s = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
        counts = int(s.get("inference_count", 0)), int(s.get("execution_count", 0))
        if expect_inferences is None or counts[0] >= expect_inferences or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def assert_matches(top_ids, top_lp, ref_lp, atol=ATOL):
    """Triton's top-k equals the reference log-probs (ids may swap only on near-ties)."""
    np.testing.assert_allclose(top_lp, ref_lp[top_ids], atol=atol)
    best = np.sort(ref_lp)[::-1][: len(top_ids)]
    np.testing.assert_allclose(top_lp, best, atol=atol)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref():
    return Reference(MODEL_DIR, PRECISION)


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    """A tritonserver of this module's own: small max_sequences and idle timeout to test them."""
    from gateway.launch.triton_process import TritonProcess
    from model_repository.render import render_repository

    repo = render_repository(MODEL_DIR, tmp_path_factory.mktemp("model_repository"), PRECISION,
                             max_sequences=MAX_SEQUENCES, sequence_idle_timeout_s=IDLE_TIMEOUT_S,
                             encoder_max_queue_delay_microseconds=20000,
                             decoder_max_queue_delay_microseconds=2000)
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonProcess(repo, log_path=log, log_verbose=1) as server:
        yield server
    print(f"tritonserver log: {log}")


@pytest.fixture(scope="module")
def client(triton_server):
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(1234)
    info = json.loads((MODEL_DIR / "model_info.json").read_text())
    # log-mel-like values in Whisper's range [-1.5, 1.5]
    return np.clip(rng.standard_normal((1, int(info["n_mels"]), int(info.get("n_frames", 3000)))) * 0.4, -1.5, 1.5
                   ).astype(np.float32)


@pytest.fixture(scope="module")
def enc(ref, features):
    return ref.encode(features)


def variant(enc: np.ndarray, i: int) -> np.ndarray:
    """Distinct encoder outputs without running the encoder again."""
    return np.ascontiguousarray(np.roll(enc, 37 * i, axis=1) * (1.0 + 0.05 * i)).astype(np.float32)


# --------------------------------------------------------------------------- tests
def test_encoder_matches_onnxruntime(client, ref, features, enc):
    result = client.infer("encoder", [_tensor("input_features", features, "FP32")], client_timeout=120)
    out = result.as_numpy("encoder_output")
    assert out.shape == enc.shape
    np.testing.assert_allclose(out, enc, atol=1e-4, rtol=1e-4)


def test_encoder_batches_concurrent_requests(client, triton_server, features, enc):
    before = stats(client, "encoder")
    n = 4

    def one(_):
        c = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            return c.infer("encoder", [_tensor("input_features", features, "FP32")],
                           client_timeout=120).as_numpy("encoder_output")
        finally:
            c.close()

    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(one, range(n)))
    for out in outs:
        np.testing.assert_allclose(out, enc, atol=1e-4, rtol=1e-4)
    after = stats(client, "encoder", before[0] + n)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == n
    assert executions < inferences, f"no dynamic batching: {inferences} requests in {executions} executions"


def check_against_direct(ref, enc, ids, lps):
    """Feed Triton's tokens to onnxruntime directly: same log-probs at every step."""
    direct = ref.sequence(enc)
    new = [ref.prefix]
    for token, (top_ids, top_lp) in zip(ids, lps):
        assert_matches(top_ids, top_lp, direct.step(new)[0])
        new = [[token]]


def test_decoder_greedy_matches_onnxruntime(client, ref, enc):
    seq = Seq(client, new_id(), enc, ref)
    try:
        ids, lps = seq.greedy(10)
    finally:
        seq.end()
    assert len(ids) == 11
    check_against_direct(ref, enc, ids, lps)
    if PRECISION == "fp32":  # the same greedy loop run entirely in onnxruntime
        assert ids == ref.greedy(enc, 10)[0]


def test_interleaved_sequences_keep_their_own_state(client, ref, enc):
    encs = [variant(enc, 1), variant(enc, 2)]
    seqs = [Seq(client, new_id(), e, ref) for e in encs]
    got = [[], []]
    try:
        outs = [s.step(np.array([ref.prefix])) for s in seqs]
        for i in range(7):
            for j, s in enumerate(seqs):  # A, B, A, B, ...
                top_ids, top_lp, _ = outs[j]
                got[j].append((top_ids[0], top_lp[0]))
                if i < 6:
                    outs[j] = s.step(np.array([[int(top_ids[0, 0])]]))
    finally:
        for s in seqs:
            s.end()
    tokens = [[int(t[0]) for t, _ in g] for g in got]
    assert tokens[0] != tokens[1] or not np.allclose(got[0][1][1], got[1][1][1]), "variants too similar"
    for j in range(2):
        check_against_direct(ref, encs[j], tokens[j], got[j])
        if PRECISION == "fp32":
            assert tokens[j] == ref.greedy(encs[j], 6)[0]


def test_beam_reorder_matches_recompute(client, ref, enc):
    """parent_beams reorders the server-side cache: the log-probs equal (a) the same steps with
    onnxruntime and an explicitly reordered cache and (b) a recomputation from scratch of every
    beam's token history."""
    seq = Seq(client, new_id(), enc, ref, top_k=4)
    direct = ref.sequence(enc)
    prefix = list(ref.prefix)

    def check(top_ids, top_lp, direct_lp, histories):
        for k, history in enumerate(histories):
            assert_matches(top_ids[k], top_lp[k], direct_lp[k])
            assert_matches(top_ids[k], top_lp[k], ref.recompute(enc, history, first=False), atol=ATOL)

    try:
        top_ids, top_lp, _ = seq.step(np.array([prefix]))
        assert_matches(top_ids[0], top_lp[0], direct.step([prefix])[0])
        first = [int(t) for t in top_ids[0, :3]]  # three distinct candidates
        # step 1: expand one beam into K=3 (all continue cached beam 0)
        ids = [[t] for t in first]
        top_ids, top_lp, _ = seq.step(np.array(ids), parents=[0, 0, 0])
        histories = [prefix + [t] for t in first]
        check(top_ids, top_lp, direct.step(ids, parents=[0, 0, 0]), histories)
        # step 2: reorder (permute + duplicate) and ask for extra ids
        parents = [2, 0, 2]
        nxt = [int(top_ids[p, j]) for j, p in enumerate(parents)]
        extra = np.array([[nxt[0], 11, -1]] * 3)
        top_ids, top_lp, extra_lp = seq.step(np.array([[t] for t in nxt]), parents=parents, extra=extra)
        direct_lp = direct.step([[t] for t in nxt], parents=parents)
        histories = [histories[p] + [t] for p, t in zip(parents, nxt)]
        check(top_ids, top_lp, direct_lp, histories)
        for k in range(3):
            np.testing.assert_allclose(extra_lp[k, :2], direct_lp[k, [nxt[0], 11]], atol=ATOL)
            assert extra_lp[k, 2] == -np.inf
        # step 3: parent_beams absent = identity order
        nxt = [int(top_ids[k, 0]) for k in range(3)]
        top_ids, top_lp, _ = seq.step(np.array([[t] for t in nxt]))
        check(top_ids, top_lp, direct.step([[t] for t in nxt]), [h + [t] for h, t in zip(histories, nxt)])
    finally:
        seq.end()


def test_end_frees_state_and_max_sequences_is_enforced(client, ref, enc):
    seqs = []
    try:
        for _ in range(MAX_SEQUENCES):
            s = Seq(client, new_id(), enc, ref)
            s.step(np.array([ref.prefix]))
            seqs.append(s)
        extra = Seq(client, new_id(), enc, ref)
        with pytest.raises(InferenceServerException, match="max_sequences") as refused:
            extra.step(np.array([ref.prefix]))
        assert "UNAVAILABLE" in str(refused.value.status())
        extra.end()  # Triton still holds the slot of the refused sequence: release it
        seqs.pop(0).end()  # END frees one cache ...
        again = Seq(client, new_id(), enc, ref)
        again.step(np.array([ref.prefix]))  # ... so a new sequence fits
        seqs.append(again)
    finally:
        for s in seqs:
            s.end()
    # all freed: a full set fits again
    fresh = [Seq(client, new_id(), enc, ref) for _ in range(MAX_SEQUENCES)]
    try:
        for s in fresh:
            s.step(np.array([ref.prefix]))
    finally:
        for s in fresh:
            s.end()


def test_concurrent_sequences_are_batched(client, triton_server, ref, enc):
    n, steps = 8, 10
    encs = [variant(enc, i) for i in range(n)]
    refs = [ref.greedy(e, steps)[0] for e in encs]
    before = stats(client, "decoder")
    barrier = threading.Barrier(n)

    def run(i):
        c = grpcclient.InferenceServerClient(triton_server.grpc_url)
        seq = Seq(c, new_id(), encs[i], ref)
        try:
            barrier.wait(timeout=30)
            return seq.greedy(steps)[0]
        finally:
            seq.end()
            c.close()

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(run, range(n)))
    after = stats(client, "decoder", before[0] + n * (steps + 2))
    if PRECISION == "fp32":  # int8: batch-dependent activation quantization may flip near-ties
        assert results == refs
    else:
        assert all(len(r) == steps + 1 for r in results)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == n * (steps + 2)  # START + steps + END per sequence
    assert executions < inferences / 2, f"decoder steps not batched: {inferences} requests, {executions} executions"


def test_bad_requests_get_errors_and_server_keeps_serving(client, triton_server, ref, enc):
    # wrong shape for the encoder: rejected, not a crash
    with pytest.raises(InferenceServerException):
        client.infer("encoder", [_tensor("input_features", np.zeros((1, 80, 100), np.float32), "FP32")])
    # START without encoder_output
    s = Seq(client, new_id(), enc, ref)
    with pytest.raises(InferenceServerException, match="encoder_output"):
        client.infer("decoder", [_tensor("input_ids", np.array([[ref.prefix]], np.int64), "INT64")],
                     sequence_id=s.id, sequence_start=True)
    s.end()
    # bad requests of a live sequence: its state survives them
    good = Seq(client, new_id(), enc, ref)
    try:
        top_ids, _, _ = good.step(np.array([ref.prefix]))
        with pytest.raises(InferenceServerException, match="parent_beams") as bad_parents:
            good.step(np.array([[1], [2]]), parents=[0, 5])        # no cached beam 5
        assert "INVALID_ARGUMENT" in str(bad_parents.value.status())
        with pytest.raises(InferenceServerException, match="input_ids"):
            good.step(np.array([[10 ** 7]]))                        # not a token id
        with pytest.raises(InferenceServerException, match="parent_beams is required"):
            good.step(np.array([[1], [2]]))                         # K changes without parents
        with pytest.raises(InferenceServerException, match=r"parent_beams must be \[1, K=2\]"):
            good.step(np.array([[1], [2]]), parents=[0, 0, 0])      # wrong shape (checked by the model)
        with pytest.raises(InferenceServerException):               # wrong rank (checked by Triton)
            client.infer("decoder", [_tensor("input_ids", np.array([[1, 2]], np.int64), "INT64")],
                         sequence_id=good.id)
        # one bad request in the same batch as good ones fails alone
        others = [Seq(grpcclient.InferenceServerClient(triton_server.grpc_url), new_id(), variant(enc, i + 3), ref)
                  for i in range(3)]
        for o in others:
            o.step(np.array([ref.prefix]))

        def bad():
            try:
                good.step(np.array([[1]]), extra=np.array([[[10 ** 7]]]))
            except InferenceServerException as error:
                return error
            return None

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(o.step, np.array([[int(ref.prefix[-1])]])) for o in others] + [pool.submit(bad)]
            results = [f.result() for f in futures]
        assert isinstance(results[-1], InferenceServerException) and "extra_ids" in str(results[-1])
        assert all(r[0].shape == (1, 5) for r in results[:-1])
        for o in others:
            o.end()
            o.client.close()
        # the good sequence goes on exactly as if the bad requests never happened
        ids, lp, _ = good.step(np.array([[int(top_ids[0, 0])]]))
        direct = ref.sequence(enc)
        direct.step([ref.prefix])
        assert_matches(ids[0], lp[0], direct.step([[int(top_ids[0, 0])]])[0])
    finally:
        good.end()
    assert client.is_server_live() and client.is_model_ready("decoder") and client.is_model_ready("encoder")


def test_idle_sequences_are_evicted(client, ref, enc):
    s = Seq(client, new_id(), enc, ref)
    s.step(np.array([ref.prefix]))
    time.sleep(IDLE_TIMEOUT_S + 0.5)
    # any decoder request runs the eviction sweep; this one finds its own cache gone
    with pytest.raises(InferenceServerException, match="evicted") as gone:
        s.step(np.array([[1]]))
    assert "NOT_FOUND" in str(gone.value.status())
    s.end()
