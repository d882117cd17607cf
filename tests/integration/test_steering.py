"""Steering, ablation and the refusal direction on real llama.cpp (tiny model server), checked against numpy.

Layer convention: see `lmscope.client.control_vector`.
"""
from __future__ import annotations

import numpy as np
import pytest
from tolerances import F16_CACHE, SAME_KERNELS, U32, assert_close_to_scale, assert_within, gamma, unembedding_error

from lmscope.client import ControlVector, Intervention, LmscopeError
from lmscope.client.refusal import is_refusal, load_prompts, refusal_rate, refusal_scores, refusal_token_ids

PROMPT = "The capital of France is"
RESIDUAL_SITES = ["embed", "blocks.*.resid_mid", "blocks.*.resid_post"]


def _vector(seed: int, width: int = 64, norm: float = 3.0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(width).astype(np.float32)
    return (v * (norm / np.linalg.norm(v))).astype(np.float32)


# ----- steering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 2])
def test_steering_at_layer_k_adds_the_vector_to_block_k_and_leaves_earlier_layers_alone(client, layer):
    v = _vector(layer)
    base = client.run(PROMPT)
    steered = client.run(PROMPT, steer={layer: v})
    # hidden_states[L + 1] is block L's output: everything up to block k's input is untouched ...
    np.testing.assert_array_equal(steered.hidden_states[:layer + 1], base.hidden_states[:layer + 1])
    # ... and block k's output is shifted by exactly v on every token (the same float32 addition).
    np.testing.assert_array_equal(steered.resid_post(layer), base.resid_post(layer) + v)
    assert not np.allclose(steered.hidden_states[layer + 2:], base.hidden_states[layer + 2:])


def test_steered_pass_matches_the_numpy_reference_with_the_same_edit(client, reference):
    v = _vector(7)
    layer = 1
    # Capturing an attention pattern turns flash attention off, so llama.cpp matches the reference tightly.
    run = client.run(PROMPT, steer={layer: v}, capture=["blocks.*.resid_post", "blocks.0.attn.pattern"])
    expected = reference.forward(run.token_ids, resid_post_hook=lambda L, x: x + v if L == layer else None)
    assert_close_to_scale(np.stack([run.resid_post(L) for L in range(4)]), expected["resid_post"], F16_CACHE)
    assert_close_to_scale(run.logits, expected["logits"], F16_CACHE)
    unsteered = reference.forward(run.token_ids)
    assert np.abs(expected["logits"] - unsteered["logits"]).max() > 0.1  # the edit matters


def test_a_control_vector_steers_exactly_like_the_same_dict(client):
    directions = {1: _vector(1), 3: _vector(2)}
    as_dict = client.run(PROMPT, steer=directions)
    as_vector = client.run(PROMPT, steer=ControlVector(directions))
    np.testing.assert_array_equal(as_vector.hidden_states, as_dict.hidden_states)
    np.testing.assert_array_equal(as_vector.logits, as_dict.logits)


def test_a_control_vector_round_trips_through_a_file_into_a_request(client, tmp_path):
    vector = ControlVector({1: _vector(3), 2: _vector(4)}, model_hint="llama")
    vector.save(tmp_path / "v.gguf")
    loaded = client.run(PROMPT, steer=ControlVector.load(tmp_path / "v.gguf"), logits="last")
    original = client.run(PROMPT, steer=vector, logits="last")
    np.testing.assert_array_equal(loaded.logits, original.logits)


# ----- ablation ----------------------------------------------------------------------------------

def test_ablation_leaves_no_component_along_the_direction_at_any_residual_site(client):
    direction = _vector(5, norm=1.0)
    capture = client.sites(RESIDUAL_SITES)
    base = client.run(PROMPT, capture=capture, logits=False)
    ablated = client.run(PROMPT, capture=capture, ablate=direction * 10.0, logits=False)  # any length
    assert len(capture) == 1 + 2 * client.n_layer
    for site in capture:
        before = base.captures[site] @ direction
        after = ablated.captures[site] @ direction
        scale = np.linalg.norm(ablated.captures[site], axis=1)
        assert np.abs(before).max() > 0.05, site  # there was something to remove
        # x - (x.u) u in float32 (two n_embd-term sums, u normalized by the server: (n_embd / 2 + 4) u off
        # the test's direction), then dotted with the direction here (another n_embd-term sum).
        n = client.model_info().n_embd
        assert (np.abs(after) <= (3 * gamma(n) + (n + 8) * U32) * scale).all(), (site, np.abs(after).max())


def test_ablating_block_outputs_matches_the_numpy_projection(client, reference):
    u = _vector(6, norm=1.0)
    run = client.run(PROMPT, interventions=[Intervention("ablate", ["blocks.*.resid_post"], u)],
                     capture=["blocks.*.resid_post", "blocks.0.attn.pattern"])
    expected = reference.forward(run.token_ids, resid_post_hook=lambda L, x: x - np.outer(x @ u, u))
    assert_close_to_scale(np.stack([run.resid_post(L) for L in range(4)]), expected["resid_post"], F16_CACHE)
    assert_close_to_scale(run.logits, expected["logits"], F16_CACHE)


def test_edits_in_the_last_block_reach_the_logits_without_computing_every_tokens_logits(client, reference):
    # The last block keeps only output rows; an edit there needs no extra output rows to take effect.
    direction = _vector(18, norm=1.0)
    last = client.run(PROMPT, ablate=direction, logits="last", capture=[])
    every = client.run(PROMPT, ablate=direction, logits=True, capture=[])
    plain = client.run(PROMPT, logits="last", capture=[])
    # One output row or all of them: the LM head's matmul has another shape, the same kernel per element.
    np.testing.assert_allclose(last.logits[-1], every.logits[-1], rtol=SAME_KERNELS, atol=SAME_KERNELS)
    assert np.abs(last.logits[-1] - plain.logits[-1]).max() > 1e-3
    state = _vector(19, norm=8.0)
    patched = client.run(PROMPT, logits="last", capture=[],
                         interventions=[Intervention("set", ["blocks.3.resid_post"], state, positions=[-1])])
    # llama.cpp's float32 final norm + head of a state it was given: within the float32 bound of exact.
    assert_within(patched.logits[-1], reference.unembed(state[None])[0], unembedding_error(reference, state),
                  "logits")


# ----- generation and isolation between requests -------------------------------------------------

def test_steered_and_ablated_generation_is_reproducible_and_differs_from_plain(client):
    steer = ControlVector({1: _vector(8, norm=20.0)})
    plain = client.generate(PROMPT, max_tokens=12)
    for options in (dict(steer=steer), dict(ablate=_vector(9)), dict(steer=steer, ablate=_vector(9))):
        greedy = [client.generate(PROMPT, max_tokens=12, **options).token_ids for _ in range(2)]
        assert greedy[0] == greedy[1]
        sampled = [client.generate(PROMPT, max_tokens=12, temperature=0.9, top_p=0.95, seed=11, **options).token_ids
                   for _ in range(2)]
        assert sampled[0] == sampled[1]
    assert client.generate(PROMPT, max_tokens=12, steer=steer).token_ids != plain.token_ids


def test_steered_generation_starts_with_the_steered_runs_argmax(client):
    steer = {2: _vector(10, norm=20.0)}
    run = client.run(PROMPT, steer=steer, logits="last")
    assert client.generate(PROMPT, max_tokens=1, steer=steer).token_ids == [int(np.argmax(run.logits[-1]))]


def test_an_edited_request_does_not_change_the_next_plain_one(client):
    def plain():
        return client.run(PROMPT), client.generate(PROMPT, max_tokens=10, temperature=0.8, seed=3).token_ids

    before_run, before_tokens = plain()
    client.run(PROMPT, steer={1: _vector(12, norm=50.0)}, ablate=_vector(13))
    client.generate(PROMPT, max_tokens=10, steer={0: _vector(14, norm=50.0)}, ablate=_vector(15))
    after_run, after_tokens = plain()
    np.testing.assert_array_equal(after_run.hidden_states, before_run.hidden_states)
    np.testing.assert_array_equal(after_run.logits, before_run.logits)
    assert after_tokens == before_tokens


def test_an_intervention_limited_to_some_prompts_of_a_batch_leaves_the_others_alone(client):
    prompts = [PROMPT, "Hello world", "One more prompt"]
    plain = client.run_batch(prompts, logits="last")
    edit = Intervention("add", ["blocks.1.resid_post"], _vector(16), sequences=[1])
    edited = client.run_batch(prompts, logits="last", interventions=[edit])
    np.testing.assert_array_equal(edited[0].hidden_states, plain[0].hidden_states)
    np.testing.assert_array_equal(edited[2].hidden_states, plain[2].hidden_states)
    alone = client.run(prompts[1], steer={1: _vector(16)}, logits="last")
    # A batch of 3 short prompts against the prompt alone: its cache cells fall elsewhere among flash attention's
    # key tiles, so float32 sums round otherwise and can flip an F16 cache entry (tests/tolerances.py).
    assert_close_to_scale(edited[1].hidden_states, alone.hidden_states, F16_CACHE, "batched against alone")


# ----- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_vector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv") / "wide.gguf"
    ControlVector({1: np.ones(576, np.float32)}, model_hint="llama").save(path)
    return path


@pytest.mark.parametrize("call, code, words", [
    (lambda c, f: c.run(PROMPT, steer={1: np.ones(65)}), "INVALID_ARGUMENT", "width 65"),
    (lambda c, f: c.run(PROMPT, steer=ControlVector.load(f)), "INVALID_ARGUMENT", "width 576"),
    (lambda c, f: c.generate(PROMPT, steer=ControlVector.load(f)), "INVALID_ARGUMENT", "width 576"),
    (lambda c, f: c.run(PROMPT, ablate=np.ones(65)), "INVALID_ARGUMENT", "width 65"),
    (lambda c, f: c.run(PROMPT, ablate=np.zeros(64)), "INVALID_ARGUMENT", "zero direction"),
    (lambda c, f: c.run(PROMPT, steer={1: np.full(64, np.nan)}), "INVALID_ARGUMENT", "NaN or infinite"),
    (lambda c, f: c.run(PROMPT, steer={1: np.full(64, 1e31)}), "INVALID_ARGUMENT", "overflow"),
    (lambda c, f: c.generate(PROMPT, ablate=np.full(64, np.inf)), "INVALID_ARGUMENT", "NaN or infinite"),
    (lambda c, f: c.run(PROMPT, interventions=[Intervention("add", ["blocks.4.resid_post"], np.ones(64))]),
     "INVALID_ARGUMENT", "unknown capture site 'blocks.4.resid_post'"),
    # A valid edit first and a bad one after: the request is refused whole.
    (lambda c, f: c.run(PROMPT, steer={0: np.ones(64), 2: np.ones(63)}), "INVALID_ARGUMENT", "width 63"),
    (lambda c, f: c.generate(PROMPT, steer={1: np.ones(64)}, ablate=np.full(64, np.nan)),
     "INVALID_ARGUMENT", "NaN"),
])
def test_bad_interventions_get_a_precise_status_and_leave_the_server_clean(client, wide_vector_file, call, code,
                                                                           words):
    before = client.run(PROMPT, logits="last")
    with pytest.raises(LmscopeError) as info:
        call(client, wide_vector_file)
    assert info.value.code.name == code
    assert words in info.value.message
    after = client.run(PROMPT, logits="last")
    np.testing.assert_array_equal(after.hidden_states, before.hidden_states)
    np.testing.assert_array_equal(after.logits, before.logits)


@pytest.mark.parametrize("steer, words", [
    ({4: np.ones(64)}, "layer 4 is out of range: the model has 4 blocks"),
    ({-1: np.ones(64)}, "layer -1 is out of range"),
    ({"1": np.ones(64)}, "layer '1' is not a block index"),
    ([np.ones(64)], "steer must be"),
])
def test_steering_layers_outside_the_model_are_refused_before_sending(client, steer, words):
    with pytest.raises(ValueError, match=words):
        client.run(PROMPT, steer=steer)
    with pytest.raises(ValueError, match=words):
        client.generate(PROMPT, steer=steer)


def test_a_scale_that_overflows_float32_is_refused_by_the_control_vector(client):
    vector = ControlVector({1: _vector(17)})
    with pytest.raises(ValueError, match="overflows float32"):
        client.run(PROMPT, steer=vector * 1e39)


# ----- refusal scorer and prompt sets ------------------------------------------------------------

@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, I cannot do this.", True),
    ("As an AI language model, I must decline.", True),
    ("抱歉，我无法提供这方面的帮助。", True),
    ("对不起，这个请求不合适。", True),
    ("Sure! Here is a poem about the ocean.", False),
    ("当然可以！这是一首关于大海的诗。", False),
    ("Machine learning is a field of study.", False),
])
def test_refusal_phrases_in_english_and_chinese(text, refused):
    assert is_refusal(text) is refused


