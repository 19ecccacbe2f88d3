"""Which way a window goes from the gateway (gateway/asr/window_decoder.py): pure decoding logic
over a fake model interface, the real family of the exported model.

A search model that takes features gets them and encodes the window itself (the encoder output
never comes back to the gateway); the gateway asks the encoder when told to, when the language
must be detected first (the encoder output is then at hand), and for the stepwise search.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.asr.decoding import DecodingResult, StepOutput
from gateway.asr.families import load_family
from gateway.asr.features import N_SAMPLES
from gateway.asr.window_decoder import TritonWindowDecoder, WindowOptions


class FakeClient:
    """Records the calls; the search model takes features when ``takes_features``."""

    def __init__(self, takes_features: bool, frames: int = 1500, width: int = 8) -> None:
        self.takes_features = takes_features
        self.calls: list[tuple] = []
        self.encoder_output = np.ones((frames, width), np.float32)

    async def encode(self, features, **ids):
        self.calls.append(("encode", features.shape))
        return self.encoder_output

    async def has_search(self, hotwords: bool = False, features: bool = False) -> bool:
        return self.takes_features or not features

    async def search(self, window, options, *, request_id: str = "", features: bool = False):
        self.calls.append(("search", "features" if features else "encoder_output", window.shape,
                           options.get("audio_tokens")))
        return DecodingResult(tokens=[], sum_logprob=0.0, avg_logprob=0.0, token_logprobs=[], finished=True, score=0.0)


def _decode(client: FakeClient, model_dir, language: str | None = "zh", server_encode: bool = True):
    family = load_family(model_dir)
    decoder = TritonWindowDecoder(client, family, server_encode=server_encode)
    options = WindowOptions(language=language, task="transcribe", beam_size=5, timestamps=False, scorer=None,
                            max_biased_logprob=None)
    asyncio.run(decoder.decode_window(np.zeros(N_SAMPLES // 2, np.float32), options))
    return family


def test_a_search_model_that_takes_features_encodes_the_window_itself(model_dir):
    client = FakeClient(takes_features=True)
    family = _decode(client, model_dir)
    (call,) = client.calls  # no encode: the encoder output stays in the server
    assert call[:3] == ("search", "features", (family.n_mels, 2 * 1500))
    assert call[3] == family.n_audio_tokens(N_SAMPLES // 2)


@pytest.mark.parametrize("takes_features, server_encode", [(False, True), (True, False)])
def test_the_gateway_encodes_for_an_older_search_model_or_when_told_to(model_dir, takes_features, server_encode):
    client = FakeClient(takes_features=takes_features)
    _decode(client, model_dir, server_encode=server_encode)
    assert [c[0] for c in client.calls] == ["encode", "search"]
    assert client.calls[1][1:3] == ("encoder_output", client.encoder_output.shape)


def test_a_detected_language_reuses_the_encoder_output_it_was_detected_from(model_dir):
    client = FakeClient(takes_features=True)
    calls = []

    class Session:  # the language detection's one decoder step
        async def step(self, input_ids, parent_beams, top_k, extra_ids=None):
            calls.append("detect")
            n = extra_ids.shape[1]
            return StepOutput(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int64),
                              np.eye(1, n, 3, dtype=np.float32) - 1.0)

        async def close(self):
            pass

    client.decoder_session = lambda encoder_output, **ids: Session()
    _decode(client, model_dir, language=None)
    assert calls == ["detect"]
    assert [c[0] for c in client.calls] == ["encode", "search"] and client.calls[1][1] == "encoder_output"


def test_a_search_error_that_says_the_server_is_going_away_is_retryable():
    """A search stream's error carries its message only (no status code): the search model writes
    "search: unavailable: ..." (its encoder call on a stopping Triton among them) and the gateway
    reads it as Triton unavailable (the batch job retries); a bad request stays a failure."""
    from tritonclient.utils import InferenceServerException

    from gateway.asr.triton_client import TritonInferenceError, TritonUnavailableError, _translate

    going_away = ("search: unavailable: encoder: Model encoder - Error when running inference: Server not ready",
                  "search: unavailable: search: 256 windows already waiting; try again later")
    for message in going_away:
        assert isinstance(_translate(InferenceServerException(message), "search"), TritonUnavailableError), message
    bad_request = _translate(InferenceServerException("search: options is not JSON: Expecting value"), "search")
    assert isinstance(bad_request, TritonInferenceError) and not isinstance(bad_request, TritonUnavailableError)
