"""llama.cpp's log, kept so that a failure can say why.

llama.cpp reports why it could not load a model ("tensor 'blk.0.ffn_gate.weight' data is not within the file
bounds, model is corrupted or incomplete", "unknown model architecture: ...") only through its log
callback; the C function itself just returns NULL. This module installs a callback (replacing
llama-cpp-python's) that remembers the last warning and error lines and prints every line to stderr
when `LMSCOPE_LLAMA_VERBOSE` is set, so the engine can put the reason into the status the user sees.
"""
from __future__ import annotations

import collections
import ctypes
import os
import sys

from .native import llama as lc

_LEVEL_WARN = 3  # ggml.h enum ggml_log_level (llama-cpp-python's own table is off by one)
_LEVEL_ERROR = 4
_LEVEL_CONTINUE = 5
_VERBOSE = bool(os.environ.get("LMSCOPE_LLAMA_VERBOSE"))

_recent: collections.deque[str] = collections.deque(maxlen=8)
_last_level = 0


@lc.llama_log_callback
def _callback(level: int, text: bytes, _user_data) -> None:
    global _last_level
    try:
        line = text.decode("utf-8", "replace")
        if level != _LEVEL_CONTINUE:
            _last_level = level
        if _last_level in (_LEVEL_WARN, _LEVEL_ERROR) and line.strip():
            _recent.append(line.strip())
        if _VERBOSE:
            print(line, end="", file=sys.stderr, flush=True)
    except BaseException:  # noqa: BLE001 - an exception must not unwind through C
        pass


def install() -> None:
    lc.llama_log_set(_callback, ctypes.c_void_p(0))


def clear() -> None:
    _recent.clear()


def recent_problems() -> str:
    """The warning and error lines logged since `clear()` (the last few), in order: cause first."""
    return "; ".join(_recent)
