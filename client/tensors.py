"""The tensor codec shared by client and server: numpy arrays <-> raw little-endian bytes on the wire.

A tensor travels as one or more `TensorChunk` messages, each carrying the tensor's name, full shape and
dtype plus the byte offset of its piece, so that no single gRPC message grows past `CHUNK_BYTES` however
large the tensor is. `Assembler` puts the pieces back together and refuses anything inconsistent (a chunk
that overruns the tensor, a shape or dtype that changes midway, missing bytes).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .wire import lmscope_pb2 as pb

CHUNK_BYTES = 1 << 20

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


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """A whole array as one `Tensor` message (for request fields: vectors, directions)."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    dtype = wire_dtype(array)
    data = np.ascontiguousarray(array, dtype=numpy_dtype(dtype)).tobytes()
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=data)


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """Decode a `Tensor` message, checking that the bytes match the shape and dtype."""
    dtype = numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"tensor shape {list(shape)} has a negative dimension")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorCodecError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def to_chunks(name: str, array: np.ndarray, sequence: int = 0,
              chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Split an array into `TensorChunk`s of at most `chunk_bytes` bytes of data each."""
    array = np.ascontiguousarray(array)
    dtype = wire_dtype(array)
    shape = list(array.shape)
    if array.size == 0:
        yield pb.TensorChunk(name=name, sequence=sequence, dtype=dtype, shape=shape, offset=0, data=b"")
        return
    raw = memoryview(array.astype(numpy_dtype(dtype), copy=False).reshape(-1)).cast("B")
    for offset in range(0, len(raw), chunk_bytes):
        yield pb.TensorChunk(name=name, sequence=sequence, dtype=dtype, shape=shape, offset=offset,
                             data=bytes(raw[offset:offset + chunk_bytes]))


class Assembler:
    """Collects `TensorChunk`s into arrays keyed by (name, sequence)."""

    def __init__(self) -> None:
        # (name, sequence) -> [shape, dtype, buffer, bytes received]
        self._parts: dict[tuple[str, int], list] = {}

    def add(self, chunk: pb.TensorChunk) -> None:
        key = (chunk.name, chunk.sequence)
        dtype = numpy_dtype(chunk.dtype)
        shape = tuple(chunk.shape)
        part = self._parts.get(key)
        if part is None:
            if any(d < 0 for d in shape):
                raise TensorCodecError(f"tensor {chunk.name!r} has a negative dimension in {list(shape)}")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            part = self._parts[key] = [shape, dtype, bytearray(size), 0]
        if part[0] != shape or part[1] != dtype:
            raise TensorCodecError(f"tensor {chunk.name!r} changed shape or dtype between chunks")
        buffer = part[2]
        end = chunk.offset + len(chunk.data)
        if end > len(buffer):
            raise TensorCodecError(
                f"chunk of tensor {chunk.name!r} ends at byte {end}, past the tensor's {len(buffer)} bytes")
        buffer[chunk.offset:end] = chunk.data
        part[3] += len(chunk.data)

    def arrays(self) -> dict[tuple[str, int], np.ndarray]:
        """Every tensor received, complete; raises if any bytes are missing."""
        out = {}
        for (name, sequence), (shape, dtype, buffer, received) in self._parts.items():
            if received != len(buffer):
                raise TensorCodecError(
                    f"tensor {name!r} is incomplete: {received} of {len(buffer)} bytes arrived")
            out[(name, sequence)] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        return out


def assemble(chunks: Iterable[pb.TensorChunk]) -> dict[tuple[str, int], np.ndarray]:
    assembler = Assembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.arrays()
