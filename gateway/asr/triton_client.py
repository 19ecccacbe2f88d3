"""Talks to the Triton `encoder` and stateful `decoder` models (docs/INTERFACES.md).

Everything that crosses the wire per decoder step is token ids, beam parents and a few
log-probabilities; the KV cache stays inside Triton.

Request ids: while the gateway serves an RPC, :func:`tag_request` names it, and every Triton
request made for it carries ``<request id>-w<window>-enc`` (encoder), ``-w<window>-s<step>``
(decoder steps), ``-w<window>-end`` (the END), ``-w<window>-lang-s0`` (language detection),
``-w<window>-a<n>-...`` (the window again on another replica), so Triton's verbose log
(``[request id: ...]``) and traces join the gateway's request log.

Scale-out: :class:`TritonReplicas` spreads work over several Tritons serving the same models.
A decoder sequence is stateful (its KV cache lives in one server), so a session stays on the
replica that started it; new encodes and sessions go to the ready replica with the fewest in
flight (round robin among equals); a replica that fails or stops answering health is skipped
until it is ready again.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from gateway.asr.decoding import DecodingResult, StepOutput
from gateway.asr.profiling import client_profile

log = logging.getLogger("gateway.triton")

ENCODER_MODEL = "encoder"
DECODER_MODEL = "decoder"
SEARCH_MODEL = "search"  # whole-window beam search in the server (model_repository/search/)
# a window's search waits for other windows' steps too: its deadline is this many step deadlines
SEARCH_TIMEOUT_STEPS = 10
SEARCH_RECHECK_S = 30.0  # a server without the search model is asked again this often
_RESULT_FIELDS = set(DecodingResult.__dataclass_fields__)  # the search model's answer may say more
# gRPC status codes that mean "Triton is not there right now" rather than "bad request".
_UNAVAILABLE_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")
# ... and messages that say so with another code or none: a stopping Triton unloads its models and
# answers requests that come meanwhile with "Request for unknown model: 'encoder' has no
# available versions" (a retry after it is back succeeds); a search stream's error carries only
# its message: the search model writes "search: unavailable: ..." for its UNAVAILABLE errors (its
# encoder call on a stopping server among them: "... Error when running inference: Server not ready")
_UNAVAILABLE_MESSAGES = ("failed to connect", "has no available versions", "server is stopping", "server is not ready",
                         "search: unavailable: ")


class TritonUnavailableError(RuntimeError):
    """Triton cannot be reached or its models are not ready."""


class TritonInferenceError(RuntimeError):
    """Triton answered a request with an error."""


def _translate(error: InferenceServerException, what: str) -> Exception:
    status = str(error.status() or "")
    message = error.message() or str(error)
    if any(code in status for code in _UNAVAILABLE_STATUSES) or any(m in message.lower() for m in _UNAVAILABLE_MESSAGES):
        return TritonUnavailableError(f"Triton unavailable during {what}: {message}")
    return TritonInferenceError(f"Triton {what} failed: {message}")


@dataclass
class RequestTag:
    """The gateway's id of the RPC being served; its windows are numbered in decode order."""

    request_id: str
    _windows: itertools.count = field(default_factory=itertools.count, repr=False)

    def window(self) -> str:
        return f"{self.request_id}-w{next(self._windows)}"


# Set per RPC by the gateway; tasks started while serving it (windows, stream decodes) inherit it.
CURRENT_REQUEST: contextvars.ContextVar[RequestTag | None] = contextvars.ContextVar("asr_request", default=None)
MAX_REQUEST_ID_CHARS = 64  # as the gateway's request log (gateway.service.metrics)


def tag_request(request_id: str) -> RequestTag:
    """Name the RPC this task (and every task it starts from now on) serves."""
    tag = RequestTag(request_id[:MAX_REQUEST_ID_CHARS])
    CURRENT_REQUEST.set(tag)
    return tag


