"""One naming scheme for every capture and intervention site, and the filters that select them.

Site names follow TransformerLens: ``embed``, ``blocks.{L}.resid_post``, ``blocks.{L}.attn.pattern``, ...
The server maps each name onto the llama.cpp graph tensor that holds it for the model's family
(``service/architectures.py``), verifies at start-up what the residual sites hold, and lists in
``ModelInfo.capture_sites`` the names the loaded model really offers (``ModelInfo.unavailable_sites`` says
why the others are not; docs/architectures.md has the table per family). Layer ``L`` is always the 0-based
transformer block; ``blocks.{L}.resid_post`` is its output, which is hidden-state index ``L + 1`` (index 0
is ``embed``). A site means the same on every family.

Each kind of site is described once, in :data:`SITE_KINDS` (graph order): what it holds, whether it is in
a block, its shape per prompt in the model's dimensions, and whether start-up verification checks it. The
rest is derived from those records: :data:`BLOCK_SITES`, :data:`PATTERN_SITES` (one (query, key) matrix per
head instead of one row per token), which sites an intervention may edit (one vector per token:
:func:`site_editable`), and a site's shape (:func:`site_shape`).

``attn.scores``: llama.cpp scales and masks the scores inside its softmax, so its ``kq`` tensor holds neither; lmscope
returns the causal part and 0 above the diagonal, like the pattern. With the default F16 KV cache, q and k
are rounded to float16 before the product: ``pattern == softmax(scores / sqrt(head_dim))`` with the mask.
Both attention sites exist only without flash attention, which the server turns off for such requests.

Filters, accepted wherever sites are selected: an exact name, a shell-style glob (``"blocks.*.resid_post"``,
``"blocks.1?.attn.*"``), a list of those, or a predicate called on each name.

>>> select_sites(["embed", "blocks.0.resid_post", "blocks.1.resid_post", "ln_final"], "blocks.*.resid_post")
['blocks.0.resid_post', 'blocks.1.resid_post']
>>> site_layer("blocks.12.mlp.post")
12
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

SiteFilter = Union[str, Sequence[str], Callable[[str], bool]]


@dataclass(frozen=True)
class SiteKind:
    """One kind of site (``blocks.{L}.<name>`` in every block, or a name of its own outside the blocks).

    `shape` is its shape per prompt, one axis name per axis: ``tokens`` (the prompt's positions; both axes of
    an attention matrix), ``n_embd``, ``n_ff``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_expert`` (routed
    experts), ``n_expert_used`` (those each token runs), ``n_ff_exp`` (an expert's width), or a product of them
    (``n_head * head_dim``). `verified`: the server checks what it holds at start-up (an identity of the
    residual stream, a norm or a probability check; docs/architectures.md). `edits`: interventions may edit
    it where it has one vector per token (False: a row that is not a vector space's point, like
    probabilities)."""
    name: str
    holds: str
    shape: tuple[str, ...]
    block: bool = True
    verified: bool = False
    edits: bool = True

    @property
    def pattern(self) -> bool:
        """One (query tokens, key tokens) matrix per head rather than one row per token."""
        return self.shape[0] != "tokens"

    @property
    def editable(self) -> bool:
        """One vector per token, which an intervention may add to, set or ablate."""
        return self.edits and self.shape[0] == "tokens" and len(self.shape) == 2


_ROW, _FF = ("tokens", "n_embd"), ("tokens", "n_ff")
_Q, _KV = ("tokens", "n_head", "head_dim"), ("tokens", "n_head_kv", "head_dim")
_ATTENTION = ("n_head", "tokens", "tokens")

#: Every kind of site, in graph order, by name.
SITE_KINDS: dict[str, SiteKind] = {kind.name: kind for kind in (
    SiteKind("embed", "what enters block 0: the token embeddings after any scale (Gemma: x sqrt(n_embd))", _ROW,
             block=False, verified=True),
    SiteKind("ln1", "normed input of the attention", _ROW, verified=True),
    SiteKind("attn.q_normed", "QK-norm families (Qwen3, Gemma 3): q after its per-head norm, before RoPE", _Q),
    SiteKind("attn.k_normed", "QK-norm families (Qwen3, Gemma 3): k after its per-head norm, before RoPE", _KV),
    SiteKind("attn.q", "queries after RoPE", _Q),
    SiteKind("attn.k", "keys after RoPE", _KV),
    SiteKind("attn.v", "values", _KV),
    SiteKind("attn.scores", "raw q . k (not scaled by 1/sqrt(head_dim)); 0 for keys after the query", _ATTENTION),
    SiteKind("attn.pattern", "attention probabilities (causal; sliding-window layers: 0 outside the window)",
             _ATTENTION, verified=True),
    SiteKind("attn.z", "per-head attention output before the output projection", ("tokens", "n_head * head_dim")),
    SiteKind("attn_out_pre_norm", "Gemma: the output projection, before the attention post-norm", _ROW,
             verified=True),
    SiteKind("attn_out", "what the attention branch adds to the stream (after any post-norm)", _ROW, verified=True),
    SiteKind("resid_mid", "the residual stream between the branches: resid_pre + attn_out", _ROW, verified=True),
    SiteKind("ln2", "normed input of the MLP", _ROW, verified=True),
    SiteKind("mlp.gate", "gate projection (not offered where fused or mixture-of-experts)", _FF),
    SiteKind("mlp.up", "up projection (not offered where fused or mixture-of-experts)", _FF),
    SiteKind("mlp.post", "neuron activations act(gate) * up (SwiGLU, Gemma: GeGLU)", _FF),
    SiteKind("mlp.router", "mixture of experts: the router's probabilities over the routed experts (each token "
             "runs the n_expert_used most probable)", ("tokens", "n_expert"), edits=False),
    SiteKind("mlp.experts.gate", "mixture of experts: the gate projection of each token's experts, most probable "
             "first", ("tokens", "n_expert_used", "n_ff_exp")),
    SiteKind("mlp.experts.up", "mixture of experts: the up projection of each token's experts, most probable first",
             ("tokens", "n_expert_used", "n_ff_exp")),
    SiteKind("mlp.experts.post", "mixture of experts: the neuron activations act(gate) * up of each token's "
             "experts, most probable first", ("tokens", "n_expert_used", "n_ff_exp")),
    SiteKind("mlp_out_pre_norm", "Gemma: the down projection, before the FFN post-norm", _ROW, verified=True),
    SiteKind("mlp_out", "what the MLP branch adds (after any post-norm; MoE: the experts' weighted sum)", _ROW,
             verified=True),
    SiteKind("resid_post", "the block's output: resid_mid + mlp_out", _ROW, verified=True),
    SiteKind("ln_final", "final-normed residual, the input of the LM head", _ROW, block=False, verified=True),
)}

# Site templates in graph order within a block; `{L}` is the layer.
BLOCK_SITES = tuple(kind.name for kind in SITE_KINDS.values() if kind.block)
# Sites of the residual stream and what the branches add to it: their meaning is the same on every family.
RESIDUAL_SITES = ("attn_out", "resid_mid", "mlp_out", "resid_post")
# Sites whose tensors are (heads, query tokens, key tokens) rather than one row per token.
PATTERN_SITES = tuple(kind.name for kind in SITE_KINDS.values() if kind.pattern)
# Sites an intervention may edit: one vector per token.
EDITABLE_SITES = tuple(kind.name for kind in SITE_KINDS.values() if kind.editable)

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


def block_site(layer: int, kind: str) -> str:
    return f"blocks.{layer}.{kind}"


def site_layer(name: str) -> int | None:
    """The block index in a site name, or None for ``embed`` / ``ln_final``."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def site_kind(name: str) -> str:
    """The name without its block prefix: ``blocks.3.attn.q`` -> ``attn.q``."""
    match = _LAYER.match(name)
    return match.group(2) if match else name


def all_site_names(n_layer: int) -> list[str]:
    """Every name of the scheme for a model of `n_layer` blocks, in graph order."""
    names: list[str] = []
    for kind in SITE_KINDS.values():
        if not kind.block:
            names.append(kind.name)
        elif kind.name == BLOCK_SITES[0]:
            names += [block_site(L, k) for L in range(n_layer) for k in BLOCK_SITES]
    return names


def is_pattern_site(name: str) -> bool:
    """Whether the site holds one (query, key) matrix per head (``attn.scores``, ``attn.pattern``)."""
    return site_kind(name) in PATTERN_SITES


def site_editable(name: str) -> bool:
    """Whether an intervention may edit the site (one vector per token); False for an unknown name."""
    return site_kind(name) in EDITABLE_SITES


def site_shape(name: str, dims: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of a site for one prompt, given the model's dimensions and the prompt's length in `dims`
    (``tokens``, ``n_embd``, ``n_ff``, ``n_head``, ``n_head_kv``, ``head_dim``; only those the site uses).

    >>> site_shape("blocks.0.attn.v", {"tokens": 5, "n_head_kv": 2, "head_dim": 16})
    (5, 2, 16)
    """
    return tuple(math.prod(dims[factor.strip()] for factor in axis.split("*"))
                 for axis in SITE_KINDS[site_kind(name)].shape)


def unavailable_reason(name: str, unavailable: Mapping[str, str]) -> str | None:
    """Why the model does not offer `name`, from `ModelInfo.unavailable_sites` (exact or ``blocks.*.<kind>``)."""
    if name in unavailable:
        return unavailable[name]
    return unavailable.get(f"blocks.*.{site_kind(name)}") if site_layer(name) is not None else None


def select_sites(available: Iterable[str], selection: SiteFilter, unavailable: Mapping[str, str] | None = None) -> list[str]:
    """The names in `available` chosen by `selection`, in `available`'s order.

    A string or list entry without glob characters must name an available site exactly; otherwise a
    `KeyError` says which name is unknown (a typo must not silently capture nothing) and, for a site the
    model lacks (`unavailable`, from ``ModelInfo.unavailable_sites``), why it lacks it and which sites of
    that block it has.
    """
    available = list(available)
    if callable(selection):
        return [name for name in available if selection(name)]
    patterns = [selection] if isinstance(selection, str) else list(selection)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"site filters are strings, lists of strings or predicates, not {type(pattern).__name__}")
        if any(c in pattern for c in "*?["):
            matched = fnmatch.filter(available, pattern)
            if not matched:
                why = sorted({f"{name}: {reason}" for name, reason in (unavailable or {}).items()
                              if fnmatch.fnmatch(name.replace("*", "0"), pattern)})
                raise KeyError(f"no capture site matches {pattern!r}"
                               + (f"; this model does not offer {'; '.join(why)}" if why else ""))
            chosen.update(matched)
        elif pattern in available:
            chosen.add(pattern)
        else:
            reason = unavailable_reason(pattern, unavailable or {})
            if reason is not None:
                layer = site_layer(pattern)
                same_block = [n for n in available if site_layer(n) == layer] if layer is not None else []
                offered = ", ".join(site_kind(n) for n in same_block) if same_block else ", ".join(available)
                raise KeyError(f"this model does not offer {pattern!r}: {reason}. "
                               f"{'Block ' + str(layer) + ' offers' if layer is not None else 'It offers'}: {offered}")
            raise KeyError(f"unknown capture site {pattern!r}; ModelInfo.capture_sites lists the valid names")
    return [name for name in available if name in chosen]
