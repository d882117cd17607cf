"""The gRPC servicer: thin glue between the wire contract and the worker pool.

Each RPC parses its request (`RequestParser`, which refuses bad input with a precise status), hands the
payload to a worker, and streams the answer back as tensor chunks. Errors of any kind become gRPC statuses;
nothing here can take the process down.
"""
from __future__ import annotations

import functools

import grpc

from lmscope.client import tensors
from lmscope.client.wire import lmscope_pb2 as pb
from lmscope.client.wire import lmscope_pb2_grpc as pb_grpc

from .errors import RequestError
from .requests import RequestParser
from .worker import WorkerPool


def _statuses(method):
    """Turn RequestError (and any bug) into a gRPC status for unary and streaming handlers alike."""
    def fail(context, exc):
        if isinstance(exc, RequestError):
            context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), exc.message)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    if method.__name__ in ("Run", "Generate", "Unembed", "GetWeights", "NearestTokens"):
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


def model_info_message(info: dict) -> pb.ModelInfo:
    fields = {k: v for k, v in info.items() if k not in ("limits", "site_shapes")}
    return pb.ModelInfo(**fields, limits=pb.Limits(**info["limits"]))


def _chunks(named_tensors):
    for name, sequence, array in named_tensors:
        for chunk in tensors.to_chunks(name, array, sequence):
            yield pb.RunChunk(tensor=chunk)


class InspectorServicer(pb_grpc.InspectorServicer):
    def __init__(self, pool: WorkerPool, max_message_bytes: int, test_hooks: bool = False):
        self.pool = pool
        self.test_hooks = test_hooks
        info = dict(pool.info)
        info["limits"] = dict(info["limits"], max_message_bytes=max_message_bytes)
        info["n_workers"] = pool.size
        self.parser = RequestParser(info)
        self.info = model_info_message(info)

    def _test_crash(self, context) -> str | None:
        """Test hook, honoured only when the server runs with test hooks: metadata
        `lmscope-test-crash: segv|abort|hang` makes the worker die (or hang) while running this request."""
        if not self.test_hooks:
            return None
        return dict(context.invocation_metadata()).get("lmscope-test-crash")

    @_statuses
    def GetModelInfo(self, request, context):
        return self.info

    @_statuses
    def Tokenize(self, request, context):
        result = self.pool.call("tokenize", self.parser.tokenize(request), context.is_active)
        return pb.TokenizeResponse(**result)

    @_statuses
    def Detokenize(self, request, context):
        result = self.pool.call("detokenize", self.parser.detokenize(request), context.is_active)
        return pb.DetokenizeResponse(**result)

    @_statuses
    def Run(self, request, context):
        payload = self.parser.run(request)
        crash = self._test_crash(context)
        if crash:
            payload["crash"] = crash
        result = self.pool.call("run", payload, context.is_active)
        yield pb.RunChunk(header=pb.RunHeader(
            sequences=[pb.RunHeader.Sequence(**s) for s in result["sequences"]],
            sites=result["sites"], decode_ms=result["decode_ms"], total_ms=result["total_ms"]))
        yield from _chunks(result["tensors"])

    @_statuses
    def Generate(self, request, context):
        for event in self.pool.stream("generate", self.parser.generate(request), context.is_active):
            if "start" in event:
                yield pb.GenerateEvent(start=pb.GenerateEvent.Start(**event["start"]))
            elif "end" in event:
                yield pb.GenerateEvent(end=pb.GenerateEvent.End(**event["end"]))
            else:
                yield pb.GenerateEvent(token=pb.GenerateEvent.Token(id=event["token"], piece=event["piece"],
                                                                    text=event["text"]))

    @_statuses
    def Unembed(self, request, context):
        result = self.pool.call("unembed", self.parser.unembed(request), context.is_active)
        yield from _chunks(result["tensors"])

    @_statuses
    def GetWeights(self, request, context):
        result = self.pool.call("weights", self.parser.weights(request), context.is_active)
        yield from _chunks(result["tensors"])


    @_statuses
    def NearestTokens(self, request, context):
        result = self.pool.call("nearest_tokens", self.parser.nearest_tokens(request), context.is_active)
        yield from _chunks(result["tensors"])
