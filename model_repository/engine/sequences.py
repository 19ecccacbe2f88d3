"""The live sequences of a decoder: binding steps to them, END, idle eviction."""
import time

import numpy as np

from .cross_store import CrossStore
from .errors import NOT_FOUND, UNAVAILABLE, RequestError
from .heap import release_free_heap
from .kv_cache import release
from .state import Sequence


class SequenceTable:
    """Sequences by correlation id, with the memory they hold (cross rows, cache slabs)."""

    def __init__(self, settings, pool):
        self.settings = settings
        self.pool = pool
        self.seqs = {}
        self.cross = CrossStore(settings.max_sequences)
        self.pending_starts = 0      # STARTs bound in this round, not yet committed
        self.last_active = time.monotonic()
        self.evicted = []            # "cid (idle N s)" not yet logged

    def __len__(self) -> int:
        return len(self.seqs)

    def bind(self, step, now: float) -> None:
        """Attach the sequence state (new on START) to `step` and validate the step against it."""
        if step.start:
            self._bind_start(step, now)
            length = 0
        else:
            seq = self.seqs.get(step.cid)
            if seq is None and step.K == 0:
                return  # nothing to step and nothing to free (e.g. END after an eviction)
            if seq is None:
                raise RequestError(
                    f"sequence {step.cid} has no decoder state: it was not STARTed, already ENDed, or evicted "
                    f"after {self.settings.idle_timeout_s:g} s idle", code=NOT_FOUND)
            step.seq = seq
            length = seq.length
            if step.K == 0:
                return
            _check_parents(step, seq)
        limit = self.settings.max_positions
        if limit and length + step.T > limit:
            raise RequestError(f"sequence too long: {length} cached + {step.T} new tokens > "
                               f"max_target_positions {limit}")

    def _bind_start(self, step, now: float) -> None:
        existing = step.cid in self.seqs
        limit = self.settings.max_sequences
        if len(self.seqs) - int(existing) + self.pending_starts >= limit:
            raise RequestError(
                f"the decoder already holds {len(self.seqs)} sequences (max_sequences={limit}); "
                "END finished sequences or retry later", code=UNAVAILABLE)
        if step.K < 1:
            raise RequestError("the START request needs at least one beam (input_ids [1, K>=1, T])")
        if existing:  # restarting a sequence id: the old cache is gone
            self.drop(step.cid)
        step.seq = Sequence(step.cid, step.suppress, step.begin, now, step.ts_rules)
        self.pending_starts += 1

    def discard(self, seq) -> None:
        """Free what `seq` holds (its cross row and its share of a cache slab)."""
        self.cross.free(seq)
        release(seq.kv, self.pool)
        seq.kv = None

    def drop(self, cid) -> None:
        """END: forget the sequence (nothing happens for an unknown one)."""
        seq = self.seqs.pop(cid, None)
        if seq is not None:
            self.discard(seq)

    def drop_all(self) -> None:
        for cid in list(self.seqs):
            self.drop(cid)

    def evict_idle(self, now: float) -> None:
        """Drop sequences idle longer than the timeout; an idle decoder gives its memory back."""
        timeout = self.settings.idle_timeout_s
        for cid, seq in list(self.seqs.items()):
            if now - seq.last_used > timeout:
                self.evicted.append(f"{cid} (idle {now - seq.last_used:.0f} s)")
                self.drop(cid)
        if not self.seqs and now - self.last_active > timeout and (not self.cross.empty or self.pool.free):
            self.cross.clear()
            self.pool.clear()
            release_free_heap()  # the smaller buffers went to the C heap, not to the system


def _check_parents(step, seq) -> None:
    """parent_beams must index the cached beams; required when the beam count changes."""
    if step.parents is None:
        if step.K != seq.beams:
            raise RequestError(f"parent_beams is required when the beam count changes ({seq.beams} -> {step.K})")
        return
    if step.parents.size and (step.parents.min() < 0 or step.parents.max() >= seq.beams):
        raise RequestError(f"parent_beams must index the {seq.beams} cached beams, got {step.parents.tolist()}")
    if np.array_equal(step.parents, np.arange(seq.beams)):
        step.parents = None  # identity: lets the cache run in place
