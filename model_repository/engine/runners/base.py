"""The interface of a model family's step runner: what differs between families.

The engine (sequence state, cache slabs, batching plan, logit rules, top-k) is shared; a runner
turns a batch of steps into one decoder_step run: it prepares new sequences (START), builds the
token feeds of the step graph and runs it. A new family is one subclass registered in
runners/__init__.py; render.py reads the same class for the graphs and parameters it deploys.
"""
import os
import time

import numpy as np

from ..config import param
from ..layers import feed_layers, load_step_session
from ..session import ORT_TYPES

STEP_OUTPUTS = ["logits", "new_k", "new_v"]


class ModelLoadError(RuntimeError):
    """The graphs do not fit the decoder contract (the model fails to load)."""


class StepRunner:
    family = ""             # the config parameter `family` (model_info.json "family")
    # Triton model -> the ONNX files render.py deploys into its version folder
    graphs = {"encoder": ["encoder.onnx"], "decoder": ["decoder_step.onnx"]}
    token_input = "input_ids"   # the step graph's input for the new tokens
    has_cross = False           # the step graph takes cross-attention K/V (kept in a CrossStore)

    @classmethod
    def render_parameters(cls, info: dict) -> dict:
        """Extra config parameters per Triton model ({model: {key: value}}) from model_info.json;
        raises ValueError when `info` lacks what the family needs."""
        return {}

    def __init__(self, version_dir: str, config: dict, logger):
        self.config, self.logger = config, logger
        path = os.path.join(version_dir, param(config, "step_onnx_file", "decoder_step.onnx"))
        self.step_session, self.split = load_step_session(path, config, logger)
        self.step_inputs = {i.name: i for i in self.step_session.get_inputs()}
        # the step graph's cross tensors by stacked name ("cross_k", not "cross_k.0"), and whether
        # their rows can be fed as views of the store (every one taken per layer)
        self.cross_inputs = {name.split(".")[0] for name in self.step_inputs if name.startswith("cross_")}
        self.cross_views = bool(self.cross_inputs) and all(name in self.split for name in self.cross_inputs)
        stacked = ("past_k", "past_v") + (("cross_k", "cross_v") if self.has_cross else ())
        expected = {self.token_input, "past_length"} | {n + ".0" if n in self.split else n for n in stacked}
        missing = expected - set(self.step_inputs)
        if missing:
            raise ModelLoadError(f"decoder_step.onnx lacks inputs {sorted(missing)}")
        if "past_k" in self.split:
            meta = self.step_inputs["past_k.0"]
            shape = [self.split["past_k"], None, None, meta.shape[2], None, meta.shape[4]]
        else:
            meta = self.step_inputs["past_k"]
            shape = meta.shape  # [L, N, K, H, P, dh]
        self.kv_dtype = ORT_TYPES.get(meta.type, np.float32)
        # (L, H, dh) of the self-attention cache, None where the graph leaves them dynamic
        self.kv_dims = tuple(d if isinstance(d, int) and d > 0 else None for d in (shape[0], shape[3], shape[5]))

    def graph_vocab(self):
        """The vocabulary size from the step graph's static logits shape, or None."""
        dim = {o.name: o.shape for o in self.step_session.get_outputs()}.get("logits", [None])[-1]
        return dim if isinstance(dim, int) and dim > 0 else None

    # ------------------------------------------------------------------ per family
    def start(self, starts, fail):
        """Prepare the START steps of a group: returns their cross tensors {name: [L, n, ...]}
        for the store (cross_store.py), or None. Raising fails every start; fail(step, error) fails one."""
        return None

    def token_feeds(self, slots, ids: np.ndarray, fail) -> dict:
        """Feeds for the new tokens ids [N, K, T] of the slots (None = dummy row)."""
        raise NotImplementedError

    def warmup_feeds(self):
        """Feeds of a tiny step (past of CAP positions, one token), or None when the dims are unknown."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def feeds(self, slots, ids: np.ndarray, lengths: np.ndarray, past, cross, fail) -> dict:
        """All feeds of one decoder_step run; past: the slab (k, v), cross: {name: array} or None."""
        feeds = self.token_feeds(slots, ids, fail)
        feeds["past_length"] = lengths
        stacks = [("past_k", past.k), ("past_v", past.v)] + list((cross or {}).items())
        for name, array in stacks:
            feed_layers(feeds, self.split, name, array)
        return feeds

    def run(self, feeds: dict):
        """(logits [N, K, V], new_k, new_v [L, N, K, H, T, dh]) of one decoder_step run."""
        return self.step_session.run(STEP_OUTPUTS, feeds)

    def warmup(self) -> None:
        """One tiny run, so the first real request does not pay for the session's first run."""
        started = time.perf_counter()
        try:
            feeds = self.warmup_feeds()
            if feeds is None:
                return
            self.run(feeds)
            self.logger.log_info(f"decoder warm-up {1e3 * (time.perf_counter() - started):.0f} ms")
        except Exception as error:  # noqa: BLE001 - only a warm-up
            self.logger.log_warn(f"decoder warm-up failed: {error!r}")

    def close(self) -> None:
        self.step_session = None

