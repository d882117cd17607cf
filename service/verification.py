"""The start-up probe: which capture sites this model really has, their shapes, and whether the numpy
unembedding reproduces llama.cpp's logits.

The site table (`service/graph_sites.py`) says where each site *would* be; whether a loaded model's graph
has that node is learnt by decoding a token with a callback that records every node it is asked about.
The lens and `Unembed` compute final norm + LM head from the GGUF weights in numpy, so they are checked
against llama.cpp's own logits before they are offered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import llama_cpp as lc

from lmscope.client.sites import all_site_names, site_kind

from . import ggml
from .batching import Contexts
from .graph_sites import is_pattern_site, rule_for
from .model import Model

if TYPE_CHECKING:
    from .engine import Engine

_PROBE_N_CTX = 256           # the start-up probe decodes one token
_CHECK_VOCAB_SAMPLE = 256    # vocabulary rows compared by the start-up unembedding check


class _Probe:
    """A pass that computes nothing for us: it records the shape of every site's node as the graph is built."""

    def __init__(self, n_layer: int):
        self.error: BaseException | None = None
        self.wanted: dict[bytes, list[tuple[str, int | None]]] = {}
        for site in all_site_names(n_layer):
            node, op = rule_for(site)
            self.wanted.setdefault(node.encode(), []).append((site, ggml.OP_CODES[op] if op else None))
        self.seen: dict[str, tuple] = {}
        self._layout_checked = False

    def begin_ubatch(self, rows, outputs, first_cell) -> None:
        pass

    def callback(self, tensor, ask, _user_data) -> bool:
        if ask:
            if not self._layout_checked:
                ggml.check_layout(tensor)
                self._layout_checked = True
            for site, op in self.wanted.get(ggml.name_of(tensor), ()):
                if site not in self.seen and (op is None or ggml.op_of(tensor) == op):
                    self.seen[site] = ggml.shape_of(tensor)
        return not ask


def probe_sites(model: Model, contexts: Contexts) -> dict[str, tuple[int, ...]]:
    """Decode one token recording every node, to learn which sites exist and their shapes."""
    probe = _Probe(model.n_layer)
    # Without flash attention, so that the attention-pattern nodes exist; freed afterwards. One token needs
    # no more than llama.cpp's smallest context (a full-size one would raise the worker's peak memory).
    ctx, callback = contexts.new(flash_attn=False, n_ctx=min(contexts.n_ctx, _PROBE_N_CTX))
    try:
        token = model.bos if model.bos >= 0 else 0
        contexts.decode(ctx, probe, [[(token, 0, 0, True)]])
    finally:
        lc.llama_free(ctx)
    del callback
    shapes = {}
    for site in all_site_names(model.n_layer):
        if site not in probe.seen:
            continue
        ne = probe.seen[site]
        kind = site_kind(site)
        if is_pattern_site(site):
            shapes[site] = (ne[2],)                    # heads; the rest depends on the prompt
        elif kind in ("attn.q", "attn.k"):
            shapes[site] = (ne[1], ne[0])              # (heads, head_dim)
        elif kind == "attn.v":
            width = ne[0] * ne[1] * ne[2]
            shapes[site] = (model.n_head_kv, width // model.n_head_kv)
        else:
            shapes[site] = (ne[0],)
    return shapes


def check_unembedding(engine: "Engine") -> str | None:
    """None if numpy's final norm + LM head reproduce llama.cpp's logits, else why not.

    Only some vocabulary rows are compared (each position's top logits and a fixed random sample):
    dequantizing the whole LM head here would cost every worker its size in float32 (113 MB for
    SmolLM2) before anyone asked for a lens.
    """
    from .engine import ForwardRequest

    last = f"blocks.{engine.n_layer - 1}.resid_post"
    if last not in engine.site_shapes:
        return f"this model has no {last} site, so the lens cannot be checked"
    tokens = engine.tokenize("The quick brown fox jumps", add_special=True)[:8] or [0]
    result = engine.forward(ForwardRequest(prompts=[tokens], capture=[last], logits="all"))
    top = np.argsort(-result.logits[0], axis=1)[:, :8].reshape(-1)
    sample = np.random.default_rng(0).choice(engine.n_vocab, min(engine.n_vocab, _CHECK_VOCAB_SAMPLE), replace=False)
    ids = np.unique(np.concatenate([top, sample]))
    theirs = result.logits[0][:, ids]
    weights = engine.weights
    head = weights.rows("token_embd.weight" if weights.tied else "output.weight", ids)
    ours = weights.final_norm(result.captures[last][0]) @ head.T
    error = float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-6))
    if not error < 0.05:
        return (f"final norm + LM head computed from the GGUF weights differ from llama.cpp's logits "
                f"(relative error {error:.3f}) for architecture {weights.architecture}: "
                f"the lens and Unembed are disabled for this model")
    return None
