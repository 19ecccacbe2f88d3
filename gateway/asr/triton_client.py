"""Talks to the Triton `encoder` and stateful `decoder` models (docs/INTERFACES.md).

Everything that crosses the wire per decoder step is token ids, beam parents and a few
log-probabilities; the KV cache stays inside Triton.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from gateway.asr.decoding import StepOutput
from gateway.asr.profiling import client_profile

ENCODER_MODEL = "encoder"
DECODER_MODEL = "decoder"
# gRPC status codes that mean "Triton is not there right now" rather than "bad request".
_UNAVAILABLE_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")


class TritonUnavailableError(RuntimeError):
    """Triton cannot be reached or its models are not ready."""


class TritonInferenceError(RuntimeError):
    """Triton answered a request with an error."""


def _translate(error: InferenceServerException, what: str) -> Exception:
    status = str(error.status() or "")
    message = error.message() or str(error)
    if any(code in status for code in _UNAVAILABLE_STATUSES) or "failed to connect" in message.lower():
        return TritonUnavailableError(f"Triton unavailable during {what}: {message}")
    return TritonInferenceError(f"Triton {what} failed: {message}")


def _tensor(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass(frozen=True)
class DeployedModel:
    """What the decoder's config.pbtxt says is deployed."""

    family: str
    model_name: str
    parameters: dict[str, str]


class TritonAsrClient:
    """Async client for the encoder/decoder pair served by one Triton."""

    def __init__(
        self,
        url: str,
        *,
        encoder_model: str = ENCODER_MODEL,
        decoder_model: str = DECODER_MODEL,
        request_timeout_s: float = 60.0,
    ) -> None:
        self.url = url
        self.encoder_model = encoder_model
        self.decoder_model = decoder_model
        self.request_timeout_s = request_timeout_s
        self._client = triton_grpc.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def models_ready(self) -> bool:
        """True when the server and both models answer ready; False on any failure."""
        try:
            if not await self._client.is_server_ready(client_timeout=2.0):
                return False
            for model in (self.encoder_model, self.decoder_model):
                if not await self._client.is_model_ready(model, client_timeout=2.0):
                    return False
            return True
        except Exception:  # noqa: BLE001 - any failure here just means "not ready"
            return False

    async def deployed_model(self) -> DeployedModel:
        try:
            config = await self._client.get_model_config(self.decoder_model, as_json=True, client_timeout=5.0)
        except InferenceServerException as error:
            raise _translate(error, "model config query") from error
        params = {key: value.get("string_value", "") for key, value in config["config"].get("parameters", {}).items()}
        return DeployedModel(family=params.get("family", ""), model_name=params.get("model_name", ""), parameters=params)

    async def encode(self, features: np.ndarray) -> np.ndarray:
        """log-mel [n_mels, n_frames] -> encoder output [S, d]."""
        batch = np.ascontiguousarray(features[np.newaxis], dtype=np.float32)
        profile, started = client_profile(), time.perf_counter()
        try:
            result = await self._client.infer(
                self.encoder_model,
                [_tensor("input_features", batch, "FP32")],
                outputs=[triton_grpc.InferRequestedOutput("encoder_output")],
                client_timeout=self.request_timeout_s,
            )
        except InferenceServerException as error:
            raise _translate(error, "encoder inference") from error
        if profile is not None:
            profile.add("encoder", time.perf_counter() - started)
        return result.as_numpy("encoder_output")[0]

    def decoder_session(
        self,
        encoder_output: np.ndarray,
        *,
        suppress_ids: list[int] | None = None,
        begin_suppress_ids: list[int] | None = None,
        timestamp_rules: tuple[int, int, int, int] | None = None,
    ) -> TritonDecoderSession:
        """``timestamp_rules`` = (timestamp_begin, no_timestamps id, max initial timestamp index, eot id):
        the decoder applies Whisper's timestamp rules to this sequence (docs/INTERFACES.md)."""
        return TritonDecoderSession(
            self, encoder_output, suppress_ids or [], begin_suppress_ids or [], timestamp_rules=timestamp_rules
        )

    async def _decoder_infer(self, inputs, sequence_id: int, start: bool, end: bool):
        outputs = [triton_grpc.InferRequestedOutput(name) for name in ("topk_logprobs", "topk_ids", "extra_logprobs")]
        profile, started = client_profile(), time.perf_counter()
        try:
            result = await self._client.infer(
                self.decoder_model,
                inputs,
                outputs=outputs,
                sequence_id=sequence_id,
                sequence_start=start,
                sequence_end=end,
                client_timeout=self.request_timeout_s,
            )
        except InferenceServerException as error:
            raise _translate(error, "decoder step") from error
        if profile is not None:
            profile.add("decoder_end" if end else "decoder", time.perf_counter() - started)
        return result

    async def inference_statistics(self) -> dict:
        stats = await self._client.get_inference_statistics(as_json=True)
        return json.loads(json.dumps(stats))


