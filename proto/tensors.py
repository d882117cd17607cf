"""The tensor codec shared by client and server: numpy arrays <-> raw little-endian bytes on the wire.

A tensor travels as one or more `TensorChunk` messages, each carrying the tensor's name, full shape and
dtype plus the byte offset of its piece, so that no single gRPC message grows past `CHUNK_BYTES` however
large the tensor is. `Assembler` puts the pieces back together and refuses anything inconsistent (a chunk
that overruns the tensor, a shape or dtype that changes midway, missing bytes).

A big tensor costs its size once on each side. `encoded_run_chunks` writes each chunk's `RunChunk` wire form
itself: protobuf encodes the small fields, and the data is appended to them from a memoryview of the array
in the one copy that makes the message's bytes. Building the messages instead copies the data four times
(the `bytes` given to protobuf, the `TensorChunk`, the `RunChunk` holding it, its serialization): 128 MiB
took 404-429 ms that way and takes 52-58 ms now (`scripts/diag_memory.py pieces`), and the front end's CPU
time for a Gemma 3 `run()` with all logits fell from 500-580 to 200-210 ms (`scripts/bench_wire.py`), time
that on a small machine is taken from llama.cpp's threads (docs/performance.md, "Fourth pass"). `Assembler`
writes each chunk into one buffer allocated at the first chunk (`new_buffer`); no list of pieces is joined at
the end.
"""
from __future__ import annotations

import math
import mmap
from typing import Iterable, Iterator

import numpy as np

from .wire import lmscope_pb2 as pb

CHUNK_BYTES = 1 << 20
_MAPPED_BYTES = 1 << 20  # buffers from this size up get pages of their own (`new_buffer`)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only
MAX_DIMS = 32  # numpy's own limit on older versions; no lmscope tensor has more than 4

_NUMPY_OF = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.INT32: np.dtype("<i4")}
_WIRE_OF = {np.dtype("float32"): pb.FLOAT32, np.dtype("float16"): pb.FLOAT16, np.dtype("int32"): pb.INT32}


class TensorCodecError(ValueError):
    """Bytes that do not form the tensor they claim to be."""


def numpy_dtype(wire_dtype: int) -> np.dtype:
    try:
        return _NUMPY_OF[wire_dtype]
    except KeyError:
        raise TensorCodecError(f"unknown tensor dtype {wire_dtype}; use FLOAT32, FLOAT16 or INT32") from None


