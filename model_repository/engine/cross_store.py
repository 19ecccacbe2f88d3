"""Cross-attention K/V of every live sequence (whisper): one row each of [L, R, H, S, dh].

Live sequences occupy rows [0, n) (freeing a row moves the last row into the hole), so a group
of sequences with consecutive rows is fed to the per-layer graph inputs as views, no copy.
"""
import numpy as np

from .errors import RequestError

MIN_ROWS = 4  # rows of a new store


class CrossStore:
    def __init__(self, max_sequences: int):
        self.max_sequences = max_sequences
        self.k = self.v = None
        self.owner = []  # row r belongs to owner[r] (a Sequence)

    @property
    def dims(self):
        """(L, H, dh) of the stored K/V, or None while empty."""
        return None if self.k is None else (self.k.shape[0], self.k.shape[2], self.k.shape[4])

    def add(self, seqs, ck: np.ndarray, cv: np.ndarray) -> None:
        """Rows for `seqs` holding ck/cv [L, len(seqs), H, S, dh]; sets each seq.row."""
        n, add = len(self.owner), len(seqs)
        if self.k is not None and self.k.shape[2:] != ck.shape[2:]:
            raise RequestError(f"encoder_output gives cross K/V {list(ck.shape[2:])}, the live sequences have "
                               f"{list(self.k.shape[2:])}")
        capacity = 0 if self.k is None else self.k.shape[1]
        if n + add > capacity:  # grow (rarely: the store is kept, see free)
            self._resize(max(n + add, min(2 * capacity, self.max_sequences), MIN_ROWS), ck)
        for j, seq in enumerate(seqs):
            seq.row = n + j
            self.owner.append(seq)
        self.k[:, n:n + add] = ck
        self.v[:, n:n + add] = cv

    def _resize(self, capacity: int, like: np.ndarray) -> None:
        n = len(self.owner)
        shape = (like.shape[0], capacity) + like.shape[2:]
        new_k, new_v = np.empty(shape, like.dtype), np.empty(shape, like.dtype)
        if n:
            new_k[:, :n] = self.k[:, :n]
            new_v[:, :n] = self.v[:, :n]
        self.k, self.v = new_k, new_v

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
            self.k[:, r] = self.k[:, last]
            self.v[:, r] = self.v[:, last]
            self.owner[r] = moved
            moved.row = r
        self.owner.pop()

    def clear(self) -> None:
        """Give the memory back (no live sequence)."""
        self.k = self.v = None

    def rows(self, seqs, contiguous: bool, pool):
        """Cross K/V [L, N, H, S, dh] of consecutive rows from seqs[0].row as views when
        `contiguous` (N = len(seqs); None entries are dummy rows), else the rows of the seqs
        copied together into pooled buffers (give them back with pool.put)."""
        if contiguous:
            a = next(s.row for s in seqs if s is not None)
            b = a + len(seqs)
            return self.k[:, a:b], self.v[:, a:b]  # per layer: contiguous views
        rows = [s.row for s in seqs]
        shape = (self.k.shape[0], len(rows)) + self.k.shape[2:]
        ck, cv = pool.get(shape, self.k.dtype), pool.get(shape, self.k.dtype)
        np.take(self.k, rows, axis=1, out=ck, mode="clip")
        np.take(self.v, rows, axis=1, out=cv, mode="clip")
        return ck, cv
