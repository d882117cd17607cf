"""Lenses and projections against independent numpy / scikit-learn computations (tiny model, real server).

The logit lens is recomputed from the GGUF weights by tests/reference.py (final RMSNorm + LM head in
float64) on the hidden states the server captured, and from the model's own logits for the last layer.
Projections are recomputed with scikit-learn on states captured one prompt at a time; nearest tokens and
analogies with numpy over the embedding table read from the file.
"""
from __future__ import annotations

import numpy as np
import pytest
from tolerances import SAME_KERNELS, U32, assert_within, entropy_atol, gamma, probability_rtol, unembedding_error

from lmscope.client import Client, LmscopeError, tensors
from lmscope.proto.wire import lmscope_pb2 as pb

PROMPT = "The capital of France is"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=-1)


def lens_bounds(reference, states: np.ndarray, temperature: float = 1.0, state_error=0.0, copies: int = 1):
    """(probability bound, entropy bound) of a float32 lens of ``states`` (rows, n_embd) against the exact one,
    from tests/tolerances.py: the probability bound is relative, per row (multiply by the probability);
    ``copies=2`` bounds two float32 lenses against each other (each within one bound of the exact lens).
    A probability that float32 flushes below its smallest normal number is off by at most that number."""
    logits = reference.unembed(states) / temperature
    delta = unembedding_error(reference, states, state_error) / temperature
    spread = logits.max(axis=-1) - logits.min(axis=-1)
    rtol = probability_rtol(delta, reference.n_vocab)[..., None]
    return copies * rtol, copies * entropy_atol(delta, entropy(softmax(logits)), reference.n_vocab, spread)


TINY = float(np.finfo(np.float32).tiny)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


# ----- logit lens ------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [5, 40])  # the server picks the top k by argmax passes up to 32, argpartition above
def test_logit_lens_equals_numpy_unembedding_of_the_captured_states(client, reference, top_k):
    lens = client.logit_lens(PROMPT, top_k=top_k, temperature=1.5, targets=[" France", 300])
    states = client.run(PROMPT, logits=False).hidden_states  # the same forward pass, captured raw
    probs = softmax(reference.unembed(states), 1.5)  # (n_layer + 1, n_tokens, n_vocab), float64 from GGUF
    n = len(lens.token_ids)
    assert lens.top_ids.shape == (reference.n_layer + 1, n, top_k) and lens.positions == list(range(n))
    expected_top = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    np.testing.assert_array_equal(lens.top_ids, expected_top)
    prob_rtol, entropy_tol = lens_bounds(reference, states, 1.5)
    expected_probs = np.take_along_axis(probs, expected_top, -1)
    assert_within(lens.top_probs, expected_probs, prob_rtol * expected_probs + TINY, "top_probs")
    assert_within(lens.entropy, entropy(probs), entropy_tol, "entropy")
    france = client.tokenize(" France", add_special=False).token_ids[0]
    for token in (france, 300):
        trace = lens.targets[token]
        assert_within(trace.probs, probs[..., token], prob_rtol[..., 0] * probs[..., token] + TINY, "target probs")
        np.testing.assert_array_equal(trace.ranks, (probs > probs[..., token:token + 1]).sum(axis=-1))
    assert lens.layers == ["embed", "0", "1", "2", "3"]
    assert lens.top_tokens[2][3][0] == client.tokenize_pieces([lens.top_ids[2, 3, 0]])[0]


def test_last_layer_lens_is_the_models_own_next_token_distribution(client, reference):
    # The tiny model's head is F32, so numpy's and llama.cpp's float32 unembeddings of the last hidden state
    # are each within the float32 bound of the exact logits (copies=2). With a quantized head they are not
    # the same computation (docs/lenses.md).
    lens = client.logit_lens(PROMPT, top_k=10)
    run = client.run(PROMPT, logits=True)
    probs = softmax(run.logits)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :10]
    np.testing.assert_array_equal(lens.top_ids[-1], order)
    prob_rtol, entropy_tol = lens_bounds(reference, run.hidden_states[-1], copies=2)
    expected = np.take_along_axis(probs, order, -1)
    assert_within(lens.top_probs[-1], expected, prob_rtol * expected + TINY, "top_probs")
    assert_within(lens.entropy[-1], entropy(probs), entropy_tol, "entropy")


