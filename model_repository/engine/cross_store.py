"""Cross-attention K/V of every live sequence (whisper): one row each of every cross tensor.

The cross tensors are what decoder_init returns, each [L, R, ...] with one row per sequence on
axis 1: cross_k, cross_v f32 [L, R, H, S, dh] (fp32 graphs), or the 8-bit variant's cross_k u8
[L, R, H, dh, S], cross_k_scale, cross_v u8, cross_v_scale (export/cross_int8.py). The store
does not care which: it keeps them by name and the step graph takes the same names.

Live sequences occupy rows [0, n) (freeing a row moves the last row into the hole), so a group
of sequences with consecutive rows is fed to the per-layer graph inputs as views, no copy.
"""
import numpy as np

from .errors import RequestError

MIN_ROWS = 4  # rows of a new store
DIMS_FROM = "cross_v"  # [L, R, H, S, dh] in every variant: the (L, H, dh) the store reports


class CrossStore:
    def __init__(self, max_sequences: int):
        self.max_sequences = max_sequences
        self.arrays = None  # {name: [L, rows, ...]}, None while empty
        self.owner = []  # row r belongs to owner[r] (a Sequence)

    @property
    def empty(self) -> bool:
        return self.arrays is None

    @property
    def dims(self):
        """(L, H, dh) of the stored K/V, or None while empty."""
        if self.arrays is None:
            return None
        v = self.arrays[DIMS_FROM]
        return v.shape[0], v.shape[2], v.shape[4]

    def add(self, seqs, cross: dict) -> None:
        """Rows for `seqs` holding cross {name: [L, len(seqs), ...]}; sets each seq.row."""
        n, add = len(self.owner), len(seqs)
        if self.arrays is not None:
            have = {name: a.shape[2:] for name, a in self.arrays.items()}
            got = {name: a.shape[2:] for name, a in cross.items()}
            if have != got:
                raise RequestError(f"encoder_output gives cross K/V {self._describe(got)}, the live sequences "
                                   f"have {self._describe(have)}")
        capacity = 0 if self.arrays is None else next(iter(self.arrays.values())).shape[1]
        if n + add > capacity:  # grow (rarely: the store is kept, see free)
            self._resize(max(n + add, min(2 * capacity, self.max_sequences), MIN_ROWS), cross)
        for j, seq in enumerate(seqs):
            seq.row = n + j
            self.owner.append(seq)
        for name, array in self.arrays.items():
            array[:, n:n + add] = cross[name]

    @staticmethod
    def _describe(shapes: dict) -> str:
        return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())

    def _resize(self, capacity: int, like: dict) -> None:
        n = len(self.owner)
        grown = {}
        for name, a in like.items():
            grown[name] = np.empty((a.shape[0], capacity) + a.shape[2:], a.dtype)
            if n:
                grown[name][:, :n] = self.arrays[name][:, :n]
        self.arrays = grown

    def free(self, seq) -> None:
        """Free a sequence's row: the last live row moves into the hole (rows stay [0, n)).

        The store itself is kept (its pages are already faulted in) until the decoder has been
        idle (see clear)."""
        r = seq.row
        if r is None:
            return
        seq.row = None
        last = len(self.owner) - 1
        if r != last:
            moved = self.owner[last]
            for array in self.arrays.values():
                array[:, r] = array[:, last]
            self.owner[r] = moved
            moved.row = r
        self.owner.pop()

    def clear(self) -> None:
        """Give the memory back (no live sequence)."""
        self.arrays = None

    def rows(self, seqs, contiguous: bool, pool) -> dict:
        """Cross tensors {name: [L, N, ...]} of consecutive rows from seqs[0].row as views when
        `contiguous` (N = len(seqs); None entries are dummy rows), else the rows of the seqs
        copied together into pooled buffers (give them back with pool.put)."""
        if contiguous:
            a = next(s.row for s in seqs if s is not None)
            b = a + len(seqs)
            return {name: array[:, a:b] for name, array in self.arrays.items()}  # per layer: contiguous
        rows = [s.row for s in seqs]
        out = {}
        for name, array in self.arrays.items():
            out[name] = pool.get((array.shape[0], len(rows)) + array.shape[2:], array.dtype)
            np.take(array, rows, axis=1, out=out[name], mode="clip")
        return out
