"""Released cache buffers (flat arrays) for reuse."""
import numpy as np

HEADROOM = 4  # a new buffer gets 1/HEADROOM extra elements (25%)


class BufferPool:
    """Released cache buffers (flat arrays) for reuse.

    Fresh memory is expensive (page faults on first touch: tens of ms per 100 MB, far more in a
    VM), and every beam-search step builds a new cache slab, so buffers are recycled: get()
    takes the smallest free buffer that is large enough, and new buffers get 25% headroom so a
    cache that grows by a few positions still fits next time. At most max_bytes are kept; the
    oldest released buffers go first.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.free = []
        self.bytes = 0

    def get(self, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape))
        dtype = np.dtype(dtype)
        best = -1
        for i, buf in enumerate(self.free):
            if buf.dtype == dtype and buf.size >= n and (best < 0 or buf.size < self.free[best].size):
                best = i
        if best >= 0:
            buf = self.free.pop(best)
            self.bytes -= buf.nbytes
        else:
            buf = np.empty(n + n // HEADROOM, dtype)
        return buf[:n].reshape(shape)

    def put(self, arr: np.ndarray) -> None:
        # a view handed out by get(): return the whole underlying buffer
        while isinstance(arr.base, np.ndarray) and arr.base.dtype == arr.dtype and arr.base.flags.c_contiguous:
            arr = arr.base
        if not arr.flags.c_contiguous or not arr.flags.writeable or arr.nbytes > self.max_bytes:
            return
        self.free.append(arr.reshape(-1))
        self.bytes += arr.nbytes
        while self.bytes > self.max_bytes and self.free:
            self.bytes -= self.free.pop(0).nbytes

    def clear(self) -> None:
        """Give every kept buffer back to the allocator (the decoder is idle)."""
        self.free.clear()
        self.bytes = 0
