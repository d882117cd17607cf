"""The start-up verification refuses what it cannot prove (service/verification.py).

Each test breaks one piece of architecture knowledge on the tiny llama model, the way a wrong registry
entry would, and checks that the engine notices: a misplaced site is not offered and says why, a soft-cap
the model does not have disables the lens, an unknown architecture gets only provable sites.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lmscope.service import architectures, verification
from lmscope.service.architectures import NodeRule
from lmscope.service.engine import Engine, EngineConfig


def _engine(path) -> Engine:
    return Engine(EngineConfig(model_path=str(path), n_ctx=256, n_threads=2))


def test_every_check_passes_on_the_tiny_model(tiny_model):
    engine = _engine(tiny_model)
    try:
        checks = engine.verification
        assert checks["resid_pre + attn_out == resid_mid"] <= verification.ADD_TOLERANCE
        assert checks["resid_mid + mlp_out == resid_post"] <= verification.ADD_TOLERANCE
        assert checks["embed == scale * embedding rows"] <= verification.ADD_TOLERANCE
        assert checks["ln_final == final norm of the last resid_post"] <= verification.NORM_TOLERANCE
        assert checks["unembedding error / its bound"] <= 1
        assert engine.unembed_error is None
        assert all(k.startswith("blocks.*.") for k in engine.unavailable_sites)  # only kinds llama lacks
    finally:
        engine.close()


def test_a_misplaced_mlp_out_is_refused_with_the_reason(tiny_model, monkeypatch):
    # The Mixtral mistake: mlp_out placed on the residual stream instead of what the FFN adds.
    wrong = dataclasses.replace(architectures.LLAMA, sites={**architectures.LLAMA.sites,
                                                           "mlp_out": NodeRule("l_out-{L}")})
    monkeypatch.setitem(architectures.REGISTRY, "llama", wrong)
    engine = _engine(tiny_model)
    try:
        assert not any(s.endswith(".mlp_out") for s in engine.site_shapes)
        assert "resid_mid + mlp_out != resid_post" in engine.unavailable_sites["blocks.*.mlp_out"]
        assert "blocks.0.attn_out" in engine.site_shapes and "blocks.0.resid_post" in engine.site_shapes
    finally:
        engine.close()


def test_a_soft_cap_the_model_does_not_have_disables_the_lens(tiny_model, monkeypatch):
    # The tiny model's logits reach about 12; a cap of 30 moves such a logit by about 0.6, thousands of
    # times the bound of an F32 head. A missing cap is the same check the other way round.
    original = verification._check_unembedding

    def with_cap(model, weights, *args):
        weights.final_logit_softcapping = 30.0
        return original(model, weights, *args)

    monkeypatch.setattr(verification, "_check_unembedding", with_cap)
    engine = _engine(tiny_model)
    try:
        assert engine.unembed_error is not None and "differ from llama.cpp's logits" in engine.unembed_error
        assert engine.verification["unembedding error / its bound"] > 100
    finally:
        engine.close()


def test_an_unknown_architecture_gets_only_proven_sites(tiny_model, monkeypatch):
    monkeypatch.setattr(architectures, "family_for", lambda *_: architectures.GENERIC)
    engine = _engine(tiny_model)
    try:
        kinds = {s.split(".", 2)[-1] for s in engine.site_shapes}
        assert kinds == {"embed", "ln1", "attn.pattern", "attn_out", "resid_mid", "ln2", "mlp_out", "resid_post",
                         "ln_final"}
        assert "not in lmscope's registry" in engine.unavailable_sites["blocks.*.mlp.post"]
    finally:
        engine.close()


def test_the_unembedding_bound_covers_8_bit_activations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    head = rng.standard_normal((16, 512)).astype(np.float32)
    step = np.abs(x).reshape(4, 2, 256).max(axis=2, keepdims=True) / 127
    quantized = (np.round(x.reshape(4, 2, 256) / step) * step).reshape(4, 512)  # Q8_K-like rounding
    error = np.abs(quantized @ head.T - x @ head.T)
    bound = verification.unembedding_error_bound(x, head, "Q4_K")
    assert (error <= bound).all() and (error > bound / 100).any()


def test_collapse_names_a_kind_once_when_every_layer_shares_the_reason():
    reasons = {"blocks.0.mlp.gate": "fused", "blocks.1.mlp.gate": "fused", "blocks.1.attn_out": "x", "embed": "y"}
    assert verification.collapse(reasons, 2) == {"blocks.*.mlp.gate": "fused", "blocks.1.attn_out": "x", "embed": "y"}


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe"])
def test_every_registry_entry_places_the_residual_sites(name):
    family = architectures.REGISTRY[name]
    assert {"embed", "attn_out", "resid_mid", "mlp_out", "resid_post", "ln_final"} <= set(family.sites)
    assert not set(family.sites) & set(family.refused) - {"attn.v"}  # phi3's V: a rule and its fallback reason
