"""glibc heap settings that keep the server's resident memory near what it is using.

Two behaviours of glibc's malloc cost lmscope resident memory it no longer uses:

- Its mmap threshold adapts: after a big block allocated by mmap is freed, blocks up to that size come from
  the heap instead, and a freed block inside the heap stays resident. The front end passes big answers
  through in 1 MiB pieces (`service/worker.py`): with the adaptive threshold each piece's buffers stay in
  some thread's heap; a fixed threshold (`settle_front_end`) returns them at once. Measured on SmolLM2's
  session (scripts/bench_session.py): front-end peak 82 -> 75 MB, resting 73 -> 66 MB. The workers keep the
  adaptive threshold: their numpy temporaries of a few MiB would otherwise be mapped and faulted in afresh
  each time, which made the lens reduction 1.2-2x slower.
- Free pages inside the heap are not returned until the top of the heap is free. A worker calls
  `return_free_memory` (`malloc_trim`) after each job, so that its peak is its resting size plus its largest
  job, not the sum of what earlier jobs left scattered in the heap (measured on SmolLM2: a worker's heap had
  grown to 112 MB over a lens, nearest tokens and an unembed).

Elsewhere than glibc (macOS, musl) these are no-ops.
"""
from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3
FRONT_END_MMAP_THRESHOLD = 256 << 10

try:
    _LIBC = ctypes.CDLL(None)
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):
    _LIBC = None


def settle_front_end() -> None:
    """A fixed mmap threshold for the front end: blocks from 256 KiB up go back to the system when freed."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, FRONT_END_MMAP_THRESHOLD)


def return_free_memory() -> None:
    """Give the heap's free pages back to the system (after a worker's job)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
