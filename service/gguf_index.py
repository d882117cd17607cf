"""A lean index of a GGUF model file: scalar metadata and memory-mapped tensor data, nothing else.

`gguf.GGUFReader` parses every metadata array element into its own numpy view. A model's tokenizer
arrays (SmolLM2: 49,152 tokens and 48,900 merges) thereby cost ~160 MB of Python objects in every worker
process, more than the model's own weights. The service needs only scalar fields and the tensors, so the
header is read by the project's one GGUF reader (`lmscope.proto.gguf_file`, which steps over arrays
without materializing them; the control-vector loader uses it too) and tensor data is mapped lazily
(`np.memmap`: pages are read only when a tensor is dequantized). Tensors have the same layout as
`GGUFReader.tensors`, so `gguf.quants.dequantize` takes their `data` as it is.

Resident memory. llama.cpp maps the same file, and the page cache holds its pages once, but a process's RSS
counts a page once per mapping that touched it, and touching one byte of a mapping maps a whole folio
(measured: 1 MiB per touch on this machine's kernel 6.18 / ext4, whose page cache keeps large folios). So:
- scattered reads (rows by id, small tensors) go through the file descriptor (`IndexedTensor.read`,
  `IndexedTensor.read_rows`), never through the mapping: 300 head rows read through the mapping had mapped
  146 MB of Gemma 3's file for a moment (the worker's start-up peak);
- contiguous chunks (the vocabulary math hands ggml a pointer) go through the mapping, and its pages are
  released after each use (`release_pages`, `GGUFIndex.release`): without that, start-up verification left
  SmolLM2's worker holding 75 MB of the file a second time, and a lens over Gemma 3's head 154 MB. A
  released page is mapped again from the page cache when next read (a minor fault, no disk read).

Public and stable: `GGUFIndex.fields` ({key: scalar, string, or None for arrays}), `GGUFIndex.tensors`
({name: IndexedTensor}, in file order) and `GGUFIndex.release()`.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from lmscope.proto.gguf_file import GGUFFormatError, GGUFHeader

__all__ = ["GGUFFormatError", "GGUFIndex", "IndexedTensor", "release_pages"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTNEED = 4  # the same value on every Linux architecture


def release_pages(view: np.ndarray) -> None:
    """Drop this process's page-table entries for the pages under `view`, a contiguous view of a read-only
    file mapping (`np.memmap`): the data stays in the page cache and faults back in when read again. Pages
    shared with neighbouring data are dropped too. Arrays that are not file mappings are left alone."""
    if not isinstance(view, np.memmap) or view.nbytes == 0:
        return
    if not view.flags.c_contiguous:
        raise ValueError("release_pages needs a contiguous view of the mapping")
    first = view.ctypes.data
    begin = first - first % mmap.PAGESIZE
    _libc.madvise(begin, first + view.nbytes - begin, _MADV_DONTNEED)

_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _File:
    """Reads at offsets of the model file through one unbuffered descriptor (pread: no mapping, no seek)."""

    def __init__(self, path: str):
        self._file = open(path, "rb", buffering=0)

    def read_into(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        while len(view):
            n = os.preadv(self._file.fileno(), [view], offset)
            if n <= 0:
                raise GGUFFormatError(f"{self._file.name}: the file ended at byte {offset} (truncated while in use?)")
            view, offset = view[n:], offset + n


@dataclass
class IndexedTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray   # ggml's `ne`, innermost dimension first (as GGUFReader)
    data: np.ndarray    # numpy order; quantized types as raw bytes per row (as GGUFReader); a view of the mapping
    offset: int         # of the data in the file
    source: _File

    def read(self) -> np.ndarray:
        """`data` as a copy read from the file (not through the mapping)."""
        out = np.empty(self.data.shape, self.data.dtype)
        self.source.read_into(out, self.offset)
        return out

    def read_rows(self, row_ids: np.ndarray) -> np.ndarray:
        """`data[row_ids]` (numpy axis 0, ids in [0, rows)) read from the file: one read per run of consecutive
        rows."""
        ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        n_rows = self.data.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            raise IndexError(f"{self.name}: row ids must be in [0, {n_rows})")
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((len(unique),) + self.data.shape[1:], self.data.dtype)
        row_bytes = rows[0].nbytes if len(rows) else 0
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for first, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(unique)]])):
            self.source.read_into(rows[first:end], self.offset + int(unique[first]) * row_bytes)
        return rows[inverse.reshape(-1)]


class GGUFIndex:
    def __init__(self, path: str):
        self.path = path
        self._file = np.memmap(path, mode="r", dtype=np.uint8)
        self._source = _File(path)
        header = GGUFHeader(self._file, path)
        self.fields: dict[str, object] = header.fields
        self.tensors = {info.name: self._tensor(info.name, list(info.dims), info.ggml_type,
                                                header.data_start + info.offset)
                        for info in header.tensor_infos()}
        self.release()  # the header's pages (Gemma 3's tokenizer arrays: several MB)

    def release(self) -> None:
        """Release every page of our mapping of the file (`release_pages`)."""
        release_pages(self._file)

    def _tensor(self, name: str, dims: list[int], ggml_type: int, offset: int) -> IndexedTensor:
        try:
            kind = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise GGUFFormatError(f"{self.path}: tensor {name} has unknown ggml type {ggml_type}") from None
        shape = tuple(reversed(dims))
        n_elements = int(np.prod(dims))
        if kind in _PLAIN_DTYPES:
            dtype = np.dtype(_PLAIN_DTYPES[kind])
            size = n_elements * dtype.itemsize
        else:
            block_size, type_size = GGML_QUANT_SIZES[kind]
            dtype, size = np.dtype(np.uint8), n_elements * type_size // block_size
            shape = quant_shape_to_byte_shape(shape, kind)
        if offset + size > len(self._file):
            raise GGUFFormatError(f"tensor {name} runs past the end of {self.path}: the file is truncated")
        data = self._file[offset:offset + size].view(dtype).reshape(shape)
        return IndexedTensor(name=name, tensor_type=kind, shape=np.asarray(dims, dtype=np.uint64), data=data,
                             offset=offset, source=self._source)