class TritonDecoderSession:
    """One decoding sequence (one audio window, all its beams) on the stateful decoder."""

    def __init__(
        self,
        client: TritonAsrClient,
        encoder_output: np.ndarray,
        suppress_ids: list[int],
        begin_suppress_ids: list[int],
        *,
        timestamp_rules: tuple[int, int, int, int] | None = None,
    ) -> None:
        self._client = client
        self._timestamp_rules = timestamp_rules
        self._encoder_output = encoder_output
        self._suppress_ids = suppress_ids
        self._begin_suppress_ids = begin_suppress_ids
        # Random 63-bit ids: several stateless gateway replicas share one Triton.
        self.sequence_id = random.getrandbits(63) or 1
        self._started = False
        self._ended = False

    async def step(
        self,
        input_ids: np.ndarray,
        parent_beams: np.ndarray | None,
        top_k: int,
        extra_ids: np.ndarray | None = None,
    ) -> StepOutput:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)[np.newaxis]
        inputs = [
            _tensor("input_ids", ids, "INT64"),
            _tensor("top_k", np.array([[top_k]], dtype=np.int32), "INT32"),
        ]
        start = not self._started
        if start:
            encoder_output = np.ascontiguousarray(self._encoder_output, dtype=np.float32)[np.newaxis]
            inputs.append(_tensor("encoder_output", encoder_output, "FP32"))
            if self._suppress_ids:
                inputs.append(_tensor("suppress_ids", np.array([self._suppress_ids], dtype=np.int32), "INT32"))
            if self._begin_suppress_ids:
                begin = np.array([self._begin_suppress_ids], dtype=np.int32)
                inputs.append(_tensor("begin_suppress_ids", begin, "INT32"))
            if self._timestamp_rules is not None:
                rules = np.array([self._timestamp_rules], dtype=np.int32)
                inputs.append(_tensor("timestamp_rules", rules, "INT32"))
        elif parent_beams is not None:
            parents = np.ascontiguousarray(parent_beams, dtype=np.int32)[np.newaxis]
            inputs.append(_tensor("parent_beams", parents, "INT32"))
        if extra_ids is not None and extra_ids.size:
            inputs.append(_tensor("extra_ids", np.ascontiguousarray(extra_ids, dtype=np.int32)[np.newaxis], "INT32"))
        # Marked started before the request goes out: a step cancelled in flight (a client that
        # hung up) must still END its sequence in close(), or its cache waits for idle eviction.
        # END for a sequence Triton never saw fails, and close() ignores that.
        self._started = True
        result = await self._client._decoder_infer(inputs, self.sequence_id, start=start, end=False)
        extra = result.as_numpy("extra_logprobs")
        return StepOutput(
            topk_logprobs=result.as_numpy("topk_logprobs")[0],
            topk_ids=result.as_numpy("topk_ids")[0].astype(np.int64),
            extra_logprobs=extra[0] if extra is not None else np.zeros((ids.shape[1], 0), np.float32),
        )

    async def close(self) -> None:
        """Free the sequence's cache in Triton (an END request with zero beams)."""
        if not self._started or self._ended:
            return
        self._ended = True
        empty = np.zeros((1, 0, 1), dtype=np.int64)
        try:
            await self._client._decoder_infer([_tensor("input_ids", empty, "INT64")], self.sequence_id, start=False, end=True)
        except (TritonUnavailableError, TritonInferenceError):
            # Triton evicts idle sequences by itself; a failed END only delays that.
            pass
