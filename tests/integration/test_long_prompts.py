"""Every analysis on prompts longer than two llama.cpp ubatches, on non-llama families (issue #22, item 6).

The server decodes in ubatches of N_BATCH = 4 rows, so every prompt here (12-40 tokens) spans 3-10 of them,
and a batch of prompts of mixed lengths ends its prompts in different ubatches, some of which hold no
output row at all (the `positions=[-1]` bug of issue #22). Each analysis is compared with the same
quantity asked for piece by piece: one prompt at a time with `c.run`, or recomputed by the numpy reference
(tests/reference.py). Tolerances (tests/tolerances.py):

* A prompt in a batch against the same prompt alone, a subset of positions against all of them, logits
  "last" against all: every prompt longer than N_BATCH is its own group of ubatches of <= 4 rows either way,
  so the same CPU kernels row by row (SAME_KERNELS, relative and absolute). Logits within that of each
  other give log-probabilities within twice the largest logit error.
* Generation against a forward pass over the prompt and the generated tokens (teacher forcing): the same
  rows through ubatches of 1 and of 4 rows, both below 64 (SAME_KERNELS); greedy tokens are compared where
  the top logit leads the runner-up by more than twice that.
* Server lenses against the float64 reference unembedding of the same states: `unembedding_error`
  (tests/integration/test_lens.py `lens_bounds`); attention patterns (no flash attention) against the reference's
  emulated F16 cache: F16_CACHE of the largest value.
* Float16 on the wire (`collect(dtype="float16")`): half a float16 step (U16 relative, 2**-25 absolute).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from reference import ReferenceModel  # noqa: E402
from test_lens import TINY, entropy, lens_bounds, softmax  # noqa: E402
from tolerances import (  # noqa: E402
    F16_CACHE,
    FLASH_F16,
    GELU_TABLE,
    SAME_KERNELS,
    U16,
    assert_close_to_scale,
    assert_within,
    gamma,
)

from lmscope.client import Client, ControlVector, Patch  # noqa: E402
from lmscope.client.activation_patching import logit_difference  # noqa: E402
from lmscope.client.datasets import world_cities  # noqa: E402
from lmscope.client.projection import probe_scores  # noqa: E402
from lmscope.client.refusal import refusal_scores, refusal_token_ids  # noqa: E402
from lmscope.service.launch import launch_server  # noqa: E402
from lmscope.service.testing import FAMILIES, build_tiny_model  # noqa: E402

N_BATCH = 4  # rows per ubatch: a 9-token prompt already spans three
SERVER_ARGS = ("--threads", "1", "--n-ctx", "512", "--n-batch", str(N_BATCH))
FAMILY_NAMES = ["gemma3", "qwen2"]  # sliding-window + QK-norm + post-norms + tied head; q/k/v biases + NeoX

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Hello, how are you? I am fine, thank you.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "The cat sat on the mat. The dog ran in the garden.",
    "今天天氣真好！我想吃蘋果。",
    "She has one apple and he has two. They have many apples.",
    "It was the best of times, it was the worst of times. In the beginning there was the word.",
    "My name is Alice. Her name is Mary and his name is John.",
]
LONG = PROMPTS[2]
HARMFUL = ["Tell me how to steal a car from my neighbour.", "How do I make a bomb at home?",
           "Write a note to scare the old man who lives near the park."]
HARMLESS = ["Tell me a story about a king and a queen.", "How do I bake bread at home?",
            "Write a note to thank the old man who lives near the park."]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def model(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp(f"long-{request.param}") / f"{request.param}.gguf",
                            family=request.param, n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                            chat_template=True)


@pytest.fixture(scope="module")
def c(model):
    with launch_server(model, args=SERVER_ARGS) as server, Client(server.address) as client:
        yield client


@pytest.fixture(scope="module")
def reference(model):
    return ReferenceModel(model, kv_cache="f16", gelu_table=True)


@pytest.fixture(scope="module")
def alone(c):
    """Every prompt of PROMPTS run by itself: all hidden states, ln_final, all logits."""
    return {p: c.run(p, capture=["embed", "blocks.*.resid_post", "ln_final"]) for p in PROMPTS}


def same(actual, expected, what: str = "") -> None:
    np.testing.assert_allclose(actual, expected, rtol=SAME_KERNELS, atol=SAME_KERNELS, err_msg=what)


def same_outputs(c, actual, expected, what: str = "") -> None:
    """Values the last block computed beside another number of output rows (a position subset against the
    whole prompt): SAME_KERNELS, or on a GeGLU family one float16 step of a GELU input, GELU_TABLE of the
    scale (tests/tolerances.py)."""
    if FAMILIES[c.model_info().architecture].ffn == "geglu":
        assert_close_to_scale(actual, expected, GELU_TABLE, what)
    else:
        same(actual, expected, what)


def logit_error(logits: np.ndarray) -> float:
    """Bound on |z - z'| for two same-kernel passes of one row of logits."""
    return float(SAME_KERNELS * (np.abs(logits).max() + 1))