def window_tag() -> str:
    """``<request id>-w<n>`` for the next window of the current RPC; "" outside one."""
    tag = CURRENT_REQUEST.get()
    return tag.window() if tag is not None and tag.request_id else ""


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
        self.ready = True  # last health poll answered, and no request found it unreachable since
        self.in_flight = 0  # encodes and decoder sessions open on this server
        self.search_model = SEARCH_MODEL
        self._has_search: bool | None = None  # None: not asked yet
        self._search_hotwords = False  # ... and it searches hotword-biased windows too
        self._search_features = False  # ... and encodes a window's features itself (input_features)
        self._search_asked = 0.0

    def _failed(self, error: InferenceServerException, what: str) -> Exception:
        translated = _translate(error, what)
        if isinstance(translated, TritonUnavailableError) and self.ready:
            self.ready = False  # skipped by TritonReplicas until its next good health poll
            log.warning("triton %s: unavailable during %s: not ready, skipped until it answers health", self.url, what)
        return translated

    async def close(self) -> None:
        await self._client.close()

    async def models_ready(self) -> bool:
        """True when the server and both models answer ready; False on any failure (kept in ``ready``)."""
        self.ready = await self._models_ready()
        return self.ready

    async def _models_ready(self) -> bool:
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

    async def encode(self, features: np.ndarray, *, request_id: str = "") -> np.ndarray:
        """log-mel [n_mels, n_frames] -> encoder output [S, d]."""
        batch = np.ascontiguousarray(features[np.newaxis], dtype=np.float32)
        profile, started = client_profile(), time.perf_counter()
        self.in_flight += 1
        try:
            result = await self._client.infer(
                self.encoder_model,
                [_tensor("input_features", batch, "FP32")],
                outputs=[triton_grpc.InferRequestedOutput("encoder_output")],
                client_timeout=self.request_timeout_s,
                request_id=request_id,
            )
        except InferenceServerException as error:
            raise self._failed(error, "encoder inference") from error
        finally:
            self.in_flight -= 1
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
        request_id: str = "",
    ) -> TritonDecoderSession:
        """``timestamp_rules`` = (timestamp_begin, no_timestamps id, max initial timestamp index, eot id):
        the decoder applies Whisper's timestamp rules to this sequence (docs/INTERFACES.md).
        ``request_id``: Triton request ids of the steps are ``<request_id>-s<step>``, the END's ``-end``."""
        return TritonDecoderSession(
            self, encoder_output, suppress_ids or [], begin_suppress_ids or [], timestamp_rules=timestamp_rules,
            request_id=request_id,
        )

    async def _decoder_infer(self, inputs, sequence_id: int, start: bool, end: bool, request_id: str = ""):
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
                request_id=request_id,
            )
        except InferenceServerException as error:
            raise self._failed(error, "decoder step") from error
        if profile is not None:
            profile.add("decoder_end" if end else "decoder", time.perf_counter() - started)
        return result

    async def has_search(self, hotwords: bool = False, features: bool = False) -> bool:
        """True when this server serves the `search` model (``hotwords``: and searches
        hotword-biased windows too, its config parameter ``hotwords``; ``features``: and takes a
        window's log-mel features, its input ``input_features``): a yes is kept, a no is asked
        again after SEARCH_RECHECK_S (a model still loading, or loaded later)."""
        now = time.monotonic()
        if self._has_search is None or (not self._has_search and now - self._search_asked >= SEARCH_RECHECK_S):
            self._search_asked = now
            try:
                self._has_search = bool(await self._client.is_model_ready(self.search_model, client_timeout=2.0))
                if self._has_search:
                    config = await self._client.get_model_config(self.search_model, as_json=True, client_timeout=5.0)
                    parameters = config["config"].get("parameters", {})
                    self._search_hotwords = parameters.get("hotwords", {}).get("string_value") == "1"
                    self._search_features = any(i.get("name") == "input_features" for i in config["config"].get("input", []))
            except InferenceServerException:
                self._has_search = None  # not answering now: asked again next time
                return False
        return bool(self._has_search) and (self._search_hotwords or not hotwords) and (self._search_features or not features)

    async def search(self, window: np.ndarray, options: dict, *, request_id: str = "", features: bool = False) -> DecodingResult:
        """One window's whole beam search in the server: its encoder output [S, d], or with
        ``features`` its log-mel features [n_mels, frames] (the server encodes them: the encoder
        output then never leaves Triton), and the search options (``prompt``, ``beam_size``,
        ``eot_ids``, ``max_length``, ``max_new_tokens``, ``suppress_ids``, ``begin_suppress_ids``,
        ``timestamp_rules``, ``audio_tokens``, ...) -> the best hypothesis. The model is
        decoupled: one gRPC stream per window, one response on it."""
        name = "input_features" if features else "encoder_output"
        inputs = [
            _tensor(name, np.ascontiguousarray(window, dtype=np.float32)[np.newaxis], "FP32"),
            _tensor("options", np.array([[json.dumps(options).encode("utf-8")]], dtype=np.object_), "BYTES"),
        ]

        async def request():
            # one request, then the client's half of the stream closes: Triton keeps the stream
            # open until the window's answer is sent, and the request's copies of the window
            # (the InferInput's and the message's) are freed now, not when the answer comes
            yield {"model_name": self.search_model, "inputs": inputs, "request_id": request_id,
                   "outputs": [triton_grpc.InferRequestedOutput("result")]}
            inputs.clear()

        profile, started = client_profile(), time.perf_counter()
        self.in_flight += 1
        try:
            responses = self._client.stream_infer(request(), stream_timeout=SEARCH_TIMEOUT_STEPS * self.request_timeout_s)
            async for result, error in responses:
                if error is not None:
                    raise self._failed(error, "search")
                raw = result.as_numpy("result").reshape(-1)[0]
                break
            else:
                raise TritonUnavailableError("Triton search: the stream ended without an answer")
        except InferenceServerException as error:
            raise self._failed(error, "search") from error
        except grpc.RpcError as error:  # the stream itself broke (server gone): its status as is
            status = error.code().name if callable(getattr(error, "code", None)) else ""
            details = error.details() if callable(getattr(error, "details", None)) else str(error)
            raise self._failed(InferenceServerException(details, status=f"StatusCode.{status}"), "search") from error
        finally:
            self.in_flight -= 1
        fields = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        if profile is not None:
            profile.add("search", time.perf_counter() - started)
            profile.add("search_round_steps", float(fields.get("mean_round_steps", 1.0)))  # a mean, not seconds
        return DecodingResult(**{k: v for k, v in fields.items() if k in _RESULT_FIELDS})

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
        request_id: str = "",
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
        self._request_id = request_id
        self._steps = 0
        self._released = False
        client.in_flight += 1  # until close(): the sequence's steps all go to this server

    def _step_id(self, suffix: str) -> str:
        return f"{self._request_id}-{suffix}" if self._request_id else ""

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
        step_id = self._step_id(f"s{self._steps}")
        self._steps += 1
        result = await self._client._decoder_infer(inputs, self.sequence_id, start=start, end=False, request_id=step_id)
        extra = result.as_numpy("extra_logprobs")
        return StepOutput(
            topk_logprobs=result.as_numpy("topk_logprobs")[0],
            topk_ids=result.as_numpy("topk_ids")[0].astype(np.int64),
            extra_logprobs=extra[0] if extra is not None else np.zeros((ids.shape[1], 0), np.float32),
        )

    async def close(self) -> None:
        """Free the sequence's cache in Triton (an END request with zero beams)."""
        if not self._released:
            self._released = True
            self._client.in_flight -= 1
        if not self._started or self._ended:
            return
        self._ended = True
        empty = np.zeros((1, 0, 1), dtype=np.int64)
        try:
            await self._client._decoder_infer(
                [_tensor("input_ids", empty, "INT64")], self.sequence_id, start=False, end=True,
                request_id=self._step_id("end"),
            )
        except (TritonUnavailableError, TritonInferenceError):
            # Triton evicts idle sequences by itself; a failed END only delays that.
            pass


