"""The foundation, end to end: real server, real llama.cpp, numbers checked against numpy references."""
from __future__ import annotations

import numpy as np
import pytest
from tolerances import (
    F16_CACHE,
    FLASH_F16,
    U16,
    assert_close_to_scale,
    assert_same_as_alone,
    assert_within,
    gamma,
    unembedding_error,
)

from lmscope.client import Client, LmscopeError, Patch

PROMPT = "The capital of France is"


def test_model_info_describes_the_tiny_model(client, reference):
    info = client.model_info()
    assert (info.architecture, info.n_layer, info.n_embd, info.n_head, info.n_head_kv, info.n_ff) == \
        ("llama", reference.n_layer, reference.n_embd, reference.n_head, reference.n_head_kv, reference.n_ff)
    assert info.n_vocab == reference.n_vocab
    assert info.tied_embeddings is False
    assert info.has_chat_template
    assert info.tensor_types["F32"] > 0
    assert len(info.fingerprint) == 64
    assert "blocks.3.resid_post" in info.capture_sites and "blocks.3.attn.pattern" in info.capture_sites
    assert info.limits["max_prompt_tokens"] == 1024


def test_tokenize_is_bytes_safe_and_round_trips(client):
    tokens = client.tokenize("今天天氣真好！")
    assert b"".join(tokens.pieces[1:]) == "今天天氣真好！".encode()  # [0] is BOS
    assert client.detokenize(tokens.token_ids[1:]) == "今天天氣真好！"


def test_run_hidden_states_match_the_numpy_reference(client, reference):
    # Capturing an attention pattern runs the pass without flash attention: llama.cpp then computes in
    # float32 apart from its F16 KV cache, which the reference mimics, so the match is tight.
    run = client.run(PROMPT, capture=["embed", "blocks.*.resid_post", "blocks.0.attn.pattern"])
    ref = reference.forward(run.token_ids)
    n = len(run.token_ids)
    assert run.hidden_states.shape == (reference.n_layer + 1, n, reference.n_embd)
    assert run.logits.shape == (n, reference.n_vocab)
    np.testing.assert_array_equal(run.hidden_states[0], ref["embed"])  # F32 rows copied: exact
    assert_close_to_scale(run.hidden_states[1:], ref["resid_post"], F16_CACHE)
    assert_close_to_scale(run.logits, ref["logits"], F16_CACHE)


def test_flash_attention_pass_matches_the_reference_within_its_float16_accumulation(client, reference):
    # The default pass uses flash attention, whose CPU kernel accumulates softmax(QK) V in float16.
    run = client.run(PROMPT)
    ref = reference.forward(run.token_ids)
    np.testing.assert_allclose(run.hidden_states[1:], ref["resid_post"], atol=FLASH_F16)
    assert (run.logits.argmax(axis=1) == ref["logits"].argmax(axis=1)).all()


def test_final_norm_and_lm_head_on_the_last_hidden_state_reproduce_the_logits(client, reference):
    # llama.cpp's and the server's float32 unembeddings are each within the float32 bound of the exact one.
    run = client.run(PROMPT)
    bound = unembedding_error(reference, run.hidden_states[-1])[:, None]
    assert_within(run.logits, reference.unembed(run.hidden_states[-1]), bound, "llama.cpp vs exact")
    assert_within(client.unembed(run.hidden_states[-1]), run.logits, 2 * bound, "server vs llama.cpp")


def test_embedding_rows_equal_hidden_state_zero(client, reference):
    run = client.run(PROMPT)
    rows = client.embedding_rows(run.token_ids)
    np.testing.assert_array_equal(rows, run.hidden_states[0])
    np.testing.assert_array_equal(rows, reference.embedding_rows(run.token_ids))  # F32 rows: a copy


def test_a_prompt_without_bos_is_the_tokens_as_written(client):
    plain = client.run(PROMPT, prepend_bos=False)
    words = client.tokenize(PROMPT, add_special=False).token_ids
    assert plain.token_ids == words and words[0] != client.model_info().bos_token_id
    as_ids = client.run(words)  # token-id prompts are used as given: the same pass
    np.testing.assert_array_equal(plain.hidden_states, as_ids.hidden_states)
    assert client.run(PROMPT).token_ids == [client.model_info().bos_token_id] + words


