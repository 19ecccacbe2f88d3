"""Handing the C heap's free pages back to the system.

glibc keeps freed allocations below its mmap threshold (which grows up to 32 MB as large blocks
are freed) mapped in the process, so they stay in its RSS: what a session load parsed and
dropped, a warm-up's activations, an encoder run's, an idle decoder's released caches.
malloc_trim(0) returns them (well under a millisecond when there is little to return).
"""
import ctypes
import ctypes.util

_trim = None  # libc's malloc_trim once looked up; False where there is none


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