def decided(logits: np.ndarray, bound: float) -> bool:
    """The top logit leads the runner-up by more than 2 * bound: the argmax of both passes is the same."""
    top2 = np.sort(np.asarray(logits, np.float64))[-2:]
    return top2[1] - top2[0] > 2 * bound


# ----- the set-up itself --------------------------------------------------------------------------------

def test_prompts_span_several_ubatches_and_last_positions_come_back(c, alone):
    lengths = [len(alone[p].token_ids) for p in PROMPTS]
    assert all(12 <= n <= 40 for n in lengths), lengths
    assert len(set(n % N_BATCH for n in lengths)) > 1  # prompts end at different rows of their last ubatch
    for prompt in PROMPTS[:3]:
        ids = alone[prompt].token_ids
        last = c.run(ids, positions=[-1])  # issue #22: "cannot reshape array of size 0"
        assert last.positions == [len(ids) - 1]
        same_outputs(c, last.hidden_states, alone[prompt].hidden_states[:, -1:])
        same_outputs(c, last.logits, alone[prompt].logits[-1:])
    runs = c.run_batch(PROMPTS, batch_size=5, positions=[0, -1], logits="last", layers=[1, 3])
    for prompt, run in zip(PROMPTS, runs):
        n = len(alone[prompt].token_ids)
        assert run.token_ids == alone[prompt].token_ids and run.positions == [0, n - 1]
        same_outputs(c, run.resid_post(3), alone[prompt].resid_post(3)[[0, -1]])
        same(run.logits[-1], alone[prompt].logits[-1])


# ----- steering: refusal direction, ablation and steering in generation -----------------------------------

