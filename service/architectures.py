"""What lmscope knows about each model family, in one place, keyed by GGUF `general.architecture`.

Every family declares:

- where each capture site is in llama.cpp's graph (`NodeRule`: a node name, an op filter, and optionally
  consumer steps for tensors llama.cpp leaves unnamed), or why the site is not offered;
- the embedding scale (Gemma multiplies the embedding rows by sqrt(n_embd) before block 0);
- its norms (pre-norm only, or Gemma's pre + post "sandwich" norms), FFN activation and fusion;
- the final norm, the LM-head tensor names and the final-logit soft-capping key;
- the GGUF metadata keys it reads.

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

This module imports nothing native: the client reads weight-tensor names from it too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    name: str
    sites: dict[str, NodeRule]          # site kind ("embed", "ln_final" or a block kind) -> rule
    refused: dict[str, str]             # site kind -> why it is not offered
    norms: str                          # "pre" or "pre+post" (sandwich)
    ffn: str                            # activation and layout of the FFN
    embedding_scale: str | None = None  # "sqrt_n_embd" or None
    final_norm: str = "rms"             # the final norm's kind; its weight is used as stored in the GGUF
    softcap_key: str | None = None      # GGUF key of the final logit soft-capping, `{arch}` = architecture
    moe: bool = False
    metadata_keys: tuple[str, ...] = ()  # GGUF keys this family's entry reads (beyond the ones every family has)
    notes: tuple[str, ...] = field(default=())

    @property
    def ffn_value_tensor(self) -> str | None:
        """The tensor whose columns are the FFN neurons' value vectors (`blk.{L}.ffn_down.weight`), or None."""
        return None if self.moe else FFN_DOWN


COMMON_KEYS = ("general.architecture", "{arch}.block_count", "{arch}.embedding_length",
               "{arch}.feed_forward_length", "{arch}.attention.layer_norm_rms_epsilon")

# The attention output projection (`wo`) is the first MUL_MAT that reads `kqv_out-L` (plus its bias when the
# model has one): llama names the result `attn_out-L`, most other families leave it unnamed.
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

_MOE_REFUSED = {
    kind: ("mixture of experts: each token runs its own top-k experts, so there is no single (tokens, n_ff) "
           "activation; mlp_out holds the weighted sum of the experts")
    for kind in ("mlp.gate", "mlp.up", "mlp.post")
}


def _with(base: dict[str, NodeRule], **changes: NodeRule | None) -> dict[str, NodeRule]:
    sites = dict(base)
    for kind, rule in changes.items():
        kind = kind.replace("__", ".")
        if rule is None:
            sites.pop(kind, None)
        else:
            sites[kind] = rule
    return sites


_QK_NORM = dict(attn__q_normed=NodeRule("Qcur_normed-{L}"), attn__k_normed=NodeRule("Kcur_normed-{L}"))

LLAMA = Family(
    name="llama", norms="pre", ffn="SwiGLU: silu(gate) * up, then down",
    sites=_LLAMA_SITES, refused={},
    notes=("Llama 2/3, Mistral, SmolLM and other llama-architecture files",),
)

# Llama-architecture mixture of experts (Mixtral): `ffn_gate_inp` + `ffn_{gate,up,down}_exps`. The experts'
# sum is `ffn_moe_out-L`; the first `ffn_out-L` there is the residual add (or, without a control vector,
# there is none), so the dense rule would be wrong.
LLAMA_MOE = Family(
    name="llama (mixture of experts)", norms="pre", ffn="top-k SwiGLU experts (ffn_*_exps), softmax gating",
    sites=_with(_LLAMA_SITES, mlp__gate=None, mlp__up=None, mlp__post=None, mlp_out=NodeRule("ffn_moe_out-{L}")),
    refused=_MOE_REFUSED, moe=True,
    metadata_keys=("{arch}.expert_count", "{arch}.expert_used_count"),
)

QWEN2 = Family(
    name="qwen2", norms="pre", ffn="SwiGLU", sites=_LLAMA_SITES, refused={},
    notes=("Q/K/V have biases; llama.cpp names no attn_out node: it is found as the output projection "
           "reading kqv_out",),
)

QWEN3 = Family(
    name="qwen3", norms="pre (QK-norm on q and k)", ffn="SwiGLU",
    sites=_with(_LLAMA_SITES, **_QK_NORM), refused={},
)

