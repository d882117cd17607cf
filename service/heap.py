"""glibc heap settings that keep the server's resident memory near what it is using, without making it slow.

Two behaviours of glibc's malloc cost lmscope resident memory it no longer uses:

- Its mmap threshold adapts: after a big block allocated by mmap is freed, blocks up to that size come from
  the heap instead, and a freed block inside the heap stays resident. The front end passes big answers
  through in `PIECE_BYTES` pieces (`service/worker.py`), each copied on its way to gRPC (read from the
  worker, its encoded message, gRPC's own copy). The front end fixes the threshold (`settle_front_end`)
  just above those buffers, and gives the heap's free pages back after each answer (`return_free_memory`
  in `servicer._tensor_answer`): the copies reuse the heap's pages during an answer, and what they took
  goes back after it. A fixed threshold below the pieces' size had each copy mapped and faulted in afresh:
  the protobuf path of 128 MiB (before `encoded_run_chunks`) took 379-533 ms instead of 233-368 ms, and a
  Gemma 3 `unembed` of 128 vectors 1.28-1.60 s instead of 1.15-1.19 s (front-end peak +1-2 MB; the adaptive
  threshold had the SmolLM2 session's at 82 MB, 73 at rest). Figures and commands: CHANGELOG.md, 2026-11-30,
  "Third pass". The trim threshold stays glibc's: a higher one was faster still, but glibc keeps that much
  free memory in every thread's arena, beyond `malloc_trim`'s reach.
- Free pages inside the heap are not returned until the top of the heap is free. A worker calls
  `return_free_memory` (`malloc_trim`) after each job, so that its peak is its resting size plus its largest
  job, not the sum of what earlier jobs left scattered in the heap (measured on SmolLM2: a worker's heap had
  grown to 112 MB over a lens, nearest tokens and an unembed). The workers keep the adaptive threshold: their
  numpy temporaries of a few MiB would otherwise be mapped and faulted in afresh each time, which made the
  lens reduction 1.2-2x slower.

Elsewhere than glibc (macOS, musl) these are no-ops.
"""
from __future__ import annotations

import ctypes

from .contracts import PIECE_BYTES

_M_MMAP_THRESHOLD = -3
FRONT_END_MMAP_THRESHOLD = 2 * PIECE_BYTES  # above a piece and its copies (their few bytes of header)

try:
    _LIBC = ctypes.CDLL(None)
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):
    _LIBC = None


def settle_front_end() -> None:
    """A fixed mmap threshold for the front end: blocks bigger than an answer's pieces are mapped, and go back to
    the system when freed."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, FRONT_END_MMAP_THRESHOLD)


def return_free_memory() -> None:
    """Give the heap's free pages back to the system (after a worker's job, after the front end's answer)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