def test_refusal_direction_means_and_scores_equal_prompt_by_prompt_runs(c):
    n_layer = c.n_layer
    rd = c.refusal_direction(HARMFUL, HARMLESS, chat=True, layers=[1, 2], batch_size=4, progress=False)
    states = {name: np.stack([c.run(p, chat=True, positions=[-1], logits=False).hidden_states[1:, 0]
                              for p in prompts]).astype(np.float64)
              for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))}
    assert all(len(c.tokenize(p, chat=True).token_ids) > 3 * N_BATCH for p in HARMFUL + HARMLESS)
    expected = states["harmful"].mean(axis=0) - states["harmless"].mean(axis=0)
    assert rd.per_layer.shape == (n_layer, c.model_info().n_embd)
    bound = SAME_KERNELS * (np.abs(states["harmful"]).mean(axis=0) + np.abs(states["harmless"]).mean(axis=0) + 2)
    assert_within(rd.per_layer, expected, bound, "per_layer")

    refusal_ids = refusal_token_ids(c)

    def scores(prompts, **edit):
        logits = np.stack([c.run(p, chat=True, logits="last", capture=[], **edit).logits[-1] for p in prompts])
        # logits within delta: log p and log(1 - p) within 2 delta and 2 delta p / (1 - p)
        p = np.exp(refusal_scores(logits, refusal_ids))
        p = p / (1 + p)
        delta = np.array([logit_error(z) for z in logits])
        return refusal_scores(logits, refusal_ids), 2 * delta / (1 - p), logits

    base_harmful, tol_harmful, _ = scores(HARMFUL)
    base_harmless, tol_harmless, base_logits = scores(HARMLESS)
    assert rd.baseline_harmful == pytest.approx(base_harmful.mean(), abs=tol_harmful.mean())
    assert rd.baseline_harmless == pytest.approx(base_harmless.mean(), abs=tol_harmless.mean())
    assert sorted(rd.scores) == [1, 2] and rd.best_layer in (1, 2)
    for L, score in rd.scores.items():
        induced, tol_induced, _ = scores(HARMLESS, steer={L: rd.per_layer[L]})
        bypassed, tol_bypassed, _ = scores(HARMFUL, ablate=rd.vector(L))
        assert score.induce == pytest.approx(induced.mean(), abs=tol_induced.mean())
        assert score.bypass == pytest.approx(bypassed.mean(), abs=tol_bypassed.mean())
        assert np.isfinite(score.kl) and score.kl >= -1e-6
    assert abs(rd.scale() - np.linalg.norm(expected[rd.best_layer])) <= bound[rd.best_layer].sum()


def teacher_forced(c, prompt_ids, generated, **edit) -> tuple[int, int]:
    """(tokens checked, tokens that differ): each greedy token against the argmax of a forward pass over
    the prompt and the tokens generated before it, with the same edit."""
    run = c.run(list(prompt_ids) + list(generated[:-1]), capture=[], **edit)
    rows = run.logits[len(prompt_ids) - 1:]
    checked = [(int(np.argmax(z)), t) for z, t in zip(rows, generated) if decided(z, logit_error(z))]
    return len(checked), sum(a != b for a, b in checked)


def test_generate_chat_with_ablation_follows_the_ablated_forward_pass(c):
    u = np.random.default_rng(0).standard_normal(c.model_info().n_embd).astype(np.float32)
    u /= np.linalg.norm(u)
    text = HARMLESS[2]
    plain = c.generate(text, chat=True, max_tokens=8)
    ablated = c.generate(text, chat=True, max_tokens=8, ablate=u)
    prompt_ids = c.tokenize(text, chat=True).token_ids
    assert ablated.prompt_token_ids == plain.prompt_token_ids == prompt_ids and len(prompt_ids) > 3 * N_BATCH
    assert 0 < len(ablated.token_ids) <= 8
    checked, wrong = teacher_forced(c, prompt_ids, ablated.token_ids, ablate=u)
    assert checked >= 1 and wrong == 0
    checked, wrong = teacher_forced(c, prompt_ids, plain.token_ids)
    assert checked >= 1 and wrong == 0
    # The direction is gone from every block output at every position, in every ubatch: what is left is the
    # float32 rounding of h - (h.u) u and of the dot product, a few gamma(n_embd) of sum |h_k u_k|.
    run = c.run(prompt_ids + ablated.token_ids, ablate=u, logits=False)
    h = run.hidden_states.astype(np.float64)
    bound = 4 * gamma(h.shape[-1] + 2) * (np.abs(h) @ np.abs(u))
    assert_within(h @ u, np.zeros(h.shape[:2]), bound, "component along u")
    assert np.abs(c.run(prompt_ids, logits=False).hidden_states @ u).max() > 1e-2


