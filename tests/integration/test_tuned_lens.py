"""The tuned lens: its gradient against finite differences, the client-side head against the server's
unembedding, the fit against the logit lens on held-out prompts, and `logit_lens(lens=...)` (tiny model,
real server)."""
from __future__ import annotations

import numpy as np
import pytest
from tolerances import U32, assert_within, entropy_atol, gamma, probability_rtol, unembedding_error

from lmscope.client.tuned_lens import Head, TunedLens, evaluate, final_targets, kl_gradients, kl_rows, store_states

WORDS = ("red green blue cat dog house river stone light night city water fire tree song king old new "
         "small large under over after before the a of and to in").split()


def make_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(n)]


def test_kl_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    d, vocab, n = 8, 50, 5
    for bias in (None, rng.normal(size=d)):  # RMSNorm, then LayerNorm (a norm with a bias)
        head = Head(rng.normal(size=d) + 1.0, bias, rng.normal(size=(vocab, d)), eps=1e-5)
        h = rng.normal(size=(n, d)) * 3.0
        a, b = rng.normal(size=(d, d)) * 0.1, rng.normal(size=d) * 0.1
        target = final_targets(head, rng.normal(size=(n, d)))

        def loss(a_, b_):
            return kl_rows(target, head.logits(h + h @ a_.T + b_)).mean()

        (grad_a, grad_b), = kl_gradients(head, [h], [[a, b]], target.p)
        direction_a, direction_b = rng.normal(size=(d, d)), rng.normal(size=d)
        step = 1e-5
        numeric = (loss(a + step * direction_a, b + step * direction_b)
                   - loss(a - step * direction_a, b - step * direction_b)) / (2 * step)
        analytic = (grad_a * direction_a).sum() + (grad_b * direction_b).sum()
        # float64 central difference: truncation ~step^2, rounding ~1e-16 / step; both far below 1e-6.
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_the_client_side_head_reproduces_the_server_unembedding(client):
    states = client.run("the old king and the river", logits=False).hidden_states.reshape(-1, 64)
    head = client.lens_head(check=states[:4])
    ours, server = head.logits(states), client.unembed(states)
    # float32 products of length n_embd = 64 with |terms| ~ 1: differences ~1e-6 of the logit scale.
    np.testing.assert_allclose(ours, server, rtol=0, atol=1e-4 * np.abs(server).max())


