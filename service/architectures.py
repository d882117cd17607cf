"""What lmscope knows about each model family, in one place, keyed by GGUF `general.architecture`.

Every family (`Family`) declares, once:

- its name, its GGUF `general.architecture` and its short name (the tiny-model builder's `family=`, the
  column of docs/architectures.md);
- its graph features: q/k/v biases, QK-norm, Gemma's pre + post "sandwich" norms, the FFN's activation and
  fusion, fused QKV, experts. The tiny-model builder (`service/testing.py`) writes files with exactly these
  features, and the site rules follow from them where llama.cpp's naming does (`_family`);
- where each capture site is in llama.cpp's graph (`NodeRule`: a node name, an op filter, and optionally
  consumer steps for tensors llama.cpp leaves unnamed), or why the site is not offered;
- the embedding scale (Gemma multiplies the embedding rows by sqrt(n_embd) before block 0), the final norm
  and the final-logit soft-capping key.

A site *means* the same on every family (TransformerLens's convention): ``embed`` is what enters block 0
(after any scale), ``attn_out`` what the attention branch adds to the residual stream (after any post-norm),
``resid_mid`` the stream between the branches, ``mlp_out`` what the FFN branch adds (after any post-norm; for
mixture-of-experts the weighted sum of the experts, never the residual add), ``resid_post`` the block's
output. Family-specific tensors get their own names (``attn.q_normed``/``attn.k_normed`` for QK-norm,
``attn_out_pre_norm``/``mlp_out_pre_norm`` for Gemma's branch outputs before their post-norms).

The node names come from llama.cpp's graph builders (`src/models/<arch>.cpp` in the llama-cpp-python 0.3.36
sdist). They are not trusted: the engine checks every residual site against the arithmetic identities on
its start-up probe (`service/verification.py`) and offers only what passes. An architecture not listed here
gets the generic llama-style rules, restricted to the sites that verification can prove.

The site kinds themselves (names, shapes, which are verified) are in `lmscope.proto.sites`. The family x
site table of docs/architectures.md is generated from this registry (`service/site_table.py`,
`scripts/dev_gen_architectures_table.py`). This module imports nothing native.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lmscope.proto.sites import SITE_KINDS
from lmscope.proto.tensor_names import ATTN_OUTPUT_BIAS, FFN_DOWN, OUTPUT, TOKEN_EMBEDDING


@dataclass(frozen=True)
class Step:
    """One step from a node to the node that consumes it: the first later node with `op` that takes the
    current node as an operand (GET_ROWS, llama.cpp's output-row selection in the last block, is looked
    through). `if_tensor`: the step exists only when the model has this weight (e.g. an output bias)."""
    op: str
    if_tensor: str | None = None


@dataclass(frozen=True)
class NodeRule:
    node: str                 # node name template; `{L}` is the layer
    op: str | None = None     # ggml op the named node must have; None = the first node with that name
    then: tuple[Step, ...] = ()  # consumer steps from the named node to the site's node


@dataclass(frozen=True)
class Family:
    """One registry entry. Build new ones with `_family`, which derives the site rules the features imply."""
    name: str                           # the entry's name (ModelInfo.site_rules, and in refusal reasons)
    architecture: str                   # GGUF general.architecture ("" for GENERIC)
    label: str                          # short name: the tiny-model builder's family=, the docs' column
    sites: dict[str, NodeRule]          # site kind ("embed", "ln_final" or a block kind) -> rule
    refused: dict[str, str]             # site kind -> why it is not offered
    # Graph features, as llama.cpp's builder for the architecture reads them from the file:
    qkv_bias: bool = False              # q/k/v projections with biases
    qk_norm: bool = False               # RMSNorm over each head of q and k before RoPE
    post_norms: bool = False            # RMSNorm on each branch's output before it joins the stream (sandwich)
    ffn: str = "swiglu"                 # "swiglu": silu(gate) * up; "geglu": gelu_tanh(gate) * up;
    #                                     "fused_swiglu": one ffn_up holding [gate; up] (2 x n_ff rows)
    fused_qkv: bool = False             # one attn_qkv matrix holding [q; k; v] (llama.cpp also loads separate ones)
    moe: bool = False                   # top-k routed experts instead of one FFN
    shared_expert: bool = False         # a sigmoid-gated shared expert beside the routed ones
    expert_weights_norm: bool = False   # the chosen experts' probabilities renormalised to sum 1 (llama.cpp's norm_w)
    embedding_scale: str | None = None  # "sqrt_n_embd" or None
    final_norm: str = "rms"             # the final norm's kind; its weight is used as stored in the GGUF
    softcap_key: str | None = None      # GGUF key of the final logit soft-capping, `{arch}` = architecture
    # Attention as llama.cpp's builder sets it where the file is silent: the sliding-window layer period (layer L
    # is local unless L % n == n - 1; 0: no sliding window; `{arch}.attention.sliding_window_pattern` overrides
    # it), the window (0: only where the file names one) and the attention scores' soft-cap (0: none, and the
    # file's `{arch}.attn_logit_softcapping` is then not read either).
    sliding_window_period: int = 0
    sliding_window_default: int = 0
    attn_softcap_default: float = 0.0

    @property
    def ffn_value_tensor(self) -> str | None:
        """The tensor whose columns are the FFN neurons' value vectors (`blk.{L}.ffn_down.weight`), or None."""
        return None if self.moe else FFN_DOWN