def test_capturing_one_layer_equals_that_layer_of_a_full_capture(client):
    full = client.run(PROMPT)
    one = client.run(PROMPT, layers=[2], logits=False)
    assert list(one.captures) == ["blocks.2.resid_post"] and one.logits is None
    np.testing.assert_array_equal(one.resid_post(2), full.hidden_states[3])
    with pytest.raises(KeyError, match="resid_post"):
        _ = one.hidden_states


def test_positions_select_rows_and_last_layer_keeps_them(client):
    full = client.run(PROMPT)
    some = client.run(PROMPT, positions=[0, -1])
    n = len(full.token_ids)
    assert some.positions == [0, n - 1]
    np.testing.assert_array_equal(some.hidden_states, full.hidden_states[:, [0, n - 1]])
    np.testing.assert_array_equal(some.logits, full.logits[[0, n - 1]])
    last = client.run(PROMPT, logits="last", layers=[3])
    np.testing.assert_array_equal(last.logits[0], full.logits[-1])
    np.testing.assert_array_equal(last.resid_post(3), full.hidden_states[4])


def test_float16_transfer_is_within_float16_error(client):
    f32 = client.run(PROMPT)
    f16 = client.run(PROMPT, dtype="float16")
    assert f16.hidden_states.dtype == np.float16 and f16.logits.dtype == np.float16
    # Round to nearest float16: half a step, 2**-11 of the value, or 2**-25 in the subnormal range.
    np.testing.assert_allclose(f16.hidden_states.astype(np.float32), f32.hidden_states, rtol=U16, atol=2 ** -25)
    np.testing.assert_allclose(f16.logits.astype(np.float32), f32.logits, rtol=U16, atol=2 ** -25)


def test_batched_prompts_equal_single_runs(client, reference):
    prompts = [PROMPT, "Hello world, this is a longer prompt with more tokens", "今天天氣真好！"]
    batch = client.run_batch(prompts, batch_size=3)
    for prompt, run in zip(prompts, batch):
        assert_same_as_alone(run, client.run(prompt))
        ref = reference.forward(run.token_ids)
        np.testing.assert_allclose(run.hidden_states[1:], ref["resid_post"], atol=FLASH_F16)


def test_prompt_longer_than_a_ubatch_is_decoded_in_pieces(tiny_model, reference):
    from lmscope.service.launch import launch_server

    with launch_server(tiny_model, args=("--threads", "2", "--n-ctx", "256", "--n-batch", "16")) as server:
        with Client(server.address) as c:
            ids = c.tokenize("one two three four five six seven eight nine ten " * 4).token_ids
            assert len(ids) > 32
            run = c.run(ids, capture=["blocks.1.resid_post", "blocks.1.attn.pattern"])
    ref = reference.forward(ids)
    assert_close_to_scale(run.captures["blocks.1.resid_post"], ref["resid_post"][1], F16_CACHE)
    assert_close_to_scale(run.captures["blocks.1.attn.pattern"], ref["pattern"][1], F16_CACHE)


def test_top_k_table_is_the_softmax_of_the_logits(client):
    run = client.run(PROMPT)
    table = client.top_k(run.logits[-1], k=5, temperature=2.0)
    z = run.logits[-1].astype(np.float64) / 2.0
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)[:5]
    np.testing.assert_array_equal(table.ids, order)
    # Both softmaxes in float64 over n_vocab terms: each within gamma_64(n_vocab + 4) relative.
    np.testing.assert_allclose(table.probs, p[order], rtol=2 * gamma(len(p) + 4, 2.0 ** -53))
    assert table.pieces[0] == client.detokenize([int(order[0])]) or table.pieces[0]


def test_embed_pools_the_final_normed_states(client, reference):
    texts = [PROMPT, "another sentence"]
    mean = client.embed(texts, pooling="mean", normalize=False)
    last = client.embed(texts, pooling="last", normalize=True)
    for text, m, unit in zip(texts, mean, last):
        ids = client.tokenize(text).token_ids
        states = reference.forward(ids)["ln_final"]
        # A flash-attention pass (FLASH_F16); normalizing the last state (order-one entries) divides it by
        # its norm, which the test computes from the reference, so the error stays of the same size.
        np.testing.assert_allclose(m, states.mean(axis=0), atol=FLASH_F16)
        np.testing.assert_allclose(unit, states[-1] / np.linalg.norm(states[-1]), atol=FLASH_F16)
    assert len(client.embed(texts, pooling="none")) == 2
    with pytest.raises(ValueError, match="pooling"):
        client.embed(texts, pooling="max")


