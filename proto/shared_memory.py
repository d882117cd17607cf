"""Answers in shared memory: a client on the server's host takes a Run's tensors from a file, not the stream.

Why. Streamed, a tensor is copied from the worker into the pipe to the front end, out of it, into gRPC's
messages, through the loopback socket and into the client's buffer, with a thread hand-off at every piece:
every hidden state of 128 tokens (9 MB on SmolLM2) arrived 21 ms after the worker had them, and Gemma 3's
128 MiB of all-position logits took its decode from 288 ms in-process to ~500 ms, the transport's CPU time
taken from llama.cpp's threads on a small machine (docs/performance.md). Written into a file the client maps,
the same answer costs one copy in the worker and none in the client.

How. The client creates a Linux memfd named `NAME`, writes `TOKEN_BYTES` random bytes at its start and offers
(its pid, the descriptor number, the token) in `RunRequest.shared_memory`. The worker opens
/proc/{pid}/fd/{fd}, and uses it only if it is a memfd of that name whose first bytes are the token: a
client can only have the server write into a file it made for the purpose, and a process elsewhere (another
host, another pid namespace, another user) fails the open or the check, after which the answer is streamed
as usual and `RunHeader.shared_memory_refused` says why. The worker writes each tensor from byte
`DATA_OFFSET` on, each on a page of its own, and lists it in `RunHeader.placements`; the client maps each
big tensor's pages (its arrays are writable, and the file is nobody else's any more), copies the small ones
out, and closes the descriptor: a tensor's pages go back to the system when the last array on them is gone
(`_TensorPages`). A fresh file per request: an answer never shares pages with another.

Like Triton Inference Server's system shared memory for outputs, except that nothing is registered: the
file lives exactly as long as the client's arrays. Linux only (memfd and /proc); elsewhere clients do not
offer it.
"""
from __future__ import annotations

import math
import mmap
import os
import stat
import sys
from _operator import _compare_digest as compare_digest  # hmac's, without loading OpenSSL into workers

import numpy as np

from . import tensors
from .wire import lmscope_pb2 as pb

NAME = "lmscope-answer"
TOKEN_BYTES = 16
ALIGNMENT = mmap.ALLOCATIONGRANULARITY  # each tensor starts on a page: a big one can be mapped on its own
DATA_OFFSET = ALIGNMENT  # the token's page
MAPPED_BYTES = 1 << 20  # tensors from this size on are mapped where they lie; smaller ones copied out

SUPPORTED = sys.platform.startswith("linux") and hasattr(os, "memfd_create")


class SharedMemoryRefused(Exception):
    """The offered file cannot be used; the message says why (the answer is streamed instead)."""


# ----- the client's side ----------------------------------------------------------------------------------