def test_prob_of_an_unrequested_token_equals_asking_for_it_up_front(client):
    plain = client.logit_lens(PROMPT, top_k=3)
    asked = client.logit_lens(PROMPT, top_k=3, targets=[" capital"])
    late = plain.prob_of(" capital")
    early = asked.prob_of(" capital")
    assert late.token_id == early.token_id == client.token_id(" capital")
    np.testing.assert_array_equal(late.probs, early.probs)
    np.testing.assert_array_equal(late.ranks, early.ranks)
    assert plain.prob_of(late.token_id) is late  # answered from the result now
    word = plain.prob_of(" capitalisation")  # several tokens, the first of which is ' capital': flagged
    assert word.multi_token and word.token_id == late.token_id and not late.multi_token
    np.testing.assert_array_equal(word.probs, late.probs)


def test_lensing_some_positions_gives_those_columns(client, reference):
    full = client.logit_lens(PROMPT, top_k=4, targets=[" is"])
    some = client.logit_lens(PROMPT, top_k=4, targets=[" is"], positions=[1, -1])
    n = len(full.token_ids)
    assert some.positions == [1, n - 1]
    np.testing.assert_array_equal(some.top_ids, full.top_ids[:, [1, n - 1]])
    # Fewer rows change how BLAS blocks the float32 (rows, n_embd) x (n_embd, n_vocab) product: the two
    # lenses are two float32 evaluations, each within its bound of the exact one (copies=2).
    states = client.run(PROMPT, positions=[1, -1], logits=False).hidden_states
    prob_rtol, entropy_tol = lens_bounds(reference, states, copies=2)
    assert_within(some.entropy, full.entropy[:, [1, n - 1]], entropy_tol, "entropy")
    token = client.token_id(" is")
    expected = full.targets[token].probs[:, [1, n - 1]]
    assert_within(some.targets[token].probs, expected, prob_rtol[..., 0] * expected + TINY, "target probs")
    assert some.column(-1) == 1
    with pytest.raises(IndexError, match="not lensed"):
        some.column(2)


def test_keep_states_returns_the_hidden_states_of_the_lensed_pass(client):
    kept = client.logit_lens(PROMPT, top_k=3, positions=[1, -1], keep_states=True)
    run = client.run(PROMPT, positions=[1, -1], logits=False)  # the same request without the lens
    np.testing.assert_array_equal(kept.hidden_states, run.hidden_states)
    assert client.logit_lens(PROMPT, top_k=3).hidden_states is None


