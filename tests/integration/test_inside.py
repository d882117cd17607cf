"""Inside a layer, end to end on the tiny model: every capture site, attention, neurons, patching, Patchscopes.

Expected values come from the independent numpy forward pass (`tests/reference.py`) or from the GGUF
weights read with `gguf`. Requests that capture an attention site run without flash attention, where
llama.cpp computes in float32 apart from its F16 KV cache (which the reference mimics), so those matches
are tight; other requests use flash attention and match within its float16 accumulation.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import rms_norm
from tolerances import (
    F16_CACHE,
    FLASH_F16,
    SAME_KERNELS,
    U32,
    assert_close_to_scale,
    assert_within,
    gamma,
    unembedding_error,
)

from lmscope.client import Client, LmscopeError, Patch
from lmscope.client.activation_patching import IDENTITY_PROMPT, logit_difference
from lmscope.service.launch import launch_server

PROMPT = "The capital of France is"
OTHER = "My favourite colour is blue and"
NO_FLASH = "blocks.0.attn.pattern"  # capturing it turns flash attention off for the request


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _f16(x):
    return x.astype(np.float16).astype(np.float64)


def _softmax_causal(scores):
    n = scores.shape[-1]
    masked = np.where(np.triu(np.ones((n, n), bool), k=1), -np.inf, scores)
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)



@pytest.fixture(scope="module")
def full_run(client):
    return client.run(PROMPT, capture="*")


def test_every_capture_site_matches_the_numpy_reference(client, reference, full_run):
    run = full_run
    ref = reference.forward(run.token_ids)
    n, heads, kv_heads, head_dim = len(run.token_ids), reference.n_head, reference.n_head_kv, reference.head_dim
    expected_sites = ["embed"] + [f"blocks.{L}.{k}" for L in range(reference.n_layer) for k in (
        "ln1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn_out", "resid_mid",
        "ln2", "mlp.gate", "mlp.up", "mlp.post", "mlp_out", "resid_post")] + ["ln_final"]
    assert list(run.captures) == expected_sites == client.model_info().capture_sites

    def close(site, expected):
        assert_close_to_scale(run.captures[site], expected, F16_CACHE, site)

    close("embed", ref["embed"])
    close("ln_final", ref["ln_final"])
    for L in range(reference.n_layer):
        w = lambda name, L=L: reference.weight(f"blk.{L}.{name}.weight").astype(np.float64)
        resid_pre = ref["embed"] if L == 0 else ref["resid_post"][L - 1]
        ln1 = rms_norm(resid_pre, w("attn_norm"), reference.rms_eps)
        ln2 = rms_norm(ref["resid_mid"][L], w("ffn_norm"), reference.rms_eps)
        gate, up = ln2 @ w("ffn_gate").T, ln2 @ w("ffn_up").T
        close(f"blocks.{L}.ln1", ln1)
        assert run.captures[f"blocks.{L}.attn.q"].shape == (n, heads, head_dim)
        close(f"blocks.{L}.attn.q", ref["q"][L])
        assert run.captures[f"blocks.{L}.attn.k"].shape == (n, kv_heads, head_dim)
        close(f"blocks.{L}.attn.k", ref["k"][L])
        close(f"blocks.{L}.attn.v", ref["v"][L])
        close(f"blocks.{L}.attn.pattern", ref["pattern"][L])
        close(f"blocks.{L}.attn.z", ref["z"][L].reshape(n, heads * head_dim))
        close(f"blocks.{L}.attn_out", ref["attn_out"][L])
        close(f"blocks.{L}.resid_mid", ref["resid_mid"][L])
        close(f"blocks.{L}.ln2", ln2)
        close(f"blocks.{L}.mlp.gate", gate)
        close(f"blocks.{L}.mlp.up", up)
        close(f"blocks.{L}.mlp.post", _silu(gate) * up)
        close(f"blocks.{L}.mlp.post", ref["mlp_post"][L])
        close(f"blocks.{L}.mlp_out", ref["mlp_out"][L])
        close(f"blocks.{L}.resid_post", ref["resid_post"][L])


def test_attention_scores_are_the_raw_unscaled_products_of_the_cached_q_and_k(reference, full_run):
    # llama.cpp's `kq` is f16(q) . f16(k) over the F16 KV cache, before the 1/sqrt(head_dim) scale and the
    # causal mask (both applied inside its softmax). lmscope returns the causal part and 0 above it.
    run = full_run
    group = reference.n_head // reference.n_head_kv
    n = len(run.token_ids)
    future = np.triu(np.ones((n, n), bool), k=1)
    for L in range(reference.n_layer):
        q = _f16(run.captures[f"blocks.{L}.attn.q"])
        k = np.repeat(_f16(run.captures[f"blocks.{L}.attn.k"]), group, axis=1)
        raw = np.einsum("qhd,khd->hqk", q, k)
        scores = run.captures[f"blocks.{L}.attn.scores"]
        # The same float16 products summed over head_dim terms in float32 (llama.cpp) and float64 (here).
        magnitude = np.einsum("qhd,khd->hqk", np.abs(q), np.abs(k))
        assert_within(scores[:, ~future], raw[:, ~future], gamma(reference.head_dim) * magnitude[:, ~future], "kq")
        assert (scores[:, future] == 0).all()
        # softmax(scale * s) in float32 over n keys: relative error of each p about (n + 4) u plus the
        # scaled rounding of s (|s| / sqrt(head_dim) u); p <= 1, so absolute.
        pattern_error = gamma(n + 4) + np.abs(scores).max() / np.sqrt(reference.head_dim) * 2 * U32
        np.testing.assert_allclose(_softmax_causal(scores / np.sqrt(reference.head_dim)),
                                   run.captures[f"blocks.{L}.attn.pattern"], atol=pattern_error)


def test_the_issue_capture_list_selects_those_sites_and_matches_the_reference(client, reference):
    run = client.run(PROMPT, capture=["blocks.*.attn_out", "blocks.*.mlp_out", "blocks.3.mlp.post"])
    assert list(run.captures) == [f"blocks.{L}.{k}" for L in range(3) for k in ("attn_out", "mlp_out")] + \
        ["blocks.3.attn_out", "blocks.3.mlp.post", "blocks.3.mlp_out"]  # in graph order
    ref = reference.forward(run.token_ids)
    for L in range(4):  # a flash-attention pass: float16 accumulation in the attention
        np.testing.assert_allclose(run.captures[f"blocks.{L}.attn_out"], ref["attn_out"][L], atol=FLASH_F16)
        np.testing.assert_allclose(run.captures[f"blocks.{L}.mlp_out"], ref["mlp_out"][L], atol=FLASH_F16)
    np.testing.assert_allclose(run.captures["blocks.3.mlp.post"], ref["mlp_post"][3], atol=FLASH_F16)


def test_attention_rows_are_causal_distributions_equal_to_softmax_of_captured_q_k(client, reference):
    att = client.attention(PROMPT, layers=[0, 2, 3])
    n = len(att.token_ids)
    assert att.probs.shape == (3, reference.n_head, n, n) and att.layers == [0, 2, 3]
    np.testing.assert_allclose(att.probs.sum(axis=-1), 1.0, atol=gamma(2 * n + 4))  # float32 softmax + sum
    assert (att.probs[..., np.triu(np.ones((n, n), bool), k=1)] == 0).all()
    # Q and K from a pass without flash attention, like the pattern's (deeper layers' inputs differ otherwise).
    run = client.run(PROMPT, capture=[f"blocks.{L}.attn.{s}" for L in (0, 2, 3) for s in ("q", "k")] + [NO_FLASH])
    group = reference.n_head // reference.n_head_kv
    for i, L in enumerate((0, 2, 3)):
        q = _f16(run.captures[f"blocks.{L}.attn.q"])
        k = _f16(run.captures[f"blocks.{L}.attn.k"])
        # Grouped-query attention: query head h reads key head h // (n_head / n_head_kv).
        recomputed = _softmax_causal(np.einsum("qhd,khd->hqk", q, np.repeat(k, group, axis=1)) /
                                     np.sqrt(reference.head_dim))
        scores = np.einsum("qhd,khd->hqk", np.abs(q), np.repeat(np.abs(k), group, axis=1))
        scale = scores.max() / np.sqrt(reference.head_dim)
        pattern_error = gamma(n + 4) + (gamma(reference.head_dim) + 2 * U32) * scale
        np.testing.assert_allclose(att.probs[i], recomputed, atol=2 * pattern_error)  # see the scores test
        wrong_mapping = _softmax_causal(np.einsum("qhd,khd->hqk", q, np.tile(k, (1, group, 1))) /
                                        np.sqrt(reference.head_dim))
        assert np.abs(att.probs[i] - wrong_mapping).max() > 1e-2
    assert "".join(att.tokens[1:]) == PROMPT  # [0] is BOS
    some = client.attention(PROMPT, layers=[3], heads=[2, 0])
    np.testing.assert_array_equal(some.probs[0], att.probs[2][[2, 0]])
    np.testing.assert_array_equal(some.pattern(3, 0), att.pattern(3, 0))


def test_flash_attention_is_off_only_for_requests_that_capture_attention(client, reference):
    plain = client.run(PROMPT, layers=[3], logits=False).resid_post(3)
    with_pattern = client.run(PROMPT, capture=["blocks.3.resid_post", NO_FLASH], logits=False).resid_post(3)
    expected = reference.forward(client.tokenize(PROMPT).token_ids)["resid_post"][3]
    assert_close_to_scale(with_pattern, expected, F16_CACHE)
    # The plain pass accumulated in float16 (flash attention): some state differs by more than float32
    # reordering could explain (gamma(n_ff) of order-one values).
    assert np.abs(plain - with_pattern).max() > 10 * gamma(reference.n_ff)


def test_head_summary_statistics(client):
    att = client.attention(PROMPT)
    summary = att.head_summary()
    n = len(att.token_ids)
    for i, layer in enumerate(att.layers):
        for h in att.heads:
            p = att.pattern(layer, h).astype(np.float64)
            entropy = np.mean([-sum(x * np.log(x) for x in p[q, :q + 1] if x > 0) for q in range(1, n)])
            # Float64 on both sides over <= n terms (gamma_64(n + 4) ~ 1e-15); float32 results carry u.
            assert summary.entropy[i, h] == pytest.approx(entropy, rel=U32 + 1e-12)
            assert summary.previous_token[i, h] == pytest.approx(np.mean([p[q, q - 1] for q in range(1, n)]),
                                                                 rel=U32 + 1e-12)
            assert summary.first_token[i, h] == pytest.approx(np.mean([p[q, 0] for q in range(1, n)]),
                                                              rel=U32 + 1e-12)
    rows = summary.rows()
    assert len(rows) == 4 * 4 and set(rows[0]) == {"layer", "head", "entropy", "previous_token", "first_token", "role"}
    assert str(summary).count("\n") == len(rows)


def test_attention_plot_saves_png_and_svg(client, tmp_path):
    att = client.attention("兩顆青蘋果", layers=[1])
    assert len(att.tokens) == len(att.token_ids) and not any("\ufffd" in t for t in att.tokens)
    fig = att.plot(1, 2, save=tmp_path / "a.png")
    fig.savefig(tmp_path / "a.svg")
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "a.svg").stat().st_size > 1000
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] in (att.tokens[-1], att.tokens[-1].encode(
        "ascii", "backslashreplace").decode())


def test_neurons_are_the_mlp_activations(client, reference):
    neurons = client.neurons(PROMPT, layer=1)
    expected = reference.forward(neurons.token_ids)["mlp_post"][1]
    assert neurons.activations.shape == (len(neurons.token_ids), reference.n_ff)
    np.testing.assert_allclose(neurons.activations, expected, atol=FLASH_F16)
    ids, values = neurons.top(position=-1, k=3)
    np.testing.assert_array_equal(ids, np.argsort(-neurons.activations[-1])[:3])
    np.testing.assert_array_equal(values, neurons.activations[-1][ids])


def test_neuron_value_vector_through_the_lm_head_equals_the_numpy_product(client, reference):
    layer, neuron, k = 2, 37, 8
    value = reference.weight(f"blk.{layer}.ffn_down.weight")[:, neuron]  # (n_embd, n_ff) matrix, column `neuron`
    np.testing.assert_array_equal(client.neuron_value(layer, neuron), value)
    logits = reference.output_weight.astype(np.float64) @ value.astype(np.float64)
    result = client.neuron_top_tokens(layer, neuron, k=k)
    np.testing.assert_array_equal(result.top_ids, np.argsort(-logits)[:k])
    np.testing.assert_array_equal(result.bottom_ids, np.argsort(logits)[:k])
    # A float32 n_embd-term dot product per token on the server.
    bound = gamma(reference.n_embd) * (np.abs(reference.output_weight.astype(np.float64)) @ np.abs(value))
    assert_within(result.top_logits, logits[result.top_ids], bound[result.top_ids], "top")
    assert_within(result.bottom_logits, logits[result.bottom_ids], bound[result.bottom_ids], "bottom")
    assert result.top_tokens == client.token_labels(result.top_ids)


def test_top_activating_ranks_every_token_of_the_corpus(client):
    prompts = [PROMPT, OTHER, "hello world, how are you", "今天天氣真好！", "one two three four five"]
    layer, neuron = 2, 5
    result = client.top_activating(prompts, layer, neuron, k=6, batch_size=2, progress=False)
    bos = client.model_info().bos_token_id
    site = f"blocks.{layer}.mlp.post"
    batched = client.run_batch(prompts, batch_size=2, capture=[site], logits=False)  # what top_activating sends
    expected = []
    for p, (prompt, run) in enumerate(zip(prompts, batched)):
        column = run.captures[site][:, neuron]
        np.testing.assert_array_equal(result.activations[p], column)
        # Alone: the prompt's cache cells fall elsewhere among flash attention's key tiles than beside another
        # prompt, so float32 sums round otherwise and can flip an F16 cache entry (F16_CACHE of the scale).
        assert_close_to_scale(column, client.neurons(prompt, layer).activations[:, neuron], F16_CACHE, prompt)
        expected += [(float(a), p, i) for i, a in enumerate(column) if run.token_ids[i] != bos]
    expected.sort(key=lambda hit: -hit[0])
    assert result.n_tokens_scanned == len(expected)
    assert [(h.prompt, h.position) for h in result.hits] == [(p, i) for _, p, i in expected[:6]]
    np.testing.assert_array_equal([h.activation for h in result.hits], [a for a, _, _ in expected[:6]])
    for hit in result.hits:
        assert "[[" in hit.context and "]]" in hit.context and "\ufffd" not in hit.context
    assert len(str(result).splitlines()) == 2 + 6


def test_single_layer_patch_at_a_different_position_matches_the_reference(client, reference):
    a = client.run(PROMPT, capture=["embed", "blocks.*.resid_post", NO_FLASH])
    b = client.run(OTHER, capture=["embed", "blocks.*.resid_post", NO_FLASH])
    assert len(a.token_ids) != len(b.token_ids)
    layer, position = 1, 3
    vector = a.resid_post(layer)[-1]
    patched = client.run(b.token_ids, capture=["embed", "blocks.*.resid_post", NO_FLASH],
                         patch=[Patch(layer=layer, position=position, vector=vector)])

    def hook(L, x):
        if L == layer:
            x[position] = vector
            return x

    expected = reference.forward(b.token_ids, resid_post_hook=hook)
    assert_close_to_scale(patched.hidden_states[1:], expected["resid_post"], F16_CACHE)
    assert_close_to_scale(patched.logits, expected["logits"], F16_CACHE)
    np.testing.assert_array_equal(patched.hidden_states[:, :position], b.hidden_states[:, :position])
    np.testing.assert_array_equal(patched.hidden_states[:layer + 1, position], b.hidden_states[:layer + 1, position])
    assert np.abs(patched.logits[position:] - b.logits[position:]).max() > 1e-2

    # At the last block, patching B's last row with A's last row gives A's next-token logits.
    last = client.n_layer - 1
    to_a = client.run(b.token_ids, logits="last", layers=[last],
                      patch=[Patch(layer=last, position=-1, vector=a.resid_post(last)[-1])])
    # Both last rows are A's block output (set, not computed): two float32 unembeddings of one vector.
    bound = unembedding_error(reference, a.resid_post(last)[-1])
    assert_within(to_a.logits[-1], a.logits[-1], 2 * bound, "logits")


def test_patchscope_patches_the_target_prompt_pass_only(client, reference):
    source_layer, target_layer, target = 1, 2, "hello world, how are you"
    ps = client.patchscope(PROMPT, source_layer=source_layer, source_position=-2, target=target,
                           target_layer=target_layer, max_tokens=4)
    source = client.run(PROMPT, layers=[source_layer], logits=False)
    np.testing.assert_array_equal(ps.vector, source.resid_post(source_layer)[-2])
    target_ids = client.tokenize(target).token_ids
    assert (ps.source_position, ps.target_position) == (len(source.token_ids) - 2, len(target_ids) - 1)
    assert ps.source_token == client.token_labels(source.token_ids)[-2]
    assert ps.text == client.detokenize(ps.token_ids) and len(ps.token_ids) == 4
    # Greedy generation with the patch on the prompt only: each token is the argmax of a forward pass over
    # the prompt + the tokens so far, patched at the target position alone.
    patch = [Patch(layer=target_layer, position=len(target_ids) - 1, vector=ps.vector)]
    for i, token in enumerate(ps.token_ids):
        logits = client.run(target_ids + ps.token_ids[:i], logits="last", patch=patch, layers=[0]).logits[-1]
        assert token == int(np.argmax(logits))
    unpatched = client.generate(target, max_tokens=4)
    assert unpatched.token_ids != ps.token_ids

    def hook(L, x):
        if L == target_layer:
            x[-1] = ps.vector
            return x

    assert ps.token_ids[0] == int(np.argmax(reference.forward(target_ids, resid_post_hook=hook)["logits"][-1]))
    default = client.patchscope(PROMPT, source_layer=2, max_tokens=2)
    assert default.target == IDENTITY_PROMPT and default.target_layer == 2
    assert default.target_position == len(client.tokenize(IDENTITY_PROMPT).token_ids) - 1


@pytest.fixture(scope="module")
def sweep_prompts(client):
    clean = client.tokenize(PROMPT).token_ids
    corrupted = list(clean)
    corrupted[3] = client.token_id(" blue")
    assert corrupted != clean
    return clean, corrupted


def test_patch_sweep_shapes_and_values_against_manual_patching(client, reference, sweep_prompts):
    clean, corrupted = sweep_prompts
    n = len(clean)
    sweep = client.patch_sweep(clean, corrupted, layers=[0, 2, 3], positions=[1, 3, -1], batch_size=4)
    assert sweep.values.shape == (3, 3) and sweep.layers == [0, 2, 3] and sweep.positions == [1, 3, n - 1]
    clean_run = client.run(clean, capture="blocks.*.resid_post")
    corrupted_run = client.run(corrupted, logits="last", layers=[0])
    good, bad = int(np.argmax(clean_run.logits[-1])), int(np.argmax(corrupted_run.logits[-1]))
    assert good != bad
    metric = lambda logits: float(logits[good] - logits[bad])
    # The sweep's passes are batches of < 64 rows: the same kernels row by row as these single runs, so a
    # logit difference differs by at most twice SAME_KERNELS (relative and absolute) of the largest logit.
    same = 2 * SAME_KERNELS * (1 + float(max(np.abs(clean_run.logits).max(), np.abs(corrupted_run.logits).max())))
    assert sweep.clean_value == pytest.approx(metric(clean_run.logits[-1]), abs=same)
    assert sweep.corrupted_value == pytest.approx(metric(corrupted_run.logits[-1]), abs=same)
    for i, layer in enumerate(sweep.layers):
        for j, position in enumerate(sweep.positions):
            vector = clean_run.resid_post(layer)[position]
            single = client.run(corrupted, logits="last", layers=[0], patch=[Patch(layer, position, vector)])
            assert sweep.values[i, j] == pytest.approx(metric(single.logits[-1]), abs=same)

            def hook(L, x, layer=layer, position=position, vector=vector):
                if L == layer:
                    x[position] = vector
                    return x

            # A flash-attention pass against the reference: two logits each within FLASH_F16 relative.
            logits = reference.forward(corrupted, resid_post_hook=hook)["logits"][-1]
            expected = metric(logits)
            assert sweep.values[i, j] == pytest.approx(expected, abs=2 * FLASH_F16 * float(np.abs(logits).max()))
    # Before the corrupted token the two prompts agree: patching there changes nothing.
    np.testing.assert_allclose(sweep.values[:, 0], sweep.corrupted_value, atol=same)
    # The last block's last row alone decides the next token: patching it restores the clean run.
    assert sweep.values[2, 2] == pytest.approx(sweep.clean_value, abs=same)
    span = abs(sweep.clean_value - sweep.corrupted_value)
    np.testing.assert_allclose(sweep.normalized()[:, 0], 0.0, atol=same / span)
    assert sweep.normalized()[2, 2] == pytest.approx(1.0, abs=same / span)
    assert "/" in sweep.tokens[1]  # the corrupted position is labelled clean/corrupted


def test_patch_sweep_with_a_custom_metric_and_site_and_its_plot(client, sweep_prompts, tmp_path):
    clean, corrupted = sweep_prompts
    target = client.token_id(" Paris")
    sweep = client.patch_sweep(clean, corrupted, metric=logit_difference(target, 0), site="attn_out",
                               positions=[3], batch_size=3)
    assert sweep.values.shape == (4, 1) and sweep.site == "attn_out"
    clean_run = client.run(clean, capture="blocks.*.attn_out", logits=False)
    for layer in range(4):
        patch = Patch(layer, 3, clean_run.captures[f"blocks.{layer}.attn_out"][3], site="attn_out")
        logits = client.run(corrupted, logits="last", layers=[0], patch=[patch]).logits[-1]
        same = 2 * SAME_KERNELS * (1 + float(np.abs(logits).max()))  # see the test above
        assert sweep.values[layer, 0] == pytest.approx(float(logits[target] - logits[0]), abs=same)
    fig = sweep.plot(save=tmp_path / "sweep.png")
    assert fig.axes and (tmp_path / "sweep.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def small_capture_client(tiny_model):
    with launch_server(tiny_model, args=("--threads", "2", "--n-ctx", "1024", "--max-capture-mb", "1")) as server:
        with Client(server.address) as c:
            yield c


def test_attention_over_too_many_tokens_is_refused_by_the_capture_limit(small_capture_client):
    long_prompt = list(range(10, 310))  # 300 tokens: 4 layers x 4 heads x 300 x 300 floats = 5.5 MiB
    with pytest.raises(LmscopeError) as info:
        small_capture_client.attention(long_prompt)
    assert info.value.code.name == "RESOURCE_EXHAUSTED" and "limit of 1 MiB" in info.value.message
    assert small_capture_client.attention(long_prompt[:100], layers=[0]).probs.shape == (1, 4, 100, 100)


@pytest.mark.parametrize("call, code, words", [
    (lambda c: c.attention(PROMPT, layers=[4]), "OUT_OF_RANGE",
     "layer 4 is out of range: the model has 4 blocks (0..3)"),
    (lambda c: c.attention(PROMPT, layers=[-1]), "OUT_OF_RANGE", "layer -1"),
    (lambda c: c.attention(PROMPT, heads=[4]), "OUT_OF_RANGE", "head 4 is out of range: the model has 4 heads (0..3)"),
    (lambda c: c.neurons(PROMPT, layer=9), "OUT_OF_RANGE", "layer 9"),
    (lambda c: c.neuron_top_tokens(1, 128), "OUT_OF_RANGE",
     "neuron 128 is out of range: the model has 128 feed-forward neurons (0..127)"),
    (lambda c: c.neuron_top_tokens(4, 0), "OUT_OF_RANGE", "layer 4"),
    (lambda c: c.top_activating([PROMPT], 1, -1, progress=False), "OUT_OF_RANGE", "neuron -1"),
    (lambda c: c.weights("blk.0.ffn_down.weight", [128], axis=1), "OUT_OF_RANGE", "index 128 is out of range"),
    (lambda c: c.run(PROMPT, capture=["blocks.4.mlp.post"]), "INVALID_ARGUMENT", "unknown capture site"),
    (lambda c: c.patchscope(PROMPT, 1, source_position=40), "OUT_OF_RANGE", "outside a prompt"),
    (lambda c: c.patchscope(PROMPT, 1, target_position=-99), "OUT_OF_RANGE", "outside a prompt"),
    (lambda c: c.patchscope(PROMPT, 1, target_layer=7), "OUT_OF_RANGE", "layer 7"),
    (lambda c: c.patch_sweep(PROMPT, OTHER), "INVALID_ARGUMENT", "needs equal lengths"),
    (lambda c: c.patch_sweep(PROMPT, PROMPT), "INVALID_ARGUMENT", "predict the same token"),
    (lambda c: c.patch_sweep(PROMPT, PROMPT, site="attn.pattern"), "INVALID_ARGUMENT", "cannot be swept"),
    (lambda c: c.patch_sweep(PROMPT, PROMPT, positions=[99]), "OUT_OF_RANGE", "outside a prompt"),
])
def test_bad_input_gets_a_precise_status(client, call, code, words):
    with pytest.raises(LmscopeError) as info:
        call(client)
    assert info.value.code.name == code
    assert words in info.value.message


def test_token_labels_name_the_characters_split_over_tokens():
    from lmscope.client.token_labels import snippet, token_labels

    apple = "蘋".encode()  # three bytes, here one token each
    pieces = [b" two", "兩".encode()[:2], "兩".encode()[2:] + apple[:1], apple[1:2], apple[2:], b"\n", b"\xff"]
    assert token_labels(pieces) == [" two", "兩[1/2]", "兩[2/2]蘋[1/3]", "蘋[2/3]", "蘋[3/3]", "\\n", "\\xff"]
    assert snippet(pieces, 3) == " two兩[[蘋]]\\n"      # the mark widens to the whole character
    assert snippet(pieces[2:], 2) == "[[蘋]]\\n"        # a character cut by the window's edge is dropped
