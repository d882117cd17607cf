"""A lean index of a GGUF file: scalar metadata and memory-mapped tensor data, nothing else.

`gguf.GGUFReader` parses every metadata array element into its own numpy view. A model's tokenizer
arrays (SmolLM2: 49,152 tokens and 48,900 merges) thereby cost ~160 MB of Python objects in every worker
process, more than the model's own weights. The service needs only scalar fields and the tensors, so this
index steps over arrays without materializing them and maps tensor data lazily (`np.memmap`: pages are
read only when a tensor is dequantized). Tensors have the same layout as `GGUFReader.tensors`, so
`gguf.quants.dequantize` takes their `data` as it is.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    pass


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
        self._buffer = memoryview(self._file)
        self._offset = 0
        if bytes(self._buffer[:4]) != _MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file")
        self._offset = 4
        version = self._unpack("<I")
        if version > 0xFFFF:
            raise GGUFFormatError(f"{path} is a big-endian GGUF file, which lmscope does not read")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            value_type = GGUFValueType(self._unpack("<I"))
            self.fields[key] = self._value(value_type)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")))
        alignment = int(self.fields.get("general.alignment") or _DEFAULT_ALIGNMENT)
        start = -(-self._offset // alignment) * alignment
        self.tensors = {name: self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos}

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        text = bytes(self._buffer[self._offset:self._offset + length]).decode("utf-8", "replace")
        self._offset += length
        return text

    def _value(self, value_type: GGUFValueType):
        """A scalar or string; arrays are stepped over and read as None."""
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self._unpack("<I"))
            count = self._unpack("<Q")
            if item_type == GGUFValueType.STRING:
                for _ in range(count):
                    length = self._unpack("<Q")  # (not `offset += unpack()`: that reads offset before unpack moves it)
                    self._offset += length
            elif item_type == GGUFValueType.ARRAY:
                for _ in range(count):
                    self._value(GGUFValueType.ARRAY)
            else:
                self._offset += count * struct.calcsize(_SCALARS[item_type])
            return None
        return self._unpack(_SCALARS[value_type])

    def _tensor(self, name: str, dims: list[int], kind: GGMLQuantizationType, offset: int) -> IndexedTensor:
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
