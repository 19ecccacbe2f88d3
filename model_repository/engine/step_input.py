"""A step's input tensors (numpy, batch dim of 1) -> a validated Step (docs/INTERFACES.md)."""
from typing import Mapping, Optional

import numpy as np

from .errors import RequestError
from .logit_rules import TimestampRules
from .state import Step

# the inputs a step may carry besides the START/END controls
INPUT_NAMES = ("input_ids", "encoder_output", "parent_beams", "suppress_ids", "begin_suppress_ids",
               "top_k", "extra_ids", "timestamp_rules")


def parse_step(step: Step, inputs: Mapping[str, np.ndarray], vocab: Optional[int], default_top_k: int) -> None:
    """Fill `step` from `inputs` ({name: array}, absent inputs missing); raises RequestError."""
    if step.cid in (None, 0, ""):
        raise RequestError("decoder requests need a sequence (correlation) id")
    _token_ids(step, inputs.get("input_ids"), vocab)
    _top_k(step, inputs.get("top_k"), vocab, default_top_k)
    arr = inputs.get("parent_beams")
    if arr is not None:
        if arr.ndim != 2 or arr.shape[0] != 1 or arr.shape[1] != step.K:
            raise RequestError(f"parent_beams must be [1, K={step.K}], got {list(arr.shape)}")
        step.parents = arr.reshape(-1).astype(np.int64)
    _extra_ids(step, inputs.get("extra_ids"), vocab)
    if step.start:
        enc = inputs.get("encoder_output")
        if enc is None:
            raise RequestError("the START request of a sequence needs encoder_output [1, S, d]")
        if enc.ndim != 3 or enc.shape[0] != 1:
            raise RequestError(f"encoder_output must be [1, S, d], got {list(enc.shape)}")
        step.enc = enc
        step.suppress = _id_list(inputs.get("suppress_ids"), "suppress_ids", vocab)
        step.begin = _id_list(inputs.get("begin_suppress_ids"), "begin_suppress_ids", vocab)
        rules = inputs.get("timestamp_rules")
        step.ts_rules = None if rules is None else TimestampRules.parse(rules, vocab)


def _token_ids(step: Step, ids: Optional[np.ndarray], vocab: Optional[int]) -> None:
    if ids is None:
        raise RequestError("input_ids is required")
    if ids.ndim != 3 or ids.shape[0] != 1:
        raise RequestError(f"input_ids must be [1, K, T], got {list(ids.shape)}")
    step.K, step.T = int(ids.shape[1]), int(ids.shape[2])
    if step.K > 0 and step.T < 1:
        raise RequestError("input_ids must hold at least one new token per beam (T >= 1)")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab and hi >= vocab):
            raise RequestError(f"input_ids must be token ids in [0, {vocab}), got values in [{lo}, {hi}]")
    step.ids = ids


def _top_k(step: Step, arr: Optional[np.ndarray], vocab: Optional[int], default_top_k: int) -> None:
    if arr is not None:
        if arr.size != 1:
            raise RequestError(f"top_k must be [1, 1], got {list(arr.shape)}")
        step.top_k = int(arr.reshape(-1)[0])
    else:
        step.top_k = default_top_k
    if step.top_k < 1:
        raise RequestError(f"top_k must be >= 1, got {step.top_k}")
    if vocab:
        step.top_k = min(step.top_k, vocab)


def _extra_ids(step: Step, arr: Optional[np.ndarray], vocab: Optional[int]) -> None:
    if arr is None:
        return
    if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[1] != step.K:
        raise RequestError(f"extra_ids must be [1, K={step.K}, E], got {list(arr.shape)}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -1 or (vocab and hi >= vocab):
            raise RequestError(f"extra_ids must be token ids in [0, {vocab}) or -1, got [{lo}, {hi}]")
    step.extra = arr[0].astype(np.int64)


def _id_list(arr: Optional[np.ndarray], name: str, vocab: Optional[int]) -> Optional[np.ndarray]:
    """Sorted unique ids of a [1, M] input, None when absent or empty."""
    if arr is None:
        return None
    if arr.ndim != 2 or arr.shape[0] != 1:
        raise RequestError(f"{name} must be [1, M], got {list(arr.shape)}")
    if arr.size == 0:
        return None
    ids = np.unique(arr.astype(np.int64))
    if ids[0] < 0 or (vocab and ids[-1] >= vocab):
        raise RequestError(f"{name} must be token ids in [0, {vocab})")
    return ids