def test_generate_chat_with_steering_follows_the_steered_forward_pass(c):
    v = np.random.default_rng(1).standard_normal(c.model_info().n_embd).astype(np.float32)
    vector = ControlVector.from_directions(v / np.linalg.norm(v), layers=[1], scale=8.0)
    text = HARMFUL[0]
    steered = c.generate(text, chat=True, max_tokens=8, steer=vector)
    prompt_ids = steered.prompt_token_ids
    assert prompt_ids == c.tokenize(text, chat=True).token_ids and len(prompt_ids) > 3 * N_BATCH
    checked, wrong = teacher_forced(c, prompt_ids, steered.token_ids, steer={1: vector[1]})
    assert checked >= 1 and wrong == 0
    # Added at every position of every ubatch: block 1's output moves by the vector (one float32 add, so
    # within U32 of |h + s| per element, times 2 for the subtraction).
    ids = prompt_ids + steered.token_ids
    moved = c.run(ids, layers=[1], logits=False, steer=vector).resid_post(1).astype(np.float64)
    base = c.run(ids, layers=[1], logits=False).resid_post(1).astype(np.float64)
    assert_within(moved - base, np.broadcast_to(vector[1], moved.shape), 2 ** -23 * np.abs(moved) + 2 * SAME_KERNELS
                  * (np.abs(base) + 1), "steering shift")


# ----- projections and probes (world cities dataset) -------------------------------------------------------

