"""Sampling and generation: llama.cpp's sampler chain over a context, interventions applied to every token.

The prompt and each generated token go through the same decode loop as a forward pass
(`Contexts.decode`), with the request's `CapturePass` active, so an intervention without positions edits
the prompt and every generated token alike.
"""
from __future__ import annotations

import codecs
import time
from typing import Iterator

from lmscope.proto.wire import lmscope_pb2 as pb

from .batching import Cancelled, Contexts, Row
from .capture import CapturePass
from .model import Model
from .native import llama as lc


def sampler_chain(temperature: float, top_k: int, top_p: float, seed: int):
    """Greedy at temperature 0; otherwise top-k, top-p, temperature, then a seeded draw."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if temperature <= 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
    if 0 < top_p < 1:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(top_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def generate(model: Model, contexts: Contexts, ctx, active: CapturePass, prompt: list[int], max_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int,
             stop: list[str]) -> Iterator[pb.GenerateEvent]:
    """The wire's events: a `token` per generated token, then `end`."""
    sampler = sampler_chain(temperature, top_k, top_p, seed)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text, finish, n_generated = "", "length", 0
    start = time.perf_counter()
    try:
        contexts.reset_memory(ctx)
        last = {len(prompt) - 1}  # the prompt's last row and its logits: the first token's distribution
        cell = contexts.decode(ctx, active, contexts.ubatches([0], [prompt], [last], [last]))
        prompt_ms = (time.perf_counter() - start) * 1e3
        position = len(prompt)
        while n_generated < max_tokens:
            if contexts.cancelled():
                raise Cancelled()
            token = lc.llama_sampler_sample(sampler, ctx, -1)
            if model.is_end_of_generation(token):
                finish = "eos"
                break
            n_generated += 1
            piece = model.piece(token, special=False)
            new_text = decoder.decode(piece)
            text += new_text
            hit = next((s for s in stop if s and s in text), None)
            if hit is not None:
                text = text[:text.index(hit)]
                yield _token(token, piece, new_text)
                finish = "stop"
                break
            yield _token(token, piece, new_text)
            if n_generated == max_tokens:
                break
            cell = contexts.decode(ctx, active, [[Row(token, position, 0, True, True)]], first_cell=cell)
            position += 1
    finally:
        lc.llama_sampler_free(sampler)
        contexts.reset_memory(ctx)
    yield pb.GenerateEvent(end=pb.GenerateEvent.End(
        finish_reason=finish, n_generated=n_generated, prompt_ms=prompt_ms,
        generate_ms=(time.perf_counter() - start) * 1e3 - prompt_ms, text=text))


def _token(token: int, piece: bytes, text: str) -> pb.GenerateEvent:
    return pb.GenerateEvent(token=pb.GenerateEvent.Token(id=token, piece=piece, text=text))