def wire_dtype(array: np.ndarray) -> int:
    try:
        return _WIRE_OF[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TensorCodecError(f"arrays of dtype {array.dtype} cannot be sent; use float32, float16 or int32") from None


def new_buffer(nbytes: int) -> np.ndarray:
    """A writable, uninitialised uint8 buffer for an array arriving from elsewhere.

    From 1 MiB up it is an anonymous memory map, which goes back to the operating system the moment the last
    array on it dies. A malloc'd block of that size would too the first time, but glibc then raises its
    mmap threshold, and later big blocks come from heaps that keep freed memory: a server that has passed
    one 24 MiB answer would stay 24 MiB (one per thread's heap) larger for ever.

    On Linux its pages are faulted in by the kernel when it is mapped (MAP_POPULATE): the buffer is about to
    be written whole, and faulting its pages in one by one as they are written took half as long again
    (128 MiB mapped and filled: 99-129 ms against 64-80 ms; the copy alone, into memory already resident,
    14-16 ms; `scripts/diag_memory.py buffers`).
    """
    if nbytes < _MAPPED_BYTES:
        return np.empty(nbytes, np.uint8)
    if _MAP_POPULATE:
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE),
                             np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """A whole array as one `Tensor` message (for request fields: vectors, directions)."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    dtype = wire_dtype(array)
    data = np.ascontiguousarray(array, dtype=numpy_dtype(dtype)).tobytes()
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=data)


def nbytes_of(shape, dtype: np.dtype, what: str = "tensor") -> int:
    """Bytes a tensor of this shape and dtype occupies, checking the shape first.

    Shapes come off the wire: the product is taken with Python integers, so a huge shape is reported as
    too large instead of wrapping around in int64 and passing a size check.
    """
    if len(shape) > MAX_DIMS:
        raise TensorCodecError(f"{what} has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"{what} shape {list(shape)} has a negative dimension")
    return math.prod(shape) * dtype.itemsize


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """Decode a `Tensor` message, checking that the bytes match the shape and dtype."""
    dtype = numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    expected = nbytes_of(shape, dtype)
    if len(tensor.data) != expected:
        raise TensorCodecError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_RUN_CHUNK_TENSOR_TAG = b"\x12"   # RunChunk field 2 (tensor), length-delimited
_TENSOR_CHUNK_DATA_TAG = b"\x32"  # TensorChunk field 6 (data), length-delimited


def encoded_run_chunks(name: str, array: np.ndarray, sequence: int = 0, chunk_bytes: int = CHUNK_BYTES,
                       shape: tuple[int, ...] | None = None, offset: int = 0) -> Iterator[bytes]:
    """An array as the serialized `RunChunk`s that carry it, each with at most `chunk_bytes` bytes of data:
    byte for byte what `RunChunk(tensor=TensorChunk(...)).SerializeToString()` gives, without the copies.

    With `shape`, the array is a piece of a bigger row-major tensor of that shape, starting at byte `offset`
    of it (how a server streams a tensor it never holds whole)."""
    array = np.asarray(array, order="C")  # not ascontiguousarray: it turns a 0-d array into shape (1,)
    dtype = wire_dtype(array)
    shape = list(array.shape if shape is None else shape)
    raw = memoryview(array.astype(numpy_dtype(dtype), copy=False).reshape(-1)).cast("B")
    for start in range(0, max(len(raw), 1), chunk_bytes):  # an empty tensor is one empty chunk: it has a shape
        data = raw[start:start + chunk_bytes]
        fields = pb.TensorChunk(name=name, sequence=sequence, dtype=dtype, shape=shape,
                                offset=offset + start).SerializeToString()
        data_field = [_TENSOR_CHUNK_DATA_TAG, _varint(len(data)), data] if len(data) else []  # proto3 omits b""
        body_bytes = len(fields) + sum(len(part) for part in data_field)
        yield b"".join([_RUN_CHUNK_TENSOR_TAG, _varint(body_bytes), fields, *data_field])


class Assembler:
    """Collects `TensorChunk`s into arrays keyed by (name, sequence).

    The chunks of one tensor must arrive in order, each starting where the previous one ended (that is how
    `encoded_run_chunks` sends them and gRPC keeps a stream's order). Checking this, rather than only counting
    bytes, makes a repeated, overlapping or skipped chunk an error instead of a tensor with a hole in it.
    `max_bytes` bounds the buffer a declared shape may make us allocate.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        # (name, sequence) -> [shape, dtype, buffer (uint8 array, written through a memoryview), bytes received]
        self._parts: dict[tuple[str, int], list] = {}
        self._max_bytes = max_bytes

    def add(self, chunk: pb.TensorChunk) -> None:
        key = (chunk.name, chunk.sequence)
        dtype = numpy_dtype(chunk.dtype)
        shape = tuple(chunk.shape)
        part = self._parts.get(key)
        if part is None:
            size = nbytes_of(shape, dtype, f"tensor {chunk.name!r}")
            if self._max_bytes is not None and size > self._max_bytes:
                raise TensorCodecError(f"tensor {chunk.name!r} of shape {list(shape)} needs {size} bytes, over the "
                                       f"limit of {self._max_bytes}")
            part = self._parts[key] = [shape, dtype, new_buffer(size), 0]
        if part[0] != shape or part[1] != dtype:
            raise TensorCodecError(f"tensor {chunk.name!r} changed shape or dtype between chunks")
        buffer = part[2]
        if chunk.offset != part[3]:
            raise TensorCodecError(f"chunk of tensor {chunk.name!r} starts at byte {chunk.offset}, but "
                                   f"{part[3]} bytes have arrived: chunks must come in order, once each")
        end = chunk.offset + len(chunk.data)
        if end > len(buffer):
            raise TensorCodecError(
                f"chunk of tensor {chunk.name!r} ends at byte {end}, past the tensor's {len(buffer)} bytes")
        memoryview(buffer)[chunk.offset:end] = chunk.data
        part[3] = end

    def arrays(self) -> dict[tuple[str, int], np.ndarray]:
        """Every tensor received, complete; raises if any bytes are missing."""
        out = {}
        for (name, sequence), (shape, dtype, buffer, received) in self._parts.items():
            if received != len(buffer):
                raise TensorCodecError(
                    f"tensor {name!r} is incomplete: {received} of {len(buffer)} bytes arrived")
            out[(name, sequence)] = buffer.view(dtype).reshape(shape)
        return out


def assemble(chunks: Iterable[pb.TensorChunk]) -> dict[tuple[str, int], np.ndarray]:
    assembler = Assembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.arrays()