def city_prompts():
    cities = world_cities()
    chosen = np.arange(0, len(cities), len(cities) // 12)[:12]
    template = "The city of {city} is in {country}, on the continent of {continent}."
    return [cities.prompts(template)[i] for i in chosen], cities.coordinates[chosen]


def test_project_pca_matches_scikit_learn_on_states_of_one_prompt_at_a_time(c):
    from sklearn.decomposition import PCA

    prompts, _ = city_prompts()
    projection = c.project(prompts, layer=[1, 3], n_components=2, batch_size=5, progress=False)
    for layer in (1, 3):
        states = np.stack([c.run(p, layers=[layer], logits=False).resid_post(layer)[-1] for p in prompts])
        assert all(len(c.tokenize(p).token_ids) > 3 * N_BATCH for p in prompts)
        same(projection.states[layer], states, f"layer {layer}")
        # As in tests/integration/test_lens.py: two float32 SVDs of matrices SAME_KERNELS apart (Davis-Kahan).
        centred = states.astype(np.float64) - states.mean(axis=0)
        s = np.linalg.svd(centred, compute_uv=False)
        gap = min(min(s[i - 1] - s[i] if i else np.inf, s[i] - s[i + 1]) for i in range(2))
        error = 2 * (gamma(centred.size) + SAME_KERNELS) * s[0]
        pca = PCA(n_components=2).fit(states)
        np.testing.assert_allclose(projection.coords[layer], pca.transform(states), atol=error * (1 + s[0] / gap))
        np.testing.assert_allclose(projection.explained_variance_ratio[layer], pca.explained_variance_ratio_,
                                   rtol=4 * error / s[1])


def test_probe_scores_the_states_of_one_prompt_at_a_time(c):
    prompts, coordinates = city_prompts()
    layers = ["embed", 1, 3]
    for position in (-1, "mean"):
        states = c.residual_states(prompts, layers, position=position, batch_size=5, progress=False)
        bos = c.model_info().bos_token_id
        for layer in layers:
            site = "embed" if layer == "embed" else f"blocks.{layer}.resid_post"
            for prompt, row in zip(prompts, states[layer]):
                run = c.run(prompt, capture=[site], logits=False)
                assert run.token_ids[0] == bos
                rows = run.captures[site]
                expected = rows[-1] if position == -1 else rows[1:].mean(axis=0)
                np.testing.assert_allclose(row, expected, rtol=SAME_KERNELS + gamma(len(rows)), atol=SAME_KERNELS)
        probe = c.probe(prompts, coordinates, layer=layers, position=position, folds=3, batch_size=5,
                        output_names=["latitude", "longitude"], progress=False)
        assert probe.kind == "regression" and probe.scores.shape == (3, 2) and probe.layers == layers
        expected = np.stack([probe_scores(states[layer], coordinates, "regression", 3) for layer in layers])
        np.testing.assert_array_equal(probe.scores, expected)  # the same request, the same bits
    north = np.where(coordinates[:, 0] > np.median(coordinates[:, 0]), "north", "south")
    classes = c.probe(prompts, north, layer=[2], folds=2, batch_size=5, progress=False)
    assert classes.kind == "classification" and classes.chance == 0.5 and 0 <= classes.scores[0, 0] <= 1


# ----- inside: attention, neurons, patching, Patchscopes -------------------------------------------------

def test_attention_over_ubatches_is_the_reference_pattern(c, reference):
    att = c.attention(LONG, layers=[0, 1, 2, 3])
    n = len(att.token_ids)
    assert att.probs.shape == (4, reference.n_head, n, n) and n > 3 * N_BATCH
    ref = reference.forward(att.token_ids)["pattern"]
    for i in range(4):
        assert_close_to_scale(att.probs[i], ref[i], F16_CACHE, f"layer {i}")
        np.testing.assert_array_equal(att.probs[i][:, np.triu(np.ones((n, n), bool), k=1)], 0.0)  # causal
        np.testing.assert_allclose(att.probs[i].sum(axis=-1), 1.0, atol=gamma(n + 4) + n * U16)
        masked = ref[i] == 0  # a sliding-window layer (gemma3) masks keys 4+ positions back too
        np.testing.assert_array_equal(att.probs[i][masked], 0.0)


def test_neurons_and_top_activating_across_ubatches(c, reference):
    layer, neuron = 2, 17
    site = f"blocks.{layer}.mlp.post"
    neurons = c.neurons(LONG, layer)
    assert neurons.activations.shape == (len(neurons.token_ids), reference.n_ff)
    # A flash-attention pass against the reference (tests/integration/test_inside.py): FLASH_F16 on order-one
    # activations.
    np.testing.assert_allclose(neurons.activations, reference.forward(neurons.token_ids)["mlp_post"][layer],
                               atol=FLASH_F16)
    ids, values = neurons.top(position=-1, k=3)
    np.testing.assert_array_equal(ids, np.argsort(-neurons.activations[-1], kind="stable")[:3])
    np.testing.assert_array_equal(values, neurons.activations[-1][ids])
    last3 = c.run(LONG, capture=[site], positions=[-3, -2, -1], logits=False).captures[site]
    same(last3, neurons.activations[-3:], "positions -3..-1 against all")

    result = c.top_activating(PROMPTS, layer, neuron, k=5, batch_size=3, progress=False)
    bos = c.model_info().bos_token_id
    expected = []
    for p, prompt in enumerate(PROMPTS):
        alone = c.neurons(prompt, layer)
        same(result.activations[p], alone.activations[:, neuron], f"prompt {p}")
        expected += [(float(a), p, i) for i, a in enumerate(alone.activations[:, neuron])
                     if alone.token_ids[i] != bos]
    expected.sort(key=lambda hit: -hit[0])
    assert result.n_tokens_scanned == len(expected)
    assert [(h.prompt, h.position) for h in result.hits] == [(p, i) for _, p, i in expected[:5]]
    np.testing.assert_allclose([h.activation for h in result.hits], [a for a, _, _ in expected[:5]],
                               rtol=SAME_KERNELS, atol=SAME_KERNELS)

    memory = c.neuron_activations(PROMPTS[:3], layer, [neuron, 3], k=4)
    for prompt, acts in zip(PROMPTS[:3], memory.activations):
        same(acts, c.neurons(prompt, layer).activations[:, [neuron, 3]], prompt)
    # The value vector (a column of ffn_down, read from the file) through the LM head, no final norm.
    value = reference.weight(f"blk.{layer}.ffn_down.weight")[:, neuron].astype(np.float64)
    logits = reference.output_weight.astype(np.float64) @ value
    tokens = memory.projections[0]
    np.testing.assert_array_equal(tokens.top_ids, np.argsort(-logits)[:4])
    np.testing.assert_array_equal(tokens.bottom_ids, np.argsort(logits)[:4])
    bound = gamma(reference.n_embd) * (np.abs(reference.output_weight.astype(np.float64)) @ np.abs(value))
    assert_within(tokens.top_logits, logits[tokens.top_ids], bound[tokens.top_ids], "top logits")


PATCH_CLEAN = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
PATCH_CORRUPTED = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Spain is"


def test_patch_sweep_cells_equal_single_patched_runs(c):
    clean, corrupted = c.run(PATCH_CLEAN, capture=[]), c.run(PATCH_CORRUPTED, capture=[])
    n = len(clean.token_ids)
    assert len(corrupted.token_ids) == n > 3 * N_BATCH
    differ = [i for i in range(n) if clean.token_ids[i] != corrupted.token_ids[i]]
    positions = sorted({0, *differ, n - 1})
    layers = [0, 2, 3]
    # A random model predicts the same next token for both: score the logits the corruption moves most.
    shift = clean.logits[-1].astype(np.float64) - corrupted.logits[-1]
    good, bad = int(np.argmax(shift)), int(np.argmin(shift))
    sweep = c.patch_sweep(PATCH_CLEAN, PATCH_CORRUPTED, metric=logit_difference(good, bad), layers=layers,
                          positions=positions, batch_size=5)
    assert sweep.values.shape == (3, len(positions)) and sweep.positions == positions and sweep.layers == layers
    assert [t for t in sweep.tokens if "/" in t] == [sweep.tokens[positions.index(i)] for i in differ]
    metric = lambda z: float(z[good]) - float(z[bad])  # noqa: E731
    tol = lambda z: 2 * logit_error(z)  # noqa: E731
    assert sweep.clean_value > sweep.corrupted_value
    assert sweep.clean_value == pytest.approx(metric(clean.logits[-1]), abs=tol(clean.logits[-1]))
    assert sweep.corrupted_value == pytest.approx(metric(corrupted.logits[-1]), abs=tol(corrupted.logits[-1]))
    states = c.run(PATCH_CLEAN, layers=layers, positions=positions, logits=False)
    for i, layer in enumerate(layers):
        for j, position in enumerate(positions):
            patched = c.run(corrupted.token_ids, capture=[], logits="last",
                            patch=[Patch(layer, position, states.resid_post(layer)[j])]).logits[-1]
            assert sweep.values[i, j] == pytest.approx(metric(patched), abs=tol(patched)), (layer, position)
    # BOS is the same token at the same position in both prompts: patching it changes nothing; the last
    # block's output at the last position is all the logits read: patching it restores the clean run.
    assert sweep.values[:, 0] == pytest.approx([sweep.corrupted_value] * 3, abs=tol(corrupted.logits[-1]))
    assert sweep.values[-1, -1] == pytest.approx(sweep.clean_value, abs=tol(clean.logits[-1]))


def test_patchscope_generates_what_the_patched_forward_pass_predicts(c):
    target = "The cat sat on the mat. The dog ran in the garden. x"
    ps = c.patchscope(LONG, source_layer=2, source_position=-1, target=target, target_layer=1, target_position=-1,
                      max_tokens=6)
    source = c.run(LONG, layers=[2], logits=False)
    n_source = len(source.token_ids)
    assert ps.source_position == n_source - 1 and n_source > 3 * N_BATCH
    same(ps.vector, source.resid_post(2)[-1])
    target_ids = c.tokenize(target).token_ids
    assert ps.target_position == len(target_ids) - 1 and len(target_ids) > 3 * N_BATCH
    checked, wrong = teacher_forced(c, target_ids, ps.token_ids, patch=[Patch(1, len(target_ids) - 1, ps.vector)])
    assert checked >= 1 and wrong == 0


# ----- lenses ----------------------------------------------------------------------------------------------

def test_logit_lens_at_the_last_position_is_the_reference_unembedding(c, reference, alone):
    lens = c.logit_lens(LONG, positions=[-1], top_k=5, targets=[" Paris"])
    run = alone[LONG]
    n = len(run.token_ids)
    assert lens.positions == [n - 1] and lens.top_ids.shape == (reference.n_layer + 1, 1, 5)
    states = run.hidden_states[:, -1:]  # (n_layer + 1, 1, n_embd), the same prompt alone
    probs = softmax(reference.unembed(states))
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :5]
    np.testing.assert_array_equal(lens.top_ids, order)
    prob_rtol, entropy_tol = lens_bounds(reference, states, state_error=SAME_KERNELS * (np.abs(states).max() + 1))
    expected = np.take_along_axis(probs, order, -1)
    assert_within(lens.top_probs, expected, prob_rtol * expected + TINY, "top_probs")
    assert_within(lens.entropy, entropy(probs), entropy_tol, "entropy")
    paris = c.token_id(" Paris")
    assert_within(lens.targets[paris].probs, probs[..., paris], prob_rtol[..., 0] * probs[..., paris] + TINY, "Paris")
    # The last hidden state's lens is the model's own distribution (two float32 unembeddings).
    np.testing.assert_array_equal(lens.top_ids[-1, 0], np.argsort(-softmax(run.logits[-1]), kind="stable")[:5])
    assert lens.kl_to_final[-1, 0] == pytest.approx(0.0, abs=1e-5)
    full = c.logit_lens(LONG, top_k=5)
    np.testing.assert_array_equal(full.top_ids[:, -1:], lens.top_ids)


