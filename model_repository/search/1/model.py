"""Triton Python-backend model `search`: a whole window's beam search inside the server.

Decoupled: execute() hands each request (one window: its input_features, encoded here by the
`encoder` model through BLS, or its encoder_output; plus a JSON of search options) to
engine/search.py's BatchedSearch and returns; the window's one response
(a JSON of the best hypothesis, or an error) is sent from the search loop's thread when it is
done. Windows that search at the same time share every decoder_step call (continuous
batching), with no round trip per token. A window may bring hotwords (options ``hotwords``: the
gateway's scorer as data, rebuilt by engine/search_hotwords.py over the deployed tokenizer.json
when the config parameter ``hotwords`` is 1). The decoder graphs are the decoder model's; the
stepwise `decoder` model stays for language detection and gateways run with --stepwise-only.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _root in (_HERE, os.path.dirname(os.path.dirname(_HERE))):  # deployed, source tree
    if os.path.isfile(os.path.join(_root, "engine", "__init__.py")):
        if _root not in sys.path:
            sys.path.insert(0, _root)
        break

from engine.bootstrap import add_pylib, numpy_warning  # noqa: E402

_PYLIB = add_pylib(os.path.join(os.path.dirname(_HERE), "config.pbtxt"))

import dataclasses  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from engine.responses import error_response  # noqa: E402
from engine.config import enabled, param  # noqa: E402
from engine.decoder import DecoderEngine  # noqa: E402
from engine.errors import INVALID_ARG, UNAVAILABLE, RequestError  # noqa: E402
from engine import beam_search  # noqa: E402  (the gateway's search, deployed here by render.py)
from engine.search import CANCEL_POLL_S, BatchedSearch, polled  # noqa: E402
from engine.search_hotwords import HotwordScorers  # noqa: E402

TOKENIZER_FILE = "tokenizer.json"  # deployed next to this file by render.py when hotwords are on

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error_response(message: str, code: str):
    """``search: <message>``; ``search: unavailable: <message>`` for UNAVAILABLE, since a gRPC stream
    response carries the message without the code and the gateway retries on that word (a
    stopping server, a full queue: gateway/asr/triton_client.py _UNAVAILABLE_MESSAGES)."""
    return error_response(pb_utils, f"search: {'unavailable: ' if code == UNAVAILABLE else ''}{message}", code)


def result_json(result) -> bytes:
    """The DecodingResult's fields (plain Python numbers from the search) plus mean_round_steps."""
    fields = dataclasses.asdict(result)
    fields["mean_round_steps"] = round(float(getattr(result, "mean_round_steps", 1.0)), 3)
    return json.dumps(fields).encode("utf-8")


