"""The gRPC servicer: thin glue between the wire contract and the worker pool.

Each RPC parses its request into a typed job (`RequestParser`, which refuses bad input with a precise
status; jobs are in `contracts.py`), hands the job to a worker, and returns the worker's answer: small
answers are already proto messages, arrays are streamed as tensor chunks as the worker sends them. Errors of
any kind become gRPC statuses; nothing here can take the process down.
"""
from __future__ import annotations

import dataclasses
import functools
from urllib.parse import unquote

import grpc

from lmscope.proto import tensors
from lmscope.proto.addresses import is_loopback_host
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.proto.wire import lmscope_pb2_grpc as pb_grpc

from . import heap
from .contracts import CrashJob, RunResult, TensorPiece
from .errors import RequestError, internal_error
from .pipe import Kind
from .requests import RequestParser
from .worker import WorkerPool

SERVICE = pb.DESCRIPTOR.services_by_name["Inspector"]
CRASH_METADATA = "lmscope-test-crash"


def _statuses(method):
    """Turn RequestError (and any bug) into a gRPC status, for unary and server-streaming RPCs alike (which
    one a method is, the proto says). A bug becomes INTERNAL with an error id, its traceback in the server's
    log (`errors.internal_error`); a RequestError's code is a status name (checked when it was made)."""
    def fail(context, exc):
        if not isinstance(exc, RequestError):
            exc = internal_error(exc, method.__name__)
        context.abort(grpc.StatusCode[exc.code], exc.message)

    if SERVICE.methods_by_name[method.__name__].server_streaming:
        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001
                fail(context, exc)
        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            fail(context, exc)
    return unary


def _tensor_answer(messages):
    """A worker's tensor answer as RunChunks, each piece sent on as it arrives (see `WorkerPool.messages`), its
    chunks serialized here in one copy: every tensor comes as pieces ahead of "done" (`worker._send_answer`),
    which brings a Run's header."""
    try:
        for kind, value in messages:
            if kind is Kind.ITEM:
                piece: TensorPiece = value
                yield from tensors.encoded_run_chunks(piece.name, piece.array, piece.sequence, shape=piece.shape,
                                                      offset=piece.offset)
            elif isinstance(value, RunResult):
                yield pb.RunChunk(header=value.header)
    finally:
        heap.return_free_memory()


def on_this_host(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "unix:...") connected from this host:
    only such a client's offer of shared memory is looked at (`lmscope.proto.shared_memory`)."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    return is_loopback_host(unquote(rest).rpartition(":")[0])


class InspectorServicer(pb_grpc.InspectorServicer):
    def __init__(self, pool: WorkerPool, max_message_bytes: int, test_hooks: bool = False):
        self.pool = pool
        self.test_hooks = test_hooks
        self.info = pb.ModelInfo()
        self.info.CopyFrom(pool.info.model)
        self.info.limits.max_message_bytes = max_message_bytes
        self.info.n_workers = pool.size
        self.parser = RequestParser(pool.info)

    def _crash_job(self, context) -> CrashJob | None:
        """Test hook, honoured only when the server runs with --test-hooks (docs/reliability.md): a Run
        carrying metadata `lmscope-test-crash: segv|abort|hang|raise` makes its worker die (or hang, or raise
        a plain exception: an internal error) instead."""
        if not self.test_hooks:
            return None
        how = dict(context.invocation_metadata()).get(CRASH_METADATA)
        return CrashJob(how) if how else None

    @_statuses
    def GetModelInfo(self, request, context):
        return self.info

    @_statuses
    def Tokenize(self, request, context):
        return self.pool.call(self.parser.tokenize(request), context.is_active)

    @_statuses
    def Detokenize(self, request, context):
        return self.pool.call(self.parser.detokenize(request), context.is_active)

    @_statuses
    def Run(self, request, context):
        job = self.parser.run(request)
        if job.shared_memory is not None and not on_this_host(context.peer()):
            job = dataclasses.replace(job, shared_memory=None, shared_memory_refused=(
                f"the client connects from {context.peer()}, not from this host: its memory cannot be shared"))
        yield from _tensor_answer(self.pool.messages(self._crash_job(context) or job, context.is_active))

    @_statuses
    def Generate(self, request, context):
        yield from self.pool.stream(self.parser.generate(request), context.is_active)

    @_statuses
    def Unembed(self, request, context):
        yield from _tensor_answer(self.pool.messages(self.parser.unembed(request), context.is_active))

    @_statuses
    def GetWeights(self, request, context):
        yield from _tensor_answer(self.pool.messages(self.parser.weights(request), context.is_active))

    @_statuses
    def NearestTokens(self, request, context):
        yield from _tensor_answer(self.pool.messages(self.parser.nearest_tokens(request), context.is_active))
