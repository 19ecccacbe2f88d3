"""Per-sequence decoder state and one decoding step (one request) of a sequence."""
from .errors import INTERNAL


class Sequence:
    """What the decoder keeps per correlation id between steps."""
    __slots__ = ("cid", "row", "kv", "kv_idx", "length", "beams", "suppress",
                 "begin_suppress", "steps", "last_used", "ts_rules", "history", "ts_pending")

    def __init__(self, cid, suppress, begin_suppress, now: float, ts_rules=None):
        self.cid = cid
        self.row = None     # row of the cross-attention K/V store (whisper)
        self.kv = None      # self-attention cache slab (kv_cache.Slab) and row in it
        self.kv_idx = 0
        self.length = 0     # cached positions
        self.beams = 0      # cached beams K
        self.suppress = suppress
        self.begin_suppress = begin_suppress
        self.steps = 0      # committed steps
        self.last_used = now
        self.ts_rules = ts_rules  # logit_rules.TimestampRules or None
        self.history = None     # [K, n] tokens generated so far per beam (timestamp rules only)
        self.ts_pending = None  # (step, history) of a step not yet known to be committed


class Step:
    """One request: one decoding step of one sequence (all its K beams).

    Parsed by step_input.parse_step; the engine sets `seq`, then `output` (a StepOutput) or
    `error` + `code`."""
    __slots__ = ("index", "cid", "start", "end", "ids", "K", "T", "parents", "top_k", "extra", "enc",
                 "suppress", "begin", "seq", "output", "error", "code", "ts_rules")

    def __init__(self, index: int, cid=None, start: bool = False, end: bool = False):
        self.index = index
        self.cid = cid
        self.start, self.end = start, end
        self.ids = self.parents = self.extra = self.enc = self.suppress = self.begin = None
        self.K = self.T = 0
        self.top_k = 5
        self.seq = self.output = self.error = None
        self.code = INTERNAL
        self.ts_rules = None