def _model_of(deployed: DeployedModel) -> tuple[str, str]:
    """What must agree between replicas (their parameters may differ: paths, sizes)."""
    return deployed.family, deployed.model_name


class TritonReplicas:
    """Several Tritons serving the same models, with TritonAsrClient's interface (module doc).

    ``models_ready`` polls every replica (the gateway's health watcher calls it each second)
    and is True while any is ready; a replica that comes back is checked to serve the model the
    others serve before it gets work again."""

    def __init__(self, urls: list[str] | str, **client_options) -> None:
        urls = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
        if not urls:
            raise ValueError("at least one Triton URL is needed")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a Triton URL is given twice: {', '.join(urls)}")
        self.replicas = [TritonAsrClient(url, **client_options) for url in urls]
        self._turn = itertools.count()
        self._deployed: DeployedModel | None = None  # what the first checked replica serves

    @property
    def url(self) -> str:
        return ", ".join(replica.url for replica in self.replicas)

    def any_ready(self) -> bool:
        return any(replica.ready for replica in self.replicas)

    def pick(self) -> TritonAsrClient:
        """The ready replica with the fewest encodes and sessions in flight, round robin among
        equals (all of them when none is ready: the request then fails as Triton unavailable)."""
        ready = [replica for replica in self.replicas if replica.ready] or self.replicas
        turn = next(self._turn) % len(ready)
        return min(ready[turn:] + ready[:turn], key=lambda replica: replica.in_flight)

    async def models_ready(self) -> bool:
        was = [replica.ready for replica in self.replicas]
        states = await asyncio.gather(*(replica._models_ready() for replica in self.replicas))
        for replica, before, now in zip(self.replicas, was, states):
            if now and not before and self._deployed is not None:
                now = await self._same_model(replica)
            replica.ready = now
            if now != before and len(self.replicas) > 1:
                log.info("triton %s: %s", replica.url, "ready" if now else "not ready, skipped")
        return any(replica.ready for replica in self.replicas)

    async def _same_model(self, replica: TritonAsrClient) -> bool:
        try:
            deployed = await replica.deployed_model()
        except (TritonUnavailableError, TritonInferenceError):
            return False
        if _model_of(deployed) != _model_of(self._deployed):
            log.error("triton %s serves %s, the other replicas %s: skipped", replica.url, _model_of(deployed), _model_of(self._deployed))
            return False
        return True

    async def deployed_model(self) -> DeployedModel:
        """What the ready replicas serve; they must all serve the same model."""
        ready = [replica for replica in self.replicas if replica.ready] or self.replicas[:1]
        models = await asyncio.gather(*(replica.deployed_model() for replica in ready))
        if any(_model_of(model) != _model_of(models[0]) for model in models):
            described = "; ".join(f"{r.url}: {m.model_name} ({m.family})" for r, m in zip(ready, models))
            raise TritonInferenceError(f"the Triton replicas serve different models: {described}")
        self._deployed = models[0]
        return models[0]

    async def encode(self, features: np.ndarray, *, request_id: str = "") -> np.ndarray:
        return await self.pick().encode(features, request_id=request_id)

    def decoder_session(self, encoder_output: np.ndarray, **options) -> TritonDecoderSession:
        """A session on one replica: all its steps and its END go there."""
        return self.pick().decoder_session(encoder_output, **options)

    async def has_search(self, hotwords: bool = False, features: bool = False) -> bool:
        """Every replica serves the `search` model (a window may go to any of them)."""
        return all(await asyncio.gather(*(replica.has_search(hotwords, features) for replica in self.replicas)))

    async def search(self, window: np.ndarray, options: dict, *, request_id: str = "", features: bool = False) -> DecodingResult:
        return await self.pick().search(window, options, request_id=request_id, features=features)

    async def inference_statistics(self) -> dict:
        return {replica.url: await replica.inference_statistics() for replica in self.replicas}

    async def close(self) -> None:
        await asyncio.gather(*(replica.close() for replica in self.replicas))
