"""One naming scheme for every capture and intervention site, and the filters that select them.

Site names follow TransformerLens: ``embed``, ``blocks.{L}.resid_post``, ``blocks.{L}.attn.pattern``, ...
The server maps each name onto the llama.cpp graph tensor that holds it for the model's family
(``service/architectures.py``), verifies at start-up what the residual sites hold, and lists in
``ModelInfo.capture_sites`` the names the loaded model really offers (``ModelInfo.unavailable_sites`` says
why the others are not; docs/architectures.md has the table per family). Layer ``L`` is always the 0-based
transformer block; ``blocks.{L}.resid_post`` is its output, which is hidden-state index ``L + 1`` (index 0
is ``embed``). A site means the same on every family:

| site | what it holds | shape per prompt |
| --- | --- | --- |
| ``embed`` | what enters block 0: the token embeddings after any scale (Gemma: x sqrt(n_embd)) | (tokens, n_embd) |
| ``blocks.{L}.ln1`` | normed input of the attention | (tokens, n_embd) |
| ``blocks.{L}.attn.q_normed`` / ``.k_normed`` | QK-norm families (Qwen3, Gemma 3): q / k after their per-head norm, before RoPE | (tokens, heads, head_dim) |
| ``blocks.{L}.attn.q`` / ``.k`` | queries / keys after RoPE | (tokens, heads, head_dim) |
| ``blocks.{L}.attn.v`` | values | (tokens, kv_heads, head_dim) |
| ``blocks.{L}.attn.scores`` | raw ``q . k`` (not scaled by 1/sqrt(head_dim)); 0 for keys after the query (see below) | (heads, tokens, tokens) |
| ``blocks.{L}.attn.pattern`` | attention probabilities (causal; sliding-window layers: 0 outside the window) | (heads, tokens, tokens) |
| ``blocks.{L}.attn.z`` | per-head attention output before the output projection | (tokens, heads * head_dim) |
| ``blocks.{L}.attn_out_pre_norm`` | Gemma: the output projection, before the attention post-norm | (tokens, n_embd) |
| ``blocks.{L}.attn_out`` | what the attention branch adds to the stream (after any post-norm) | (tokens, n_embd) |
| ``blocks.{L}.resid_mid`` | the residual stream between the branches: resid_pre + attn_out | (tokens, n_embd) |
| ``blocks.{L}.ln2`` | normed input of the MLP | (tokens, n_embd) |
| ``blocks.{L}.mlp.gate`` / ``.up`` | gate / up projections (not offered where fused or mixture-of-experts) | (tokens, n_ff) |
| ``blocks.{L}.mlp.post`` | neuron activations act(gate) * up (SwiGLU, Gemma: GeGLU) | (tokens, n_ff) |
| ``blocks.{L}.mlp_out_pre_norm`` | Gemma: the down projection, before the FFN post-norm | (tokens, n_embd) |
| ``blocks.{L}.mlp_out`` | what the MLP branch adds (after any post-norm; MoE: the experts' weighted sum) | (tokens, n_embd) |
| ``blocks.{L}.resid_post`` | the block's output: resid_mid + mlp_out | (tokens, n_embd) |
| ``ln_final`` | final-normed residual, the input of the LM head | (tokens, n_embd) |

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
import re
from typing import Callable, Iterable, Mapping, Sequence, Union

SiteFilter = Union[str, Sequence[str], Callable[[str], bool]]

# Site templates in graph order within a block; `{L}` is the layer.
BLOCK_SITES = (
    "ln1", "attn.q_normed", "attn.k_normed", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern",
    "attn.z", "attn_out_pre_norm", "attn_out", "resid_mid", "ln2", "mlp.gate", "mlp.up", "mlp.post",
    "mlp_out_pre_norm", "mlp_out", "resid_post",
)
# Sites of the residual stream and what the branches add to it: their meaning is the same on every family.
RESIDUAL_SITES = ("attn_out", "resid_mid", "mlp_out", "resid_post")
# Sites whose tensors are (heads, query tokens, key tokens) rather than one row per token.
PATTERN_SITES = ("attn.scores", "attn.pattern")

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
    return ["embed"] + [block_site(L, k) for L in range(n_layer) for k in BLOCK_SITES] + ["ln_final"]


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