# The attention output projection (`wo`) is the first MUL_MAT that reads `kqv_out-L` (plus its bias when the
# model has one): llama names the result `attn_out-L`, most other families leave it unnamed (qwen2).
_WO = (Step("MUL_MAT"), Step("ADD", if_tensor=ATTN_OUTPUT_BIAS))

_LLAMA_SITES = {
    "embed": NodeRule("embd"),
    "ln1": NodeRule("attn_norm-{L}"),
    "attn.q": NodeRule("Qcur-{L}", "ROPE"),
    "attn.k": NodeRule("Kcur-{L}", "ROPE"),
    # The last node named Vcur: after the projection and any bias, reshaped to heads (contiguous).
    "attn.v": NodeRule("Vcur-{L}", "RESHAPE"),
    "attn.scores": NodeRule("kq-{L}", "MUL_MAT"),
    "attn.pattern": NodeRule("kq_soft_max-{L}", "SOFT_MAX"),
    "attn.z": NodeRule("kqv_out-{L}"),
    "attn_out": NodeRule("kqv_out-{L}", then=_WO),
    "resid_mid": NodeRule("ffn_inp-{L}"),
    "ln2": NodeRule("ffn_norm-{L}"),
    "mlp.gate": NodeRule("ffn_gate-{L}"),
    "mlp.up": NodeRule("ffn_up-{L}"),
    "mlp.post": NodeRule("ffn_swiglu-{L}"),
    # build_ffn's result: the down projection (plus its bias). In a dense block it is the first node named
    # ffn_out-L; the residual add that follows is renamed l_out-L (or is a second ffn_out-L with a control vector).
    "mlp_out": NodeRule("ffn_out-{L}"),
    "resid_post": NodeRule("l_out-{L}"),
    "ln_final": NodeRule("result_norm"),
}

_MOE_REASON = ("mixture of experts: each token runs its own top-k experts, so there is no single (tokens, n_ff) "
               "activation; mlp.experts.post holds each token's experts' activations, mlp_out their weighted sum")
_SCALED_Q = "{family} scales q before q.k, so llama.cpp's kq node is not the raw score; attn.pattern is offered"


def _family(architecture: str, *, name: str | None = None, label: str | None = None,
            changes: dict[str, NodeRule | None] | None = None, refused: dict[str, str] | None = None,
            **features) -> Family:
    """A registry entry: the llama rules, what the features imply, then the family's own `changes` (a kind
    -> its rule, or None for a site the family does not place) and `refused` reasons."""
    name = name or architecture
    family = Family(name=name, architecture=architecture, label=label or name, sites={}, refused={}, **features)
    sites, reasons = dict(_LLAMA_SITES), {}
    if family.qk_norm:
        sites.update({"attn.q_normed": NodeRule("Qcur_normed-{L}"), "attn.k_normed": NodeRule("Kcur_normed-{L}")})
    if family.ffn == "geglu":
        sites["mlp.post"] = NodeRule("ffn_geglu-{L}")
    elif family.ffn == "fused_swiglu":
        for kind in ("mlp.gate", "mlp.up"):
            del sites[kind]
            reasons[kind] = (f"{name} fuses gate and up into one ffn_up tensor; mlp.post holds the activations "
                             f"silu(gate) * up")
    if family.fused_qkv:
        # Used only when the probe finds no separate V (the rule stays for files with separate Q/K/V).
        reasons["attn.v"] = (f"{name} fuses Q, K and V into one attn_qkv projection: V is a strided view of it, "
                             f"not a tensor of its own")
    if family.moe:
        for kind in ("mlp.gate", "mlp.up", "mlp.post"):
            del sites[kind]
            reasons[kind] = _MOE_REASON
        # build_moe_ffn's result, the experts' weighted sum, is ffn_moe_out-L (a first ffn_out-L is then the
        # residual add); with a shared expert the FFN's output is the ADD of both, named ffn_out-L.
        sites["mlp_out"] = NodeRule("ffn_out-{L}", "ADD") if family.shared_expert else NodeRule("ffn_moe_out-{L}")
        # the softmax over the router's logits (the experts are chosen from it), and the routed experts'
        # activations, (n_ff_exp, n_expert_used, tokens) in the order of the choice
        sites["mlp.router"] = NodeRule("ffn_moe_probs-{L}", "SOFT_MAX")
        sites["mlp.experts.gate"] = NodeRule("ffn_moe_gate-{L}")
        sites["mlp.experts.up"] = NodeRule("ffn_moe_up-{L}")
        sites["mlp.experts.post"] = NodeRule("ffn_moe_swiglu-{L}")
    for kind, rule in (changes or {}).items():
        if rule is None:
            sites.pop(kind, None)
        else:
            sites[kind] = rule
    return replace(family, sites=sites, refused={**reasons, **(refused or {})})