def test_patching_last_row_with_another_prompts_state_reproduces_its_logits(client, reference):
    a = client.run("The capital of France is")
    b = client.run("My favourite colour is blue and")
    n_layer = client.n_layer
    # Patch every block output at B's last position with A's: the last row is then A's last row.
    patches = [Patch(layer=L, position=-1, vector=a.resid_post(L)[-1]) for L in range(n_layer)]
    patched = client.run(b.token_ids, patch=patches)
    # The last row of the last block is A's (set, not computed), so both logits rows are float32
    # unembeddings of the same vector, in batches of other lengths: each within the float32 bound.
    bound = unembedding_error(reference, a.resid_post(n_layer - 1)[-1])
    assert_within(patched.logits[-1], a.logits[-1], 2 * bound, "patched logits")
    np.testing.assert_array_equal(patched.hidden_states[:, :-1], b.hidden_states[:, :-1])


def test_generation_is_greedy_and_reproducible(client):
    g1 = client.generate(PROMPT, max_tokens=8)
    g2 = client.generate(PROMPT, max_tokens=8)
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) <= 8
    run = client.run(PROMPT, logits="last")
    assert g1.token_ids[0] == int(np.argmax(run.logits[-1]))
    s1 = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=7)
    s2 = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=7)
    assert s1.token_ids == s2.token_ids


@pytest.mark.parametrize("call, code, words", [
    (lambda c: c.run(""), "INVALID_ARGUMENT", "empty"),
    (lambda c: c.run("x" * 5000), "OUT_OF_RANGE", "at most 1024"),
    (lambda c: c.run([10 ** 6]), "OUT_OF_RANGE", "outside the vocabulary"),
    (lambda c: c.run(PROMPT, layers=[99]), "OUT_OF_RANGE", "layer 99 is out of range: the model has 4 blocks"),
    (lambda c: c.run(PROMPT, positions=[50]), "OUT_OF_RANGE", "outside a prompt"),
    (lambda c: c.unembed(np.zeros((2, 7))), "INVALID_ARGUMENT", "width 7"),
    (lambda c: c.unembed(np.full((1, 64), np.nan)), "INVALID_ARGUMENT", "NaN"),
    (lambda c: c.run(PROMPT, steer={1: np.full(64, np.inf)}), "INVALID_ARGUMENT", "NaN or infinite"),
    (lambda c: c.run(PROMPT, steer={1: np.ones(65)}), "INVALID_ARGUMENT", "width 65"),
    (lambda c: c.embedding_rows([-1]), "OUT_OF_RANGE", "out of range"),
    (lambda c: c.weights("no.such.tensor"), "NOT_FOUND", "no tensor"),
    (lambda c: c.generate(PROMPT, max_tokens=0), "OUT_OF_RANGE", "max_tokens"),
    (lambda c: c.generate(PROMPT, temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
])
def test_bad_input_gets_a_precise_status_and_the_server_keeps_serving(client, call, code, words):
    with pytest.raises(LmscopeError) as info:
        call(client)
    assert info.value.code.name == code
    assert words in info.value.message
    assert client.run(PROMPT, layers=[0], logits=False).resid_post(0).shape[1] == 64


def test_real_model_puts_paris_first(smol_client):
    run = smol_client.run("The capital of France is", logits="last", layers=[29])
    table = smol_client.top_k(run.logits[-1], k=3)
    assert table.pieces[0] == " Paris", table


def test_real_model_final_norm_and_head_reproduce_llama_cpp_logits(smol_client):
    run = smol_client.run("The capital of France is")
    logits = smol_client.unembed(run.hidden_states[-1])
    # llama.cpp multiplies the Q8_0 head with 8-bit-quantized activations; numpy uses exact float32.
    assert np.abs(logits - run.logits).max() < 0.05 * np.abs(run.logits).max()
    assert (logits.argmax(axis=1) == run.logits.argmax(axis=1)).all()
