"""The site kinds and the families are each declared once; what the rest of the code and the docs say about
them is derived, and these tests keep it so.

- docs/architectures.md's family x site table is `service/site_table.py`'s rendering of the registry
  (regenerate it with `python scripts/dev_gen_architectures_table.py`);
- the registry names only kinds of `lmscope.proto.sites.SITE_KINDS`, and the tiny-model builder has one
  model per registry family, built from that family's record;
- the facts derived from `SITE_KINDS` are the ones the service and the client rely on.
"""
from __future__ import annotations

import pathlib

import pytest

from lmscope.proto import sites
from lmscope.service import architectures, site_table
from lmscope.service.testing import FAMILIES

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architectures.md"


def test_the_family_x_site_table_in_docs_is_generated_from_the_registry():
    page = PAGE.read_text(encoding="utf-8")
    assert page.count(site_table.BEGIN) == 1 and page.count(site_table.END) == 1
    assert site_table.rewrite(page) == page, (
        "docs/architectures.md's family x site table differs from the registry: run "
        "python scripts/dev_gen_architectures_table.py")


def test_the_table_has_a_row_per_kind_and_a_column_per_family():
    rows = [line for line in site_table.render().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(sites.SITE_KINDS)
    header = site_table.render().splitlines()[0]
    assert header.split(" | ")[2:] == [f.label for f in architectures.KNOWN_FAMILIES] + ["other |"]


def test_rewrite_refuses_a_page_without_markers():
    with pytest.raises(ValueError, match="markers"):
        site_table.rewrite("# no table here\n")


@pytest.mark.parametrize("family", architectures.KNOWN_FAMILIES + (architectures.GENERIC,), ids=lambda f: f.label)
def test_the_registry_names_only_known_site_kinds(family):
    assert set(family.sites) <= set(sites.SITE_KINDS)
    assert set(family.refused) <= set(sites.SITE_KINDS)


def test_the_registry_is_keyed_by_architecture_and_labels_are_unique():
    labels = [f.label for f in architectures.KNOWN_FAMILIES + (architectures.GENERIC,)]
    assert len(set(labels)) == len(labels)
    assert all(architectures.REGISTRY[f.architecture] is f for f in architectures.KNOWN_FAMILIES
               if f is not architectures.LLAMA_MOE)
    assert architectures.family_for("llama", ["blk.0.ffn_gate_inp.weight"]) is architectures.LLAMA_MOE


def test_the_builder_has_one_tiny_model_per_registry_family_and_takes_its_features_from_it():
    assert [fam.entry for fam in FAMILIES.values()] == list(architectures.KNOWN_FAMILIES)
    for name, fam in FAMILIES.items():
        entry = fam.entry
        assert name == entry.label and fam.architecture == entry.architecture
        assert (fam.qk_norm, fam.post_norms, fam.ffn) == (entry.qk_norm, entry.post_norms, entry.ffn)
        assert (fam.n_expert > 0) == entry.moe and fam.embed_scale == (entry.embedding_scale is not None)
        # The features and the sites they imply agree.
        assert ("attn.q_normed" in entry.sites) == entry.qk_norm
        assert ("attn_out_pre_norm" in entry.sites) == entry.post_norms
        assert ("mlp.post" in entry.refused) == entry.moe


def test_site_facts_derived_from_the_kinds():
    assert sites.BLOCK_SITES == (
        "ln1", "attn.q_normed", "attn.k_normed", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern",
        "attn.z", "attn_out_pre_norm", "attn_out", "resid_mid", "ln2", "mlp.gate", "mlp.up", "mlp.post",
        "mlp.router", "mlp.experts.gate", "mlp.experts.up", "mlp.experts.post", "mlp_out_pre_norm", "mlp_out",
        "resid_post")
    assert sites.PATTERN_SITES == ("attn.scores", "attn.pattern")
    assert sites.all_site_names(2)[:2] == ["embed", "blocks.0.ln1"]
    assert sites.all_site_names(2)[-2:] == ["blocks.1.resid_post", "ln_final"]
    assert len(sites.all_site_names(2)) == 2 + 2 * len(sites.BLOCK_SITES)
    not_editable = {"attn.q_normed", "attn.k_normed", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern",
                    "mlp.router", "mlp.experts.gate", "mlp.experts.up", "mlp.experts.post"}
    assert {k for k in sites.SITE_KINDS if not sites.site_editable(f"blocks.3.{k}")} == not_editable
    assert sites.site_editable("embed") and sites.site_editable("ln_final")
    assert sites.is_pattern_site("blocks.0.attn.pattern") and not sites.is_pattern_site("blocks.0.attn.z")
    assert set(architectures.PROVABLE_KINDS) == {
        "embed", "ln1", "attn.pattern", "attn_out_pre_norm", "attn_out", "resid_mid", "ln2", "mlp_out_pre_norm",
        "mlp_out", "resid_post", "ln_final"}
    dims = {"tokens": 5, "n_embd": 64, "n_ff": 128, "n_head": 4, "n_head_kv": 2, "head_dim": 16, "n_expert": 4,
            "n_expert_used": 2, "n_ff_exp": 32}
    assert sites.site_shape("blocks.0.attn.q", dims) == (5, 4, 16)
    assert sites.site_shape("blocks.0.attn.k", dims) == (5, 2, 16)
    assert sites.site_shape("blocks.0.attn.z", dims) == (5, 64)
    assert sites.site_shape("blocks.0.attn.scores", dims) == (4, 5, 5)
    assert sites.site_shape("blocks.0.mlp.post", dims) == (5, 128)
    assert sites.site_shape("embed", dims) == (5, 64)
    assert sites.site_shape("blocks.0.mlp.router", dims) == (5, 4)
    assert sites.site_shape("blocks.0.mlp.experts.post", dims) == (5, 2, 32)


def test_verification_reads_a_sites_shape_from_its_node_by_the_kinds_rule():
    pytest.importorskip("llama_cpp")
    from lmscope.service.verification import _shape

    # ggml's ne, innermost axis first: (head_dim, heads, tokens), (n_kv, tokens, heads), (n_embd, tokens).
    assert _shape("blocks.0.attn.q", (16, 4, 7, 1)) == (4, 16)
    assert _shape("blocks.0.attn.v", (16, 2, 7, 1)) == (2, 16)
    assert _shape("blocks.0.attn.pattern", (7, 7, 4, 1)) == (4,)
    assert _shape("blocks.0.attn.z", (64, 7, 1, 1)) == (64,)
    assert _shape("blocks.0.resid_post", (64, 1, 1, 1)) == (64,)
    assert _shape("ln_final", (64, 7, 1, 1)) == (64,)
    assert _shape("blocks.0.mlp.router", (4, 7, 1, 1)) == (4,)
    assert _shape("blocks.0.mlp.experts.post", (32, 2, 7, 1)) == (2, 32)
    assert _shape("blocks.1.mlp.experts.post", (32, 2, 1, 1)) == (2, 32)  # the last block: one output row
