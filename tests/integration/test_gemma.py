"""Gemma 3 270M (Q4_K_M), a real second family: what each site means, checked on the real file.

`lmscope pull gemma3-270m` fetches it during set-up (scripts/setup.sh). Gemma differs from the llama
family in exactly the ways a site table can get wrong: the embedding is scaled by sqrt(n_embd) before block 0,
each branch has a post-norm before it joins the stream (so what a branch *adds* is the post-norm's output),
the last block drops non-output rows before the attention post-norm, and q is pre-scaled. Tolerances:

- residual identities: llama.cpp adds the stream in float32, so ``resid_pre + attn_out`` equals
  ``resid_mid`` to the rounding of one float32 add (half an ulp; 8 eps of the row's largest value allowed);
- the embedding: ggml dequantizes the Q8_0 rows as numpy does and multiplies by sqrt(640) in float32;
- ablation: ``x - (x . v) v`` in float32 leaves a component of at most a few n_embd * eps * |x|;
- the lens: numpy multiplies the dequantized head by float32 activations, llama.cpp multiplies the Q8_0 head
  by activations quantized to 8 bits per block: `unembedding_error_bound` is that error's worst case.
"""
from __future__ import annotations

import numpy as np
import pytest

from lmscope.client import Client, LmscopeError
from lmscope.service.launch import launch_server
from lmscope.service.verification import unembedding_error_bound

PROMPT = "The capital of France is Paris, and the capital of Germany is"
EPS32 = float(np.finfo(np.float32).eps)
N_EMBD = 640


@pytest.fixture(scope="module")
def gemma_client():
    from lmscope.service.model_files import pull_model

    path = pull_model("gemma3-270m", progress=None)
    with launch_server(path, args=("--threads", "2", "--n-ctx", "256")) as server:
        with Client(server.address) as client:
            yield client


@pytest.fixture(scope="module")
def streams(gemma_client):
    return gemma_client.run(PROMPT, capture=["embed", "blocks.*.attn_out", "blocks.*.resid_mid",
                                             "blocks.*.mlp_out", "blocks.*.resid_post", "ln_final"])


def _relative(ours, theirs):
    return float((np.abs(ours - theirs).max(axis=-1) / np.abs(theirs).max(axis=-1)).max())


def test_gemma_offers_every_residual_site_verified(gemma_client):
    info = gemma_client.model_info()
    assert info.architecture == "gemma3" and info.site_rules == "gemma3"
    for kind in ("attn_out", "resid_mid", "mlp_out", "resid_post", "mlp.post", "attn_out_pre_norm",
                 "mlp_out_pre_norm", "attn.q_normed", "attn.pattern"):
        assert all(f"blocks.{L}.{kind}" in info.capture_sites for L in range(info.n_layer)), kind
    # a dense FFN: no router or experts
    assert set(info.unavailable_sites) == {"blocks.*.attn.scores"} | {
        f"blocks.*.mlp.{kind}" for kind in ("router", "experts.gate", "experts.up", "experts.post")}
    assert "no such tensor" in info.unavailable_sites["blocks.*.mlp.router"]
    assert info.verification["resid_pre + attn_out == resid_mid"] <= 8 * EPS32
    assert info.unembed_error == ""
    assert info.embedding_scale == pytest.approx(np.sqrt(N_EMBD), rel=1e-7)


def test_missing_site_names_the_reason_and_the_sites_that_exist(gemma_client):
    with pytest.raises(LmscopeError) as error:
        gemma_client.run(PROMPT, capture=["blocks.0.attn.scores"])
    assert "scales q" in str(error.value) and "attn.pattern" in str(error.value)
    with pytest.raises(LmscopeError, match="scales q"):
        gemma_client.run(PROMPT, capture="blocks.*.attn.scores")


def test_residual_identities_hold_at_every_layer(gemma_client, streams):
    captures = streams.captures
    for L in range(gemma_client.n_layer):
        pre = captures["embed"] if L == 0 else captures[f"blocks.{L - 1}.resid_post"]
        mid, post = captures[f"blocks.{L}.resid_mid"], captures[f"blocks.{L}.resid_post"]
        assert _relative(pre + captures[f"blocks.{L}.attn_out"], mid) <= 8 * EPS32, L
        assert _relative(mid + captures[f"blocks.{L}.mlp_out"], post) <= 8 * EPS32, L


def test_hidden_state_0_is_the_scaled_embedding(gemma_client, streams):
    hidden = streams.hidden_states
    rows = gemma_client.embedding_rows(streams.token_ids) * np.float32(np.sqrt(N_EMBD))
    assert _relative(rows, hidden[0]) <= 8 * EPS32
    # Unscaled, the rows would be 25x too small: the failure the site table used to have.
    assert np.abs(hidden[0]).max() > 20 * np.abs(gemma_client.embedding_rows(streams.token_ids)).max()


def test_ablation_leaves_no_component_at_any_residual_site(gemma_client, streams):
    direction = np.random.default_rng(0).standard_normal(N_EMBD).astype(np.float32)
    direction /= np.linalg.norm(direction)
    ablated = gemma_client.run(PROMPT, capture=["embed", "blocks.*.resid_mid", "blocks.*.resid_post"],
                               ablate=direction, logits=False)
    for site, x in ablated.captures.items():
        component = np.abs(x.astype(np.float64) @ direction)
        assert (component <= 4 * N_EMBD * EPS32 * np.linalg.norm(x, axis=1)).all(), site
    before = np.abs(streams.captures["blocks.8.resid_post"] @ direction).max()
    assert before > 1e3 * np.abs(ablated.captures["blocks.8.resid_post"] @ direction).max()


def test_lens_at_the_last_layer_is_the_model_within_the_quantized_heads_error(gemma_client, streams):
    last = streams.captures[f"blocks.{gemma_client.n_layer - 1}.resid_post"][-1:]
    lensed = gemma_client.unembed(last)[0]
    theirs = streams.logits[-1]
    assert lensed.argmax() == theirs.argmax()
    ids = np.unique(np.concatenate([np.argsort(-theirs)[:64],
                                    np.random.default_rng(1).choice(len(theirs), 256, replace=False)]))
    head = gemma_client.weights("token_embd.weight", ids.tolist())
    info = gemma_client.model_info()
    bound = unembedding_error_bound(streams.captures["ln_final"][-1:], head, "Q8_0")[0]
    assert info.tensor_types.get("Q8_0") and info.tied_embeddings  # the head whose error the bound states
    assert (np.abs(lensed[ids] - theirs[ids]) <= bound).all()


def test_neurons_and_geglu_activations(gemma_client):
    neurons = gemma_client.neurons(PROMPT, layer=3)
    assert neurons.activations.shape[1] == gemma_client.model_info().n_ff == 2048
    value = gemma_client.neuron_value(3, 7)
    assert value.shape == (N_EMBD,)
