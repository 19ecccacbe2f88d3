"""The beam search inside Triton (model `search`) behind the real gateway and a real Triton.

Windows without hotwords are searched inside Triton, one request per window (no decoder step
crosses the wire); the transcripts equal the gateway's own stepwise search, with hotwords too
(the scorer travels as data); a repository rendered without them keeps hotword windows stepwise;
a window sent as features is encoded inside Triton (BLS) as the encoder model would encode it;
a bad request to the model gets an error saying what is wrong and the model keeps serving.
"""
from __future__ import annotations

import json
import queue
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.protocol import asr_pb2
from tests.conftest import asr_client, running_gateway, sample_clips


def _counts(url: str) -> dict[str, int]:
    with triton_grpc.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(as_json=True)["model_stats"]
    return {m["name"]: int(m.get("inference_count", 0)) for m in stats}


def _request(clip, **fields) -> asr_pb2.TranscribeRequest:
    return asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=5,
                                     disable_server_hotwords=True, **fields)


@pytest.fixture(scope="module")
def stepwise_gateway(triton, model_dir, tmp_path_factory):
    with running_gateway(model_dir, triton.grpc_url, tmp_path_factory.mktemp("stepwise"), ["--stepwise-only"]) as gw:
        yield gw


def test_windows_are_searched_inside_triton_without_decoder_steps(asr_stub, triton):
    clips = sample_clips()
    before = _counts(triton.grpc_url)
    with ThreadPoolExecutor(len(clips) * 2) as pool:
        responses = list(pool.map(lambda c: asr_stub.Transcribe(_request(c), timeout=300), clips * 2))
    after = _counts(triton.grpc_url)
    assert all(r.text for r in responses)
    # the same clip gives the same text whatever windows it shared decoder calls with
    assert [r.text for r in responses[: len(clips)]] == [r.text for r in responses[len(clips):]]
    assert after["search"] - before["search"] >= len(clips) * 2  # one request per window
    assert after["decoder"] == before["decoder"], "no step of these windows went through the decoder model"


def test_the_search_inside_triton_equals_the_gateways_stepwise_search(asr_stub, stepwise_gateway, triton):
    clips = sample_clips()
    inside = [asr_stub.Transcribe(_request(c), timeout=300) for c in clips]
    before = _counts(triton.grpc_url)
    with asr_client(stepwise_gateway.address) as stepwise_stub:
        stepwise = [stepwise_stub.Transcribe(_request(c), timeout=300) for c in clips]
    after = _counts(triton.grpc_url)
    assert after["search"] == before["search"] and after["decoder"] > before["decoder"]  # --stepwise-only
    assert [r.text for r in inside] == [r.text for r in stepwise]
    for a, b in zip(inside, stepwise):
        assert [s.confidence for s in a.segments] == pytest.approx([s.confidence for s in b.segments], abs=1e-4)


# whisper base writes 天地玄皇宇宙 洪荒日月影子陈苏列长 for this clip without them
PANGRAM_HOTWORDS = [asr_pb2.Hotword(phrase="天地玄黄", weight=2.0), asr_pb2.Hotword(phrase="辰宿列张", weight=2.0)]


def _pangram():
    return next(c for c in sample_clips() if c.name == "zh/pangrama")


def test_the_decoder_model_loads_its_graphs_again_on_first_use(triton, stepwise_gateway):
    """With the search model serving the windows, the decoder model checks its graphs at load and
    gives its sessions back; a stepwise window (or a language detection) loads them again."""
    log_path = Path(triton.log_path)
    assert "loaded again on the first request (load_on_first_use)" in log_path.read_text(errors="replace")
    with asr_client(stepwise_gateway.address) as stub:
        assert stub.Transcribe(_request(sample_clips()[0]), timeout=300).text
    assert "decoder: graphs loaded on the first request in" in log_path.read_text(errors="replace")


def test_hotword_biased_windows_are_searched_inside_triton_as_the_gateway_would(asr_stub, stepwise_gateway, triton):
    clip = _pangram()
    plain = asr_stub.Transcribe(_request(clip), timeout=300).text
    before = _counts(triton.grpc_url)
    inside = asr_stub.Transcribe(_request(clip, hotwords=PANGRAM_HOTWORDS), timeout=300)
    after = _counts(triton.grpc_url)
    with asr_client(stepwise_gateway.address) as stepwise_stub:
        stepwise = stepwise_stub.Transcribe(_request(clip, hotwords=PANGRAM_HOTWORDS), timeout=300)
    assert after["search"] > before["search"] and after["decoder"] == before["decoder"]
    assert inside.text == stepwise.text, "the scorer rebuilt in the server biases the search the same way"
    assert "天地玄黄" in inside.text and "天地玄黄" not in plain


def _stream_once(url: str, inputs) -> tuple:
    """One request on a gRPC stream to the decoupled search model: (result, error)."""
    answers: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("search", inputs, outputs=[triton_grpc.InferRequestedOutput("result")])
        return answers.get(timeout=120)
    finally:
        client.stop_stream()
        client.close()


