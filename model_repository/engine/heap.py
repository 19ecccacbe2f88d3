"""Handing the C heap's free pages back to the system.

glibc keeps freed allocations below its mmap threshold (which grows up to 32 MB as large blocks
are freed) mapped in the process, so they stay in its RSS: what a session load parsed and
dropped, a warm-up's activations, an encoder run's, an idle decoder's released caches.
malloc_trim(0) returns them (well under a millisecond when there is little to return).
"""
import ctypes
import ctypes.util

_trim = None  # libc's malloc_trim once looked up; False where there is none
# mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc malloc_trim; nothing elsewhere).

    Safe at any time, from any thread."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


def configure_heap(mmap_threshold_bytes: int = 0, arena_max: int = 0) -> list[str]:
    """Fix glibc's mmap threshold and cap its arenas (0: leave each as glibc has it); returns
    what was set, for the log. Call before the process starts its worker threads.

    A fixed threshold keeps every block of at least that size in its own mapping, handed back
    the moment it is freed; glibc's own threshold instead grows with the largest block freed
    (to 32 MB), after which such blocks come from the heap and stay there, fragmented among
    one arena per thread. For the search model's engine (caches and cross K/V of every window
    in flight, ONNX Runtime's threads) 16 MB and 2 arenas took about 200 MB off its peak on the
    10-minute recording, but in one run of two cost a quarter of the speed; 2 arenas alone took
    110-160 MB off the whole stack at the same speed (render.py heap_* tunables,
    bench/results/ab_heap_*.json). glibc only."""
    notes = []
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return ["no glibc mallopt: heap settings ignored"] if (mmap_threshold_bytes or arena_max) else []
    if mmap_threshold_bytes > 0 and mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_bytes)) == 1:
        notes.append(f"mmap threshold {mmap_threshold_bytes >> 20} MB")
    if arena_max > 0 and mallopt(M_ARENA_MAX, int(arena_max)) == 1:
        notes.append(f"{arena_max} malloc arenas")
    return notes
