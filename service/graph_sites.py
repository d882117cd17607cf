"""The one table that maps lmscope site names onto llama.cpp graph tensors.

llama.cpp names graph nodes with `cb(tensor, "name", layer)`, producing e.g. `l_out-5`. A name can label
several nodes (the Q projection, its reshape and its RoPE are all `Qcur-L`; the down projection and the
residual add are both `ffn_out-L` until a control vector gives the add its own node), so each site also
says which of the nodes it means: the one with a given ggml op, or the first one in graph order.

Which sites a model really has is not assumed from this table: the engine decodes one token at start-up,
records every node it sees (`Inventory`), and offers only the sites it found, with their real shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmscope.client.sites import PATTERN_SITES


@dataclass(frozen=True)
class NodeRule:
    node: str             # node name template; `{L}` is the layer
    op: str | None = None  # ggml op name the node must have; None = the first node with that name


BLOCK_NODES = {
    "ln1": NodeRule("attn_norm-{L}"),
    "attn.q": NodeRule("Qcur-{L}", "ROPE"),
    "attn.k": NodeRule("Kcur-{L}", "ROPE"),
    "attn.v": NodeRule("Vcur-{L}"),
    "attn.scores": NodeRule("kq-{L}", "MUL_MAT"),
    "attn.pattern": NodeRule("kq_soft_max-{L}", "SOFT_MAX"),
    "attn.z": NodeRule("kqv_out-{L}"),
    "attn_out": NodeRule("attn_out-{L}"),
    "resid_mid": NodeRule("ffn_inp-{L}"),
    "ln2": NodeRule("ffn_norm-{L}"),
    "mlp.gate": NodeRule("ffn_gate-{L}"),
    "mlp.up": NodeRule("ffn_up-{L}"),
    "mlp.post": NodeRule("ffn_swiglu-{L}"),
    "mlp_out": NodeRule("ffn_out-{L}"),
    "resid_post": NodeRule("l_out-{L}"),
}
GLOBAL_NODES = {
    "embed": NodeRule("embd"),
    "ln_final": NodeRule("result_norm"),
}
# In the last block llama.cpp drops the rows of tokens that are not outputs right after the attention
# (`ggml_get_rows(cur, inp_out_ids)`): these sites then hold one row per *output* token only.
OUTPUT_ROWS_ONLY_IN_LAST_BLOCK = ("resid_mid", "ln2", "mlp.gate", "mlp.up", "mlp.post", "mlp_out", "resid_post")


def rule_for(site: str) -> tuple[str, str | None]:
    """(llama.cpp node name, op filter) for a concrete site name."""
    if site in GLOBAL_NODES:
        rule = GLOBAL_NODES[site]
        return rule.node, rule.op
    parts = site.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in BLOCK_NODES:
        raise KeyError(f"unknown site {site!r}")
    rule = BLOCK_NODES[parts[2]]
    return rule.node.format(L=int(parts[1])), rule.op


def output_rows_only(site: str, n_layer: int) -> bool:
    """Whether the site's tensor keeps only the rows of output tokens."""
    if site == "ln_final":
        return True
    parts = site.split(".", 2)
    return (len(parts) == 3 and parts[0] == "blocks" and parts[1] == str(n_layer - 1)
            and parts[2] in OUTPUT_ROWS_ONLY_IN_LAST_BLOCK)


def is_pattern_site(site: str) -> bool:
    return site.split(".", 2)[-1] in PATTERN_SITES
