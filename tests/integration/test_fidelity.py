"""The fidelity map (`c.run(..., fidelity=True)`, service/fidelity.py) against what it claims.

- Its rounding is the kernels' rounding: the map rounds each product's input with ggml's own `from_float`;
  the tests round the same captured rows with the numpy reference's independent Q8_0 / Q8_K code
  (tests/reference.py) and the two relative errors agree to float32 summation (n values: n * 2^-24).
- Its estimate of a product's change, sqrt(sum_j e_j^2 ||W[:, j]||^2), against the exact ||W e|| computed
  from the file's weights: for the tiny model's random matrices ||W e||^2 is a sum of n_out = 64 terms
  whose spread is that of a chi-square with 64 degrees of freedom (relative sd sqrt(2/64) = 0.18 of the
  square), so 4 sd put the norm within [0.5, 1.5] of the estimate. The same holds for a mixture's down
  products, sum_slot w_slot W_expert e_slot: each output is still a sum of independent terms whose expected
  square the map adds up.
- Its flags against a float32 copy of the same weights (made at test time, `requantize`), served with the
  same settings, on tiny q8_0 models with a massive activation planted at the first position
  (`build_tiny_model(massive_activation=...)`): at the first position, which no earlier row reaches through
  attention, the flagged blocks are exactly those whose output deviates by more than 5 %. Later rows
  deviate through attention to the first row, and the map follows that: it flags later rows too. Every
  flagged row deviates by more than half the threshold: each of the map's terms is an expected ||W e||^2,
  and for the tiny model's random matrices the exact one lies within [0.5, 1.5] of it whatever e's
  direction (the chi-square bound above); terms added in quadrature keep that bound, so a row estimated
  over 5 % moves by over 2.5 % (a row estimated just over the threshold may deviate just under it). A
  control model without the planted activation has no flag and no deviation.
- The logit lens carries the flags: its table marks them, and the view (in the system's chromium, as in
  test_views.py) draws exactly the flagged cells and states the estimate of the cell under the mouse.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from reference import ReferenceModel, _round_q8
from test_views import driver, hover, load, texts  # noqa: F401  (driver: the browser fixture)

from lmscope.client import Client
from lmscope.client.fidelity import PRODUCTS, THRESHOLD
from lmscope.service.fidelity import FidelityMap
from lmscope.service.launch import launch_server
from lmscope.service.requantize import requantized
from lmscope.service.stored_matrix import rounded_as_vec_dot
from lmscope.service.testing import build_tiny_model
from lmscope.service.weights import Weights

DEVIATION = 0.05
PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin.", "def mean(xs): return sum(xs)"]
INPUTS = {"attn_in": "ln1", "attn_out": "attn.z", "ffn_in": "ln2", "ffn_down": "mlp.post"}
GGML_TYPE_Q8_K = 15
SERVER_ARGS = ("--threads", "1")


def _deviations(states: np.ndarray, exact: np.ndarray) -> np.ndarray:
    states, exact = states.astype(np.float64), exact.astype(np.float64)
    return np.linalg.norm(states - exact, axis=-1) / np.linalg.norm(exact, axis=-1)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """LMSCOPE_HOME for the module: the float32 copies go there, not into the user's model cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("lmscope-home")
        patch.setenv("LMSCOPE_HOME", str(folder))
        yield folder


def _runs(path, capture=None) -> dict[str, list]:
    """The prompts' runs on the file (with the map) and on its float32 copy."""
    runs = {}
    for name, served in (("file", path), ("f32", requantized(path, "f32"))):
        with launch_server(served, args=SERVER_ARGS) as server, Client(server.address) as c:
            runs[name] = [c.run(p, logits=False, fidelity=name == "file", capture=capture) for p in PROMPTS]
    return runs


@pytest.fixture(scope="module")
def planted(home, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("planted") / "llama.gguf", weight_type="q8_0",
                            massive_activation=10.0)


@pytest.fixture(scope="module")
def planted_runs(planted):
    capture = ["embed", "blocks.*.resid_post"] + [f"blocks.*.{kind}" for kind in INPUTS.values()]
    return _runs(planted, capture)


