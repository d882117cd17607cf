"""A lean index of a GGUF model file: scalar metadata and memory-mapped tensor data, nothing else.

`gguf.GGUFReader` parses every metadata array element into its own numpy view. A model's tokenizer
arrays (SmolLM2: 49,152 tokens and 48,900 merges) thereby cost ~160 MB of Python objects in every worker
process, more than the model's own weights. The service needs only scalar fields and the tensors, so the
header is read by the project's one GGUF reader (`lmscope.client.gguf_file`, which steps over arrays
without materializing them; the control-vector loader uses it too) and tensor data is mapped lazily
(`np.memmap`: pages are read only when a tensor is dequantized). Tensors have the same layout as
`GGUFReader.tensors`, so `gguf.quants.dequantize` takes their `data` as it is.

Public and stable: `GGUFIndex.fields` ({key: scalar, string, or None for arrays}) and `GGUFIndex.tensors`
({name: IndexedTensor}, in file order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from lmscope.client.gguf_file import GGUFFormatError, GGUFHeader

__all__ = ["GGUFFormatError", "GGUFIndex", "IndexedTensor"]

_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class IndexedTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray   # ggml's `ne`, innermost dimension first (as GGUFReader)
    data: np.ndarray    # numpy order; quantized types as raw bytes per row (as GGUFReader)


class GGUFIndex:
    def __init__(self, path: str):
        self.path = path
        self._file = np.memmap(path, mode="r", dtype=np.uint8)
        header = GGUFHeader(self._file, path)
        self.fields: dict[str, object] = header.fields
        self.tensors = {info.name: self._tensor(info.name, list(info.dims), info.ggml_type,
                                                header.data_start + info.offset)
                        for info in header.tensor_infos()}

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
        return IndexedTensor(name=name, tensor_type=kind, shape=np.asarray(dims, dtype=np.uint64), data=data)