QWEN2_MOE = Family(
    name="qwen2moe", norms="pre", ffn="top-k SwiGLU experts + a gated shared expert",
    # ffn_out-L is the experts' sum plus the gated shared expert (the residual add is left unnamed).
    sites=_with(_LLAMA_SITES, mlp__gate=None, mlp__up=None, mlp__post=None, mlp_out=NodeRule("ffn_out-{L}", "ADD")),
    refused=_MOE_REFUSED, moe=True,
    metadata_keys=("{arch}.expert_count", "{arch}.expert_used_count", "{arch}.expert_shared_feed_forward_length"),
)

QWEN3_MOE = Family(
    name="qwen3moe", norms="pre (QK-norm on q and k)", ffn="top-k SwiGLU experts",
    sites=_with(_LLAMA_SITES, mlp__gate=None, mlp__up=None, mlp__post=None, mlp_out=NodeRule("ffn_moe_out-{L}"),
                **_QK_NORM),
    refused=_MOE_REFUSED, moe=True,
    metadata_keys=("{arch}.expert_count", "{arch}.expert_used_count"),
)

_SCALED_Q = "{family} scales q before q.k, so llama.cpp's kq node is not the raw score; attn.pattern is offered"

PHI3 = Family(
    name="phi3", norms="pre", ffn="SwiGLU with gate and up fused in one ffn_up tensor (2 x n_ff rows)",
    sites=_with(
        _LLAMA_SITES, mlp__gate=None, mlp__up=None, attn__scores=None,
        # The stream between the branches is an unnamed ADD of the attention output and the residual.
        resid_mid=NodeRule("kqv_out-{L}", then=_WO + (Step("ADD"),)),
    ),
    refused={
        "mlp.gate": "phi3 fuses gate and up into one ffn_up tensor; mlp.post holds the activations silu(gate) * up",
        "mlp.up": "phi3 fuses gate and up into one ffn_up tensor; mlp.post holds the activations silu(gate) * up",
        "attn.scores": _SCALED_Q.format(family="phi3"),
        # Used only when the probe finds no separate V (the rule stays for files with separate Q/K/V).
        "attn.v": "phi3 fuses Q, K and V into one attn_qkv projection: V is a strided view of it, not a tensor "
                  "of its own",
    },
    notes=("Q, K and V may come from one fused attn_qkv tensor: attn.v is then a strided view and is "
           "not offered",),
)


def _gemma(name: str, qk_norm: bool, post_ffn_named: bool) -> Family:
    post_ffn = (NodeRule("ffn_post_norm-{L}") if post_ffn_named
                # gemma2 names its FFN post-norm without the layer: follow ffn_out-L through the norm instead.
                else NodeRule("ffn_out-{L}", then=(Step("RMS_NORM"), Step("MUL"))))
    sites = _with(
        _LLAMA_SITES,
        embed=NodeRule("inp_scaled"),
        attn_out_pre_norm=NodeRule("kqv_out-{L}", then=_WO),
        attn_out=NodeRule("attn_post_norm-{L}"),
        resid_mid=NodeRule("sa_out-{L}"),
        mlp__post=NodeRule("ffn_geglu-{L}"),
        mlp_out_pre_norm=NodeRule("ffn_out-{L}"),
        mlp_out=post_ffn,
        attn__scores=None,
        **(_QK_NORM if qk_norm else {}),
    )
    return Family(
        name=name, norms="pre+post (sandwich): RMSNorm before and after each branch" + (", QK-norm" if qk_norm else ""),
        ffn="GeGLU: gelu_tanh(gate) * up, then down", sites=sites,
        refused={"attn.scores": _SCALED_Q.format(family=name)},
        embedding_scale="sqrt_n_embd", softcap_key="{arch}.final_logit_softcapping",
        metadata_keys=("{arch}.final_logit_softcapping", "{arch}.attention.sliding_window"),
        notes=("attn_out and mlp_out are after the post-norms (what each branch adds to the stream); "
               "attn_out_pre_norm and mlp_out_pre_norm are before them",),
    )


GEMMA2 = _gemma("gemma2", qk_norm=False, post_ffn_named=False)
GEMMA3 = _gemma("gemma3", qk_norm=True, post_ffn_named=True)

# Keyed by general.architecture. Llama-architecture MoE files share the key "llama": `family_for` tells them
# apart by their tensors.
REGISTRY: dict[str, Family] = {
    "llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "qwen2moe": QWEN2_MOE, "qwen3moe": QWEN3_MOE,
    "phi3": PHI3, "gemma2": GEMMA2, "gemma3": GEMMA3,
}

# Sites verification can prove on a family it does not know (identities, norms, probabilities).
PROVABLE_KINDS = ("embed", "ln1", "attn.pattern", "attn_out", "resid_mid", "ln2", "mlp_out", "resid_post", "ln_final")

GENERIC = Family(
    name="generic (not in the registry)", norms="unknown", ffn="unknown",
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
