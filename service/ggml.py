"""ctypes access to ggml tensors inside llama.cpp's eval callback.

llama-cpp-python binds llama.h but no ggml functions, so the few we need come from the
`libggml-base.so.0` that `libllama` itself links against (loading another copy of the library would map a
second, independent ggml). The callback receives a raw `struct ggml_tensor *`; its name and op are read
straight from the struct (fixed offsets, checked against `ggml_get_name` / `ggml_op_name` when the library
is loaded, so a layout change fails loudly instead of reading garbage), because the callback runs for every
graph node and must be cheap: the name is read with `from_address` on a fixed-size char array, about 5x
cheaper than `ctypes.string_at` (a foreign call), which made the callback's ~940 calls per decoded ubatch
cost ~6 % of each generated token on SmolLM2 (callgrind instruction counts).
"""
from __future__ import annotations

import ctypes

import numpy as np

MAX_DIMS = 4
_OFFSET_TYPE = 0
_OFFSET_NE = 16
_OFFSET_NB = 48
_OFFSET_OP = 80
_OFFSET_SRC = 152   # struct ggml_tensor * src[GGML_MAX_SRC], after op (80), op_params (64 bytes) and flags
_OFFSET_NAME = 256
GGML_MAX_NAME = 64
TENSOR_STRUCT_SIZE = 336

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


def load_library(stem: str) -> ctypes.CDLL:
    """`libggml-base`, `libggml-cpu`, ...: the copy llama.cpp itself links against (the `.so.0` soname first), or for
    `ggml-cpu` in a build with CPU variants, the variant llama.cpp loaded."""
    from .native import CPU_LIBRARY
    from .native import LIBRARY_DIR as lib_dir
    if stem == "ggml-cpu" and CPU_LIBRARY is not None:
        return ctypes.CDLL(str(CPU_LIBRARY))
    for name in (f"lib{stem}.so.0", f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        path = lib_dir / name
        if path.exists():
            return ctypes.CDLL(str(path))
    raise OSError(f"lib{stem} not found in {lib_dir}")


_lib = load_library("ggml-base")
_lib.ggml_get_name.argtypes = [ctypes.c_void_p]
_lib.ggml_get_name.restype = ctypes.c_char_p
_lib.ggml_op_name.argtypes = [ctypes.c_int]
_lib.ggml_op_name.restype = ctypes.c_char_p
_lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
_lib.ggml_nbytes.restype = ctypes.c_size_t
_lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
_lib.ggml_is_contiguous.restype = ctypes.c_bool
_lib.ggml_type_name.argtypes = [ctypes.c_int]
_lib.ggml_type_name.restype = ctypes.c_char_p
_lib.ggml_tensor_overhead.argtypes = []
_lib.ggml_tensor_overhead.restype = ctypes.c_size_t
_lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_lib.ggml_backend_tensor_get.restype = None
_lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_lib.ggml_backend_tensor_set.restype = None


def _op_codes() -> dict[str, int]:
    codes = {}
    for code in range(512):
        name = _lib.ggml_op_name(code)
        if not name or name in (b"", b"(null)"):
            break
        codes[name.decode()] = code
        if name == b"COUNT":
            break
    return codes


OP_CODES = _op_codes()


_NAME_FIELD = ctypes.c_char * GGML_MAX_NAME


def name_of(tensor: int) -> bytes:
    return _NAME_FIELD.from_address(tensor + _OFFSET_NAME).value


def op_of(tensor: int) -> int:
    return ctypes.c_int.from_address(tensor + _OFFSET_OP).value


_SOURCES = ctypes.c_void_p * 2


def sources_of(tensor: int) -> tuple[int | None, int | None]:
    """The node's first two operands (src[0], src[1]) as addresses; None where absent."""
    return tuple(_SOURCES.from_address(tensor + _OFFSET_SRC))


def type_of(tensor: int) -> int:
    return ctypes.c_int.from_address(tensor + _OFFSET_TYPE).value


def shape_of(tensor: int) -> tuple[int, int, int, int]:
    """ggml's `ne`: innermost dimension first."""
    return tuple((ctypes.c_int64 * MAX_DIMS).from_address(tensor + _OFFSET_NE))


def type_name(ggml_type: int) -> str:
    return _lib.ggml_type_name(ggml_type).decode()


def is_contiguous(tensor: int) -> bool:
    return bool(_lib.ggml_is_contiguous(tensor))


def read(tensor: int, out: np.ndarray, offset: int = 0) -> None:
    """Copy bytes [offset, offset + out.nbytes) of the tensor's data into the C-contiguous array `out`."""
    _lib.ggml_backend_tensor_get(tensor, out.ctypes.data, offset, out.nbytes)


def write(tensor: int, data: np.ndarray, offset: int = 0) -> None:
    """Overwrite bytes of the tensor's data with the C-contiguous array `data`."""
    _lib.ggml_backend_tensor_set(tensor, data.ctypes.data, offset, data.nbytes)


def check_layout(tensor: int) -> None:
    """Fail loudly if the struct offsets above no longer match this ggml build."""
    if _lib.ggml_tensor_overhead() < TENSOR_STRUCT_SIZE:
        raise RuntimeError("ggml_tensor is smaller than expected: the ggml build changed its struct layout")
    if _lib.ggml_get_name(tensor) != name_of(tensor):
        raise RuntimeError("ggml_tensor.name is not at the expected offset: the ggml build changed its layout")
    nbytes = _lib.ggml_nbytes(tensor)
    ne = shape_of(tensor)
    element = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2}.get(type_of(tensor))
    if element is not None and is_contiguous(tensor) and nbytes != element * int(np.prod(ne)):
        raise RuntimeError("ggml_tensor.ne/type are not at the expected offsets: the ggml build changed its layout")