class AnswerFile:
    """The client's file for one request's answer: `offer()` goes into the request; `arrays(placements)` reads
    the placed tensors. Close it (or use it as a context manager) once the answer is in: big tensors keep
    their own mappings, not the descriptor."""

    def __init__(self) -> None:
        self.fd = os.memfd_create(NAME, os.MFD_CLOEXEC)
        self.token = os.urandom(TOKEN_BYTES)
        os.pwrite(self.fd, self.token, 0)

    def offer(self) -> pb.SharedMemory:
        return pb.SharedMemory(pid=os.getpid(), fd=self.fd, token=self.token)

    def arrays(self, placements) -> dict[tuple[str, int], np.ndarray]:
        """Each placed tensor as an array: from MAPPED_BYTES on, on a shared mapping of its own pages (no
        copy); smaller ones copied out (a mapping each would make thousands of kept results thousands of
        mappings, against the kernel's limit per process)."""
        size = os.fstat(self.fd).st_size
        out = {}
        for p in placements:
            dtype = tensors.numpy_dtype(p.dtype)
            shape = tuple(int(d) for d in p.shape)
            nbytes = tensors.nbytes_of(shape, dtype, f"tensor {p.name!r}")
            if nbytes and (p.offset < DATA_OFFSET or p.offset + nbytes > size):
                raise tensors.TensorCodecError(f"tensor {p.name!r} is placed at bytes {p.offset}-{p.offset + nbytes} "
                                               f"of an answer file of {size}")
            if nbytes >= MAPPED_BYTES and p.offset % ALIGNMENT == 0:
                buffer = np.frombuffer(_TensorPages(self.fd, nbytes, offset=p.offset), np.uint8)
            else:
                buffer = tensors.new_buffer(nbytes)
                view, done = memoryview(buffer), 0
                while done < nbytes:
                    n = os.preadv(self.fd, [view[done:]], p.offset + done)
                    if n == 0:
                        raise tensors.TensorCodecError(f"tensor {p.name!r} ends past the answer file")
                    done += n
            out[(p.name, p.sequence)] = buffer.view(dtype).reshape(shape)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorPages(mmap.mmap):
    """One tensor's pages of an answer file, mapped shared: when the last array on them dies, they are
    removed from the file (MADV_REMOVE), so a kept tensor holds its own pages only, not the whole answer's
    (the file lives as long as any of its mappings)."""

    def __del__(self) -> None:
        try:
            self.madvise(mmap.MADV_REMOVE)
        except (ValueError, OSError):  # closed already, or a kernel without it: the pages go with the file
            pass


# ----- the server's side ----------------------------------------------------------------------------------

class AnswerWriter:
    """The worker's writer into an offered file: `place` reserves a tensor's bytes, `write` fills them (in
    pieces, in any order), `placements()` is what the header lists."""

    def __init__(self, pid: int, fd: int, token: bytes):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(path)
        except OSError as exc:
            raise SharedMemoryRefused(f"cannot see the client's file {path} ({exc.strerror}): the client is on "
                                      f"another host, in another pid namespace or runs as another user") from None
        if not target.startswith(f"/memfd:{NAME}"):
            raise SharedMemoryRefused(f"{path} is not an {NAME} memfd")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SharedMemoryRefused(f"cannot open the client's file {path} ({exc.strerror})") from None
        try:
            # again on the file opened: the client could have put another file at that number in between
            if not os.readlink(f"/proc/self/fd/{self.fd}").startswith(f"/memfd:{NAME}"):
                raise SharedMemoryRefused(f"{path} is not an {NAME} memfd")
            info = os.fstat(self.fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 0:
                raise SharedMemoryRefused(f"{path} is not an anonymous memory file")
            if not compare_digest(os.pread(self.fd, TOKEN_BYTES, 0), bytes(token)):
                raise SharedMemoryRefused(f"{path} does not hold the request's token")
        except BaseException:
            os.close(self.fd)
            raise
        self._end = DATA_OFFSET
        self._placed: dict[tuple[str, int], pb.TensorPlacement] = {}

    def place(self, name: str, sequence: int, shape: tuple[int, ...], dtype: np.dtype) -> int:
        """The offset of tensor (name, sequence) in the file, reserved at the first call."""
        placement = self._placed.get((name, sequence))
        if placement is None:
            dtype = np.dtype(dtype)
            placement = pb.TensorPlacement(name=name, sequence=sequence, dtype=tensors.wire_dtype(np.empty(0, dtype)),
                                           shape=list(shape), offset=self._end)
            self._placed[(name, sequence)] = placement
            self._end += -(-math.prod(tuple(shape)) * dtype.itemsize // ALIGNMENT) * ALIGNMENT
        return placement.offset

    def write(self, offset: int, array: np.ndarray) -> None:
        if array.size == 0:
            return
        data = memoryview(np.asarray(array, order="C").reshape(-1)).cast("B")
        while data:
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def write_tensor(self, name: str, sequence: int, array: np.ndarray) -> None:
        self.write(self.place(name, sequence, array.shape, array.dtype), array)

    def placements(self) -> list[pb.TensorPlacement]:
        return list(self._placed.values())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
