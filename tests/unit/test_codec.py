"""Property tests of the tensor codec (`lmscope.proto.tensors`): what the server writes by hand is what protobuf
would write, every array survives chunking and reassembly, and every malformed stream is refused. No server.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lmscope.proto import tensors
from lmscope.proto.wire import lmscope_pb2 as pb

CODEC = settings(max_examples=200, deadline=None)
codec_arrays = hnp.arrays(
    dtype=st.sampled_from([np.dtype("<f4"), np.dtype(">f4"), np.dtype("<f2"), np.dtype(">f2"), np.dtype("<i4"),
                           np.dtype(">i4")]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaNs included, whatever the byte order."""
    return a.shape == b.shape and np.array_equal(a.astype(a.dtype.newbyteorder("=")), b,
                                                 equal_nan=a.dtype.kind == "f")


def _chunks(*args, **kwargs) -> list:
    """The TensorChunks a server sends for an array, read back from their wire form."""
    return [pb.RunChunk.FromString(b).tensor for b in tensors.encoded_run_chunks(*args, **kwargs)]


@CODEC
@given(array=codec_arrays, name=st.text(max_size=20), sequence=st.integers(0, 2 ** 32 - 1),
       offset=st.integers(0, 2 ** 63), chunk_bytes=st.integers(1, 300), data=st.data())
def test_codec_encodes_chunks_as_protobuf_does(array, name, sequence, offset, chunk_bytes, data):
    """The hand-made wire form is protobuf's own, byte for byte (1- and 2-byte lengths here, 3 below)."""
    shape = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 2 ** 40), max_size=5)))
    encoded = list(tensors.encoded_run_chunks(name, array, sequence, chunk_bytes=chunk_bytes, shape=shape,
                                              offset=offset))
    raw = np.asarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    starts = range(0, max(len(raw), 1), chunk_bytes)
    expected = [pb.RunChunk(tensor=pb.TensorChunk(
        name=name, sequence=sequence, dtype=tensors.wire_dtype(array), offset=offset + start,
        shape=list(array.shape) if shape is None else shape, data=raw[start:start + chunk_bytes])).SerializeToString()
        for start in starts]
    assert encoded == expected


def test_codec_encodes_long_chunks_as_protobuf_does():
    array = np.arange(40_000, dtype=np.float32)  # 160,000 bytes: a 3-byte length
    (encoded,) = tensors.encoded_run_chunks("logits", array, 2, chunk_bytes=1 << 20, shape=(7, 40_000), offset=12)
    expected = pb.RunChunk(tensor=pb.TensorChunk(name="logits", sequence=2, dtype=pb.FLOAT32, shape=[7, 40_000],
                                                 offset=12, data=array.tobytes()))
    assert encoded == expected.SerializeToString()


@CODEC
@given(array=codec_arrays, chunk_bytes=st.integers(1, 300))
def test_codec_round_trip_through_chunks(array, chunk_bytes):
    chunks = _chunks("t", array, 3, chunk_bytes=chunk_bytes)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    out = tensors.assemble(chunks)[("t", 3)]
    assert _same(array, out) and out.dtype.byteorder in ("<", "=", "|")


@CODEC
@given(array=codec_arrays)
def test_codec_round_trip_through_one_tensor(array):
    assert _same(array, tensors.from_tensor(tensors.to_tensor(array)))


@CODEC
@given(arrays=st.lists(codec_arrays, min_size=2, max_size=4), chunk_bytes=st.integers(1, 64), seed=st.integers(0, 99))
def test_codec_chunks_of_several_tensors_may_interleave(arrays, chunk_bytes, seed):
    queues = [_chunks(f"t{i}", a, chunk_bytes=chunk_bytes) for i, a in enumerate(arrays)]
    rng = random.Random(seed)
    assembler = tensors.Assembler()
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        assembler.add(queue.pop(0))
    out = assembler.arrays()
    assert all(_same(a, out[(f"t{i}", 0)]) for i, a in enumerate(arrays))