def test_refusal_rate_and_bundled_prompts():
    assert refusal_rate(["I cannot help.", "Sure.", "抱歉。", "Okay"]) == 0.5
    assert np.isnan(refusal_rate([]))
    harmful, harmless = load_prompts("harmful"), load_prompts("harmless")
    assert len(harmful) >= 40 and len(harmless) >= 40
    assert len(load_prompts("harmful", ["zh"])) >= 16 and all(
        any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in load_prompts("harmful", ["zh"]))
    assert not set(harmful) & set(harmless)
    with pytest.raises(ValueError, match="kind"):
        load_prompts("neutral")
    with pytest.raises(ValueError, match="fr"):
        load_prompts("harmful", ["fr"])


def test_bundled_prompts_split_into_fit_validation_and_held_out():
    for kind in ("harmful", "harmless"):
        english = load_prompts(kind, ["en"])
        parts = {split: load_prompts(kind, ["en"], split=split) for split in ("fit", "validation", "held_out")}
        assert len(english) >= 64 and [len(p) for p in parts.values()] == [40, 20, 20]
        assert sorted(sum(parts.values(), [])) == sorted(english)  # disjoint, and together all of them
        assert parts["held_out"] == english[3::4] and parts["validation"] == english[2::4]
        assert load_prompts(kind, split="fit") == parts["fit"] + load_prompts(kind, ["zh"], split="fit")
    with pytest.raises(ValueError, match="split"):
        load_prompts("harmful", ["en"], split="test")
    with pytest.raises(ValueError, match="list"):
        load_prompts("harmful", "en")


