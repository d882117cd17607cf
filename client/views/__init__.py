"""Views you can explore: self-contained HTML for the logit lens, attention, neurons and patch sweeps.

Each result object renders itself: in Jupyter through `_repr_html_` and anywhere through
``.to_html(path)``, which writes a page that opens from disk with no network at all (scripts, styles and
data inline; see `page`). The functions here build the fragment from a result:

- `lens_html(lens)`: layers x positions, cells coloured by the top-1 probability, the entropy or a
  target's probability; hovering a cell lists that layer's top-k with probabilities, the targets' ranks,
  and marks the token that really comes next.
- `attention_html(attention)`: every head of a layer as small multiples, one head large; hovering a token
  shades where it attends and who attends to it, hovering a cell gives the probability.
- `neurons_html(activations)`: prompts with each token shaded by a neuron's activation, beside the
  tokens the neuron's value vector promotes and suppresses.
- `patch_html(sweep)`: the layer x position effect grid of activation patching, raw or normalized.
- `sae_html(features)`: SAE features (pick one): its top-activating contexts shaded by its activation,
  the tokens its decoder direction promotes and suppresses, and the histogram of its activations.

Tokens are shown as text: byte pieces of one character joined (`token_labels`), whitespace visible
(a space in a grid label as "␣", a newline as "↵"), CJK as is (the browser's fonts draw it).
"""
from __future__ import annotations

import numpy as np

from ..token_labels import token_labels
from .page import fragment, integers, numbers, write

__all__ = ["lens_html", "attention_html", "neurons_html", "patch_html", "sae_html", "write"]

# Attention probabilities travel as integers in units of 1/ATTENTION_SCALE: 4 decimals, what a hover shows.
ATTENTION_SCALE = 10_000


def lens_html(lens, color: str | int = "prob") -> str:
    """The logit-lens view of a `LogitLens`. color: "prob" (top-1 probability), "entropy", or a target
    token (text or id; fetched with `prob_of` if the result does not hold it yet) selected at first."""
    initial = color
    if color not in ("prob", "entropy"):
        initial = lens.prob_of(color).token_id
    text: dict[int, str] = {}
    for ids_row, tokens_row in zip(lens.top_ids, lens.top_tokens):
        for ids, tokens in zip(ids_row, tokens_row):
            text.update(zip((int(t) for t in ids), tokens))
    text.update(zip(lens.token_ids, lens.prompt_tokens))
    text.update({t.token_id: t.token for t in lens.targets.values()})
    pieces = getattr(lens, "token_pieces", {}) or {}

    def label(token_id: int) -> str:
        piece = pieces.get(token_id)
        return token_labels([piece])[0] if piece is not None else text[token_id]

    if all(t in pieces for t in lens.token_ids):
        prompt = token_labels([pieces[t] for t in lens.token_ids])
    else:
        prompt = list(lens.prompt_tokens)
    next_ids = lens.next_token_ids
    vocab_ids = list(dict.fromkeys([int(t) for t in np.unique(lens.top_ids)]
                                   + [t for t in next_ids if t is not None] + list(lens.targets)))
    index = {t: i for i, t in enumerate(vocab_ids)}
    n = len(lens.token_ids)
    targets = list(lens.targets.values())
    data = {
        "layers": list(lens.layers), "positions": list(lens.positions),
        "tokens": [prompt[p] for p in lens.positions],
        "next": [prompt[p + 1] if p + 1 < n else None for p in lens.positions],
        "nextIndex": [index[t] if t is not None else -1 for t in next_ids],
        "k": int(lens.top_ids.shape[2]), "temperature": float(lens.temperature),
        "vocab": [label(t) for t in vocab_ids], "ids": vocab_ids,
        "top": integers(np.vectorize(index.__getitem__, otypes=[np.int64])(lens.top_ids) if lens.top_ids.size
                        else lens.top_ids),
        "probs": numbers(lens.top_probs), "entropy": numbers(lens.entropy),
        "targets": [{"token": label(t.token_id), "id": t.token_id, "multi": bool(t.multi_token),
                     "probs": numbers(t.probs), "ranks": integers(t.ranks)} for t in targets],
        "color": initial if initial in ("prob", "entropy") else [t.token_id for t in targets].index(initial),
        "fidelity": None if lens.fidelity is None else {
            "threshold": lens.fidelity.threshold,
            # one row per hidden state, like the grid: the embedding row first (nothing rounds before it)
            "estimate": numbers(np.concatenate([np.zeros((1, len(lens.positions))), lens.fidelity.estimate]))},
    }
    return fragment("lens", data, f"logit lens · {len(lens.layers)} hidden states × {len(lens.positions)} positions")


