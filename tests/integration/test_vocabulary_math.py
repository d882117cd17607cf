"""The vocabulary-wide math on the stored head (`service/weights.py`, `service/stored_matrix.py`).

Tolerances come from the arithmetic. Both the head's kernels and the numpy reference multiply the same
numbers: the weights as stored (dequantized exactly) and the rows as the CPU kernels see them (rounded
to the weight type's vec_dot_type: Q8_0 blocks for a Q8_0 head, nothing for F32). What is left is float32
summation: a dot product of n terms summed in any order is within gamma_n * sum |x_i w_i| of the exact
value, gamma_n = n * 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); two float32
results of different orders are within twice that of each other. Quantities derived from logits move at
most as much as the logits do: a log-probability by at most 2 max|dz|, an entropy or a KL by at most
2 max|dz| (their gradients in z have 1-norm <= 2), plus the float32 rounding of their own computation.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from reference import ReferenceModel

from lmscope.client import Client, LmscopeError
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service import stored_matrix
from lmscope.service import weights as weights_module
from lmscope.service.testing import build_tiny_model
from lmscope.service.weights import Weights

PROMPT = "The capital of France is"
EPS32 = 2.0 ** -24


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def tiny_weights(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param) / "tiny.gguf", n_layer=2, n_embd=64, n_head=4,
                            n_head_kv=2, n_ff=128, weight_type=request.param, tied=request.param == "q8_0")
    return path, Weights(str(path), n_threads=2)


def summation_bound(weights: Weights, normed: np.ndarray) -> np.ndarray:
    """gamma_n * sum_i |x_i w_i| per (row, token), for rows as the kernels see them."""
    head = weights.head
    return head.n_cols * EPS32 * (np.abs(head.rounded(normed)).astype(np.float64)
                                  @ np.abs(head.dequantize(0, head.n_rows)).T.astype(np.float64))


def exact_logits(weights: Weights, normed: np.ndarray) -> np.ndarray:
    head = weights.head
    return head.rounded(normed).astype(np.float64) @ head.dequantize(0, head.n_rows).T.astype(np.float64)


def test_a_chunk_dequantized_transposed_is_the_chunk_transposed(tiny_weights):
    head = tiny_weights[1].head
    for start, stop in [(0, head.n_rows), (5, 5 + 2 * stored_matrix.TRANSPOSE_ROWS + 3)]:
        np.testing.assert_array_equal(head.dequantize_transposed(start, stop), head.dequantize(start, stop).T)


# below and above BLAS_MIN_ROWS: ggml_mul_mat, and BLAS on chunks unless ggml's kernel for the type is the
# faster (`StoredMatrix.batched_kernel`, which depends on the CPU: both are held here on every machine)
@pytest.mark.parametrize("n_rows, batched_kernel", [(5, False), (80, False), (80, True)])
def test_chunked_reductions_equal_one_chunk(tiny_weights, monkeypatch, n_rows, batched_kernel):
    path, weights = tiny_weights
    monkeypatch.setattr(weights.head, "batched_kernel", batched_kernel)
    rng = np.random.default_rng(n_rows)
    x = (rng.normal(size=(n_rows, weights.head.n_cols)) * 3).astype(np.float32)
    targets = [0, 17, 123, weights.n_vocab - 1]
    spec = dict(top_k=6, temperature=1.3, target_ids=targets, keep_logits=True, reference_rows=n_rows // 5)
    whole = weights.lens(x, **spec)
    assert whole["logits"].shape == (n_rows, weights.n_vocab)
    monkeypatch.setattr(weights_module, "MIN_CHUNK", 7)  # chunks of 7 tokens: 72 chunks, the last one short
    monkeypatch.setattr(weights, "reduction_budget", 1)
    assert len(list(weights._vocabulary_chunks(n_rows))) == -(-weights.n_vocab // 7)
    chunked = weights.lens(x, **spec)

    bound = 2 * summation_bound(weights, weights.final_norm(x))
    np.testing.assert_array_less(np.abs(chunked["logits"] - whole["logits"]), bound + 1e-30)
    dz = float(bound.max()) / spec["temperature"]
    # top-k: the same tokens, unless two logits are closer than the summation bound
    picked = np.take_along_axis(whole["logits"], chunked["top_ids"].astype(np.int64), axis=1)
    best = np.take_along_axis(whole["logits"], whole["top_ids"].astype(np.int64), axis=1)
    np.testing.assert_array_less(np.abs(picked - best), 2 * bound.max() + 1e-30)
    np.testing.assert_allclose(chunked["top_probs"], whole["top_probs"], rtol=2 * dz + 1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked["target_probs"], whole["target_probs"], rtol=2 * dz + 1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked["entropy"], whole["entropy"], atol=2 * dz + 1e-5)
    np.testing.assert_allclose(chunked["kl_to_final"], whole["kl_to_final"], atol=4 * dz + 1e-5)
    logits = whole["logits"]
    for j, t in enumerate(targets):  # ranks: within the tokens whose logit could be on either side
        above = logits > logits[:, t:t + 1] + bound.max()
        maybe = logits > logits[:, t:t + 1] - bound.max()
        maybe[:, t] = False
        assert (above.sum(1) <= chunked["target_ranks"][:, j]).all()
        assert (chunked["target_ranks"][:, j] <= maybe.sum(1)).all()


@pytest.mark.parametrize("rows_per_block", [256, 64, 30])
def test_reductions_equal_the_numpy_definitions(tiny_weights, monkeypatch, rows_per_block):
    """Top-k, entropy, target probabilities and ranks, and KL to the reference rows, recomputed in float64
    from logits of the stored weights and the rounded rows (`exact_logits`). 90 rows with 30 references: one
    block of three whole periods (the references broadcast); blocks of 64 rows that cut periods (gathered),
    the second one inside the references, whose products are reused; blocks of one period each, the last
    one the references themselves, and with chunks laid out transposed (what a lens of thousands of rows
    gets)."""
    path, weights = tiny_weights
    monkeypatch.setattr(weights_module, "LENS_ROWS_PER_CHUNK", rows_per_block)
    if rows_per_block == 30:
        monkeypatch.setattr(stored_matrix, "TRANSPOSED_CHUNK_MIN_ROWS", 0)
    x = np.random.default_rng(1).normal(size=(90, weights.head.n_cols)).astype(np.float32) * 2
    m, temperature = 30, 0.8
    got = weights.lens(x, top_k=4, temperature=temperature, target_ids=[3, 250], reference_rows=m)
    normed = weights.final_norm(x)
    z = exact_logits(weights, normed) / temperature
    dz = float(summation_bound(weights, normed).max()) / temperature
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    p = np.exp(logp)
    top = np.argsort(-z, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_less(np.abs(np.take_along_axis(z, got["top_ids"].astype(np.int64), 1)
                                        - np.take_along_axis(z, top, 1)), 2 * dz + 1e-30)
    np.testing.assert_allclose(got["top_probs"], np.take_along_axis(p, top, 1), rtol=2 * dz + 1e-5, atol=1e-7)
    np.testing.assert_allclose(got["entropy"], -(p * logp).sum(1), atol=2 * dz + 1e-5)
    np.testing.assert_allclose(got["target_probs"], p[:, [3, 250]], rtol=2 * dz + 1e-5, atol=1e-7)
    reference = np.arange(90) % m + (90 - m)
    kl = (p[reference] * (logp[reference] - logp)).sum(1)
    np.testing.assert_allclose(got["kl_to_final"], kl, atol=4 * dz + 1e-5)
    assert np.all(got["kl_to_final"][-m:] <= 4 * dz + 1e-5)  # the reference rows against themselves


def test_q8_0_head_is_the_reference_with_activations_rounded_like_llama_cpp(tmp_path):
    """The lens of a Q8_0 head is tests/reference.py's unembedding with `quantize_activations=True` (the rows
    rounded to Q8_0 blocks, as ggml does before its dot products), not the exact float product: the rounding
    moves logits by up to sum_i |w_i| d_b / 2 (d_b = the block's max |x| / 127), far above float32 error."""
    path = build_tiny_model(tmp_path / "q8.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                            weight_type="q8_0", tied=True)
    weights = Weights(str(path), n_threads=2)
    reference = ReferenceModel(path, quantize_activations=True)
    x = np.random.default_rng(2).normal(size=(100, 64)).astype(np.float32)  # 100 rows: the BLAS path
    for rows in (x, x[:3]):                                                  # 3 rows: ggml_mul_mat
        got = weights.lens(rows, top_k=1, temperature=1.0, target_ids=[], keep_logits=True)["logits"]
        normed = weights.final_norm(rows)
        bound = 2 * summation_bound(weights, normed) + 1e-6 * np.abs(exact_logits(weights, normed))
        np.testing.assert_array_less(np.abs(got - reference.unembed(rows)), bound)  # norm: float32 vs float64
        exact = ReferenceModel(path).unembed(rows)
        assert np.abs(got - exact).max() > 10 * bound.max()  # the rounding is really there


def test_the_q8_0_head_is_never_dequantized_whole(tmp_path, monkeypatch):
    """With a small reduction budget only chunks of the head are ever expanded to float32. Many rows (the
    BLAS path): ggml's `to_float` is called on at most a chunk of rows at a time (the matrix's counter).
    Few rows (`ggml_mul_mat` on the stored rows): numpy's allocation peak (tracemalloc sees numpy's
    buffers) stays below half a float32 copy of the head, which alone would exceed it."""
    path = build_tiny_model(tmp_path / "q8.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                            weight_type="q8_0", tied=True)
    weights = Weights(str(path), n_threads=2)
    monkeypatch.setattr(weights_module, "MIN_CHUNK", 16)
    weights.reduction_budget = 8 << 10
    x = np.random.default_rng(3).normal(size=(70, 64)).astype(np.float32)
    weights.lens(x, top_k=5, temperature=1.0, target_ids=[1], reference_rows=10)
    weights.nearest(x, 5, "embedding")
    # lens chunks: 16 tokens; row norms for cosine: budget / (4 n_embd) = 64 rows at a time
    assert 0 < weights.head.largest_dequantized <= max(16, weights.reduction_budget // (4 * 64)) < weights.n_vocab / 4

    fresh = Weights(str(path), n_threads=2)
    fresh.reduction_budget = 8 << 10
    fresh.final_norm(x[:1])  # reads the norm weights
    head_f32 = 4 * fresh.n_vocab * fresh.head.n_cols
    tracemalloc.start()
    try:
        fresh.lens(x[:4], top_k=5, temperature=1.0, target_ids=[1], reference_rows=2)
        fresh.nearest(x[:4], 5, "embedding")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < head_f32 / 2, (peak, head_f32)


# ----- through the server ---------------------------------------------------------------------------

def lens_of_run(client: Client, capture: list[str]) -> tuple[dict, object]:
    spec = pb.LensSpec(enabled=True, top_k=3)
    run = client.send_run(client.run_request([PROMPT], capture=capture, logits=False, lens=spec))[0]
    return {name.removeprefix("lens."): a for name, a in run.extra.items()}, run


def test_lens_kl_to_final_is_the_kl_from_the_last_layers_distribution(client, reference):
    n_layer = reference.n_layer
    capture = ["embed"] + [f"blocks.{L}.resid_post" for L in range(n_layer)]
    lensed, run = lens_of_run(client, capture)
    states = client.run(PROMPT, logits=False).hidden_states  # (n_layer + 1, n_tokens, n_embd)
    z = reference.unembed(states)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    kl = (np.exp(logp[-1]) * (logp[-1] - logp)).sum(-1)
    # F32 tiny model: the server's logits are float32 sums, the reference's float64
    dz = 2 * reference.n_embd * EPS32 * float(np.abs(reference.final_norm(states)).max(-1).max()
                                              * np.abs(reference.output_weight).sum(-1).max())
    assert lensed["kl_to_final"].shape == (n_layer + 1, len(run.token_ids))
    np.testing.assert_allclose(lensed["kl_to_final"], kl, atol=4 * dz + 1e-5)
    assert kl[:-1].min() > 100 * (4 * dz + 1e-5)  # a random model's layers really differ from the last

    # a site after the final layer (sites come back in the model's order): the final layer's rows are still
    # the reference, and the other sites' KL is unchanged
    more, run = lens_of_run(client, capture + ["ln_final"])
    assert more["kl_to_final"].shape == (n_layer + 2, len(run.token_ids))
    np.testing.assert_allclose(more["kl_to_final"][:-1], lensed["kl_to_final"], atol=4 * dz + 1e-5)
    # Unembed with the final layer's rows last as reference rows: the same KL (the tuned-lens path)
    flat = states.reshape(-1, states.shape[-1])
    unembedded = client.lens_vectors(flat, top_k=1, kl_reference_rows=states.shape[1])
    np.testing.assert_allclose(unembedded["kl_to_final"].reshape(kl.shape), kl, atol=4 * dz + 1e-5)
    with pytest.raises(LmscopeError, match="kl_reference_rows") as failure:
        client.lens_vectors(flat[:2], kl_reference_rows=3)
    assert failure.value.code.name == "INVALID_ARGUMENT"
    without, _ = lens_of_run(client, capture[:-1])
    assert "kl_to_final" not in without and without["top_ids"].shape[0] == n_layer


def test_model_info_reports_memory_by_part(client, reference):
    info = client.model_info()
    memory = info.memory
    kv_rows = 2 * reference.n_head_kv * reference.head_dim * reference.n_layer
    assert info.n_ctx % 256 == 0  # llama.cpp's own rounding of n_ctx does not apply
    assert memory["kv_cache"] == info.n_ctx * kv_rows * 2  # one context, grown to n_ctx at most
    assert memory["contexts"] == 1
    assert memory["mapped_weights"] <= info.file_size
    assert memory["compute_buffer"] >= 4 * memory["n_outputs_max"] * info.n_vocab
    assert memory["n_outputs_max"] <= memory["n_ubatch"]
    assert memory["per_worker"] == (memory["kv_cache"] + memory["compute_buffer"] + memory["output_buffer"]
                                    + memory["reduction_budget"])
    assert "expected memory" in info.memory_lines()[0]


def test_a_big_vocabulary_gets_fewer_output_rows_per_ubatch():
    """llama.cpp reserves n_outputs_max x n_vocab float32 logits (compute buffer, and the output buffer grows
    to them): the engine allows the most output rows per ubatch whose logits fit LOGITS_RESERVE_BYTES, at
    least MIN_OUTPUT_ROWS, a multiple of 4 (the repacked kernels' groups of rows)."""
    from lmscope.service.engine import LOGITS_RESERVE_BYTES, MIN_OUTPUT_ROWS, output_rows_per_ubatch
    for n_vocab in (32_000, 49_152, 128_256, 262_144, 10**8):
        rows = output_rows_per_ubatch(n_vocab)
        assert rows >= MIN_OUTPUT_ROWS
        assert rows % 4 == 0
        assert rows == MIN_OUTPUT_ROWS or rows * 4 * n_vocab <= LOGITS_RESERVE_BYTES < (rows + 4) * 4 * n_vocab
    assert output_rows_per_ubatch(262_144) == 64  # Gemma 3: 64 MiB of logits per ubatch
    assert output_rows_per_ubatch(49_152) == 168  # SmolLM2: 32 MiB
