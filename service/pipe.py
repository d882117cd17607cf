"""The worker pipe: how a job and its answer travel between the front end and a worker process.

What travels: the front end sends one job (`contracts.py`, e.g. `RunJob`); the worker answers with
(Kind.ITEM, message) any number of times (generated tokens; `TensorPiece`s of big tensors), then
(Kind.DONE, answer) or (Kind.ERROR, code, message). At start-up a worker sends (Kind.READY, WorkerInfo).

How it travels: pickled (`send_message` / `receive_message`), proto messages as their serialized bytes,
numpy arrays as pickle protocol 5 out-of-band buffers. Each array is written to the pipe from its own memory
and read straight into one buffer of its exact size (`tensors.new_buffer`), which the unpickled array then
uses: no copy on either side of the pipe. Plain `Connection.send` would first copy every array into one
pickle bytes object.
"""
from __future__ import annotations

import enum
import io
import os
import pickle
import struct

import numpy as np
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from lmscope.proto import tensors

PICKLE_PROTOCOL = 5


class Kind(str, enum.Enum):
    """The first element of every message on the pipe; RAISE is the front end's own, on a request's inbox: a
    failure handed from the thread that reads the pipe to the one that answers the client."""
    READY = "ready"
    ITEM = "item"
    DONE = "done"
    ERROR = "error"
    RAISE = "raise"


def _proto(full_name: str, data: bytes) -> Message:
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name)).FromString(data)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        # Generated proto classes claim the module `lmscope_pb2`, which pickle cannot import by that name.
        if isinstance(obj, Message):
            return _proto, (obj.DESCRIPTOR.full_name, obj.SerializeToString())
        return NotImplemented


def send_message(conn, message) -> None:
    """One message: a frame with the pickle and the sizes of its out-of-band buffers, then the buffers' raw
    bytes on the pipe itself (`Connection` writes from a memoryview without copying)."""
    buffers: list[memoryview] = []
    pickled = io.BytesIO()
    _Pickler(pickled, protocol=PICKLE_PROTOCOL, buffer_callback=lambda b: buffers.append(b.raw())).dump(message)
    head = pickled.getbuffer()
    sizes = struct.pack(f"<I{len(buffers)}Q", len(buffers), *(b.nbytes for b in buffers))
    conn.send_bytes(sizes + head)
    for buffer in buffers:
        _write_all(conn.fileno(), buffer)


def receive_message(conn):
    data = conn.recv_bytes()
    (n_buffers,) = struct.unpack_from("<I", data)
    sizes = struct.unpack_from(f"<{n_buffers}Q", data, 4)
    buffers = [_read_exactly(conn.fileno(), size) for size in sizes]
    return pickle.loads(memoryview(data)[4 + 8 * n_buffers:], buffers=buffers)


def _write_all(fd: int, data: memoryview) -> None:
    data = data.cast("B")
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> np.ndarray:
    """`size` bytes from the pipe into one new buffer (the array built on it owns it)."""
    buffer = tensors.new_buffer(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        n = os.readv(fd, [view[received:]])
        if n == 0:
            raise EOFError("the pipe closed in the middle of a message")
        received += n
    return buffer
