"""FFN neurons as key-value memories (Geva et al., arXiv 2012.14913): results of the neuron tools.

A llama block's feed-forward layer computes ``down(silu(gate(x)) * up(x))``. Its neuron ``i`` has an
activation ``a_i = silu(gate_i . x) * up_i . x`` (the site ``blocks.L.mlp.post``, n_ff wide) and a *value
vector*: column ``i`` of the down projection ``blk.L.ffn_down.weight`` (numpy shape (n_embd, n_ff)). The
layer's output is the sum of value vectors weighted by activations, so a neuron writes ``a_i * value_i``
into the residual stream.

Reading a value vector through the LM head (``W_U @ value_i``) says which next tokens the neuron promotes
when it fires positively (top tokens) and suppresses (bottom tokens; the reverse holds for a negative
activation, which SwiGLU allows). Following the paper, the vector goes through the LM head *without* the
final norm: the final RMSNorm rescales the whole residual stream, not this one contribution, so applying it
to the vector alone would distort it. The scores are the exact logit contributions per unit activation.
For the normed view, use ``c.lens_vectors(c.neuron_value(L, i), final_norm=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Neurons:
    """activations: (n_tokens, n_ff), the neuron activations of one layer for every prompt token."""
    layer: int
    activations: np.ndarray
    tokens: list[str]
    token_ids: list[int]

    def top(self, position: int = -1, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The `k` neurons with the largest activation at `position`: (neuron indices, activations)."""
        row = self.activations[position]
        order = np.argsort(-row, kind="stable")[:k]
        return order, row[order]

    def __repr__(self) -> str:
        return f"Neurons(layer {self.layer}, {len(self.tokens)} tokens x {self.activations.shape[1]} neurons)"


@dataclass
class NeuronTokens:
    """The tokens a neuron's value vector promotes (top) and suppresses (bottom), with their logit
    contributions per unit activation (``value . W_U[token]``)."""
    layer: int
    neuron: int
    top_ids: np.ndarray
    top_tokens: list[str]
    top_logits: np.ndarray
    bottom_ids: np.ndarray
    bottom_tokens: list[str]
    bottom_logits: np.ndarray

    def __repr__(self) -> str:
        lines = [f"NeuronTokens(layer {self.layer}, neuron {self.neuron})",
                 f"  {'promotes':<24}{'logit':>8}    {'suppresses':<24}{'logit':>8}"]
        for t, tl, b, bl in zip(self.top_tokens, self.top_logits, self.bottom_tokens, self.bottom_logits):
            lines.append(f"  {t!r:<24}{tl:>8.3f}    {b!r:<24}{bl:>8.3f}")
        return "\n".join(lines)


@dataclass
class Hit:
    """One token where the neuron fired: prompt index, position, token, activation, text around it."""
    prompt: int
    position: int
    token: str
    activation: float
    context: str


@dataclass
class TopActivating:
    """The tokens of a corpus with the largest activations of one neuron, largest first."""
    layer: int
    neuron: int
    hits: list[Hit]
    n_tokens_scanned: int
    activations: list[np.ndarray] = field(repr=False)  # per prompt: (n_tokens,) activations of the neuron

    def rows(self) -> list[dict]:
        return [vars(hit).copy() for hit in self.hits]

    def __repr__(self) -> str:
        lines = [f"TopActivating(layer {self.layer}, neuron {self.neuron}, {self.n_tokens_scanned} tokens scanned)",
                 f"  {'activation':>10} {'prompt':>6} {'pos':>4}  {'token':<16} context"]
        lines += [f"  {h.activation:>10.3f} {h.prompt:>6} {h.position:>4}  {h.token!r:<16} {h.context}"
                  for h in self.hits]
        return "\n".join(lines)


@dataclass
class NeuronActivations:
    """Chosen neurons of one layer over several prompts: each token's activation and each neuron's
    promoted / suppressed tokens. `Client.neuron_activations` returns it; it renders as the neuron view."""
    layer: int
    neurons: list[int]
    tokens: list[list[str]]          # per prompt: a readable label per token
    activations: list[np.ndarray]    # per prompt: (n_tokens, len(neurons))
    projections: list[NeuronTokens]  # per neuron: its value vector through the LM head

    def to_html(self, path=None, *, neuron: int | None = None) -> str:
        """The neuron view (`lmscope.client.views`) as a self-contained page, written to `path` if given."""
        from .views import neurons_html, write

        return write(neurons_html(self, neuron=neuron), f"neurons of layer {self.layer}", path)

    def _repr_html_(self) -> str:
        from .views import neurons_html

        return neurons_html(self)

    def __repr__(self) -> str:
        return (f"NeuronActivations(layer {self.layer}, neurons {self.neurons}, {len(self.tokens)} prompts, "
                f"{sum(len(t) for t in self.tokens)} tokens)")
