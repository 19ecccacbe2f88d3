"""Self-attention KV caches: slabs shared by the sequences that ran together.

A slab has the step graph's layout [L, N, K, H, cap, dh]: member n of a batch is row n of
axis 1. The same batch again runs on its slab in place (new tokens go into spare capacity),
each member's parent_beams reorder done in place too, copying only the beams whose parent is
another beam; otherwise (members joined or left, more beams, no room) one gather copy, with the
reorder folded in, builds the next slab from pooled buffers.
"""
import numpy as np

CAP_STEP = 16  # cache capacity grows in multiples of this many positions


class Slab:
    """K/V arrays shared by the sequences of one group: member n is row n of axis 1."""
    __slots__ = ("k", "v", "live", "cap")

    def __init__(self, k, v, cap=0):
        self.k, self.v, self.live, self.cap = k, v, 0, cap


def release(slab, pool) -> None:
    """One sequence less on `slab`; its buffers go back to the pool with the last one."""
    if slab is None:
        return
    slab.live -= 1
    if slab.live <= 0:
        if slab.k is not None:
            pool.put(slab.k)
            pool.put(slab.v)
        slab.k = slab.v = None


def reusable(slots, K: int, need: int, reorder: bool = True):
    """The slab the slots can run on in place (same sequences, same order, same beams, room for
    `need` positions; without ``reorder``, no beam reordered either), or None."""
    if any(q is None or q.start or (q.parents is not None and not reorder) for q in slots):
        return None
    slab = slots[0].seq.kv
    if (slab is None or slab.k.shape[1] != len(slots) or slab.k.shape[2] != K or slab.cap < need):
        return None
    if all(q.seq.kv is slab and q.seq.kv_idx == n for n, q in enumerate(slots)):
        return slab
    return None


def gather(slots, K: int, T: int, known_dims, cross_dims, dtype, pool, reorder_in_place: bool = True):
    """(slab, new): the past [L, N, K, H, cap, dh] for the slots (None = dummy row, empty past),
    each cache reordered by its parent_beams; `new` is False when the slots run in place.

    known_dims: (L, H, dh) of the step graph (None where dynamic); cross_dims: those of the
    cross-attention store or None (see cache_dims)."""
    members = [q for q in slots if q is not None]
    need = max(q.seq.length for q in members) + T
    slab = reusable(slots, K, need, reorder_in_place)
    if slab is not None:
        for n, q in enumerate(slots):
            if q.parents is not None:
                _reorder_in_place(slab, n, q.parents, q.seq.length)
        return slab, False
    cap = -(-need // CAP_STEP) * CAP_STEP
    L, H, dh = cache_dims(known_dims, members, cross_dims)
    shape = (L, len(slots), K, H, cap, dh)
    pk, pv = pool.get(shape, dtype), pool.get(shape, dtype)
    for n, q in enumerate(slots):
        p = q.seq.length if q is not None else 0
        if p:
            _copy_past(pk[:, n], pv[:, n], q.seq, q.parents, p)
        pk[:, n, :, :, p:] = 0
        pv[:, n, :, :, p:] = 0
    return Slab(pk, pv, cap), True


def _reorder_in_place(slab, n: int, parents: np.ndarray, p: int) -> None:
    """Beam k of member n takes the first p cached positions of beam parents[k]; only the beams
    whose parent is another beam are written (a beam search keeps most beams in place), and
    their sources are read first (the fancy index copies them), so a beam that is both source
    and destination is read before it is overwritten."""
    moved = np.flatnonzero(parents != np.arange(parents.size))
    if moved.size:
        sources = parents[moved]
        slab.k[:, n, moved, :, :p] = slab.k[:, n, sources, :, :p]
        slab.v[:, n, moved, :, :p] = slab.v[:, n, sources, :, :p]


def _copy_past(dst_k: np.ndarray, dst_v: np.ndarray, seq, parents, p: int) -> None:
    """The first p cached positions of `seq` into dst [L, K, H, cap, dh], beam k from parents[k]."""
    sk, sv, row = seq.kv.k, seq.kv.v, seq.kv_idx
    if parents is None:
        dst_k[:, :, :, :p] = sk[:, row, :, :, :p]
        dst_v[:, :, :, :p] = sv[:, row, :, :, :p]
        return
    for k_new, k_old in enumerate(parents.tolist()):
        dst_k[:, k_new, :, :p] = sk[:, row, k_old, :, :p]
        dst_v[:, k_new, :, :p] = sv[:, row, k_old, :, :p]


def cache_dims(known, members, cross_dims):
    """(L, H, dh) of the self-attention cache: the graph's static dims, else a member's cache,
    else the cross-attention store's (whisper: self- and cross-attention heads are equal)."""
    L, H, dh = known
    if L is not None and H is not None and dh is not None:
        return known
    src = next((q.seq.kv.k for q in members if q.seq.kv is not None), None)
    if src is not None:
        return src.shape[0], src.shape[3], src.shape[5]
    if cross_dims is None:
        raise RuntimeError("the decoder_step graph has dynamic K/V dims and nothing cached to take them from")
    return cross_dims
