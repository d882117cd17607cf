"""Products with a weight matrix as it is stored in the GGUF file, computed by llama.cpp's own ggml kernels.

Why. The vocabulary-wide math (logit lens, `Unembed`, nearest tokens) multiplies float32 rows by the LM
head or the embedding table, the largest matrix of a small model. A float32 copy costs 4 bytes per weight
(Gemma 3 270M: 262,144 x 640 = 671 MB in every worker; a Llama-3-8B head 2.1 GB); the file stores it in
0.5-1 byte per weight and is already memory-mapped (`gguf_index`). Here a one-node ggml graph,
`ggml_mul_mat(W, X)`, whose W is a tensor header pointing into the mapping (no copy, no allocation), is
computed with ggml's CPU backend, a vocabulary chunk at a time.

Arithmetic. It is the arithmetic of the model's own output layer on the CPU backend: the rows X are
converted to the weight type's `vec_dot_type` (Q8_0 blocks of 32 with an F16 scale for Q4_0/Q5_0/Q8_0,
Q8_1 for Q4_1/Q5_1, Q8_K blocks of 256 for k-quants, F16 for F16 weights, nothing for F32) and the dot
products accumulate in float32, so the lens's last layer repeats llama.cpp's logits (measured in
docs/performance.md) rather than an exact float64 product of the dequantized weights.

Only W's pages for the rows touched are read; the float32 block produced is (n_rows, chunk), sized by the
caller's memory budget (`service/weights.py`).
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import ggml
from .gguf_index import IndexedTensor

_base = ggml.load_library("ggml-base")
_cpu = ggml.load_library("ggml-cpu")

GGML_TYPE_I32 = 26
# In a no_alloc context only the tensor headers and the graph live in ggml's memory: 3 tensors + graph.
_CONTEXT_TENSORS = 4
_OFFSET_DATA = 248  # struct ggml_tensor.data (checked against ggml_get_data on first use)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _ComputePlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


def _bind(lib, name, argtypes, restype):
    function = getattr(lib, name)
    function.argtypes, function.restype = argtypes, restype
    return function


_void_p, _i64, _size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
_init = _bind(_base, "ggml_init", [_InitParams], _void_p)
_free = _bind(_base, "ggml_free", [_void_p], None)
_new_tensor_2d = _bind(_base, "ggml_new_tensor_2d", [_void_p, ctypes.c_int, _i64, _i64], _void_p)
_mul_mat = _bind(_base, "ggml_mul_mat", [_void_p, _void_p, _void_p], _void_p)
_new_graph = _bind(_base, "ggml_new_graph", [_void_p], _void_p)
_build_forward = _bind(_base, "ggml_build_forward_expand", [_void_p, _void_p], None)
_get_data = _bind(_base, "ggml_get_data", [_void_p], _void_p)
_tensor_overhead = _bind(_base, "ggml_tensor_overhead", [], _size)
_graph_overhead = _bind(_base, "ggml_graph_overhead", [], _size)
_row_size = _bind(_base, "ggml_row_size", [ctypes.c_int, _i64], _size)
_type_traits = _bind(_base, "ggml_get_type_traits", [ctypes.c_int], ctypes.POINTER(_TypeTraits))
_graph_plan = _bind(_cpu, "ggml_graph_plan", [_void_p, ctypes.c_int, _void_p], _ComputePlan)
_graph_compute = _bind(_cpu, "ggml_graph_compute", [_void_p, ctypes.POINTER(_ComputePlan)], ctypes.c_int)

_CONTEXT_BYTES = _CONTEXT_TENSORS * _tensor_overhead() + _graph_overhead()
_layout_checked = False


def _set_data(tensor: int, address: int) -> None:
    global _layout_checked
    ctypes.c_void_p.from_address(tensor + _OFFSET_DATA).value = address
    if not _layout_checked:
        if _get_data(tensor) != address:
            raise RuntimeError("ggml_tensor.data is not at the expected offset: the ggml build changed its layout")
        _layout_checked = True


class StoredMatrix:
    """A 2-D GGUF tensor (numpy rows = ggml's ne[1]) as stored, for row-chunked products and dequantization.

    products(x, start, stop): x (n, n_cols) float32 -> x @ W[start:stop].T as (n, stop - start) float32.
    `dequantized_rows` counts rows expanded to float32 (tests use it to show no whole copy is ever made).
    """

    def __init__(self, tensor: IndexedTensor, n_threads: int):
        if len(tensor.shape) != 2:
            raise ValueError(f"{tensor.name} is not a matrix")
        self.name = tensor.name
        self.ggml_type = int(tensor.tensor_type)
        self.n_cols, self.n_rows = (int(d) for d in tensor.shape)
        self.row_bytes = _row_size(self.ggml_type, self.n_cols)
        self.raw = tensor.data.reshape(self.n_rows, -1)  # a view of the mapping: one stored row per numpy row
        if self.raw.shape[1] * self.raw.itemsize != self.row_bytes:
            raise ValueError(f"{tensor.name}: stored rows of {self.raw.shape[1] * self.raw.itemsize} bytes, "
                             f"ggml expects {self.row_bytes}")
        self.n_threads = max(1, n_threads)
        self.dequantized_rows = 0
        self._work = np.empty(0, np.uint8)

    def products(self, x: np.ndarray, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        return self._products(self.raw[start:stop], x, out)

    def products_of_rows(self, x: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """x @ W[row_ids].T (n, len(row_ids)) with the same kernels: the few stored rows are gathered first."""
        return self._products(np.ascontiguousarray(self.raw[np.asarray(row_ids, dtype=np.int64)]), x, None)

    def _products(self, raw_rows: np.ndarray, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, m = x.shape[0], raw_rows.shape[0]
        if x.shape[1] != self.n_cols:
            raise ValueError(f"rows of length {x.shape[1]} cannot multiply {self.name} (rows of {self.n_cols})")
        if out is None:
            out = np.empty((n, m), np.float32)
        if n == 0 or m == 0:
            return out
        assert out.shape == (n, m) and out.dtype == np.float32 and out.flags.c_contiguous
        assert raw_rows.flags.c_contiguous
        context = _init(_InitParams(_CONTEXT_BYTES, None, True))
        if not context:
            raise MemoryError("ggml_init failed")
        try:
            weight = _new_tensor_2d(context, self.ggml_type, self.n_cols, m)
            rows = _new_tensor_2d(context, ggml.GGML_TYPE_F32, self.n_cols, n)
            product = _mul_mat(context, weight, rows)  # ne = [m, n]: numpy (n, m)
            _set_data(weight, raw_rows.ctypes.data)
            _set_data(rows, x.ctypes.data)
            _set_data(product, out.ctypes.data)
            graph = _new_graph(context)
            _build_forward(graph, product)
            plan = _graph_plan(graph, self.n_threads, None)
            if plan.work_size > self._work.nbytes:
                self._work = np.empty(plan.work_size, np.uint8)
            plan.work_data = self._work.ctypes.data if plan.work_size else None
            status = _graph_compute(graph, ctypes.byref(plan))
            if status != 0:
                raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        finally:
            _free(context)
        return out

    def dequantize(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (n, n_cols), by ggml's own `to_float` for the type."""
        out = np.empty((stop - start, self.n_cols), np.float32)
        block = np.ascontiguousarray(self.raw[start:stop])
        if self.ggml_type == ggml.GGML_TYPE_F32:
            out[:] = block.view(np.float32).reshape(out.shape)
        else:
            to_float = _TO_FLOAT(_type_traits(self.ggml_type).contents.to_float)
            to_float(block.ctypes.data, out.ctypes.data, out.size)
        self.dequantized_rows += stop - start
        return out
