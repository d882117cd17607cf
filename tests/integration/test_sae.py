"""SAEs against real servers: fitted from a store, measured in the forward pass (checked against the numpy
reference doing the same splice), used for steering, refused on another model, explained in the browser;
and, sized for CI, an SAE of SmolLM2's middle residual stream that recovers most of the next-token loss."""
from __future__ import annotations

import numpy as np
import pytest
from test_views import driver, hover, load, shown, texts  # noqa: F401  (driver: the browser fixture)
from tolerances import FLASH_F16, U16

from lmscope.client.corpus import python_reference
from lmscope.client.sae import SaeMismatchError, SparseAutoencoder
from lmscope.client.sae_analysis import _cross_entropy, encode_store, store_rows
from lmscope.client.store import ActivationStore, StoreMismatchError

SITE = "blocks.1.resid_post"
PROMPTS = [f"Item {i}: the {['red', 'green', 'blue', 'old'][i % 4]} {['box', 'cup', 'key'][i % 3]} number "
           f"{i * 7} lies {['on', 'under', 'near'][i % 3]} the table" for i in range(48)]


@pytest.fixture(scope="module")
def tiny_store(client, tmp_path_factory):
    return client.collect(PROMPTS, tmp_path_factory.mktemp("sae") / "store", sites=[SITE], positions=None,
                          dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tiny_sae(client, tiny_store):
    return client.fit_sae(tiny_store, SITE, n_features=128, k=8, epochs=8, batch_size=64, lr=1e-2,
                          prompts=slice(0, 40), threads=1, progress=False)


def test_fit_reads_the_store_rows_but_the_first_tokens_and_records_the_model(client, tiny_store, tiny_sae):
    info = client.model_info()
    rows, index = store_rows(tiny_store, SITE, slice(0, 40))
    offsets = tiny_store.token_offsets
    assert len(rows) == offsets[40] - 40
    np.testing.assert_array_equal(rows, np.delete(tiny_store[SITE][:offsets[40]], offsets[:40], axis=0))
    assert tiny_sae.model == {"name": info.name, "fingerprint": info.fingerprint, "n_embd": info.n_embd}
    assert tiny_sae.info["n_rows"] == len(rows)
    assert tiny_sae.evaluate(rows).fve > 0.5   # a random-weight model's states are far from sparse; still fitted


def test_fitting_on_prompts_collects_them_first(client, tiny_store, tmp_path):
    options = dict(n_features=32, k=4, epochs=1, batch_size=64, threads=1, progress=False)
    from_prompts = client.fit_sae(PROMPTS, SITE, store_path=tmp_path / "store", **options)
    collected = ActivationStore.open(tmp_path / "store")
    assert collected.prompts == PROMPTS and collected.request["dtype"] == "float16"
    # the float32 store's rows, rounded to float16 on the wire: within half a float16 step
    np.testing.assert_allclose(collected[SITE], tiny_store[SITE], rtol=U16, atol=2.0 ** -25)
    from_store = client.fit_sae(collected, SITE, **options)
    assert from_prompts.W_dec.tobytes() == from_store.W_dec.tobytes()   # the same rows, so the same fit
    with pytest.raises(ValueError, match="store_path="):
        client.fit_sae(PROMPTS, SITE, **options)


def test_sae_encodes_a_runs_captures_like_the_stores_rows(client, tiny_store, tiny_sae):
    # the same batch as the collect sent (prompts 0..7): the same bytes (tests/integration/test_store.py)
    run = client.run_batch(PROMPTS[:8], batch_size=8, capture=[SITE], logits=False)[3]
    np.testing.assert_array_equal(run.captures[SITE], tiny_store.rows(SITE, 3))
    codes = tiny_sae.encode(run.captures[SITE])
    assert codes.shape == (len(run.token_ids), 128)
    assert ((codes > 0).sum(axis=1) <= 8).all() and (codes > 0).any()
    index, stored = encode_store(tiny_sae, tiny_store)
    mine = (index >= tiny_store.token_offsets[3]) & (index < tiny_store.token_offsets[4])
    np.testing.assert_array_equal(codes[len(codes) - mine.sum():], stored[mine].toarray())


def test_loss_recovered_splices_the_site_like_the_reference(client, reference, tiny_sae):
    prompts = PROMPTS[40:44]
    evaluation = client.sae_loss_recovered(tiny_sae, prompts, batch_size=2, progress=False)
    expected = {"clean": [], "sae": [], "zero": [], "mean": []}
    clean_rows, all_logits = [], []
    for prompt in prompts:
        ids = client.tokenize(prompt).token_ids
        plain = reference.forward(ids)
        clean_rows.append(plain["resid_post"][1][1:])
        all_logits.append(plain["logits"])
    mean = np.concatenate(clean_rows).mean(axis=0)
    for prompt, rows in zip(prompts, clean_rows):
        ids = client.tokenize(prompt).token_ids
        expected["clean"].append(_cross_entropy(reference.forward(ids)["logits"], ids))
        for name, replacement in (("sae", tiny_sae.reconstruct(rows)), ("zero", 0 * rows), ("mean", mean + 0 * rows)):
            def splice(site, layer, x, replacement=replacement):
                if site == "resid_post" and layer == 1:
                    x[1:] = replacement
                    return x
            expected[name].append(_cross_entropy(reference.forward(ids, site_hook=splice)["logits"], ids))
    # log-softmax moves by at most 2 max|logit error|; llama.cpp's flash attention pass is within FLASH_F16
    # (absolute, order-one states) of the reference, scaled here by the logits' magnitude
    bound = 2 * FLASH_F16 * max(np.abs(x).max() for x in all_logits)
    got = {"clean": evaluation.ce_clean, "sae": evaluation.ce_sae, "zero": evaluation.ce_zero,
           "mean": evaluation.ce_mean}
    for name, values in expected.items():
        assert abs(got[name] - np.concatenate(values).mean()) <= bound, (name, got[name], bound)
    assert abs(evaluation.ce_zero - evaluation.ce_clean) > 2 * bound   # the splice changes the loss
    assert evaluation.n_predictions == sum(len(client.tokenize(p).token_ids) - 1 for p in prompts)


def test_steering_with_a_feature_adds_its_decoder_direction(client, reference, tiny_sae):
    feature, scale = 5, 3.0
    edit = tiny_sae.steering(feature, scale)
    steered = client.run(PROMPTS[0], interventions=[edit], capture=["blocks.*.resid_post"])
    plain = client.run(PROMPTS[0], capture=["blocks.*.resid_post"])
    # block 1's output is shifted by exactly the direction (one float32 addition), the earlier block untouched
    np.testing.assert_array_equal(steered.resid_post(0), plain.resid_post(0))
    np.testing.assert_array_equal(steered.resid_post(1), plain.resid_post(1) + edit.vector)
    generated = client.generate(PROMPTS[0], max_tokens=6, interventions=[edit])
    same = client.generate(PROMPTS[0], max_tokens=6, steer={1: scale * tiny_sae.W_dec[feature]})
    assert generated.token_ids == same.token_ids


def test_an_sae_round_trips_through_the_saelens_layout_and_runs_the_same(client, tiny_sae, tmp_path):
    tiny_sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    loaded.check_model(client.model_info())
    run = client.run(PROMPTS[1], capture=[SITE], logits=False)
    np.testing.assert_array_equal(loaded.encode(run.captures[SITE]), tiny_sae.encode(run.captures[SITE]))


def test_another_models_sae_or_store_is_refused(smol_client, tiny_store, tiny_sae):
    with pytest.raises(SaeMismatchError, match="fitted on model"):
        smol_client.sae_loss_recovered(tiny_sae, ["one two three four"], progress=False)
    with pytest.raises(StoreMismatchError):
        smol_client.fit_sae(tiny_store, SITE, n_features=16, k=2, progress=False)
    with pytest.raises(SaeMismatchError):
        smol_client.sae_features(tiny_sae, tiny_store, [0])


def test_features_are_explained_from_the_store(client, tiny_store, tiny_sae):
    index, codes = encode_store(tiny_sae, tiny_store)
    frequent = np.argsort(-np.diff(codes.tocsc().indptr))[:2]
    result = client.sae_features(tiny_sae, tiny_store, [int(f) for f in frequent], contexts=4, window=3,
                                 codes=(index, codes))
    for feature in result.features:
        column = codes[:, feature.index].toarray().ravel()
        assert feature.max_activation == pytest.approx(column.max())
        assert feature.frequency == pytest.approx((column > 0).mean())
        assert feature.histogram.sum() == (column > 0).sum()
        top = feature.contexts[0]
        assert top.activation == pytest.approx(column.max())
        assert top.activations[top.center] == pytest.approx(top.activation)
        # the token shown is the store's token at that position
        ids = tiny_store.token_ids(top.prompt)
        assert top.tokens[top.center] == client.token_labels([ids[top.position]])[0]
        assert len(feature.promoted) == len(feature.suppressed) == 10
        assert feature.promoted[0][1] >= feature.promoted[-1][1] > feature.suppressed[-1][1]


def test_feature_view_in_the_browser(driver, client, tiny_store, tiny_sae, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    index, codes = encode_store(tiny_sae, tiny_store)
    features = [int(f) for f in np.argsort(-np.diff(codes.tocsc().indptr))[:2]]
    result = client.sae_features(tiny_sae, tiny_store, features, contexts=3, window=3, codes=(index, codes))
    page = tmp_path / "features.html"
    result.to_html(page)
    load(driver, page)
    Select(driver.find_element(By.CSS_SELECTOR, ".bar-row select")).select_by_index(1)
    feature = result.features[1]
    context = feature.contexts[1]
    hover(driver, f'.prompt .s[data-c="1"][data-i="{context.center}"]')
    assert texts(driver, ".panel h4")[0] == f"prompt {context.prompt} · position {context.position}"
    assert float(texts(driver, ".panel td.act")[0]) == pytest.approx(context.activation, rel=1e-3)
    promoted, suppressed = texts(driver, ".side > table")
    assert all(shown(t) in promoted for t, _ in feature.promoted)
    assert all(shown(t) in suppressed for t, _ in feature.suppressed)
    assert len(driver.find_elements(By.CSS_SELECTOR, ".hist .hb")) == len(feature.histogram)


# ----- SmolLM2, sized for CI ----------------------------------------------------------------------------

SMOL_SITE = "blocks.15.resid_post"


def test_smollm2_middle_layer_sae_recovers_most_of_the_loss(smol_client, tmp_path):
    passages = python_reference()[:64]
    store = smol_client.collect(passages[:40], tmp_path / "store", sites=[SMOL_SITE], positions=None,
                                progress=False)
    sae = smol_client.fit_sae(store, SMOL_SITE, n_features=1152, k=32, epochs=6, batch_size=256, lr=2e-3,
                              threads=1, progress=False)
    evaluation = smol_client.sae_loss_recovered(sae, passages[56:60], progress=False)
    assert evaluation.ce_sae < evaluation.ce_mean and evaluation.ce_sae < evaluation.ce_zero
    assert evaluation.recovered_mean > 0.5, evaluation
    assert evaluation.l0 <= 32
    # steering with the feature most active on the prompt's last token, at about half the residual's norm
    prompt = "In Python, an exception is raised when"
    codes = sae.encode(smol_client.run(prompt, capture=[SMOL_SITE], logits=False).captures[SMOL_SITE])
    feature = int(np.argmax(codes[-1]))
    steered = smol_client.generate(prompt, max_tokens=8, interventions=[sae.steering(feature, 100.0)])
    plain = smol_client.generate(prompt, max_tokens=8)
    assert steered.token_ids != plain.token_ids, (feature, plain.text)
