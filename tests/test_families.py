"""Every supported architecture family: tiny model, numpy reference and llama.cpp agree, then the server.

Part 1 (no server): each family's tiny GGUF (``lmscope.service.testing.build_tiny_model(family=...)``)
loads in llama.cpp, and the independent numpy reference (``tests/reference.py``) reproduces llama.cpp's own
logits and the graph nodes that hold each site (read through a self-contained eval callback, the one in
``tests/test_reference.py``). A second check turns each family feature off in the reference (the sliding
window, the soft-caps, the embedding scale, ...) and asserts that the agreement is lost: the tiny models
really exercise what they claim to.

Tolerances, from the arithmetic (measured figures in the comments are from one machine, for scale only):
F32 weights with an F32 KV cache leave only float32 rounding, ~1e-6 of the largest value (measured
5e-7..1.5e-6), except that the CPU backend's GELU goes through an F16 table: the reference emulates it
(``gelu_table=True``), but an input that lands on the other side of an F16 rounding boundary costs one F16
step (~5e-4 relative) in that activation (measured 3e-5..3e-4 over a model). With llama.cpp's default F16
KV cache, emulated, the same boundary effect for q, K, V and the probabilities gives 1e-4..5e-4.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from reference import ReferenceModel  # noqa: E402
from test_reference import _rel_err, _Run  # noqa: E402  (the self-contained llama.cpp runner)

from lmscope.service.testing import FAMILIES, build_tiny_model  # noqa: E402

# The sliding window is 4 tokens: the prompts are longer, so local layers really cut attention.
PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin.",
           "Hello, how are you? I have two green apples.",
           "今天天氣真好！"]

EXACT_TOL = 1e-5        # F32 weights, F32 cache: float32 rounding only
GELU_TOL = 2e-3         # + one F16 GELU-table step on a few activations (gemma)
KV16_TOL = 2e-3         # F16 KV cache, emulated: F16 boundary effects on q, K, V, probabilities


def _tolerance(family: str, kv_cache: str) -> float:
    return KV16_TOL if kv_cache == "f16" or FAMILIES[family].ffn == "geglu" else EXACT_TOL


# Graph nodes of each family that hold a reference quantity: node prefix -> (op, reference key).
# Per-layer nodes are named `<prefix>-<layer>`; their arrays are (T, n_embd) or (T, heads, head_dim).
_COMMON = {"l_out": ("ADD", "resid_post"), "Qcur": ("ROPE", "q"), "Kcur": ("ROPE", "k")}
_ATTN_OUT = {"attn_out": ("MUL_MAT", "attn_out")}
_RESID_MID = {"ffn_inp": ("ADD", "resid_mid")}
_QK_NORM = {"Qcur_normed": ("MUL", "q_normed"), "Kcur_normed": ("MUL", "k_normed")}
_GEMMA = {"attn_post_norm": ("MUL", "attn_out"), "sa_out": ("ADD", "resid_mid"),
          "ffn_out": ("MUL_MAT", "mlp_out_pre_norm"), "ffn_geglu": ("GEGLU", "mlp_post")}
NODES = {
    "llama": {**_COMMON, **_ATTN_OUT, **_RESID_MID, "ffn_out": ("MUL_MAT", "mlp_out"),
              "ffn_swiglu": ("SWIGLU", "mlp_post")},
    "qwen2": {**_COMMON, **_RESID_MID, "ffn_out": ("MUL_MAT", "mlp_out"), "ffn_swiglu": ("SWIGLU", "mlp_post")},
    "qwen3": {**_COMMON, **_RESID_MID, **_QK_NORM, "ffn_out": ("MUL_MAT", "mlp_out")},
    "gemma2": {**_COMMON, **_GEMMA},  # gemma2 names its FFN post-norm without a layer: not capturable
    "gemma3": {**_COMMON, **_GEMMA, **_QK_NORM, "ffn_post_norm": ("MUL", "mlp_out")},
    "phi3": {**_COMMON, "ffn_out": ("MUL_MAT", "mlp_out"), "ffn_swiglu": ("SWIGLU", "mlp_post")},
    # In the llama graph with experts, `ffn_out` is the residual add: the FFN's output is ffn_moe_out.
    "mixtral": {**_COMMON, **_ATTN_OUT, **_RESID_MID, "ffn_moe_out": ("ADD", "mlp_out")},
    "qwen2moe": {**_COMMON, **_RESID_MID, "ffn_moe_out": ("ADD", "routed_out"),
                 "ffn_shexp_out": ("MUL", "shared_out"), "ffn_out": ("ADD", "mlp_out")},
}
GLOBAL_NODES = {"result_norm": ("MUL", "ln_final"), "result_output": (None, "logits"),
                "inp_scaled": ("SCALE", "embed"), "embd": ("GET_ROWS", "embed")}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _emulating_reference(path, kv_cache):
    return ReferenceModel(path, kv_cache=kv_cache, quantize_activations=True, gelu_table=True)


def test_every_family_has_a_graph_table():
    assert set(NODES) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builder_is_deterministic_and_writes_the_familys_architecture(family_dir, family):
    a = build_tiny_model(family_dir / f"{family}-a.gguf", family=family)
    b = build_tiny_model(family_dir / f"{family}-b.gguf", family=family)
    c = build_tiny_model(family_dir / f"{family}-c.gguf", family=family, seed=1)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    reader = gguf.GGUFReader(a)
    fam = FAMILIES[family]
    assert reader.fields["general.architecture"].contents() == fam.architecture
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == fam.qkv_bias
    assert ("blk.0.attn_q_norm.weight" in names) == fam.qk_norm
    assert ("blk.0.post_ffw_norm.weight" in names) == fam.post_norms
    assert ("blk.0.attn_qkv.weight" in names) == fam.fused_qkv
    assert ("blk.0.ffn_gate_exps.weight" in names) == bool(fam.n_expert)
    assert ("blk.0.ffn_up_shexp.weight" in names) == fam.shared_expert
    assert ("output.weight" in names) == (not fam.default_tied)


def test_a_family_llama_cpp_cannot_load_is_refused_by_the_builder(family_dir):
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_model(family_dir / "x.gguf", family="gpt2")
    with pytest.raises(ValueError, match="tied=True"):
        build_tiny_model(family_dir / "x.gguf", family="gemma2", tied=False)
    with pytest.raises(ValueError, match="tied=False"):
        build_tiny_model(family_dir / "x.gguf", family="qwen2moe", tied=True)


@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_matches_llama_cpp_logits_and_graph_nodes(family_dir, family, kv_cache):
    path = build_tiny_model(family_dir / f"{family}.gguf", family=family)
    ref = _emulating_reference(path, kv_cache)
    capture = {name: op for name, (op, _) in {**NODES[family], **GLOBAL_NODES}.items() if op}
    capture["kq_soft_max"] = "SOFT_MAX"
    run = _Run(path, capture=capture, kv_cache=kv_cache)
    tol = _tolerance(family, kv_cache)
    try:
        for text in PROMPTS:
            ids = run.tokenize(text)
            T = len(ids)
            logits = run.decode(ids)
            want = ref.forward(ids)
            got = run.captured
            assert np.all(np.isfinite(logits)) and 1.0 < logits[-1].std() < 20.0
            assert _rel_err(logits, want["logits"]) < tol
            assert _rel_err(got["result_norm"], want["ln_final"]) < tol
            embed_node = "inp_scaled" if ref.embed_scale != 1.0 else "embd"
            assert _rel_err(got[embed_node], want["embed"]) < 1e-6
            for il in range(ref.n_layer):
                for node, (_, key) in NODES[family].items():
                    assert _rel_err(got[f"{node}-{il}"], want[key][il]) < tol, (node, il)
                soft = got[f"kq_soft_max-{il}"][:, :, :T]  # (H, T, n_kv), cache cells in position order
                assert np.max(np.abs(soft - want["pattern"][il])) < tol, il
                assert np.all(soft[:, ref.attention_mask(il, T)] == 0), il
    finally:
        run.close()


# (family, what is switched off in the reference): each must break the agreement with llama.cpp.
FEATURES = [
    ("llama", "rope_mode"), ("qwen2", "rope_mode"), ("qwen2", "qkv_bias"), ("qwen3", "qk_norm"),
    ("gemma2", "embed_scale"), ("gemma2", "swa_layers"), ("gemma2", "attn_softcap"),
    ("gemma2", "final_softcap"), ("gemma2", "post_norms"), ("gemma2", "gelu"),
    ("gemma3", "swa_layers"), ("gemma3", "rope_base_swa"), ("gemma3", "qk_norm"),
    ("phi3", "fused_order"), ("mixtral", "top_k"), ("qwen2moe", "shared_expert"), ("qwen2moe", "renormalise"),
]


def _switch_off(ref: ReferenceModel, feature: str) -> None:
    """Make the reference forget one feature of its family's graph."""
    arch = ref._arch
    if feature == "rope_mode":
        arch.neox = not arch.neox
    elif feature == "qkv_bias":
        for name in [n for n in ref._tensors if n.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias"))]:
            del ref._tensors[name]
    elif feature in ("qk_norm", "post_norms", "shared_expert"):
        suffixes = {"qk_norm": ("attn_q_norm.weight", "attn_k_norm.weight"),
                    "post_norms": ("post_attention_norm.weight", "post_ffw_norm.weight"),
                    "shared_expert": ("ffn_gate_inp_shexp.weight",)}[feature]
        for name in [n for n in ref._tensors if n.endswith(suffixes)]:
            del ref._tensors[name]
    elif feature == "embed_scale":
        ref.embed_scale = 1.0
    elif feature == "swa_layers":
        ref.swa_layers = []
    elif feature in ("attn_softcap", "final_softcap"):
        setattr(ref, feature, 0.0)
    elif feature == "rope_base_swa":
        ref.rope_base_swa = ref.rope_base
    elif feature == "gelu":
        arch.gelu = False
    elif feature == "fused_order":  # read phi3's fused gate+up as [up; gate]
        for name in [n for n in ref._tensors if n.endswith("ffn_up.weight")]:
            gate, up = np.split(ref.weight(name), 2)
            ref._cache[name] = np.concatenate([up, gate])
    elif feature == "top_k":
        ref.n_expert_used = ref.n_expert_used + 1
    elif feature == "renormalise":
        arch.moe_renormalise = not arch.moe_renormalise
    else:
        raise AssertionError(feature)


@pytest.mark.parametrize("family,feature", FEATURES)
def test_each_family_feature_matters(family_dir, family, feature, monkeypatch):
    path = build_tiny_model(family_dir / f"{family}.gguf", family=family)
    ref = _emulating_reference(path, "f32")
    import reference as reference_module

    monkeypatch.setattr(ref, "_arch", reference_module._Arch(**vars(ref._arch)))  # a private copy
    _switch_off(ref, feature)
    run = _Run(path, capture={}, kv_cache="f32")
    try:
        ids = run.tokenize(PROMPTS[0])
        error = _rel_err(run.decode(ids), ref.forward(ids)["logits"])
    finally:
        run.close()
    assert error > 10 * _tolerance(family, "f32"), error