def _inputs(options: bytes, frames: int = 1500, width: int = 512, window: dict | None = None):
    """The options plus the window: ``window`` {input name: array [S, d] or [n_mels, frames]}
    (default: an encoder_output of zeros)."""
    window = window if window is not None else {"encoder_output": np.zeros((frames, width), np.float32)}
    inputs = []
    for name, array in window.items():
        tensor = triton_grpc.InferInput(name, [1, *array.shape], "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32)[np.newaxis])
        inputs.append(tensor)
    opts = triton_grpc.InferInput("options", [1, 1], "BYTES")
    opts.set_data_from_numpy(np.array([[options]], dtype=np.object_))
    return [*inputs, opts]


def _english_options(model_dir, **extra) -> dict:
    info = json.loads((model_dir / "model_info.json").read_text())
    return {"prompt": [info["sot"], info["lang_to_id"]["en"], info["transcribe"], info["no_timestamps"]],
            "beam_size": 5, "max_new_tokens": 40, "max_length": info["max_target_positions"],
            "eot_ids": [info["eot"]], **extra}


def test_a_window_sent_as_features_is_encoded_inside_triton_as_the_encoder_would(triton, model_dir):
    from gateway.asr.audio import load_audio
    from gateway.asr.features import N_SAMPLES, log_mel_spectrogram

    clip = next(c for c in sample_clips() if c.language == "en")
    features = log_mel_spectrogram(load_audio(clip.path.read_bytes()).samples[:N_SAMPLES])
    with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
        tensor = triton_grpc.InferInput("input_features", [1, *features.shape], "FP32")
        tensor.set_data_from_numpy(features[np.newaxis])
        encoder_output = client.infer("encoder", [tensor]).as_numpy("encoder_output")[0]
    options = json.dumps(_english_options(model_dir)).encode()
    from_output, error = _stream_once(triton.grpc_url, _inputs(options, window={"encoder_output": encoder_output}))
    assert error is None
    before = _counts(triton.grpc_url)
    from_features, error = _stream_once(triton.grpc_url, _inputs(options, window={"input_features": features}))
    after = _counts(triton.grpc_url)
    assert error is None
    assert after["encoder"] == before["encoder"] + 1  # encoded by the encoder model, inside the server
    expected, got = (json.loads(r.as_numpy("result").reshape(-1)[0]) for r in (from_output, from_features))
    assert got["tokens"] and got["tokens"] == expected["tokens"]
    assert got["sum_logprob"] == pytest.approx(expected["sum_logprob"], abs=1e-4)

    # a window given twice, or with a bad audio_tokens, is refused saying why
    both = {"input_features": features, "encoder_output": encoder_output}
    result, error = _stream_once(triton.grpc_url, _inputs(options, window=both))
    assert result is None and "either input_features" in error.message()
    bad = json.dumps(_english_options(model_dir, audio_tokens=0)).encode()
    result, error = _stream_once(triton.grpc_url, _inputs(bad, window={"input_features": features}))
    assert result is None and "audio_tokens must be a positive integer" in error.message()


def test_a_gateway_that_encodes_its_windows_itself_writes_the_same_transcripts(asr_stub, model_dir, triton,
                                                                               tmp_path_factory):
    clips = sample_clips()
    by_server = [asr_stub.Transcribe(_request(c), timeout=300) for c in clips]
    logs = tmp_path_factory.mktemp("encode-in-gateway")
    with running_gateway(model_dir, triton.grpc_url, logs, ["--encode-in-gateway"]) as gw, asr_client(gw.address) as stub:
        by_gateway = [stub.Transcribe(_request(c), timeout=300) for c in clips]
    assert [r.text for r in by_server] == [r.text for r in by_gateway]
    for a, b in zip(by_server, by_gateway):
        assert [s.confidence for s in a.segments] == pytest.approx([s.confidence for s in b.segments], abs=1e-4)


def test_a_bad_search_request_gets_an_error_and_the_model_keeps_serving(triton, model_dir):
    result, error = _stream_once(triton.grpc_url, _inputs(b"not json"))
    assert result is None and "options is not JSON" in error.message()
    result, error = _stream_once(triton.grpc_url, _inputs(json.dumps({"prompt": [50258]}).encode()))
    assert result is None and "lack 'eot_ids'" in error.message()
    bad_beam = {"prompt": [50258], "eot_ids": [50257], "max_length": 448, "beam_size": 99}
    result, error = _stream_once(triton.grpc_url, _inputs(json.dumps(bad_beam).encode()))
    assert result is None and "beam_size" in error.message()
    bad_hotwords = {**bad_beam, "beam_size": 2, "hotwords": {"graphs": [{"phrases": [["朝阳区", 99]]}],
                                                             "vocabulary": {"ignore_ids": [], "size": 50257}}}
    result, error = _stream_once(triton.grpc_url, _inputs(json.dumps(bad_hotwords).encode()))
    assert result is None and "hotwords: graph #1 hotword #1 '朝阳区': weight must be in" in error.message()

    info = json.loads((model_dir / "model_info.json").read_text())
    good = {"prompt": [info["sot"], info["lang_to_id"]["en"], info["transcribe"], info["no_timestamps"]],
            "beam_size": 2, "max_new_tokens": 5, "max_length": info["max_target_positions"], "eot_ids": [info["eot"]]}
    result, error = _stream_once(triton.grpc_url, _inputs(json.dumps(good).encode()))
    assert error is None
    answer = json.loads(result.as_numpy("result").reshape(-1)[0])
    assert 1 <= answer["n_steps"] <= 5 and len(answer["tokens"]) == len(answer["token_logprobs"])


@pytest.fixture(scope="module")
def triton_without_search(model_dir, tmp_path_factory):
    """A Triton whose repository was rendered with `search_model` off (an older repository)."""
    from gateway.launch.triton_process import TritonProcess
    from model_repository.render import render_repository

    work = tmp_path_factory.mktemp("no-search")
    repo = render_repository(model_dir, work / "repo", precision="fp32", search_model=False)
    assert not (repo / "search").exists()
    with TritonProcess(repo, log_path=work / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def triton_without_search_hotwords(model_dir, tmp_path_factory):
    """A Triton whose search model was rendered with `search_hotwords` off."""
    from gateway.launch.triton_process import TritonProcess
    from model_repository.render import render_repository

    work = tmp_path_factory.mktemp("no-search-hotwords")
    repo = render_repository(model_dir, work / "repo", precision="fp32", search_hotwords=False)
    assert not (repo / "search" / "1" / "tokenizer.json").exists()
    with TritonProcess(repo, log_path=work / "triton.log") as server:
        yield server


def test_a_search_model_without_hotwords_leaves_hotword_windows_stepwise(asr_stub, triton_without_search_hotwords,
                                                                       model_dir, tmp_path_factory):
    server = triton_without_search_hotwords
    clip = _pangram()
    expected = asr_stub.Transcribe(_request(clip, hotwords=PANGRAM_HOTWORDS), timeout=300).text
    with running_gateway(model_dir, server.grpc_url, tmp_path_factory.mktemp("gateway-no-hw")) as gw, \
            asr_client(gw.address) as stub:
        before = _counts(server.grpc_url)
        biased = stub.Transcribe(_request(clip, hotwords=PANGRAM_HOTWORDS), timeout=300).text
        middle = _counts(server.grpc_url)
        plain = stub.Transcribe(_request(clip), timeout=300).text
        after = _counts(server.grpc_url)
    assert biased == expected and "天地玄黄" in biased
    assert middle["decoder"] > before["decoder"] and middle["search"] == before["search"]
    assert plain and after["search"] > middle["search"]  # windows without hotwords still searched there


def test_a_server_without_the_search_model_gets_stepwise_windows(asr_stub, triton_without_search, model_dir,
                                                                 tmp_path_factory):
    clip = sample_clips()[0]
    expected = asr_stub.Transcribe(_request(clip), timeout=300).text
    logs = tmp_path_factory.mktemp("gateway-no-search")
    with running_gateway(model_dir, triton_without_search.grpc_url, logs) as gw, asr_client(gw.address) as stub:
        before = _counts(triton_without_search.grpc_url)
        assert stub.Transcribe(_request(clip), timeout=300).text == expected
        after = _counts(triton_without_search.grpc_url)
    assert "search" not in after and after["decoder"] > before["decoder"]


def test_a_cancelled_search_request_stops_its_window(triton, model_dir):
    """A client that hangs up (its gRPC stream cancelled) stops its window at the next step; the
    search model says so in the Triton log. The window could never end by itself: EOT is
    suppressed and the length limit is the model's."""
    import asyncio
    import time

    import tritonclient.grpc.aio as triton_aio

    info = json.loads((model_dir / "model_info.json").read_text())
    endless = {"prompt": [info["sot"], info["lang_to_id"]["en"], info["transcribe"], info["no_timestamps"]],
               "beam_size": 5, "max_length": info["max_target_positions"], "eot_ids": [info["eot"]],
               "suppress_ids": [info["eot"]]}
    log_path = Path(triton.log_path)
    before = log_path.read_text(errors="replace").count("window cancelled by its client")

    async def hang_up():
        client = triton_aio.InferenceServerClient(triton.grpc_url)
        forever = asyncio.Event()

        async def request():
            yield {"model_name": "search", "inputs": _inputs(json.dumps(endless).encode()),
                   "outputs": [triton_aio.InferRequestedOutput("result")]}
            await forever.wait()

        responses = client.stream_infer(request())
        reader = asyncio.ensure_future(responses.__anext__())
        await asyncio.sleep(1.0)  # the window is searching (or waiting for its turn)
        assert not reader.done(), "an endless window answered"
        responses.cancel()
        reader.cancel()
        await client.close()

    asyncio.run(hang_up())
    deadline = time.monotonic() + 60
    while log_path.read_text(errors="replace").count("window cancelled by its client") <= before:
        assert time.monotonic() < deadline, "the search model never stopped the cancelled window"
        time.sleep(0.2)