def test_affine_maps_are_applied_before_the_final_norm(client, reference):
    n_embd = reference.n_embd
    rng = np.random.default_rng(3)
    matrix = (np.eye(n_embd) + 0.3 * rng.normal(size=(n_embd, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    bias = rng.normal(size=n_embd).astype(np.float32)
    tuned = client.logit_lens(PROMPT, top_k=5, affine={2: (matrix, bias)}, targets=[" the"])
    identity = client.logit_lens(PROMPT, top_k=5, affine=[None] * (reference.n_layer + 1))
    plain = client.logit_lens(PROMPT, top_k=5)
    np.testing.assert_array_equal(identity.top_ids, plain.top_ids)
    raw = client.run(PROMPT, logits=False).hidden_states
    # Unembed requests (the affine path) and the Run lens: two float32 lenses of the same states.
    prob_rtol, _ = lens_bounds(reference, raw, copies=2)
    assert_within(identity.top_probs, plain.top_probs, prob_rtol * plain.top_probs + TINY, "identity")

    states = raw.astype(np.float64)
    states[2] = states[2] @ matrix.T.astype(np.float64) + bias
    probs = softmax(reference.unembed(states))
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :5]
    np.testing.assert_array_equal(tuned.top_ids, order)
    # The client maps state 2 in float32: an (n_embd + 1)-term sum per element.
    map_error = np.zeros(states.shape[:2])
    map_error[2] = gamma(n_embd + 1) * (np.abs(raw[2]) @ np.abs(matrix.T) + np.abs(bias)).max(axis=-1)
    prob_rtol, _ = lens_bounds(reference, states, state_error=map_error)
    expected = np.take_along_axis(probs, order, -1)
    assert_within(tuned.top_probs, expected, prob_rtol * expected + TINY, "tuned top_probs")
    the = client.token_id(" the")
    assert_within(tuned.prob_of(" the").probs, probs[..., the], prob_rtol[..., 0] * probs[..., the] + TINY, "' the'")
    assert not np.array_equal(tuned.top_ids[2], plain.top_ids[2])
    np.testing.assert_array_equal(tuned.top_ids[3], plain.top_ids[3])
    with pytest.raises(ValueError, match=r"affine map 1 must be"):
        client.logit_lens(PROMPT, affine={1: (np.eye(3), None)})


def test_table_and_heatmap(client, tmp_path):
    lens = client.logit_lens(PROMPT, top_k=3, targets=[" France"])
    table = lens.table()
    lines = table.splitlines()
    assert len(lines) == 2 + reference_rows(client) and "' France'" in lines[1]
    assert lines[2].split()[0] == "embed" and lines[-1].split()[0] == str(client.n_layer - 1)
    assert f"{lens.entropy[-1, -1]:.3f}" in lines[-1]
    fig = lens.plot(save=tmp_path / "lens.png")
    assert (tmp_path / "lens.png").stat().st_size > 10_000
    assert fig.axes[0].images[0].get_array().shape == (client.n_layer + 1, len(lens.token_ids))
    lens.plot("entropy", save=tmp_path / "lens.svg")
    assert (tmp_path / "lens.svg").read_text().startswith("<?xml")
    target = lens.plot(" France")
    np.testing.assert_allclose(np.asarray(target.axes[0].images[0].get_array()), lens.prob_of(" France").probs)
    with pytest.raises(ValueError, match="save to a"):
        lens.plot(save=tmp_path / "lens.jpeg")


def reference_rows(client) -> int:
    return client.n_layer + 1


def test_latent_language_sums_first_token_probabilities_at_the_last_position(client, reference):
    prompt = 'Français: "fleur" - 中文: "'
    result = client.latent_language(prompt, target="花", pivot=["flower", " flower"], temperature=1.0)
    states = client.run(prompt, logits=False).hidden_states[:, -1]
    probs = softmax(reference.unembed(states))
    target = client.tokenize("花", add_special=False).token_ids[0]
    pivots = {client.tokenize(w, add_special=False).token_ids[0] for w in ("flower", " flower")}
    prob_rtol = lens_bounds(reference, states)[0][:, 0]
    assert_within(result.target_probs, probs[:, target], prob_rtol * probs[:, target] + TINY, "target")
    pivot = sum(probs[:, t] for t in pivots)  # a sum of two positive terms keeps their relative bound (+ u)
    assert_within(result.pivot_probs, pivot, (prob_rtol + U32) * pivot + 2 * TINY, "pivot")
    assert result.layers[0] == "embed" and len(result.target_probs) == reference.n_layer + 1
    assert "花" in result.multi_token  # three UTF-8 bytes, three byte tokens in the tiny vocabulary
    assert result.plot().axes[0].get_lines()[0].get_ydata().shape == (reference.n_layer + 1,)


# ----- projections and probes ------------------------------------------------------------------------

PROMPTS = [PROMPT, "Hello world", "The cat sat on the mat", "今天天氣真好！", "one two three four",
           "Paris is the capital", "a b c d e f", "The quick brown fox", "I like green apples", "What time is it?"]


def test_pca_matches_scikit_learn_on_states_captured_one_prompt_at_a_time(client):
    from sklearn.decomposition import PCA

    projection = client.project(PROMPTS, layer=[1, "embed"], n_components=3, batch_size=4, progress=False)
    assert projection.layers == [1, "embed"]
    for layer, site in ((1, "blocks.1.resid_post"), ("embed", "embed")):
        states = np.stack([client.run(p, capture=[site], logits=False).captures[site][-1] for p in PROMPTS])
        # Batches of 4 prompts (< 64 rows): the same kernels row by row as one prompt at a time.
        np.testing.assert_allclose(projection.states[layer], states, rtol=SAME_KERNELS, atol=SAME_KERNELS)
        pca = PCA(n_components=3).fit(states)
        # Both fits are float32 SVDs of nearly the same centred matrix X: each is backward stable, an exact
        # SVD of X + E with |E| <= gamma(X.size) s_0 (s: singular values), and the two inputs differ by
        # SAME_KERNELS |X|. A component moves by |E| / gap (Davis-Kahan), gap = the distance of its
        # singular value to the others, so a coordinate X v by |E| (1 + s_0 / gap).
        centred = states.astype(np.float64) - states.mean(axis=0)
        s = np.linalg.svd(centred, compute_uv=False)
        gap = min(min(s[i - 1] - s[i] if i else np.inf, s[i] - s[i + 1]) for i in range(3))
        error = 2 * (gamma(centred.size) + SAME_KERNELS) * s[0]
        np.testing.assert_allclose(projection.coords[layer], pca.transform(states), atol=error * (1 + s[0] / gap))
        # A ratio s_i^2 / sum s^2 moves by about 2 |E| / s_i relative, and the sum by 2 |E| / s_0.
        np.testing.assert_allclose(projection.explained_variance_ratio[layer], pca.explained_variance_ratio_,
                                   rtol=4 * error / s[2])
    fig = projection.plot(labels=PROMPTS, color=["en"] * 9 + ["zh"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2


def test_mean_position_averages_the_tokens_after_bos(client):
    states = client.residual_states(PROMPTS[:3], [2], position="mean", progress=False)[2]
    for prompt, row in zip(PROMPTS[:3], states):
        run = client.run(prompt, layers=[2], logits=False)
        # Batched (< 64 rows, SAME_KERNELS) and a float32 mean of <= 8 rows (gamma(8)).
        np.testing.assert_allclose(row, run.resid_post(2)[1:].mean(axis=0), rtol=SAME_KERNELS + gamma(8),
                                   atol=SAME_KERNELS)


@pytest.fixture(scope="module")
def planted(client, reference):
    """Random-token prompts and a target planted as a fixed linear function of block 2's last state,
    computed by the numpy reference (deterministic: fixed seeds)."""
    rng = np.random.default_rng(0)
    prompts = [[0] + [int(t) for t in rng.integers(4, reference.n_vocab, size=6)] for _ in range(200)]  # 0: BOS
    states = np.stack([reference.forward(p)["resid_post"][2][-1] for p in prompts])
    signal = states @ rng.normal(size=reference.n_embd)
    return prompts, signal


def test_probe_finds_a_planted_linear_signal_and_chance_on_shuffled_targets(client, planted):
    prompts, signal = planted
    found = client.probe(prompts, signal, progress=False)
    assert found.kind == "regression" and found.layers == ["embed", 0, 1, 2, 3]
    assert found.scores[3, 0] > 0.98, found  # layer 2 is hidden-state row 3
    assert found.best_layer == 2
    shuffled = client.probe(prompts, np.random.default_rng(1).permutation(signal), progress=False)
    assert (shuffled.scores < 0.1).all(), shuffled

    labels = np.where(signal > np.median(signal), "high", "low")
    classes = client.probe(prompts, labels, layer=[0, 2], progress=False)
    assert classes.kind == "classification" and classes.chance == 0.5
    assert classes.scores[1, 0] > 0.8, classes  # 160 training prompts in 64 dimensions: not perfect
    random_labels = client.probe(prompts, np.random.default_rng(2).permutation(labels), layer=[0, 2], progress=False)
    assert (np.abs(random_labels.scores - 0.5) < 0.12).all(), random_labels
    assert found.plot().axes[0].get_lines()[0].get_ydata().shape == (5,)


def test_probe_scores_several_continuous_targets_at_once(client, planted):
    prompts, signal = planted
    both = client.probe(prompts, np.stack([signal, -2 * signal + 1], axis=1), layer=2, output_names=["a", "b"],
                        progress=False)
    assert both.scores.shape == (1, 2) and (both.scores > 0.98).all()


# ----- the embedding table ---------------------------------------------------------------------------

def test_nearest_tokens_are_the_numpy_cosine_neighbours(client, reference):
    table = reference.weight("token_embd.weight").astype(np.float64)
    word = client.token_id(" capital")
    cosines = cosine_rows(table[word][None], table)[0]
    cosines[word] = -np.inf  # the query word itself is left out
    for k in (8, 40):
        result = client.nearest_tokens(" capital", k=k)
        order = np.argsort(-cosines, kind="stable")[:k]
        np.testing.assert_array_equal(result.ids, order)
        # The server's float32 cosine: a unit query (rounded, u) dotted with a row over n_embd terms
        # (gamma(n_embd), relative to sum |q_k m_k| <= |m|) times a float32 inverse norm (n_embd / 2 + 4 u).
        np.testing.assert_allclose(result.scores, cosines[order], rtol=0,
                                   atol=gamma(reference.n_embd) + (reference.n_embd / 2 + 5) * U32)
        assert result.tokens == client.tokenize_pieces(order)

    vectors = np.random.default_rng(0).normal(size=(2, reference.n_embd)).astype(np.float32)
    head = reference.output_weight.astype(np.float64)
    for row, found in zip(vectors, client.nearest_tokens(vectors, k=4, table="lm_head")):
        cosines = cosine_rows(row[None].astype(np.float64), head)[0]
        np.testing.assert_array_equal(found.ids, np.argsort(-cosines, kind="stable")[:4])


def test_analogy_reports_neighbours_with_and_without_its_inputs(client, reference):
    table = reference.weight("token_embd.weight").astype(np.float64)
    result = client.analogy(" France", " Paris", " capital", k=6)
    ids = [client.token_id(w) for w in (" France", " Paris", " capital")]
    assert result.input_ids == tuple(ids)
    cosines = cosine_rows((table[ids[0]] - table[ids[1]] + table[ids[2]])[None], table)[0]
    everything = np.argsort(-cosines, kind="stable")[:6]
    np.testing.assert_array_equal(result.unfiltered.ids, everything)
    cosines[ids] = -np.inf
    np.testing.assert_array_equal(result.neighbours.ids, np.argsort(-cosines, kind="stable")[:6])
    assert not set(ids) & set(result.neighbours.ids.tolist())
    ranks = result.input_ranks
    assert all(ranks[w] == (everything.tolist().index(t) if t in everything else None)
               for w, t in zip(result.words, ids))


def test_contextual_similarity_is_the_cosine_of_the_words_states(client):
    contexts = ["The capital of France is", "Money is the capital of a firm", " capital letters"]
    result = client.contextual_similarity(" capital", contexts, layer=[0, 3])
    assert result.positions == [2, 7, 1]  # BOS, then ' capital' is token 2, 7 and 1
    assert result.tokens == [" capital"] * 3 and result.layers == [0, 3]
    runs = [client.run(c, layers=[0, 3], logits=False) for c in contexts]
    static = client.embedding_rows([client.token_id(" capital")])[0].astype(np.float64)
    for i, layer in enumerate((0, 3)):
        vectors = np.stack([run.resid_post(layer)[p] for run, p in zip(runs, result.positions)]).astype(np.float64)
        expected = cosine_rows(vectors, vectors)
        # States from a batch of 3 prompts (< 64 rows): SAME_KERNELS relative on each vector, so a cosine
        # (float64 on both sides) moves by at most twice that per vector.
        near = 4 * SAME_KERNELS
        np.testing.assert_allclose(result.similarity[i], expected, rtol=0, atol=near)
        np.testing.assert_allclose(result.mean_similarity[i], expected[~np.eye(3, dtype=bool)].mean(), atol=near)
        np.testing.assert_allclose(result.static_similarity[i], cosine_rows(vectors, static[None])[:, 0], atol=near)
        others = [np.delete(run.resid_post(layer)[1:], p - 1, axis=0) for run, p in zip(runs, result.positions)]
        pairs = [cosine_rows(others[g], others[h]).ravel() for g in range(3) for h in range(g + 1, 3)]
        np.testing.assert_allclose(result.baseline[i], np.concatenate(pairs).mean(), atol=near)
    assert client.contextual_similarity(" capital", [" capitalisation", PROMPT]).positions == [1, 2]
    with pytest.raises(ValueError, match="does not occur"):
        client.contextual_similarity(" Berlin", contexts)


def test_untied_tables_are_told_apart(client):
    tables = client.compare_embedding_tables(sample=64)
    assert not tables.tied and not tables.equal_values and tables.sampled == 64
    assert abs(tables.mean_cosine) < 0.2  # independent random matrices


def test_tied_model_has_one_table(tmp_path_factory):
    from lmscope.service.launch import launch_server
    from lmscope.service.testing import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tied") / "tied.gguf", n_layer=2, tied=True)
    with launch_server(path, args=("--threads", "2", "--n-ctx", "256")) as server, Client(server.address) as c:
        tables = c.compare_embedding_tables()
        assert tables.tied and tables.equal_values
        by_embedding = c.nearest_tokens(" the", k=5)
        by_head = c.nearest_tokens(" the", k=5, table="lm_head")
        np.testing.assert_array_equal(by_embedding.ids, by_head.ids)
        np.testing.assert_array_equal(by_embedding.scores, by_head.scores)


# ----- bad input -------------------------------------------------------------------------------------

def nearest_rpc(client, vectors, k=5, table="", exclude=()):
    request = pb.NearestTokensRequest(vectors=tensors.to_tensor(np.asarray(vectors, dtype=np.float32)), k=k,
                                      table=table, exclude_ids=list(exclude))
    return client._tensor_stream("NearestTokens", request)


@pytest.mark.parametrize("call, code, words", [
    (lambda c: nearest_rpc(c, np.ones(64), k=0), "OUT_OF_RANGE", "k must be between 1 and 500, got 0"),
    (lambda c: nearest_rpc(c, np.ones(64), k=501), "OUT_OF_RANGE", "k must be between 1 and 500"),
    (lambda c: nearest_rpc(c, np.ones(64), k=499, exclude=[1, 2]), "OUT_OF_RANGE", "between 1 and 498"),
    (lambda c: nearest_rpc(c, np.ones(7)), "INVALID_ARGUMENT", "width 7"),
    (lambda c: nearest_rpc(c, np.ones(64), table="unembedding"), "INVALID_ARGUMENT", "unknown table 'unembedding'"),
    (lambda c: nearest_rpc(c, np.zeros(64)), "INVALID_ARGUMENT", "all zeros"),
    (lambda c: nearest_rpc(c, np.full(64, np.nan)), "INVALID_ARGUMENT", "NaN"),
    (lambda c: nearest_rpc(c, np.ones(64), exclude=[500]), "OUT_OF_RANGE", "outside the vocabulary"),
    (lambda c: nearest_rpc(c, np.ones((4097, 64))), "RESOURCE_EXHAUSTED", "at most 4096"),
    (lambda c: c.nearest_tokens(" the", k=0), "OUT_OF_RANGE", "k must be between"),
    (lambda c: c.logit_lens(PROMPT, targets=[10 ** 6]), "OUT_OF_RANGE", "lens target_ids has token id 1000000"),
    (lambda c: c.logit_lens(PROMPT, top_k=5000), "INVALID_ARGUMENT", "top_k 5000 is over the limit"),
    (lambda c: c.send_run(c.run_request([PROMPT], lens=pb.LensSpec(enabled=True, top_k=1, temperature=-1.0))),
     "INVALID_ARGUMENT", "lens temperature must be between"),
    (lambda c: c.logit_lens(PROMPT, positions=[40]), "OUT_OF_RANGE", "outside a prompt"),
    (lambda c: c.project(["a b", "c d"], layer=1, position=9, progress=False), "OUT_OF_RANGE", "outside a prompt"),
])
def test_bad_input_gets_a_precise_status(client, call, code, words):
    with pytest.raises(LmscopeError) as info:
        call(client)
    assert info.value.code.name == code
    assert words in info.value.message, info.value.message
    assert client.nearest_tokens(" the", k=1).ids.shape == (1,)


@pytest.mark.parametrize("call, words", [
    (lambda c: c.logit_lens(PROMPT, targets=[""]), "tokenizes to nothing"),
    (lambda c: c.logit_lens(PROMPT, temperature=0), "temperature must be > 0"),
    (lambda c: c.nearest_tokens(" the", table="head"), "table must be"),
    (lambda c: c.project(PROMPTS, layer=4, progress=False), r"layer 4 is out of range: the model has 4 blocks"),
    (lambda c: c.project(PROMPTS, layer=[1, 1], progress=False), "layers repeat"),
    (lambda c: c.project(PROMPTS, method="umap", progress=False), "method must be"),
    (lambda c: c.probe(PROMPTS, [1.0, 2.0], progress=False), "10 prompts but 2 targets"),
    (lambda c: c.probe(PROMPTS, np.arange(10.0), folds=11, progress=False), "folds must be"),
    (lambda c: c.contextual_similarity(" capital", [PROMPT]), "at least two contexts"),
])
def test_bad_arguments_are_refused_on_the_client_with_a_reason(client, call, words):
    with pytest.raises(LmscopeError, match=words) as info:
        call(client)
    assert info.value.code.name in ("INVALID_ARGUMENT", "OUT_OF_RANGE")


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch):
    import sys

    from lmscope.client import plots

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"lmscope\[plot\]"):
        plots.pyplot()


# ----- command line, data, real model ----------------------------------------------------------------

def test_lens_command_prints_the_last_tokens_table(tiny_server, capsys):
    from lmscope.client.cli import main

    assert main(["lens", PROMPT, "--server", tiny_server.address, "--top-k", "2", "--target", " France"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "input ' is'" in out[0] and "' France'" in out[1]
    assert [line.split()[0] for line in out[2:]] == ["embed", "0", "1", "2", "3"]


def test_world_cities_dataset():
    from lmscope.client.datasets import world_cities

    cities = world_cities()
    assert len(cities) >= 300 and len(set(zip(cities.names, cities.countries))) == len(cities)
    assert (np.abs(cities.latitude) <= 90).all() and (np.abs(cities.longitude) <= 180).all()
    paris = cities.names.index("Paris")
    assert abs(cities.latitude[paris] - 48.86) < 0.2 and abs(cities.longitude[paris] - 2.35) < 0.2
    assert set(cities.continents) == {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    assert cities.prompts("{city}, {country}")[paris] == "Paris, France"


def test_real_model_lens_ends_in_paris_and_its_tables_are_tied(smol_client):
    lens = smol_client.logit_lens(PROMPT, top_k=3, positions=[-1], targets=[" Paris"])
    assert lens.top_tokens[-1][0][0] == " Paris"
    paris = lens.targets[smol_client.token_id(" Paris")]
    assert paris.ranks[-1, 0] == 0 and paris.ranks[0, 0] > 100  # the embedding row does not predict it
    assert smol_client.compare_embedding_tables().tied