@pytest.fixture(scope="module")
def stores(client, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    sites = ["embed", "blocks.*.resid_post"]
    train = client.collect(make_prompts(300, 1), root / "train", sites=sites, positions=None, dtype="float32",
                           progress=False)
    heldout = client.collect(make_prompts(60, 2), root / "heldout", sites=sites, positions=None, dtype="float32",
                             progress=False)
    return train, heldout


@pytest.fixture(scope="module")
def tuned(client, stores):
    return client.fit_tuned_lens(stores[0], steps=30, batch_tokens=64, progress=False)


def test_the_tuned_lens_beats_the_logit_lens_on_held_out_prompts(client, stores, tuned):
    n_layer = client.model_info().n_layer
    assert sorted(tuned.matrices) == list(range(n_layer))  # embed and every block but the last
    states, final = store_states(stores[1])
    table = evaluate(client.lens_head(), states, final, tuned)
    for i, (logit, lens) in table.items():
        assert lens < logit, f"hidden state {i}: tuned lens KL {lens:.4f} >= logit lens {logit:.4f}"
    train = stores[0]
    bos = client.model_info().bos_token_id
    with_bos = sum(train.token_ids(i)[0] == bos for i in range(len(train)))
    assert with_bos == len(train)  # the tiny model's prompts start with BOS, whose rows the fit leaves out
    assert tuned.training["n_train_tokens"] + tuned.training["n_validation_tokens"] == train.n_tokens - with_bos


def test_logit_lens_applies_a_tuned_lens(client, tuned, reference, tmp_path):
    prompt = "the small cat under the new tree"
    lensed = client.logit_lens(prompt, lens=tuned, top_k=3)
    plain = client.logit_lens(prompt, top_k=3)
    states = client.run(prompt, logits=False).hidden_states
    n_layer = states.shape[0] - 1
    # Both sides are the server's float32 unembedding of the same rows, batched differently: each logit is
    # within unembedding_error of the exact one, so the two are within twice that of each other.
    translated = np.stack([tuned.translate(i, s) for i, s in enumerate(states)])
    dz = 2 * unembedding_error(reference, translated)  # (n_hidden, n_positions)
    spread = float(np.ptp(reference.unembed(translated.astype(np.float64)), axis=-1).max())
    for i in range(n_layer):
        expected = client.lens_vectors(tuned.translate(i, states[i]), top_k=3)
        np.testing.assert_array_equal(lensed.top_ids[i], expected["top_ids"])  # no near-ties: see below
        assert_within(lensed.entropy[i], expected["entropy"],
                      entropy_atol(dz[i], expected["entropy"], reference.n_vocab, spread), f"entropy {i}")
    np.testing.assert_array_equal(lensed.top_ids[n_layer], plain.top_ids[n_layer])
    assert_within(lensed.top_probs[n_layer], plain.top_probs[n_layer],
                  probability_rtol(dz[n_layer], reference.n_vocab)[:, None] * plain.top_probs[n_layer], "top probs")

    loaded = TunedLens.load(tuned.save(tmp_path / "lens.npz"))
    assert loaded.model == tuned.model and loaded.training == tuned.training
    for i in tuned.matrices:
        np.testing.assert_array_equal(loaded.matrices[i], tuned.matrices[i])
        np.testing.assert_array_equal(loaded.biases[i], tuned.biases[i])
    other = TunedLens(loaded.matrices, loaded.biases, model=dict(loaded.model, fingerprint="0" * 64))
    with pytest.raises(ValueError, match="fitted on model"):
        client.logit_lens(prompt, lens=other)


def test_kl_to_final_of_the_logit_lens_and_of_a_tuned_lens(client, tuned, reference):
    prompt = "the river over the old stone"
    states = client.run(prompt, logits=False).hidden_states
    head = client.lens_head()

    def reference_kl(rows: np.ndarray) -> np.ndarray:  # float64 numpy: KL(final || each row) per position
        def log_softmax(z):
            z = z - z.max(axis=-1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        final = log_softmax(head.logits(states[-1].astype(np.float64)))
        return np.stack([(np.exp(final) * (final - log_softmax(head.logits(r.astype(np.float64))))).sum(-1)
                         for r in rows])

    def kl_bound(rows: np.ndarray) -> np.ndarray:
        """|server KL - exact KL| per row: with every logit of both distributions within dz of the exact
        one, each log-softmax is within 2 dz, so KL(p || q) = E_p[log p - log q] moves by at most 4 dz (row
        and reference row) plus p's own shift (2 dz), and the float32/float64 reduction over n_vocab terms
        adds gamma(n_vocab) of the logit spread. reference_kl is float64 on the same (F32) weights: exact to
        far below that."""
        dz = np.maximum(unembedding_error(reference, rows), unembedding_error(reference, states[-1])[None])
        spread = float(np.ptp(reference.unembed(rows.astype(np.float64)), axis=-1).max())
        return 2 * 6 * dz + gamma(reference.n_vocab + 4) * spread + 4 * U32

    plain = client.logit_lens(prompt)
    assert plain.kl_to_final.shape == (len(states), states.shape[1])
    assert np.all(plain.kl_to_final[-1] <= kl_bound(states)[-1])  # the final layer against itself: ~0
    assert_within(plain.kl_to_final, reference_kl(states), kl_bound(states), "kl_to_final")
    lensed = client.logit_lens(prompt, lens=tuned)
    translated = np.stack([tuned.translate(i, s) for i, s in enumerate(states)])
    assert_within(lensed.kl_to_final, reference_kl(translated), kl_bound(translated), "tuned kl_to_final")
