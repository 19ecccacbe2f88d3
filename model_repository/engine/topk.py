"""Top-k of every row of a [R, V] array, for vocabularies of tens of thousands of ids."""
import numpy as np

BLOCK = 64  # columns folded into one block maximum by the fast path


def topk_rows(x: np.ndarray, k: int):
    """Top-k (ids, values) of every row of x [R, V], sorted best first (ties: lower id first on
    the fast path; in partition order on the general one).

    Faster than argpartition over the vocabulary: a threshold from strided block maxima keeps
    only a handful of candidates per row, which are then sorted.
    """
    rows, vocab = x.shape
    k = min(k, vocab)
    found = _topk_by_block_maxima(x, k)
    if found is not None:
        return found
    # general path (NaNs, huge k, ...)
    if k < vocab:
        part = np.argpartition(x, vocab - k, axis=1)[:, vocab - k:]
    else:
        part = np.broadcast_to(np.arange(vocab), x.shape)
    vals = np.take_along_axis(x, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


def _topk_by_block_maxima(x: np.ndarray, k: int):
    """The fast path of topk_rows, or None where it does not apply (small vocabulary, large k,
    too many ties at the threshold, NaNs)."""
    rows, vocab = x.shape
    nb = vocab // BLOCK
    if k * 4 > nb or rows == 0:
        return None
    bm = x[:, :nb * BLOCK].reshape(rows, BLOCK, nb).max(axis=1)
    if vocab % BLOCK:
        bm = np.concatenate([bm, x[:, nb * BLOCK:].max(axis=1, keepdims=True)], axis=1)
    # the k-th largest block maximum: every row has at least k values >= it
    thr = np.partition(bm, bm.shape[1] - k, axis=1)[:, bm.shape[1] - k]
    flat = np.flatnonzero(x >= thr[:, None])
    r = flat // vocab
    counts = np.bincount(r, minlength=rows)
    if counts.min() < k or flat.size > BLOCK * k * rows + 4096:
        return None
    cols = flat - r * vocab
    vals = x.reshape(-1)[flat]
    order = np.lexsort((-vals, r))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = starts[:, None] + np.arange(k)
    return cols[order][idx], vals[order][idx]
