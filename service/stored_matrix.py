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
from .gguf_index import IndexedTensor, release_pages
from .native import CPU_VARIANT

_base = ggml.load_library("ggml-base")
_cpu = ggml.load_library("ggml-cpu")

GGML_TYPE_BF16 = 30
# How the vec_dot types' blocks decode (ggml-common.h): Q8_0 {f16 d; i8 qs[32]}, Q8_1 {f16 d, s; i8 qs[32]},
# Q8_K {f32 d; i8 qs[256]; i16 bsums[16]}; a value is d * q.
_Q8_BLOCKS = {
    8: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    9: np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)]),
    15: np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]),
}
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
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _CpuTypeTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


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
_cpu_type_traits = _bind(_cpu, "ggml_get_type_traits_cpu", [ctypes.c_int], ctypes.POINTER(_CpuTypeTraits))
_graph_plan = _bind(_cpu, "ggml_graph_plan", [_void_p, ctypes.c_int, _void_p], _ComputePlan)
_graph_compute = _bind(_cpu, "ggml_graph_compute", [_void_p, ctypes.POINTER(_ComputePlan)], ctypes.c_int)

BLAS_MIN_ROWS = 64  # from this many rows on, chunks are dequantized and multiplied by BLAS (`Multiplier`)
# Weight types that the CPU variants built with AVX512-VNNI (VL, BW) multiply with patches/0008's kernel, which
# is faster on many rows than BLAS on dequantized chunks: Gemma 3's Q8_0 head times the 2,432 rows of a lens,
# 2.4 against 3.3 s (`scripts/diag_memory.py head`). Other variants and types keep BLAS for many rows.
VNNI_KERNEL_TYPES = frozenset({3, 6, 8})  # GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0
VNNI_VARIANTS = frozenset({"icelake", "cascadelake", "cooperlake", "zen4", "sapphirerapids"})
TRANSPOSE_ROWS = 128  # rows dequantized at once by `dequantize_transposed`
# From this many rows on, `Multiplier` lays each dequantized chunk out transposed: the copy costs 0.6-0.96 ms
# more per head chunk and BLAS saves 0.1-0.56 ms per 128 rows multiplied by it (SmolLM2 and Gemma 3 chunks,
# `scripts/diag_memory.py chunks`), so it pays from a few hundred to ~1,200 rows (a lens: thousands); an
# `unembed` of 128 vectors would pay more than it saves.
TRANSPOSED_CHUNK_MIN_ROWS = 1024
TRANSFORM_ROWS = 256  # rows transformed and rounded at once by `Multiplier` (row-wise: any block gives the same)
_CONTEXT_BYTES = _CONTEXT_TENSORS * _tensor_overhead() + _graph_overhead()
_layout_checked = False


def _set_data(tensor: int, address: int) -> None:
    global _layout_checked
    ctypes.c_void_p.from_address(tensor + _OFFSET_DATA).value = address
    if not _layout_checked:
        if _get_data(tensor) != address:
            raise RuntimeError("ggml_tensor.data is not at the expected offset: the ggml build changed its layout")
        _layout_checked = True


def vec_dot_type(ggml_type: int) -> int:
    """The type the CPU back end converts a matrix product's float32 input rows to for weights of `ggml_type`
    (F32 for F32 weights: no conversion)."""
    return int(_cpu_type_traits(int(ggml_type)).contents.vec_dot_type)