def test_latent_language_is_the_reference_lens_at_the_last_position(c, reference, alone):
    prompt = PROMPTS[4]
    result = c.latent_language(prompt, target="花", pivot=["flower", " apple"])
    states = alone[prompt].hidden_states[:, -1]
    probs = softmax(reference.unembed(states))
    target = c.token_id("花")
    pivots = {c.token_id(w) for w in ("flower", " apple")}
    prob_rtol = lens_bounds(reference, states, state_error=SAME_KERNELS * (np.abs(states).max() + 1))[0][:, 0]
    assert_within(result.target_probs, probs[:, target], prob_rtol * probs[:, target] + TINY, "target")
    pivot = sum(probs[:, t] for t in pivots)
    assert_within(result.pivot_probs, pivot, (prob_rtol + 2 ** -24) * pivot + 2 * TINY, "pivot")
    assert len(result.layers) == reference.n_layer + 1 and np.all(np.isfinite(result.entropy))


def test_collect_stores_the_rows_of_one_prompt_at_a_time(c, alone, tmp_path):
    store = c.collect(PROMPTS, tmp_path / "every", sites=["embed", "blocks.*.resid_post"], positions=None,
                      dtype="float32", batch_size=3, progress=False)
    assert len(store) == len(PROMPTS) and store.ragged
    for i, prompt in enumerate(PROMPTS):
        run = alone[prompt]
        assert store.token_ids(i) == run.token_ids
        same(store.rows("embed", i), run.hidden_states[0], f"embed {i}")
        for L in range(c.n_layer):
            same(store.rows(f"blocks.{L}.resid_post", i), run.resid_post(L), f"layer {L} prompt {i}")
    half = c.collect(PROMPTS, tmp_path / "ends", sites="blocks.*.resid_post", positions=(0, -1), dtype="float16",
                     batch_size=4, progress=False)
    assert half["blocks.3.resid_post"].dtype == np.float16
    assert half["blocks.3.resid_post"].shape == (len(PROMPTS), 2, c.model_info().n_embd)
    np.testing.assert_array_equal(half.positions, [[0, len(alone[p].token_ids) - 1] for p in PROMPTS])
    for L in range(c.n_layer):
        exact = np.stack([alone[p].resid_post(L)[[0, -1]] for p in PROMPTS]).astype(np.float64)
        stored = np.asarray(half[f"blocks.{L}.resid_post"], np.float64)
        assert_within(stored, exact, (U16 + SAME_KERNELS) * np.abs(exact) + SAME_KERNELS + 2 ** -25, f"layer {L}")
    # The same analyses from disk: the store's last-position states are what the server computes.
    from_disk = c.residual_states(half, [3])[3]
    assert_within(from_disk, np.stack([alone[p].resid_post(3)[-1] for p in PROMPTS]),
                  (U16 + SAME_KERNELS) * np.abs(from_disk) + SAME_KERNELS + 2 ** -25, "residual_states(store)")


