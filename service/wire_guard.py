"""Registering the Inspector service so that a request that does not parse is the client's error.

grpc's generated `add_InspectorServicer_to_server` decodes requests with `Message.FromString`; when the bytes
are not a valid message (garbage, truncated fields, a string field that is not UTF-8), grpc itself answers
INTERNAL "Exception deserializing request!", a status that blames the server and says nothing useful. Here
the decoder never raises: it hands the handler a `MalformedRequest`, and the handler answers
INVALID_ARGUMENT naming the message that failed to parse. The handlers are built from the service
descriptor, so RPCs added to the proto later are covered without touching this module.

Answers: a handler returns messages, or, for the tensor chunks of a big answer, those messages already
serialized (`tensors.encoded_run_chunks`), which pass through as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory

from lmscope.proto.wire import lmscope_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inspector"]


@dataclass
class MalformedRequest:
    message_type: str
    error: str

    def abort(self, context) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request is not a valid {self.message_type} ({self.error}): it is malformed protobuf "
                      f"or has a string field that is not UTF-8; send strings as valid Unicode text")


def _tolerant_decoder(message_class):
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except protobuf_message.DecodeError as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc) or "cannot decode")
    return decode


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _guarded(method, streaming: bool):
    if streaming:
        def stream(request, context):
            if isinstance(request, MalformedRequest):
                request.abort(context)
            yield from method(request, context)
        return stream

    def unary(request, context):
        if isinstance(request, MalformedRequest):
            request.abort(context)
        return method(request, context)
    return unary


def add_inspector_service(servicer, server: grpc.Server) -> None:
    """What `lmscope_pb2_grpc.add_InspectorServicer_to_server` does, with tolerant request decoding and answers
    already serialized passed through."""
    handlers = {}
    for method in SERVICE.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client-streaming RPCs are not handled here")
        request_class = message_factory.GetMessageClass(method.input_type)
        make_handler = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                        else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make_handler(_guarded(getattr(servicer, method.name), method.server_streaming),
                                             request_deserializer=_tolerant_decoder(request_class),
                                             response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