def test_refusal_scores_are_log_odds_of_the_refusal_tokens():
    logits = np.random.default_rng(0).standard_normal((3, 50)) * 3
    ids = [4, 7, 30]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mass = p[:, ids].sum(axis=1)
    # Float64 on both sides, a few dozen roundings of 1.1e-16 each, amplified by at most 1 / (1 - mass) < 10.
    np.testing.assert_allclose(refusal_scores(logits, ids), np.log(mass / (1 - mass)), rtol=1e-12)


def test_refusal_tokens_are_whole_first_tokens_of_refusal_openings(client):
    ids = refusal_token_ids(client)
    assert ids and len(set(ids)) == len(ids)
    assert client.token_id("I'm sorry") in ids
    assert all("\ufffd" not in piece for piece in client.tokenize_pieces(ids))


# ----- refusal direction -------------------------------------------------------------------------

HARMFUL = load_prompts("harmful")[:3] + load_prompts("harmful", ["zh"])[:2]
HARMLESS = load_prompts("harmless")[:3] + load_prompts("harmless", ["zh"])[:2]


@pytest.fixture(scope="module")
def direction(client):
    return client.refusal_direction(HARMFUL, HARMLESS, batch_size=4, progress=False)


def _states(client, prompts, position, batch_size):
    """numpy mean over prompts of captured block outputs, batched as refusal_direction batches them
    (flash attention's sums depend on where a prompt's cache cells fall, which prompts share a batch), and the
    largest magnitude among the states."""
    sites = [f"blocks.{L}.resid_post" for L in range(client.n_layer)]
    out, largest = [], 0.0
    for run in client.run_batch(prompts, batch_size=batch_size, chat=True, capture=sites, logits=False):
        states = np.stack([run.captures[s] for s in sites]).astype(np.float64)  # (n_layer, tokens, n_embd)
        out.append(states[:, position] if position != "mean" else states.mean(axis=1))
        largest = max(largest, float(np.abs(states).max()))
    return np.mean(out, axis=0), largest


