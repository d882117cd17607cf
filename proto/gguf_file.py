"""The project's one GGUF reader: metadata and tensor descriptions, bounds-checked, numpy only.

Two readers need it. The service (`lmscope.service.gguf_index`) indexes model files: `gguf.GGUFReader`
would expand a tokenizer's metadata arrays (SmolLM2: 49,152 tokens, 48,900 merges) into ~160 MB of Python
objects per worker, where the service needs only scalar fields and memory-mapped tensors. The client
(`lmscope.client.control_vector`) loads control-vector files, and must do so without the `gguf` package,
which is in the server extra only. So this module reads what both need and nothing else: scalar and string
fields (arrays are stepped over and read as None), then each tensor's name, dimensions, ggml type and data
offset. Tensor data stays where it is; the callers map or read it.

Every count in a file is checked against the bytes that remain before it is used, so a malformed or
hostile file raises `GGUFFormatError` (a ValueError) instead of over-reading or allocating without bound.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, versions 2 and 3).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_KEY_BYTES = 1 << 16      # keys and tensor names are short; a longer one means a bad file
MAX_ARRAY_DEPTH = 8          # arrays of arrays: no real file nests deeper; the bound keeps recursion finite
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                  FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


class GGUFFormatError(ValueError):
    """The file is not a (well-formed) GGUF file; the message says where it goes wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]    # ggml's `ne`, innermost dimension first
    ggml_type: int           # a ggml_type value (0 = F32, 1 = F16, 8 = Q8_0, ...)
    offset: int              # from the start of the data section (`GGUFHeader.data_start`)


class GGUFHeader:
    """``GGUFHeader(buffer)`` reads the header and the metadata of a GGUF file held in ``buffer`` (bytes, a
    memoryview or an np.memmap); `tensor_infos()` then reads the tensor descriptions after them (callers
    may check the metadata first, e.g. that the file is a control vector)."""

    def __init__(self, buffer, name: str = "the file"):
        self._buffer = memoryview(buffer).cast("B")
        self.size = len(self._buffer)
        self.name = name
        self._offset = 0
        if self.size < 24 or bytes(self._buffer[:4]) != MAGIC:
            self._fail("not a GGUF file (it does not start with the GGUF magic)")
        self._offset = 4
        self.version = self._scalar("<I", "the version")
        if self.version not in (2, 3):
            self._fail(f"GGUF version {self.version} is not supported (2 and 3 are; big-endian files are not)")
        self._n_tensors = self._scalar("<Q", "the tensor count")
        n_fields = self._scalar("<Q", "the metadata count")
        # Every metadata entry and tensor description takes well over 8 bytes: bound the counts by the file.
        if self._n_tensors > self.size // 8 or n_fields > self.size // 8:
            self._fail(f"it claims {self._n_tensors} tensors and {n_fields} metadata entries, more than the file "
                       f"holds")
        self.fields: dict[str, object] = {}
        for i in range(n_fields):
            key = self._string(f"metadata key {i}", MAX_KEY_BYTES)
            if key in self.fields:
                self._fail(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._scalar("<I", f"the type of {key}"), key)
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            self._fail(f"general.alignment {alignment!r} is not a power of two")
        self.alignment = alignment
        self.metadata_end = self._offset  # where the tensor descriptions begin
        self._tensors: list[TensorInfo] | None = None
        self.data_start = 0  # set by tensor_infos()
        self.tensor_infos_end = 0  # set by tensor_infos(): the end of the descriptions, before the padding

    def tensor_infos(self) -> list[TensorInfo]:
        """The tensor descriptions, in file order; sets `data_start`, where the data section begins."""
        if self._tensors is None:
            tensors = []
            for i in range(self._n_tensors):
                name = self._string(f"tensor name {i}", MAX_KEY_BYTES)
                n_dims = self._scalar("<I", f"the dimension count of {name}")
                if not 1 <= n_dims <= MAX_DIMS:
                    self._fail(f"tensor {name} has {n_dims} dimensions")
                dims = tuple(self._scalar("<Q", f"a dimension of {name}") for _ in range(n_dims))
                ggml_type = self._scalar("<I", f"the type of {name}")
                offset = self._scalar("<Q", f"the data offset of {name}")
                tensors.append(TensorInfo(name, dims, ggml_type, offset))
            self.tensor_infos_end = self._offset
            self.data_start = -(-self._offset // self.alignment) * self.alignment
            self._tensors = tensors
        return self._tensors

    # ----- bounded reads ----------------------------------------------------------------------------

    def _fail(self, message: str):
        raise GGUFFormatError(f"{self.name}: {message}")

    def _take(self, n: int, what: str) -> int:
        """Advance past n bytes; the offset they start at."""
        if n < 0 or n > self.size - self._offset:
            self._fail(f"{what} ({n} bytes at offset {self._offset}) runs past the end of the file "
                       f"({self.size} bytes)")
        start = self._offset
        self._offset += n
        return start

    def _scalar(self, fmt: str, what: str):
        start = self._take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self._buffer, start)[0]

    def _string(self, what: str, limit: int | None = None) -> str:
        n = self._scalar("<Q", f"the length of {what}")
        if limit is not None and n > limit:
            self._fail(f"{what} claims {n} bytes")
        start = self._take(n, what)
        return bytes(self._buffer[start:start + n]).decode("utf-8", "replace")

    def _value(self, kind: int, what: str):
        """One metadata value; arrays are stepped over and read as None."""
        if kind in SCALAR_FORMATS:
            return self._scalar(SCALAR_FORMATS[kind], what)
        if kind == STRING:
            return self._string(what)
        if kind == ARRAY:
            self._skip_array(what, depth=1)
            return None
        self._fail(f"{what} has unknown value type {kind}")

    def _skip_array(self, what: str, depth: int) -> None:
        if depth > MAX_ARRAY_DEPTH:
            self._fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        element = self._scalar("<I", f"the element type of {what}")
        count = self._scalar("<Q", f"the length of {what}")
        if element in SCALAR_FORMATS:
            size = struct.calcsize(SCALAR_FORMATS[element])
            if count > (self.size - self._offset) // size:
                self._fail(f"{what} claims {count} elements, more than the file holds")
            self._take(count * size, what)
        elif element == STRING:
            if count > (self.size - self._offset) // 8:
                self._fail(f"{what} claims {count} strings, more than the file holds")
            for _ in range(count):
                self._take(self._scalar("<Q", f"a string length in {what}"), what)
        elif element == ARRAY:
            if count > (self.size - self._offset) // 12:
                self._fail(f"{what} claims {count} arrays, more than the file holds")
            for _ in range(count):
                self._skip_array(what, depth + 1)
        else:
            self._fail(f"{what} is an array of unsupported type {element}")
