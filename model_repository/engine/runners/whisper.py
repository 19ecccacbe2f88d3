"""Whisper family: cross-attention K/V from decoder_init.onnx at START, token ids into the step graph."""
import os

import numpy as np

from ..config import enabled, input_dims, param
from ..errors import RequestError
from ..kv_cache import CAP_STEP, Slab
from ..session import make_session
from .base import ModelLoadError, StepRunner


class WhisperRunner(StepRunner):
    family = "whisper"
    graphs = {"encoder": ["encoder.onnx"], "decoder": ["decoder_init.onnx", "decoder_step.onnx"]}
    token_input = "input_ids"
    has_cross = True

    def __init__(self, version_dir: str, config: dict, logger):
        # decoder_init without the CPU arena (`init_cpu_mem_arena` 0): its output, 37 MB of cross
        # K/V per sequence (9 MB in the 8-bit int8 variant), is copied into the CrossStore at once;
        # an arena would keep the largest START batch's worth for good (4 STARTs: +350 MB), where
        # a fresh allocation costs a few ms
        arena = enabled(config, "cpu_mem_arena") and enabled(config, "init_cpu_mem_arena", "0")
        self.init_session = make_session(
            os.path.join(version_dir, param(config, "init_onnx_file", "decoder_init.onnx")), config, logger,
            cpu_mem_arena=arena)
        init_inputs = [i.name for i in self.init_session.get_inputs()]
        self.init_input = "encoder_output" if "encoder_output" in init_inputs else init_inputs[0]
        self.init_outputs = [o.name for o in self.init_session.get_outputs()]
        super().__init__(version_dir, config, logger)  # the step graph must take cross_k and cross_v
        if set(self.init_outputs) != self.cross_inputs:
            raise ModelLoadError(f"decoder_init.onnx returns {sorted(self.init_outputs)} but decoder_step.onnx takes "
                                 f"{sorted(self.cross_inputs)}: the two graphs are not from one export variant")

    def cross_kv(self, enc: np.ndarray) -> dict:
        """The cross tensors {name: [L, B, ...]} of encoder_output [B, S, d]: every output of
        decoder_init (cross_k, cross_v f32 [L, B, H, S, dh], or the 8-bit variant's four)."""
        arrays = self.init_session.run(self.init_outputs, {self.init_input: np.ascontiguousarray(enc, dtype=np.float32)})
        return dict(zip(self.init_outputs, arrays))

    def start(self, starts, fail):
        """Cross K/V for the new sequences: one decoder_init run over all their encoder outputs."""
        shapes = {q.enc.shape[1:] for q in starts}
        if len(shapes) != 1:
            raise RequestError(f"encoder_output shapes differ within one batch: {sorted(shapes)}")
        enc = starts[0].enc if len(starts) == 1 else np.concatenate([q.enc for q in starts], axis=0)
        return self.cross_kv(enc)

    def token_feeds(self, slots, ids: np.ndarray, fail) -> dict:
        return {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}

    def warmup_feeds(self):
        dims = input_dims(self.config, "encoder_output") or []
        if len(dims) != 2 or min(dims) <= 0:
            return None
        cross = self.cross_kv(np.zeros([1] + dims, np.float32))
        v = cross["cross_v"]  # [L, 1, H, S, dh] in every variant
        L, H, dh = self.kv_dims
        L, H, dh = L or v.shape[0], H or v.shape[2], dh or v.shape[4]
        zeros = np.zeros((L, 1, 1, H, CAP_STEP, dh), self.kv_dtype)
        past = Slab(zeros, zeros, CAP_STEP)
        return self.feeds([None], np.zeros((1, 1, 1), np.int64), np.zeros(1, np.int64), past, cross, None)

    def close(self) -> None:
        super().close()
        self.init_session = None