def test_the_maps_rounding_is_the_reference_rounding_of_the_same_rows(planted_runs):
    for run in planted_runs["file"]:
        fidelity = run.fidelity
        assert fidelity.rounding.shape == (run.n_layer, len(run.positions), len(PRODUCTS))
        for k, product in enumerate(PRODUCTS):
            for layer in range(run.n_layer):
                x = run.captures[f"blocks.{layer}.{INPUTS[product]}"].reshape(len(run.positions), -1)
                error = np.linalg.norm(_round_q8(x, 32, True).astype(np.float64) - x, axis=-1)
                size = np.linalg.norm(x.astype(np.float64), axis=-1)
                expected = error / np.where(size > 0, size, 1.0)  # an all-zero row (a sink's value) is not moved
                np.testing.assert_allclose(fidelity.rounding[layer, :, k], expected, rtol=x.shape[1] * 2**-24,
                                           atol=1e-12, err_msg=f"{product}, block {layer}")
        assert fidelity.rounding[:, 0, PRODUCTS.index("ffn_down")].min() > 0  # the planted row is rounded


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3"])  # grouped kv heads; soft-cap; sliding windows
def test_the_maps_attention_weights_are_the_models_pattern(tmp_path, family):
    path = build_tiny_model(tmp_path / f"{family}.gguf", family=family, weight_type="q8_0")
    with launch_server(path, args=SERVER_ARGS) as server, Client(server.address) as c:
        info = c.model_info()
        run = c.run(PROMPTS[0], logits=False, capture=[f"blocks.*.{k}" for k in ("attn.q", "attn.k", "attn.pattern")])
    n = len(run.positions)
    fidelity = FidelityMap(Weights(str(path)), {site: run.captures[site].shape[1:] for site in run.captures},
                           info.n_layer, info.n_head, info.n_head_kv)
    group = info.n_head // info.n_head_kv
    for layer, block in enumerate(fidelity.blocks):
        q = run.captures[f"blocks.{layer}.attn.q"].astype(np.float64)
        k = run.captures[f"blocks.{layer}.attn.k"].astype(np.float64)
        pattern = run.captures[f"blocks.{layer}.attn.pattern"].astype(np.float64)
        for h, _, squared in fidelity._attention(block, lambda site: run.captures[site].reshape(n, -1),
                                                 np.asarray(run.positions)):
            # llama.cpp's scores are of float16 q and k (2 roundings of 2^-11, float32 sums of head_dim terms);
            # the soft-cap's slope is at most 1, and a change of every score by at most d moves each log
            # probability by at most 2 d
            terms = np.abs(q[:, h]) @ np.abs(k[:, h // group]).T / np.sqrt(q.shape[-1])
            d = (2 * 2**-11 + 2**-22 + 2 * q.shape[-1] * 2**-24) * terms.max()
            mine = np.sqrt(squared)
            bound = np.maximum(mine, pattern[h]) * (np.expm1(2 * d) + n * 2**-23)
            assert (np.abs(mine - pattern[h]) <= bound).all(), (layer, h, np.abs(mine - pattern[h]).max())


def test_q8_k_rounding_is_the_reference_rounding():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8, 512)).astype(np.float32)
    rows[:, 3] = 1000.0  # a massive value in the first block of 256 of every row: d = 1000 / 127
    rounded = rounded_as_vec_dot(rows, GGML_TYPE_Q8_K)
    # ggml's scale is 1 / (-127 / max), the reference's amax / 127: the same up to one float32 rounding
    np.testing.assert_allclose(rounded, _round_q8(rows, 256, False), rtol=2**-22, atol=0)
    assert np.count_nonzero(rounded[:, 1:256] == 0) > 0.9 * 8 * 255  # the massive block loses its small values


def test_the_estimated_change_of_an_output_projection_bounds_the_exact_one(planted, planted_runs):
    reference = ReferenceModel(planted, dtype=np.float64)
    for run in planted_runs["file"]:
        fidelity = run.fidelity
        for layer in range(run.n_layer):
            out_norm = np.linalg.norm(run.captures[f"blocks.{layer}.resid_post"].astype(np.float64), axis=-1)
            for product, weight in (("attn_out", "attn_output"), ("ffn_down", "ffn_down")):
                x = run.captures[f"blocks.{layer}.{INPUTS[product]}"].astype(np.float32)
                error = _round_q8(x, 32, True).astype(np.float64) - x
                exact = np.linalg.norm(error @ reference.weight(f"blk.{layer}.{weight}.weight").T.astype(np.float64),
                                       axis=-1)
                # llama has no post-norms: the estimated change of the branch is the estimated ||W e||
                estimate = fidelity.effect[layer, :, PRODUCTS.index(product)] * out_norm
                moved = exact > 0
                ratio = exact[moved] / estimate[moved]
                assert 0.5 <= ratio.min() and ratio.max() <= 1.5, (product, layer, ratio)


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe", "qwen3moe"])
def test_the_estimated_change_of_the_experts_down_products_bounds_the_exact_one(home, tmp_path, family):
    """The experts a token runs are the router's n_expert_used most probable, weighted by their
    probabilities (renormalised for mixtral and qwen3moe): the exact change of the routed experts' output that
    the rounding of their activations causes, from the file's weights, against the map's `ffn_down` effect."""
    path = build_tiny_model(tmp_path / f"{family}.gguf", family=family, weight_type="q8_0", massive_activation=10.0)
    reference = ReferenceModel(path, dtype=np.float64)
    capture = ["blocks.*.resid_post", "blocks.*.mlp.router", "blocks.*.mlp.experts.post"]
    with launch_server(path, args=SERVER_ARGS) as server, Client(server.address) as c:
        runs = [c.run(p, logits=False, fidelity=True, capture=capture) for p in PROMPTS]
    for run in runs:
        for layer in range(run.n_layer):
            probs = run.captures[f"blocks.{layer}.mlp.router"].astype(np.float64)
            post = run.captures[f"blocks.{layer}.mlp.experts.post"].astype(np.float32)
            n, used, width = post.shape
            chosen = np.argsort(-probs, axis=1, kind="stable")[:, :used]
            weights = np.take_along_axis(probs, chosen, axis=1)
            if family != "qwen2moe":
                weights /= weights.sum(axis=1, keepdims=True)
            error = _round_q8(post.reshape(n * used, width), 32, True).astype(np.float64).reshape(post.shape) - post
            down = reference.weight(f"blk.{layer}.ffn_down_exps.weight").astype(np.float64)  # (experts, out, in)
            exact = np.linalg.norm(np.einsum("ts,tsj,tsij->ti", weights, error, down[chosen]), axis=-1)
            out_norm = np.linalg.norm(run.captures[f"blocks.{layer}.resid_post"].astype(np.float64), axis=-1)
            estimate = run.fidelity.effect[layer, :, PRODUCTS.index("ffn_down")] * out_norm
            moved = exact > 0
            ratio = exact[moved] / estimate[moved]
            assert moved.any() and 0.5 <= ratio.min() and ratio.max() <= 1.5, (layer, ratio)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "mixtral", "qwen2moe", "qwen3moe"])