# Llama 2/3, Mistral, SmolLM and other llama-architecture files.
LLAMA = _family("llama")

# Llama-architecture mixture of experts (Mixtral): `ffn_gate_inp` + `ffn_{gate,up,down}_exps`, softmax gating.
LLAMA_MOE = _family("llama", name="llama (mixture of experts)", label="mixtral", moe=True, expert_weights_norm=True)

# Q/K/V have biases; llama.cpp names no attn_out node: it is found as the output projection reading kqv_out.
QWEN2 = _family("qwen2", qkv_bias=True)

QWEN3 = _family("qwen3", qk_norm=True)

QWEN2_MOE = _family("qwen2moe", qkv_bias=True, moe=True, shared_expert=True)

QWEN3_MOE = _family("qwen3moe", qk_norm=True, moe=True, expert_weights_norm=True)

PHI3 = _family(
    "phi3", ffn="fused_swiglu", fused_qkv=True,
    # The stream between the branches is an unnamed ADD of the attention output and the residual.
    changes={"attn.scores": None, "resid_mid": NodeRule("kqv_out-{L}", then=_WO + (Step("ADD"),))},
    refused={"attn.scores": _SCALED_Q.format(family="phi3")},
)


def _gemma(architecture: str, qk_norm: bool, post_ffn_named: bool, **attention) -> Family:
    # attn_out and mlp_out are after the post-norms (what each branch adds to the stream); attn_out_pre_norm
    # and mlp_out_pre_norm are before them.
    post_ffn = (NodeRule("ffn_post_norm-{L}") if post_ffn_named
                # gemma2 names its FFN post-norm without the layer: follow ffn_out-L through the norm instead.
                else NodeRule("ffn_out-{L}", then=(Step("RMS_NORM"), Step("MUL"))))
    return _family(
        architecture, qk_norm=qk_norm, post_norms=True, ffn="geglu",
        embedding_scale="sqrt_n_embd", softcap_key="{arch}.final_logit_softcapping", **attention,
        changes={"embed": NodeRule("inp_scaled"), "attn_out_pre_norm": NodeRule("kqv_out-{L}", then=_WO),
                 "attn_out": NodeRule("attn_post_norm-{L}"), "resid_mid": NodeRule("sa_out-{L}"),
                 "mlp_out_pre_norm": NodeRule("ffn_out-{L}"), "mlp_out": post_ffn, "attn.scores": None},
        refused={"attn.scores": _SCALED_Q.format(family=architecture)},
    )


GEMMA2 = _gemma("gemma2", qk_norm=False, post_ffn_named=False, sliding_window_period=2, sliding_window_default=4096,
               attn_softcap_default=50.0)
GEMMA3 = _gemma("gemma3", qk_norm=True, post_ffn_named=True, sliding_window_period=6)

# Every family the registry knows, in the order of the docs' table and the tiny-model builder.
KNOWN_FAMILIES = (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, LLAMA_MOE, QWEN2_MOE, QWEN3_MOE)

# Keyed by general.architecture. Llama-architecture MoE files share the key "llama": `family_for` tells them
# apart by their tensors.
REGISTRY: dict[str, Family] = {family.architecture: family for family in KNOWN_FAMILIES if family is not LLAMA_MOE}

# Sites verification can prove on a family it does not know (identities, norms, probabilities).
PROVABLE_KINDS = tuple(kind.name for kind in SITE_KINDS.values() if kind.verified)

GENERIC = Family(
    name="generic (not in the registry)", architecture="", label="other",
    sites={k: r for k, r in _LLAMA_SITES.items() if k in PROVABLE_KINDS},
    refused={k: "this architecture is not in lmscope's registry, and this site cannot be verified on it"
             for k in _LLAMA_SITES if k not in PROVABLE_KINDS},
)


def family_for(architecture: str, tensor_names=()) -> Family:
    """The registry entry for a GGUF architecture; GENERIC when there is none."""
    family = REGISTRY.get(architecture)
    if family is None:
        return GENERIC
    if family is LLAMA and "blk.0.ffn_gate_inp.weight" in tensor_names:
        return LLAMA_MOE
    return family


def embedding_scale(family: Family, n_embd: int) -> float:
    """The factor llama.cpp multiplies token-embedding rows by before block 0."""
    return math.sqrt(n_embd) if family.embedding_scale == "sqrt_n_embd" else 1.0


def head_tensor(tensor_names) -> str:
    """The LM head: `output.weight`, or the token embedding when the file ties them."""
    return OUTPUT if OUTPUT in tensor_names else TOKEN_EMBEDDING