@CODEC
@given(array=codec_arrays, delta=st.integers(-9, 9).filter(bool))
def test_codec_refuses_bytes_that_do_not_fit_the_shape(array, delta):
    message = tensors.to_tensor(array)
    message.data = message.data[:max(0, len(message.data) + delta)] if delta < 0 else message.data + b"\0" * delta
    if len(message.data) == array.nbytes:
        return  # an empty tensor cannot be shortened
    with pytest.raises(tensors.TensorCodecError, match="needs"):
        tensors.from_tensor(message)


@CODEC
@given(dtype=st.sampled_from([np.float64, np.int64, np.int8, np.uint32, np.complex64, np.bool_]),
       shape=hnp.array_shapes(max_dims=3, max_side=4))
def test_codec_refuses_dtypes_the_wire_does_not_carry(dtype, shape):
    array = np.zeros(shape, dtype)
    with pytest.raises(tensors.TensorCodecError, match="cannot be sent"):
        _chunks("t", array)
    if dtype is not np.float64:  # to_tensor narrows float64 on purpose
        with pytest.raises(tensors.TensorCodecError):
            tensors.to_tensor(array)


@CODEC
@given(wire=st.integers(-2 ** 31, 2 ** 31 - 1).filter(lambda v: v not in (pb.FLOAT32, pb.FLOAT16, pb.INT32)))
def test_codec_refuses_unknown_wire_dtypes(wire):
    with pytest.raises(tensors.TensorCodecError, match="unknown tensor dtype"):
        tensors.from_tensor(pb.Tensor(dtype=wire, shape=[1], data=b"\0" * 4))
    with pytest.raises(tensors.TensorCodecError, match="unknown tensor dtype"):
        tensors.Assembler().add(pb.TensorChunk(name="t", dtype=wire, shape=[1], data=b"\0" * 4))


@CODEC
@given(shape=st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), min_size=1, max_size=6).filter(
    lambda s: any(d < 0 for d in s) or np.prod(np.array(s, dtype=object)) > 2 ** 40))
def test_codec_refuses_negative_and_absurd_shapes(shape):
    with pytest.raises(tensors.TensorCodecError):
        tensors.from_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b""))
    with pytest.raises(tensors.TensorCodecError):
        tensors.Assembler(max_bytes=1 << 30).add(pb.TensorChunk(name="t", dtype=pb.FLOAT32, shape=shape))


@CODEC
@given(array=codec_arrays.filter(lambda a: a.nbytes >= 8), chunk_bytes=st.integers(1, 16), data=st.data())
def test_codec_refuses_overrunning_repeated_skipped_and_missing_chunks(array, chunk_bytes, data):
    chunks = _chunks("t", array, chunk_bytes=chunk_bytes)
    fault = data.draw(st.sampled_from(["overrun", "repeat", "skip", "missing", "reshape"]))
    if fault in ("repeat", "skip", "missing") and len(chunks) < 2:
        return
    assembler = tensors.Assembler()
    if fault == "overrun":
        last = chunks[-1]
        last.data = last.data + b"\0" * data.draw(st.integers(1, 64))
        for chunk in chunks[:-1]:
            assembler.add(chunk)
        with pytest.raises(tensors.TensorCodecError, match="past the tensor"):
            assembler.add(last)
    elif fault == "repeat":
        k = data.draw(st.integers(0, len(chunks) - 2))
        for chunk in chunks[:k + 1]:
            assembler.add(chunk)
        with pytest.raises(tensors.TensorCodecError, match="in order, once each"):
            assembler.add(chunks[k])
    elif fault == "skip":
        k = data.draw(st.integers(1, len(chunks) - 1))
        for chunk in chunks[:k]:
            assembler.add(chunk)
        with pytest.raises(tensors.TensorCodecError, match="in order, once each"):
            assembler.add(chunks[k + 1] if k + 1 < len(chunks) else chunks[0])
    elif fault == "missing":
        for chunk in chunks[:-1]:
            assembler.add(chunk)
        with pytest.raises(tensors.TensorCodecError, match="incomplete"):
            assembler.arrays()
    else:
        assembler.add(chunks[0])
        changed = pb.TensorChunk()
        changed.CopyFrom(chunks[-1] if len(chunks) > 1 else chunks[0])
        changed.shape[:] = list(array.shape) + [1]
        with pytest.raises(tensors.TensorCodecError, match="changed shape"):
            assembler.add(changed)
