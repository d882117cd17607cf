"""Attention patterns per head (`Attention`) and per-head statistics (`HeadSummary`).

The server captures ``blocks.L.attn.pattern``: llama.cpp's softmax output for the requested layers only,
cut to the prompt's real keys (llama.cpp pads its key axis to the KV-cache size; the padding is dropped)
and causal (keys after the query are exactly 0). Flash attention, which never materialises the pattern,
is switched off for such a request only.

Per-head statistics, averaged over query positions 1..n-1 (position 0 can only attend to itself):

- entropy: ``-sum_k p log p`` of a query's attention row, in nats. Low = the head looks at few tokens.
- previous-token score: attention paid to the token right before the query (previous-token heads,
  a building block of induction circuits).
- first-token score: attention paid to position 0 (BOS or the first token), where heads with nothing to do
  park their attention ("attention sinks").

A head whose previous-token or first-token score is at least `ROLE_THRESHOLD` is labelled with that role.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import invalid_argument
from .heatmap import heatmap

ROLE_THRESHOLD = 0.5


@dataclass
class Attention:
    """probs: (n_layers asked, n_heads asked, n_tokens, n_tokens), query x key, rows sum to 1."""
    probs: np.ndarray
    layers: list[int]
    heads: list[int]
    tokens: list[str]
    token_ids: list[int]

    def pattern(self, layer: int, head: int) -> np.ndarray:
        """(n_tokens, n_tokens) pattern of one head, by model layer and head index."""
        return self.probs[self._layer_index(layer), self._head_index(head)]

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not captured; this result holds layers {self.layers}")
        return self.layers.index(layer)

    def _head_index(self, head: int) -> int:
        if head not in self.heads:
            raise KeyError(f"head {head} was not kept; this result holds heads {self.heads}")
        return self.heads.index(head)

    def head_summary(self) -> "HeadSummary":
        n = self.probs.shape[-1]
        if n < 2:
            raise invalid_argument("head statistics need a prompt of at least 2 tokens")
        rows = self.probs[:, :, 1:, :].astype(np.float64)          # queries 1..n-1
        entropy = -(rows * np.log(np.where(rows > 0, rows, 1.0))).sum(axis=-1).mean(axis=-1)
        queries = np.arange(1, n)
        previous = rows[:, :, queries - 1, queries - 1].mean(axis=-1)
        first = rows[:, :, :, 0].mean(axis=-1)
        return HeadSummary(layers=list(self.layers), heads=list(self.heads), entropy=entropy,
                           previous_token=previous, first_token=first)

    def plot(self, layer: int, head: int, *, ax=None, save: str | None = None):
        """Heatmap of one head with token labels (queries down, keys across); returns the figure."""
        return heatmap(self.pattern(layer, head), row_labels=self.tokens, col_labels=self.tokens,
                       title=f"attention, layer {layer} head {head}", xlabel="key (attended-to token)",
                       ylabel="query token", colorbar_label="probability", cmap="magma", vmin=0.0, vmax=1.0,
                       ax=ax, save=save)

    def to_html(self, path=None, *, layer: int | None = None, head: int | None = None) -> str:
        """The attention view (`lmscope.client.views`): every layer held (pick one), all heads of a layer as
        small multiples, one head large; a self-contained page, written to `path` if given. layer / head:
        what it shows first."""
        from .views import attention_html, write

        return write(attention_html(self, layer=layer, head=head), "lmscope attention", path)

    def _repr_html_(self) -> str:
        from .views import attention_html

        return attention_html(self)

    def __repr__(self) -> str:
        return (f"Attention({len(self.tokens)} tokens, layers {self.layers}, {len(self.heads)} heads; "
                f"probs {tuple(self.probs.shape)})")


@dataclass
class HeadSummary:
    """Per-head statistics, arrays of shape (n_layers, n_heads) (see the module docstring)."""
    layers: list[int]
    heads: list[int]
    entropy: np.ndarray
    previous_token: np.ndarray
    first_token: np.ndarray

    def role(self, layer_index: int, head_index: int) -> str:
        roles = []
        if self.previous_token[layer_index, head_index] >= ROLE_THRESHOLD:
            roles.append("previous-token")
        if self.first_token[layer_index, head_index] >= ROLE_THRESHOLD:
            roles.append("first-token")
        return ", ".join(roles)

    def rows(self) -> list[dict]:
        """One dict per head (layer, head, entropy, previous_token, first_token, role): a table's rows."""
        return [dict(layer=layer, head=head, entropy=float(self.entropy[i, j]),
                     previous_token=float(self.previous_token[i, j]), first_token=float(self.first_token[i, j]),
                     role=self.role(i, j))
                for i, layer in enumerate(self.layers) for j, head in enumerate(self.heads)]

    def __repr__(self) -> str:
        lines = [f"{'layer':>5} {'head':>4} {'entropy':>8} {'prev-tok':>8} {'first-tok':>9}  role"]
        lines += [f"{r['layer']:>5} {r['head']:>4} {r['entropy']:>8.3f} {r['previous_token']:>8.3f} "
                  f"{r['first_token']:>9.3f}  {r['role']}" for r in self.rows()]
        return "\n".join(lines)