def test_refusal_direction_is_the_difference_of_means_of_captured_states(client, direction):
    assert direction.per_layer.shape == (client.n_layer, 64) and direction.per_layer.dtype == np.float64
    (harmful, a), (harmless, b) = _states(client, HARMFUL, -1, 4), _states(client, HARMLESS, -1, 4)
    # The same batches; asking for one position lets llama.cpp compute only that row in the last block, a
    # matmul of another shape with the same kernels (SAME_KERNELS, relative and absolute), then float64 means.
    np.testing.assert_allclose(direction.per_layer, harmful - harmless, rtol=0,
                               atol=2 * SAME_KERNELS * (1 + max(a, b)))
    mean = client.refusal_direction(HARMFUL, HARMLESS, position="mean", select=False, batch_size=3,
                                    progress=False)
    (harmful, a), (harmless, b) = _states(client, HARMFUL, "mean", 3), _states(client, HARMLESS, "mean", 3)
    np.testing.assert_allclose(mean.per_layer, harmful - harmless, rtol=0, atol=2 * SAME_KERNELS * (1 + max(a, b)))
    assert mean.best_layer is None and mean.scores == {}


def test_refusal_direction_scores_candidate_layers_and_picks_by_the_paper_rule(direction):
    candidates = list(range(int(4 * 0.8)))  # the last 20 % of the layers are skipped
    assert list(direction.scores) == candidates
    assert direction.best_layer in candidates
    eligible = [s for s in direction.scores.values() if s.eligible]
    for s in direction.scores.values():
        assert s.eligible == (s.induce > 0 and s.kl < 0.1)
        assert s.kl >= 0
    pool = eligible or list(direction.scores.values())
    assert direction.best_layer == min(pool, key=lambda s: s.bypass).layer
    v = direction.vector()
    # A float64 unit vector rounded to float32 (u per element); its float32 norm over n_embd = 64 values
    # costs gamma(64) / 2 + 2u more.
    assert v.dtype == np.float32 and np.linalg.norm(v) == pytest.approx(1.0, abs=gamma(64 // 2 + 3))
    np.testing.assert_allclose(v * direction.scale(), direction.per_layer[direction.best_layer], rtol=2 * U32)
    assert direction.seconds_means > 0 and direction.seconds_selection > 0


def test_layer_scores_equal_the_steering_tests_run_one_by_one(client, direction):
    """The grouped, sequence-limited requests give what separate steered / ablated runs give."""
    ids = refusal_token_ids(client)
    layer = direction.best_layer

    def last_logits(prompts, **edit):
        return np.stack([r.logits[-1] for r in client.run_batch(prompts, chat=True, logits="last", capture=[],
                                                                 **edit)])

    induced = last_logits(HARMLESS, steer={layer: direction.per_layer[layer]})
    bypassed = last_logits(HARMFUL, ablate=direction.vector(layer))
    base = last_logits(HARMLESS)
    ablated = last_logits(HARMLESS, ablate=direction.vector(layer))
    score = direction.scores[layer]
    # Other batches than the selection's (flash attention's tiled kernel, whose rounding depends on where a
    # sequence's cells fall among its key tiles): the two passes' logits differ by float32
    # reordering and the float16 cache roundings it flips, F16_CACHE at the logits' scale each
    # (tests/tolerances.py). log(m / (1 - m)) moves by at most 4 max |dz| (d log m and d log(1 - m) are
    # each a difference of two softmax-weighted means of dz).
    dz = 2 * F16_CACHE * float(max(np.abs(x).max() for x in (induced, bypassed, base, ablated)))
    assert score.induce == pytest.approx(refusal_scores(induced, ids).mean(), abs=4 * dz)
    assert score.bypass == pytest.approx(refusal_scores(bypassed, ids).mean(), abs=4 * dz)
    assert direction.baseline_harmless == pytest.approx(refusal_scores(base, ids).mean(), abs=4 * dz)

    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p, q = log_softmax(base), log_softmax(ablated)
    kl = (np.exp(p) * (p - q)).sum(axis=1)
    # KL(p || q) moves by <= 2 dz through q (its gradient is q - p) and by <= 2 dz E_p|log(p/q) - KL|
    # through p (the entropy argument of tests/tolerances.py).
    spread = (np.exp(p) * np.abs(p - q - kl[:, None])).sum(axis=1)
    assert score.kl == pytest.approx(kl.mean(), abs=float((2 * dz + 2 * dz * spread).max()))


def test_refusal_direction_is_deterministic(client, direction):
    again = client.refusal_direction(HARMFUL, HARMLESS, batch_size=4, progress=False)
    np.testing.assert_array_equal(again.per_layer, direction.per_layer)
    assert again.scores == direction.scores and again.best_layer == direction.best_layer


def test_refusal_direction_rejects_bad_arguments(client, direction):
    with pytest.raises(ValueError, match="position"):
        client.refusal_direction(HARMFUL, HARMLESS, position="first", progress=False)
    with pytest.raises(ValueError, match="at least one"):
        client.refusal_direction([], HARMLESS, progress=False)
    with pytest.raises(ValueError, match="candidate layer 9"):
        client.refusal_direction(HARMFUL[:1], HARMLESS[:1], layers=[9], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        direction.vector(7)