def rounded_as_vec_dot(x: np.ndarray, kind: int, what: str = "rows") -> np.ndarray:
    """x (..., n) float32 converted to vec_dot type `kind` by ggml's own `from_float` (the function the CPU
    matrix product calls) and back to float32 (exactly: q * d needs < 24 bits)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == ggml.GGML_TYPE_F32 or x.size == 0:
        return x
    if kind == ggml.GGML_TYPE_F16:
        return x.astype(np.float16).astype(np.float32)
    if kind == GGML_TYPE_BF16:  # ggml rounds to nearest even, as below
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)
    block = _Q8_BLOCKS.get(kind)
    if block is None:
        raise NotImplementedError(f"{what}: activations of vec_dot type {kind} cannot be decoded")
    packed = np.empty(x.size // block["qs"].shape[0], block)
    from_float = _FROM_FLOAT(_cpu_type_traits(kind).contents.from_float)
    from_float(x.ctypes.data, packed.ctypes.data, x.size)
    values = packed["qs"].astype(np.float32) * packed["d"].astype(np.float32)[:, None]
    return values.reshape(x.shape)


class StoredMatrix:
    """A GGUF tensor of 2 or more axes as stored, its rows ggml's ne[0]-long rows (numpy rows: ne[1], then
    ne[2] ...: a stack of expert matrices is one matrix of their rows, expert after expert), for row-chunked
    products and dequantization.

    products(x, start, stop): x (n, n_cols) float32 -> x @ W[start:stop].T as (n, stop - start) float32.
    `largest_dequantized`: the most rows ever expanded to float32 at once (a test checks it stays a chunk).
    """

    def __init__(self, tensor: IndexedTensor, n_threads: int):
        if len(tensor.shape) < 2:
            raise ValueError(f"{tensor.name} is not a matrix")
        self.name = tensor.name
        self.tensor = tensor
        self.ggml_type = int(tensor.tensor_type)
        self.n_cols, self.n_rows = int(tensor.shape[0]), int(np.prod(tensor.shape[1:]))
        self.row_bytes = _row_size(self.ggml_type, self.n_cols)
        self.raw = tensor.data.reshape(self.n_rows, -1)  # a view of the mapping: one stored row per numpy row
        if self.raw.shape[1] * self.raw.itemsize != self.row_bytes:
            raise ValueError(f"{tensor.name}: stored rows of {self.raw.shape[1] * self.raw.itemsize} bytes, "
                             f"ggml expects {self.row_bytes}")
        self.n_threads = max(1, n_threads)
        self.vec_dot_type = vec_dot_type(self.ggml_type)
        # whether ggml multiplies many rows faster than BLAS on dequantized chunks (`Multiplier`)
        self.batched_kernel = self.ggml_type in VNNI_KERNEL_TYPES and CPU_VARIANT in VNNI_VARIANTS
        self.largest_dequantized = 0  # most rows ever expanded to float32 at once (tests: never the whole matrix)
        self._work = np.empty(0, np.uint8)

    def products(self, x: np.ndarray, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        out = self._products(self.raw[start:stop], x, out)
        self.release()
        return out

    def release(self) -> None:
        """Release our mapping's pages of the whole matrix once a chunk is done (`release_pages`): otherwise a
        lens over the whole head showed it twice in the worker's RSS, ours and llama.cpp's mapping of the same
        file (Gemma 3: +154 MB). The whole matrix, not the chunk's rows: reading a chunk's first row maps
        the whole folio around it (1 MiB here), pages of the chunk before too, so releasing only the chunk's
        own rows left ~0.5 MiB per chunk mapped (+109 MB over a Gemma 3 lens). Releasing page-table entries
        that are not there costs nothing; the next pass maps the pages again from the page cache (minor
        faults)."""
        release_pages(self.raw)

    def multiplier(self, x: np.ndarray | list[np.ndarray], transform=None) -> "Multiplier":
        return Multiplier(self, x, transform)

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

    def rounded(self, x: np.ndarray) -> np.ndarray:
        """x (n, n_cols) as the CPU kernels see it when multiplying this matrix (`rounded_as_vec_dot`)."""
        return rounded_as_vec_dot(x, self.vec_dot_type, self.name)

    def dequantize(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (n, n_cols), by ggml's own `to_float` for the type."""
        out = self._dequantize(self.raw[start:stop])
        self.release()
        return out

    def dequantize_transposed(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (n_cols, stop - start), the layout BLAS reads ~6% faster as the right
        factor than a transposed view. Built TRANSPOSE_ROWS rows at a time: one chunk-sized array, not two."""
        out = np.empty((self.n_cols, stop - start), np.float32)
        for first in range(start, stop, TRANSPOSE_ROWS):
            last = min(stop, first + TRANSPOSE_ROWS)
            out[:, first - start:last - start] = self._dequantize(self.raw[first:last]).T
        self.largest_dequantized = max(self.largest_dequantized, stop - start)
        self.release()
        return out

    def dequantize_rows(self, row_ids: np.ndarray) -> np.ndarray:
        """Rows by id, read from the file: scattered reads through the mapping map a folio each."""
        return self._dequantize(self._stored_rows(row_ids))

    def products_of_rows(self, x: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """x @ W[row_ids].T by ggml, the rows read from the file (as `dequantize_rows`)."""
        return self._products(self._stored_rows(row_ids), x, None)

    def _stored_rows(self, row_ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.tensor.read_rows(row_ids).reshape(-1, self.raw.shape[1]))

    def _dequantize(self, raw_rows: np.ndarray) -> np.ndarray:
        out = dequantize_raw(raw_rows, self.ggml_type, self.n_cols)
        self.largest_dequantized = max(self.largest_dequantized, len(out))
        return out


def dequantize_raw(raw_rows: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """Stored rows (rows, row_bytes) of `ggml_type` as float32 (rows, n_cols), by ggml's own `to_float`."""
    out = np.empty((raw_rows.shape[0], n_cols), np.float32)
    block = np.ascontiguousarray(raw_rows)
    if ggml_type == ggml.GGML_TYPE_F32:
        out[:] = block.view(np.float32).reshape(out.shape)
    else:
        to_float = _TO_FLOAT(_type_traits(ggml_type).contents.to_float)
        to_float(block.ctypes.data, out.ctypes.data, out.size)
    return out


class Multiplier:
    """x @ W[start:stop].T for one set of rows x over many vocabulary chunks, one arithmetic for all of them.

    Many rows (a lens: layers x positions): x is rounded to the vec_dot_type once, each chunk of W is
    dequantized once (float32, chunk-sized) and multiplied by BLAS, which is faster than ggml's CPU kernels
    on portable builds and sums the same products (q_x d_x)(q_w d_w): the two differ by float32 summation
    order only (~3e-7 of sum |x_i w_i| measured on SmolLM2 and Gemma 3 heads). Where ggml has a faster
    kernel for the type (`StoredMatrix.batched_kernel`), and for few rows (a word's neighbours, one vector):
    `ggml_mul_mat` on the stored rows, which reads 0.5-1 byte per weight instead of expanding the vocabulary
    to float32. Either way the target rows (`products_of_rows`) take the same arithmetic as the chunks.
    """

    def __init__(self, matrix: StoredMatrix, x: np.ndarray | list[np.ndarray], transform=None):
        """x: (n, n_cols), or a list of consecutive row blocks, which is emptied as they are copied (so the
        caller's captures can go as soon as they are in); transform: a row-wise map applied to x first (the
        final norm of a lens). The rows multiplied are built TRANSFORM_ROWS at a time into one float32 array,
        so x's transformed and rounded copies never exist whole (a lens of 4,000 SmolLM2 rows: 9 MiB each)."""
        blocks = x if isinstance(x, list) else [x]
        self.matrix = matrix
        n = sum(block.shape[0] for block in blocks)
        self.by_blas = n >= BLAS_MIN_ROWS and not matrix.batched_kernel
        self.transposed = n >= TRANSPOSED_CHUNK_MIN_ROWS
        self.x = np.empty((n, matrix.n_cols), np.float32)
        row = 0
        for i, block in enumerate(blocks):
            for start in range(0, block.shape[0], TRANSFORM_ROWS):
                part = block[start:start + TRANSFORM_ROWS]
                if transform is not None:
                    part = transform(part)
                self.x[row:row + len(part)] = matrix.rounded(part) if self.by_blas else part
                row += len(part)
            blocks[i] = None
        self._chunk: tuple[int, int, np.ndarray] | None = None

    def products(self, rows: slice, start: int, stop: int) -> np.ndarray:
        if not self.by_blas:
            return self.matrix.products(self.x[rows], start, stop)
        if self._chunk is None or self._chunk[:2] != (start, stop):
            self._chunk = None  # the chunk before goes first: never two in memory
            self._chunk = (start, stop, self.matrix.dequantize_transposed(start, stop) if self.transposed
                           else self.matrix.dequantize(start, stop).T)
        return self.x[rows] @ self._chunk[2]

    def products_of_rows(self, rows: slice, row_ids: np.ndarray) -> np.ndarray:
        """x @ W[row_ids].T for a few vocabulary rows (targets), in the arithmetic of `products`."""
        if not self.by_blas:
            return self.matrix.products_of_rows(self.x[rows], row_ids)
        return self.x[rows] @ self.matrix.dequantize_rows(row_ids).T