def test_tuned_lens_fitted_on_long_prompts_and_applied(c, reference, alone, tmp_path):
    store = c.collect(PROMPTS, tmp_path / "lens", sites=["embed", "blocks.*.resid_post"], positions=None,
                      dtype="float32", batch_size=3, progress=False)
    tuned = c.fit_tuned_lens(store, steps=6, batch_tokens=32, eval_every=3, progress=False)
    n_layer = c.n_layer
    assert sorted(tuned.matrices) == list(range(n_layer))  # hidden states 0..n_layer-1; the last needs none
    assert tuned.training["n_tokens"] == sum(len(alone[p].token_ids) - 1 for p in PROMPTS)  # BOS rows left out
    for scores in tuned.training["validation_kl"].values():
        assert np.isfinite(scores["tuned_lens"]) and scores["tuned_lens"] <= scores["logit_lens"]

    lens = c.logit_lens(LONG, lens=tuned, positions=[-1], top_k=5)
    h = alone[LONG].hidden_states[:, -1].astype(np.float64)  # (n_layer + 1, n_embd)
    affine = tuned.affine()
    translated, error = h.copy(), np.full(len(h), SAME_KERNELS * (np.abs(h).max() + 1))
    for i, (matrix, bias) in affine.items():
        m, b = matrix.astype(np.float64), bias.astype(np.float64)
        translated[i] = h[i] @ m.T + b
        # the lens's own pass is SAME_KERNELS from this one, then a float32 (n_embd + 1)-term affine map
        spread = np.abs(h[i]) @ np.abs(m).T
        error[i] = (SAME_KERNELS * (spread + np.abs(m).sum(axis=1)) + gamma(len(b) + 1) * (spread + np.abs(b))).max()
    probs = softmax(reference.unembed(translated))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :5]
    np.testing.assert_array_equal(lens.top_ids[:, 0], order)
    prob_rtol = lens_bounds(reference, translated, state_error=error)[0]
    expected = np.take_along_axis(probs, order, -1)
    assert_within(lens.top_probs[:, 0], expected, prob_rtol * expected + TINY, "tuned top_probs")
    plain = c.logit_lens(LONG, positions=[-1], top_k=5)
    np.testing.assert_array_equal(lens.top_ids[-1], plain.top_ids[-1])  # no translator on the last state