def attention_html(attention, layer: int | None = None, head: int | None = None) -> str:
    """The attention view of an `Attention` result: all its layers (pick one), all heads of the layer as
    small multiples, one head large. layer / head: what is shown first (default: the first layer held,
    the first head)."""
    layers = list(attention.layers)
    first_layer = layers.index(layer) if layer is not None else 0
    first_head = list(attention.heads).index(head) if head is not None else 0
    n = len(attention.tokens)
    rows, cols = np.tril_indices(n)
    lower = np.rint(np.asarray(attention.probs, dtype=np.float64)[:, :, rows, cols] * ATTENTION_SCALE)
    data = {"layers": layers, "heads": list(attention.heads), "tokens": list(attention.tokens),
            "scale": ATTENTION_SCALE, "probs": integers(lower), "layer": first_layer, "head": first_head}
    return fragment("attention", data, f"attention · {len(layers)} layer{'s' if len(layers) > 1 else ''} × "
                                       f"{len(attention.heads)} heads × {n} tokens")


def neurons_html(activations, neuron: int | None = None) -> str:
    """The neuron view of a `NeuronActivations` result: prompts shaded by one neuron's activation (pick the
    neuron), its promoted and suppressed tokens beside them."""
    neurons = list(activations.neurons)
    data = {"layer": int(activations.layer), "neurons": neurons,
            "prompts": [{"tokens": list(tokens), "acts": numbers(acts)}
                        for tokens, acts in zip(activations.tokens, activations.activations)],
            "projections": [{"top": [[t, float(f"{v:.4g}")] for t, v in zip(p.top_tokens, p.top_logits)],
                             "bottom": [[t, float(f"{v:.4g}")] for t, v in zip(p.bottom_tokens, p.bottom_logits)]}
                            for p in activations.projections],
            "neuron": neurons.index(neuron) if neuron is not None else 0}
    return fragment("neurons", data, f"neurons of layer {activations.layer} · {len(neurons)} neuron"
                                     f"{'s' if len(neurons) > 1 else ''} × {len(activations.tokens)} prompts")


def patch_html(sweep, normalized: bool = False) -> str:
    """The activation-patching view of a `PatchSweep`: positions down, layers across, as in causal tracing."""
    span = sweep.clean_value - sweep.corrupted_value
    data = {"layers": list(sweep.layers), "positions": list(sweep.positions), "tokens": list(sweep.tokens),
            "values": numbers(sweep.values), "restored": numbers(sweep.normalized()) if span != 0 else None,
            "clean": float(f"{sweep.clean_value:.6g}"),
            "corrupted": float(f"{sweep.corrupted_value:.6g}"), "site": sweep.site, "metric": sweep.metric_name,
            "normalized": bool(normalized and span != 0)}
    return fragment("patch", data, f"activation patching of {sweep.site} · {len(sweep.layers)} layers × "
                                   f"{len(sweep.positions)} positions")


def sae_html(result, feature: int | None = None) -> str:
    """The feature view of an `SaeFeatures` result: one feature at a time (pick it), its top-activating
    contexts with every token shaded by its activation, its promoted / suppressed tokens and its histogram."""
    indices = [f.index for f in result.features]
    data = {"site": result.site, "dSae": int(result.d_sae), "nTokens": int(result.n_tokens),
            "features": [{"index": int(f.index), "frequency": float(f"{f.frequency:.4g}"),
                          "max": float(f"{f.max_activation:.4g}"), "mean": float(f"{f.mean_activation:.4g}"),
                          "hist": integers(f.histogram), "edges": numbers(f.bin_edges),
                          "promoted": [[t, float(f"{v:.4g}")] for t, v in f.promoted],
                          "suppressed": [[t, float(f"{v:.4g}")] for t, v in f.suppressed],
                          "contexts": [{"prompt": c.prompt, "position": c.position, "center": c.center,
                                        "tokens": list(c.tokens), "acts": numbers(c.activations)}
                                       for c in f.contexts]}
                         for f in result.features],
            "feature": indices.index(feature) if feature is not None else 0}
    return fragment("sae", data, f"SAE features of {result.site} · {len(indices)} of {result.d_sae} · "
                                 f"{result.n_tokens} tokens")