def test_the_flags_are_the_rows_that_deviate_from_the_float32_copy(home, tmp_path, family):
    path = build_tiny_model(tmp_path / f"{family}.gguf", family=family, weight_type="q8_0", massive_activation=10.0)
    runs = _runs(path)
    for run, exact in zip(runs["file"], runs["f32"]):
        deviation = _deviations(run.hidden_states[1:], exact.hidden_states[1:])
        deviates, flags = deviation > DEVIATION, run.fidelity.flags
        assert (flags[:, 0] == deviates[:, 0]).all(), (run.fidelity.estimate[:, 0], deviates[:, 0])
        assert deviates[:, 0].any()  # the planted activation does move the first row
        assert flags[:, 1:].any()  # through attention to it, later rows too
        assert (deviation[flags] > DEVIATION / 2).all(), deviation[flags].min()


def test_without_a_massive_activation_nothing_is_flagged(home, tmp_path):
    path = build_tiny_model(tmp_path / "plain.gguf", weight_type="q8_0")
    runs = _runs(path)
    for run, exact in zip(runs["file"], runs["f32"]):
        # Unflagged rows (estimate <= DEVIATION) deviate less than twice the threshold: the map's estimate within
        # a factor of 2 of the deviation, the same bound the flagged rows of the planted models are held to.
        assert _deviations(run.hidden_states[1:], exact.hidden_states[1:]).max() < 2 * DEVIATION
        assert not run.fidelity.flags.any(), run.fidelity.estimate.max()
        assert run.fidelity.estimate.max() > 0  # the rounding is there, only small


@pytest.fixture(scope="module")
def planted_lens(planted):
    with launch_server(planted, args=SERVER_ARGS) as server, Client(server.address) as c:
        yield c.logit_lens(PROMPTS[0], fidelity=True, positions=[0, -1]), c.run(PROMPTS[0], logits=False,
                                                                                  fidelity=True)


def test_the_lens_marks_the_flagged_cells(planted_lens):
    lens, alone = planted_lens
    assert lens.flags.shape == (lens.n_layer + 1, 2) and not lens.flags[0].any()
    # the first row's map does not depend on the other rows returned (float32 sums whose blocking follows the
    # number of rows: a few ulps); later rows' attention reads the returned rows only
    np.testing.assert_allclose(lens.fidelity.estimate[:, 0], alone.fidelity.estimate[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(lens.flags[1:], lens.fidelity.estimate > THRESHOLD)
    assert lens.flags[1:, 0].all()  # the planted first row, in every block
    assert "!" in lens.table(position=0)
    assert f'"fidelity":{{"threshold":{THRESHOLD}' in lens.to_html().replace(" ", "")  # views.js marks the cells


def test_the_lens_view_draws_the_flags(driver, planted_lens, tmp_path):  # noqa: F811  (the imported fixture)
    from selenium.webdriver.common.by import By

    lens = planted_lens[0]
    lens.to_html(tmp_path / "lens.html")
    load(driver, tmp_path / "lens.html")
    drawn = {(int(c.get_attribute("data-i")), int(c.get_attribute("data-j")))
             for c in driver.find_elements(By.CSS_SELECTOR, "div.lmv .g .c.flag")}
    assert drawn == {(int(i), int(j)) for i, j in zip(*np.nonzero(lens.flags))} and drawn
    i, j = sorted(drawn)[0]
    hover(driver, f'div.lmv .g .c[data-i="{i}"][data-j="{j}"]')
    note = texts(driver, ".panel .flagged")
    shown = float(re.search(r"by about ([0-9.]+) %", note[0])[1])
    # sent with 4 significant digits, shown with 4: two roundings of half a unit in the 4th digit
    assert len(note) == 1 and abs(shown - 100 * lens.fidelity.estimate[i - 1, j]) <= 1e-3 * shown
