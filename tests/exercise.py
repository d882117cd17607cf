"""Requests that keep a model worker busy for as long as a reliability check needs.

A random-weight test model soon samples its end-of-sequence token, so "a long generation" needs help: the
intervention here pins the final-normed state of every position to a multiple of one token's row of the
LM head, so greedy decoding repeats that token until `max_tokens`, at the model's full speed. The tests
and the fault script use it to have a request reliably in flight when they kill, cancel or stop things.
"""
from __future__ import annotations

from lmscope.client import Intervention
from lmscope.proto.tensor_names import head_tensor_name
from lmscope.proto.wire import lmscope_pb2 as pb

PINNED_TOKEN = 100


def endless(client, token: int = PINNED_TOKEN) -> list[Intervention]:
    """Interventions that make greedy generation repeat `token` for ever (never end-of-sequence)."""
    row = client.weights(head_tensor_name(client.model_info().tied_embeddings), [token])[0]
    return [Intervention("set", ["ln_final"], 10 * row)]


def endless_request(client, prompt: str = "The capital of France is", max_tokens: int = 4000) -> pb.GenerateRequest:
    """A raw GenerateRequest for an endless generation (for callers that drive the stream themselves)."""
    return pb.GenerateRequest(prompt=pb.Prompt(text=prompt), max_tokens=max_tokens,
                              interventions=[iv.to_proto() for iv in endless(client)])
