"""glm_asr family (GLM-ASR-Nano): no cross-attention; the step graph runs on embeddings.

Every step embeds its ids with embed_tokens.onnx; in a START step the positions holding the
audio placeholder (`audio_token_id` parameter) get the rows of encoder_output (the audio
embeddings, one per placeholder, in order).
"""
import os

import numpy as np

from ..config import param
from ..errors import RequestError
from ..kv_cache import CAP_STEP, Slab
from ..session import ORT_TYPES, make_session
from .base import ModelLoadError, StepRunner


class GlmAsrRunner(StepRunner):
    family = "glm_asr"
    graphs = {"encoder": ["encoder.onnx"], "decoder": ["embed_tokens.onnx", "decoder_step.onnx"]}
    token_input = "inputs_embeds"
    has_cross = False

    @classmethod
    def render_parameters(cls, info: dict) -> dict:
        if info.get("audio_token_id") is None:
            raise ValueError("model_info.json of a glm_asr model lacks audio_token_id (re-run the export)")
        return {"decoder": {"embed_onnx_file": "embed_tokens.onnx", "audio_token_id": str(int(info["audio_token_id"]))}}

    def __init__(self, version_dir: str, config: dict, logger):
        self.embed_session = make_session(
            os.path.join(version_dir, param(config, "embed_onnx_file", "embed_tokens.onnx")), config, logger)
        self.audio_token_id = int(param(config, "audio_token_id", "-1"))
        if self.audio_token_id < 0:
            raise ModelLoadError("a glm_asr decoder needs the audio_token_id parameter")
        super().__init__(version_dir, config, logger)
        self.embeds_dtype = ORT_TYPES.get(self.step_inputs["inputs_embeds"].type, np.float32)

    def start(self, starts, fail):
        """The audio embeddings enter with the prompt (see embed): only check the placeholders.
        A bad START fails alone (it still runs, uncommitted, with its batch)."""
        for q in starts:
            counts = (q.ids[0] == self.audio_token_id).sum(axis=1)
            if counts.min() != counts.max() or int(counts[0]) != q.enc.shape[1]:
                fail(q, RequestError(f"the START prompt holds {counts.tolist()} audio placeholders (id "
                                     f"{self.audio_token_id}) per beam for {q.enc.shape[1]} audio embeddings"))
        return None

    def token_feeds(self, slots, ids: np.ndarray, fail) -> dict:
        return {"inputs_embeds": self.embed(slots, ids, fail)}

    def embed(self, slots, ids: np.ndarray, fail) -> np.ndarray:
        """inputs_embeds [N, K, T, D] of ids [N, K, T]; in the rows of START steps the audio
        placeholders get that step's audio embeddings (counted in start)."""
        (emb,) = self.embed_session.run(["inputs_embeds"], {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})
        if emb.dtype != self.embeds_dtype or not emb.flags.writeable:
            emb = emb.astype(self.embeds_dtype)
        for n, q in enumerate(slots):
            if q is not None and q.start and q.error is None:
                audio = q.enc[0].astype(emb.dtype, copy=False)  # [A, D]
                if audio.shape[-1] != emb.shape[-1]:
                    fail(q, RequestError(f"encoder_output has width {audio.shape[-1]}, the decoder embeds "
                                         f"to {emb.shape[-1]}"))
                    continue
                mask = q.ids[0] == self.audio_token_id  # [K, T], A per row
                emb[n][mask] = np.broadcast_to(audio, (mask.shape[0],) + audio.shape).reshape(-1, audio.shape[-1])
        return emb

    def warmup_feeds(self):
        L, H, dh = self.kv_dims
        zeros = np.zeros((L, 1, 1, H, CAP_STEP, dh), self.kv_dtype)
        past = Slab(zeros, zeros, CAP_STEP)
        return self.feeds([None], np.zeros((1, 1, 1), np.int64), np.zeros(1, np.int64), past, None, None)

    def close(self) -> None:
        super().close()
        self.embed_session = None