def _cancelled(sender, poll_s: float):
    """sender.is_cancelled (a client that hung up: gRPC stream cancelled) where this backend has
    it, asked at most every poll_s (an IPC to the server: engine/search.py CANCEL_POLL_S)."""
    check = getattr(sender, "is_cancelled", None)
    if not callable(check):
        return None

    def cancelled() -> bool:
        try:
            return bool(check())
        except Exception:  # noqa: BLE001 - a backend that cannot tell: never cancelled
            return False

    return polled(cancelled, poll_s)


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        for note in numpy_warning(_PYLIB):
            self.logger.log_warn(note)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        try:
            self.engine = DecoderEngine(version_dir, config, self.logger, role="search")
        except Exception as error:  # the graphs do not fit: the model fails to load, saying why
            raise pb_utils.TritonModelException(f"search: {error}") from error
        self.scorers = None
        if enabled(config, "hotwords", "0"):
            try:
                from engine import hotwords  # the gateway's hotword module, deployed by render.py (needs zhconv)

                self.scorers = HotwordScorers(hotwords, os.path.join(version_dir, TOKENIZER_FILE))
                self.scorers.check()
            except Exception as error:  # the config promises hotwords: a stub that cannot has to say so
                raise pb_utils.TritonModelException(
                    f"search: hotwords are on but cannot be served ({type(error).__name__}: {error}); install "
                    "tokenizers and zhconv into the stub's pylib (tools/setup_triton.py) or render with "
                    "search_hotwords=0") from error
        self.encoder_model = param(config, "encoder_model", "encoder")
        self.engine.start_janitor()
        self.cancel_poll_s = int(param(config, "cancel_poll_ms", str(round(CANCEL_POLL_S * 1000)))) / 1000
        self.search = BatchedSearch(self.engine, beam_search, max_windows=int(param(config, "search_max_windows", "16")),
                                    max_waiting=int(param(config, "search_max_waiting", "256")), logger=self.logger,
                                    heap_trim_s=int(param(config, "heap_trim_ms", "0")) / 1000)
        self.logger.log_info(f"search ready: {self.search.max_windows} windows at once, "
                             f"{self.search.max_waiting} waiting at most, hotwords {'on' if self.scorers else 'off'}")

    async def _submit(self, request) -> None:
        sender = request.get_response_sender()

        def done(result, error):
            if error is not None:
                code = error.code if isinstance(error, RequestError) else "INTERNAL"
                message = str(error) if isinstance(error, RequestError) else f"search failed: {type(error).__name__}: {error}"
                sender.send(_error_response(message, code), flags=FINAL)
            else:
                out = np.array([result_json(result)], dtype=np.object_)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("result", out)]), flags=FINAL)

        try:
            features = pb_utils.get_input_tensor_by_name(request, "input_features")
            enc = pb_utils.get_input_tensor_by_name(request, "encoder_output")
            spec = pb_utils.get_input_tensor_by_name(request, "options")
            if (features is None) == (enc is None) or spec is None:
                raise RequestError("search requests need options (JSON) and either input_features [1, n_mels, frames] "
                                   "or encoder_output [1, S, d]")
            raw = spec.as_numpy().reshape(-1)
            if raw.size != 1:
                raise RequestError("options must hold one JSON document")
            text = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
            try:
                options = json.loads(text)
            except ValueError as error:
                raise RequestError(f"options is not JSON: {error}") from error
            if not isinstance(options, dict):
                raise RequestError("options must be a JSON object")
            scorer = None
            if options.get("hotwords") is not None:
                if self.scorers is None:
                    raise RequestError("this search model was rendered without hotwords (search_hotwords=0)")
                scorer = self.scorers.scorer(options["hotwords"])
            encoder_output = enc.as_numpy() if enc is not None else await self._encode(features.as_numpy(), options)
            job = self.search.job(encoder_output, options, done, cancelled=_cancelled(sender, self.cancel_poll_s),
                                  scorer=scorer)
        except RequestError as error:
            sender.send(_error_response(str(error), error.code or INVALID_ARG), flags=FINAL)
            return
        except Exception as error:  # noqa: BLE001 - reported to that request only
            sender.send(_error_response(f"{type(error).__name__}: {error}", "INTERNAL"), flags=FINAL)
            return
        self.search.submit(job)

    async def _encode(self, features: np.ndarray, options: dict) -> np.ndarray:
        """The window's encoder output [1, S, d], from the encoder model in this server (BLS): the
        output goes from the encoder's stub to this one without a round trip through the client.
        ``audio_tokens`` (options): the rows the decoder attends to (GLM-ASR: the window's own
        audio). Awaited: a blocking exec() held this stub's execute thread (and, measured, slowed
        the search loop) for each encoder run; the encoder's batcher also sees several windows."""
        tokens = options.get("audio_tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise RequestError(f"audio_tokens must be a positive integer, got {tokens!r}")
        request = pb_utils.InferenceRequest(model_name=self.encoder_model, requested_output_names=["encoder_output"],
                                            inputs=[pb_utils.Tensor("input_features", features)])
        response = await request.async_exec()
        if response.has_error():
            raise RequestError(f"encoder: {response.error().message()}", UNAVAILABLE)
        encoded = pb_utils.get_output_tensor_by_name(response, "encoder_output").as_numpy()
        return np.array(encoded[:, :tokens] if tokens is not None else encoded)  # its own copy, not the response's

    async def execute(self, requests):
        # a coroutine: the Python backend runs a decoupled model's execute() in the background on
        # its event loop, so a window waiting for its encoder output holds nothing else up
        for request in requests:
            await self._submit(request)
        return None

    def finalize(self):
        self.search.close()
        self.engine.close()