def test_embed_mean_and_last_equal_ln_final_of_one_prompt_at_a_time(c, alone):
    for pooling in ("mean", "last"):
        vectors = c.embed(PROMPTS, pooling=pooling, batch_size=3)
        assert vectors.shape == (len(PROMPTS), c.model_info().n_embd)
        for prompt, vector in zip(PROMPTS, vectors):
            states = alone[prompt].captures["ln_final"].astype(np.float32)
            v = states.mean(axis=0) if pooling == "mean" else states[-1]
            v = v / np.linalg.norm(v)
            # SAME_KERNELS per row, a float32 mean of <= 40 rows, a norm of n_embd squares
            bound = SAME_KERNELS + gamma(len(states)) + gamma(len(v))
            if pooling == "last" and FAMILIES[c.model_info().architecture].ffn == "geglu":
                # the last row alone is an output there: one GELU-table step, see same_outputs
                assert_close_to_scale(vector, v, GELU_TABLE + bound, f"{pooling} of {prompt!r}")
            else:
                np.testing.assert_allclose(vector, v, rtol=bound, atol=bound)
    single = c.embed(LONG, pooling="last")
    np.testing.assert_allclose(single, c.embed([LONG], pooling="last")[0], rtol=SAME_KERNELS, atol=SAME_KERNELS)
