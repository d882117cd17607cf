"""The request space, explored by differential tests: a request equals its pieces.

Each property compares two requests that must agree: a position subset with the full run indexed, a batch
with its prompts one by one, a capture subset or `layers=` with the same sites of a full capture, float16 with
float32, a zero steer with no steer, the lens's last layer with the logits, a generation's first token with
the run of its prompt. Hypothesis draws the requests (seeded: CI sees the same examples every time) on the
tiny model of every family, served with ubatches of 4 tokens (`--n-batch 4`): prompts of 1-23 tokens then
cover one to six ubatches, ubatches without output rows, and prompts split across ubatches, the shapes that
answered INTERNAL before (a ubatch with no output row reached a reshape of zero rows in service/capture.py).
A request for every row's outputs is cut at `--n-outputs` rows per ubatch while one for a few decodes in whole
ubatches: `test_a_request_cut_at_its_output_rows_is_the_uncut_one` compares the two; on the real models,
ubatches of 72 and of 16 rows give the same bits (either side of the 64 rows where upstream llama.cpp's flash
attention switches kernels; patches/0004 gives both the tiled kernel).
The same properties then run on SmolLM2 and Gemma 3 270M with prompts past two of their ubatches.

Tolerances (tests/tolerances.py), from what the two requests compute:
- A position subset decodes the same rows in the same ubatches; only the last block, which llama.cpp computes
  for the output rows alone, multiplies a different number of rows: float32 sums in another blocking,
  SAME_KERNELS on the tiny models, and where a GELU table reads the sums (gemma families) one float16 step
  of an activation, GELU_TABLE of the scale. A mixture's router in the last block could take the other
  expert at a near tie: such prompts are left out (the numpy reference finds them, `near_last_tie`). On the
  quantized real models a different rounding in the last block can move an activation across an 8-bit
  rounding boundary (one step, 2**-7 of its block's largest value) before a later product of the same block:
  Q8_STEP_LAST_BLOCK, relative to the row's largest value; every earlier layer holds the same bits.
- A batch against its prompts alone: flash attention's tiled kernel gives each row the same sums, but a
  matrix product over one row and over several may block its float32 sums otherwise, and a difference of one
  unit can flip an entry of the F16 KV cache: F16_CACHE of the array's scale.
  Prompts longer than a ubatch are groups of their own, so on the real models their rows are the same bits
  as alone; mixtures of experts run with --batch-invariant (see `routed`), the same bits too.
- float16 against float32: half a float16 step of the value (normal range), 2**-25 absolute (subnormals).
- A zero steer adds +0.0 to every edited value: the same bits.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tolerances import (
    F16_CACHE,
    FLASH_F16,
    GELU_TABLE,
    SAME_KERNELS,
    U16,
    assert_close_to_scale,
    assert_within,
    reordered,
)

from lmscope.client import Client, LmscopeError
from lmscope.service.launch import launch_server
from lmscope.service.testing import FAMILIES, TINY_VOCAB_SIZE, build_tiny_model

UBATCH = 4
SERVER_ARGS = ("--threads", "1", "--n-ctx", "512", "--n-batch", str(UBATCH))
MAX_LEN = 6 * UBATCH - 1
EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
Q8_STEP_LAST_BLOCK = 2 * 2.0 ** -7  # one 8-bit step of one activation, carried by at most two products
FIRST_CONTROL_FREE_ID = 4  # ids 0-3 are the tiny vocabulary's control tokens


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


def routed(family: str) -> bool:
    """A mixture of experts: a float32 difference can send a token at a near tie to the other expert, a
    discrete change no tolerance bounds; these servers decode each prompt as if alone (--batch-invariant)."""
    return FAMILIES[family].n_expert > 0


@pytest.fixture(scope="module")
def family_client(family, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("space") / f"{family}.gguf", family=family)
    args = SERVER_ARGS + (("--batch-invariant",) if routed(family) else ())
    with launch_server(path, args=args) as server, Client(server.address) as client:
        memory = client.model_info().memory
        assert memory["n_ubatch"] == memory["n_outputs_max"] == UBATCH
        yield client


def prompts_strategy(max_prompts: int = 3):
    prompt = st.lists(st.integers(FIRST_CONTROL_FREE_ID, TINY_VOCAB_SIZE - 1), min_size=1, max_size=MAX_LEN)
    return st.lists(prompt, min_size=1, max_size=max_prompts)


@st.composite
def shared_positions(draw, shortest: int) -> list[int]:
    """Distinct relative positions valid for every prompt of a request (positions apply to each prompt): some
    from the start, some from the end, never naming one token twice in the shortest prompt."""
    split = draw(st.integers(0, shortest))
    ahead = draw(st.lists(st.integers(0, split - 1), unique=True, max_size=3)) if split else []
    behind = draw(st.lists(st.integers(-(shortest - split), -1), unique=True, max_size=3)) if shortest > split else []
    positions = ahead + behind
    return draw(st.permutations(positions)) if positions else [-1]


@pytest.fixture(scope="module")
def family_reference(family, family_client, tmp_path_factory):
    """The numpy reference of a mixture's tiny model (its near ties), None for the other families."""
    if not routed(family):
        return None
    from reference import ReferenceModel

    path = build_tiny_model(tmp_path_factory.mktemp("space-reference") / f"{family}.gguf", family=family)
    return ReferenceModel(path, kv_cache="f16")


def near_last_tie(reference, ids: list[int]) -> bool:
    """Whether a token's routing in the last block is within ROUTER_MARGIN of a tie (float32 differences
    could take the other expert there); False for a dense model."""
    if reference is None:
        return False
    from test_families import ROUTER_MARGIN

    ties = reference.near_ties(reference.forward(ids), ROUTER_MARGIN)
    return any(layer == reference.n_layer - 1 for layer, _, _ in ties)


def in_last_block(site: str, n_layer: int) -> bool:
    """Computed for the output rows alone (the last block, the final norm, the logits)."""
    return site.startswith(f"blocks.{n_layer - 1}.") or site in ("ln_final", "logits")


def close_across_row_counts(family: str, site: str, n_layer: int, actual, expected, what: str) -> None:
    """The same rows computed beside another number of output rows (see the module docstring)."""
    if in_last_block(site, n_layer) and FAMILIES[family].ffn == "geglu":
        assert_close_to_scale(actual, expected, GELU_TABLE, what)
    else:
        close(actual, expected, what)


def absolute(positions: list[int], n_tokens: int) -> list[int]:
    return [p + n_tokens if p < 0 else p for p in positions]


def close(actual, expected, what: str, rtol: float = SAME_KERNELS, atol: float = SAME_KERNELS) -> None:
    expected = np.asarray(expected, np.float64)
    assert_within(actual, expected, atol + rtol * np.abs(expected), what)


def is_pattern(site: str) -> bool:
    return site.endswith(("attn.pattern", "attn.scores"))


def site_subset(client, data, patterns: bool = True) -> list[str]:
    sites = [s for s in client.model_info().capture_sites if patterns or not is_pattern(s)]
    return data.draw(st.lists(st.sampled_from(sites), min_size=1, max_size=6, unique=True), label="sites")


@given(data=st.data())
@EXAMPLES
def test_a_position_subset_is_the_full_run_at_those_positions(family, family_client, family_reference, data):
    c = family_client
    prompts = data.draw(prompts_strategy(), label="prompts")
    assume(not any(near_last_tie(family_reference, ids) for ids in prompts))
    positions = data.draw(shared_positions(min(map(len, prompts))), label="positions")
    sites = site_subset(c, data)
    full = c.send_run(c.run_request(prompts, capture=sites, logits=True))
    part = c.send_run(c.run_request(prompts, capture=sites, positions=positions, logits=True))
    last = c.send_run(c.run_request(prompts, capture=sites, positions=positions, logits="last"))
    for s, ids in enumerate(prompts):
        chosen = absolute(positions, len(ids))
        assert part[s].positions == chosen == last[s].positions
        for site in sites:
            whole = full[s].captures[site]
            expected = whole[:, chosen, :] if is_pattern(site) else whole[chosen]
            for run, how in ((part[s], "all logits"), (last[s], "last logits")):
                close_across_row_counts(family, site, c.n_layer, run.captures[site], expected,
                                        f"{site} at {chosen} of prompt {s}, {how}")
        close_across_row_counts(family, "logits", c.n_layer, part[s].logits, full[s].logits[chosen],
                                f"logits at {chosen} of prompt {s}")
        close_across_row_counts(family, "logits", c.n_layer, last[s].logits, full[s].logits[-1:],
                                f"last logits of prompt {s}")


@given(data=st.data())
@EXAMPLES
def test_a_batch_of_mixed_lengths_equals_its_prompts_one_by_one(family, family_client, data):
    c = family_client
    prompts = data.draw(prompts_strategy(max_prompts=4), label="prompts")
    sites = ["embed", "blocks.*.resid_post"] + site_subset(c, data, patterns=False)
    batch = c.run_batch(prompts, capture=sites)
    for s, ids in enumerate(prompts):
        alone = c.run(ids, capture=sites)
        assert batch[s].token_ids == alone.token_ids == ids
        for name in list(alone.captures) + ["logits"]:
            shared = batch[s].logits if name == "logits" else batch[s].captures[name]
            single = alone.logits if name == "logits" else alone.captures[name]
            if routed(family):  # --batch-invariant: the prompt's own ubatches and cells, the same bits
                np.testing.assert_array_equal(shared, single, f"{name} of prompt {s}")
            else:  # a ubatch of other rows can round a product otherwise and flip an F16 cache entry
                assert_close_to_scale(shared, single, F16_CACHE, f"{name} of prompt {s} in the batch")


@given(data=st.data())
@EXAMPLES
def test_a_capture_subset_and_layers_are_the_same_sites_of_a_full_capture(family, family_client, data):
    c = family_client
    ids = data.draw(prompts_strategy(max_prompts=1), label="prompts")[0]
    sites = site_subset(c, data, patterns=False)
    layers = data.draw(st.lists(st.integers(0, c.n_layer - 1), min_size=1, unique=True), label="layers")
    everything = c.run(ids, capture=lambda site: not is_pattern(site))  # a pattern would switch the kernel
    subset = c.run(ids, capture=sites, logits=False)  # no logits: the pass ends at the last wanted node
    by_layer = c.run(ids, layers=layers, logits=False)
    for site in sites:
        close(subset.captures[site], everything.captures[site], site)
    for layer in layers:
        close(by_layer.resid_post(layer), everything.hidden_states[layer + 1], f"layers=[{layer}]")
    assert subset.logits is None and by_layer.logits is None
    if FAMILIES[family].n_expert == 0:  # a mixture's routing can take the other expert at a near tie
        observed = c.run(ids, capture=sites + ["blocks.0.attn.pattern"], logits=False)
        for site in sites:  # a pattern capture runs the plain attention kernel: FLASH_F16 on order-one states
            close(observed.captures[site], everything.captures[site], f"{site} beside a pattern", 0.0, FLASH_F16)


@given(data=st.data())
@EXAMPLES
def test_float16_answers_are_float32_rounded_to_half_a_step(family_client, data):
    c = family_client
    prompts = data.draw(prompts_strategy(), label="prompts")
    positions = data.draw(st.none() | shared_positions(min(map(len, prompts))), label="positions")
    sites = site_subset(c, data)
    wide = c.send_run(c.run_request(prompts, capture=sites, positions=positions))
    half = c.send_run(c.run_request(prompts, capture=sites, positions=positions, dtype="float16"))
    for w, h in zip(wide, half):
        for name in list(w.captures) + ["logits"]:
            a16 = h.logits if name == "logits" else h.captures[name]
            a32 = w.logits if name == "logits" else w.captures[name]
            assert a16.dtype == np.float16
            assert_within(a16, a32, U16 * np.abs(a32) + 2.0 ** -25, f"float16 {name}")


@given(data=st.data())
@EXAMPLES
def test_a_zero_steer_is_no_steer_and_an_ablated_direction_is_gone(family_client, data):
    c = family_client
    ids = data.draw(prompts_strategy(max_prompts=1), label="prompts")[0]
    n_embd = c.model_info().n_embd
    layer = data.draw(st.integers(0, c.n_layer - 1), label="layer")
    plain = c.run(ids)
    steered = c.run(ids, steer={layer: np.zeros(n_embd, np.float32)})
    np.testing.assert_array_equal(steered.hidden_states, plain.hidden_states)
    np.testing.assert_array_equal(steered.logits, plain.logits)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    u = np.random.default_rng(seed).standard_normal(n_embd).astype(np.float32)
    ablated = c.run(ids, ablate=u, capture=["embed", "blocks.*.resid_mid", "blocks.*.resid_post"], logits=False)
    u64 = u.astype(np.float64) / np.linalg.norm(u.astype(np.float64))
    for site, states in ablated.captures.items():
        # x - (x.v) v in float32 with v normalized in float32: a dot product of n_embd terms and the rounding
        # of each element, each at most reordered(n_embd) of |x| along the unit direction.
        norms = np.linalg.norm(states.astype(np.float64), axis=1)
        along = states.astype(np.float64) @ u64
        assert_within(along, np.zeros_like(along), 3 * reordered(n_embd) * norms, f"{site} along u")


@given(data=st.data())
@EXAMPLES
def test_the_lens_of_the_last_layer_ranks_tokens_as_the_logits_do(family_client, data):
    c = family_client
    ids = data.draw(prompts_strategy(max_prompts=1), label="prompts")[0]
    positions = data.draw(st.none() | shared_positions(len(ids)), label="positions")
    lens = c.logit_lens(ids, top_k=3, positions=positions)
    run = c.run(ids, positions=positions, capture=[])
    logits = run.logits.astype(np.float64)
    order = np.argsort(-logits, axis=1, kind="stable")
    top, second = np.take_along_axis(logits, order[:, :2], axis=1).T
    # The lens unembeds in numpy, llama.cpp in its own kernels: two float32 evaluations of the same logits,
    # apart by at most reordered(n_embd) of the largest |logit|-sized terms. Where the first two logits are
    # further apart than that, both must put the same token first.
    margin = 4 * reordered(c.model_info().n_embd) * np.abs(logits).max(axis=1) + 1e-6
    clear = top - second > margin
    assert lens.positions == run.positions
    np.testing.assert_array_equal(lens.top_ids[-1, clear, 0], order[clear, 0])


def test_generation_with_interventions_continues_the_run_of_a_long_chat_prompt(family_client):
    c = family_client
    text = "Tell me, in a few words, why the sky looks blue on a clear summer day and red at sunset."
    n_embd = c.model_info().n_embd
    u = np.random.default_rng(7).standard_normal(n_embd).astype(np.float32)
    steer = {c.n_layer // 2: 2.0 * u}
    for edit in ({"ablate": u}, {"steer": steer}, {}):
        generated = c.generate(text, chat=True, max_tokens=3, **edit)
        assert len(generated.prompt_token_ids) > 2 * UBATCH
        run = c.run(text, chat=True, logits="last", capture=[], **edit)
        assert run.token_ids == generated.prompt_token_ids
        assert generated.token_ids, generated
        # the prompt's decode is the run's (the same ubatches, the last row the only output): the same bits,
        # so greedy sampling picks the run's first argmax (llama.cpp's greedy sampler keeps the first maximum)
        assert generated.token_ids[0] == int(np.argmax(run.logits[-1])), edit
    with pytest.raises(LmscopeError) as refused:
        c.generate(c.tokenize(text).token_ids, chat=True, max_tokens=1)
    assert refused.value.code.name == "INVALID_ARGUMENT"


# ----- the same properties on the real models ----------------------------------------------------------------

REAL_TEXT = ("The history of the old harbour town begins in Roman times, when a few fishermen settled on the "
             "banks of the river. Over the centuries it grew into a centre of trade, learning and the arts, "
             "with a cathedral, a university and a market that drew merchants from across the sea. Today the "
             "town is known for its festivals, its narrow streets and the bridges that cross the water at")


def _check_real_model(c: Client) -> None:
    info = c.model_info()
    memory = info.memory
    assert (memory["n_ubatch"], memory["n_outputs_max"]) == REAL_UBATCH
    ubatch = memory["n_outputs_max"]
    ids = c.tokenize(REAL_TEXT + " " + REAL_TEXT).token_ids  # past two ubatches of either model
    assert len(ids) > 2 * memory["n_ubatch"], (len(ids), memory)
    full = c.run(ids)
    n = full.hidden_states.shape[0]
    # Every position's logits: ubatches of n_outputs_max rows. Every hidden state without logits: ubatches of
    # n_batch rows decoded without the LM head (patches/0007), the same bits; with the last token's logits, the
    # same up to a last ubatch of 8-11 rows that has the head (where one would do, two).
    assert full.n_ubatches == -(-len(ids) // ubatch)
    bare = c.run(ids, logits=False)
    assert bare.logits is None and bare.n_ubatches == -(-len(ids) // memory["n_ubatch"])
    np.testing.assert_array_equal(bare.hidden_states, full.hidden_states)
    last = c.run(ids, logits="last")
    assert last.n_ubatches in (bare.n_ubatches, bare.n_ubatches + 1), (last.n_ubatches, bare.n_ubatches)
    np.testing.assert_array_equal(last.hidden_states, full.hidden_states)
    np.testing.assert_array_equal(last.logits, full.logits[-1:])
    for positions in ([-1], [0, -1], [ubatch, ubatch - 1, 3]):
        chosen = absolute(positions, len(ids))
        for logits in (True, "last"):
            part = c.run(ids, positions=positions, logits=logits)
            assert part.positions == chosen
            want = full.logits[chosen] if logits is True else full.logits[-1:]
            # Every block but the last computes the same rows, in ubatches of other lengths (72 and 16 rows, cut
            # on groups of four rows, the last at least 8): the same bits.
            np.testing.assert_array_equal(part.hidden_states[:n - 1], full.hidden_states[:n - 1, chosen])
            expected = full.hidden_states[n - 1, chosen]
            scale = np.abs(expected).max(axis=1, keepdims=True)
            assert_within(part.hidden_states[n - 1], expected, Q8_STEP_LAST_BLOCK * scale, f"last block {positions}")
            # the logits are the final norm and head of those states; the same budget, of the logits' scale
            assert_within(part.logits, want, Q8_STEP_LAST_BLOCK * np.abs(want).max(axis=1, keepdims=True),
                          f"logits {positions} {logits}")
    # Prompts longer than a ubatch are decoded in groups of their own: the same bits as alone.
    longest = memory["n_ubatch"]
    prompts = [ids[:longest + 3], ids, ids[:longest + 1]]
    for p, batched in zip(prompts, c.run_batch(prompts, layers=[0, c.n_layer // 2, c.n_layer - 1])):
        alone = c.run(p, layers=[0, c.n_layer // 2, c.n_layer - 1])
        for site in alone.captures:
            np.testing.assert_array_equal(batched.captures[site], alone.captures[site])
        np.testing.assert_array_equal(batched.logits, alone.logits)
    # float16: the values rounded to half a step, or a clear refusal where they do not fit
    try:
        half = c.run(ids, positions=[0, -1], dtype="float16")
    except LmscopeError as error:
        assert error.code.name == "OUT_OF_RANGE" and "float32" in error.message
        assert max(np.abs(full.hidden_states[:, [0, -1]]).max(), np.abs(full.logits[[0, -1]]).max()) >= 65520
    else:
        assert_within(half.hidden_states, full.hidden_states[:, [0, -1]],
                      U16 * np.abs(full.hidden_states[:, [0, -1]]) + 2.0 ** -25, "float16 hidden states")
    # a zero steer, an ablation and a lens on the long prompt
    zero = c.run(ids, positions=[-1], steer={c.n_layer // 2: np.zeros(c.model_info().n_embd, np.float32)})
    np.testing.assert_array_equal(zero.logits, c.run(ids, positions=[-1]).logits)
    lens = c.logit_lens(ids, positions=[-1], top_k=1)
    assert lens.top_ids.shape == (n, 1, 1)
    u = full.hidden_states[n // 2, -1] - full.hidden_states[n // 2, 0]
    ablated = c.run(ids, positions=[-1], ablate=u, logits="last")
    assert np.isfinite(ablated.logits).all()


# Ubatches of 72 tokens, at most 16 of them outputs: a request for a few positions decodes in 72-row ubatches,
# one for every position's logits in 16-row ones.
REAL_UBATCH = (72, 16)
REAL_ARGS = ("--threads", "2", "--n-ctx", "512", "--n-batch", str(REAL_UBATCH[0]), "--n-outputs", str(REAL_UBATCH[1]))


@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_the_request_space_on_real_models(name):
    from lmscope.service.model_files import pull_model

    path = pull_model(name, progress=None)
    with launch_server(path, args=REAL_ARGS) as server, Client(server.address) as c:
        _check_real_model(c)


# ----- requests cut at their output rows ---------------------------------------------------------------------

def test_a_request_cut_at_its_output_rows_is_the_uncut_one(tiny_model):
    """`--n-batch 8 --n-outputs 3`: every-position logits (or the last block at every position with logits)
    decode in ubatches of 3 rows, a few positions, or every position without logits, in ubatches of 8. The
    same rows in ubatches of other lengths: float32 sums blocked otherwise, which can flip an F16 cache entry
    (F16_CACHE of the scale, as for a batch)."""
    args = ("--threads", "1", "--n-ctx", "512", "--n-batch", "8", "--n-outputs", "3")
    prompts = [list(range(4, 4 + n)) for n in (1, 3, 7, 8, 9, 17, 25)]
    with launch_server(tiny_model, args=args) as server, Client(server.address) as c:
        memory = c.model_info().memory
        assert (memory["n_ubatch"], memory["n_outputs_max"]) == (8, 3)
        last = c.n_layer - 1
        sites = ["embed", "blocks.*.resid_post", f"blocks.{last}.ln2"]
        full = c.run_batch(prompts, capture=sites)  # every row an output: cut at 3 rows
        cut = {len(p): run for p, run in zip(prompts, full)}
        for positions in ([-1], [0, -1], [2, 0]):
            usable = [p for p in prompts if len(p) >= 3]  # no position named twice
            for ids, part in zip(usable, c.run_batch(usable, capture=sites, positions=positions)):
                chosen = absolute(positions, len(ids))
                whole = cut[len(ids)]
                for site in part.captures:
                    assert_close_to_scale(part.captures[site], whole.captures[site][chosen], F16_CACHE,
                                          f"{site} at {chosen} of a {len(ids)}-token prompt")
                assert_close_to_scale(part.logits, whole.logits[chosen], F16_CACHE, f"logits at {chosen}")
            for ids, last_only in zip(usable, c.run_batch(usable, capture=[], logits="last")):
                assert_close_to_scale(last_only.logits, cut[len(ids)].logits[-1:], F16_CACHE, "last logits")
        # every row an output without logits: ubatches of 8 rows without the LM head
        bare = c.run_batch(prompts, capture=sites, logits=False)
        assert bare[0].n_ubatches < full[0].n_ubatches
        for ids, run in zip(prompts, bare):
            for site in run.captures:
                assert_close_to_scale(run.captures[site], cut[len(ids)].captures[site], F16_CACHE,
                                      f"{site} of a {len(ids)}-token prompt without logits")
        # every row an output, each prompt's last logits: the prompts share ubatches, and a ubatch that holds a
        # prompt's last row computes the head (at most 3 outputs and the spare rows' limit), the others do not
        last = c.run_batch(prompts, capture=sites, logits="last")
        for ids, run in zip(prompts, last):
            assert_close_to_scale(run.logits, cut[len(ids)].logits[-1:], F16_CACHE, f"last logits of {len(ids)}")
            for site in run.captures:
                assert_close_to_scale(run.captures[site], cut[len(ids)].captures[site], F16_CACHE,
                                      f"{site} of a {len(ids)}-token prompt with its last logits")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_computes_the_head_only_where_logits_are_wanted(name, tmp_path):
    """`--n-batch 8 --n-outputs 4`: the last block at every position decodes in ubatches of 8 rows where no
    row's logits are wanted, without the LM head (patches/0006-0007: the graph ends at the final norm), in
    ubatches of 4 where each row's are, and with the last row's, in one of 8 and short ones to the end: the same
    sites, the final norm included, within F16_CACHE of the scale (rows in ubatches of other lengths, as
    above). A mixture decodes each prompt in ubatches of 4 rows whatever it asks (--batch-invariant, so that no
    float32 difference moves a token to another expert): the same bits, for the experts' sites too, and a
    mixture's position subset and batch of mixed lengths are the full run indexed and the prompts alone."""
    moe = FAMILIES[name].n_expert > 0
    args = ("--threads", "1", "--n-ctx", "512", "--n-batch", "8", "--n-outputs", "4") + (
        ("--batch-invariant",) if moe else ())
    path = build_tiny_model(tmp_path / f"{name}.gguf", family=name)
    with launch_server(path, args=args) as server, Client(server.address) as c:
        ids = list(range(FIRST_CONTROL_FREE_ID, FIRST_CONTROL_FREE_ID + 13))
        sites = ["embed", "blocks.*.resid_post", "blocks.*.mlp_out", "ln_final"] + (
            ["blocks.*.mlp.router", "blocks.*.mlp.experts.*"] if moe else [])
        every = c.run(ids, capture=sites, logits=True)
        runs = {"last": c.run(ids, capture=sites, logits="last"), "none": c.run(ids, capture=sites, logits=False)}
        assert runs["none"].logits is None and "ln_final" in runs["none"].captures
        calls = {logits: run.n_ubatches for logits, run in runs.items()}
        assert (every.n_ubatches, calls) == ((4, {"last": 4, "none": 4}) if moe else (4, {"last": 3, "none": 2}))
        for logits, run in runs.items():
            assert set(run.captures) == set(every.captures)
            for site, expected in every.captures.items():
                if moe:
                    np.testing.assert_array_equal(run.captures[site], expected, err_msg=f"{site} ({logits})")
                else:
                    assert_close_to_scale(run.captures[site], expected, F16_CACHE, f"{site} ({logits})")
        last = runs["last"].logits
        if moe:
            np.testing.assert_array_equal(last, every.logits[-1:])
        else:
            assert_close_to_scale(last, every.logits[-1:], F16_CACHE, "the last row's logits")
        # A call with the head right after one without, of the same shape (4 rows, all outputs), builds its own
        # graph: llama.cpp reuses a graph only where the head is switched alike (patches/0007), else it would
        # leave the logits of the call before. The same rows in a 5-token prompt are the reference.
        short = ids[:4]
        c.run(short, capture=sites, logits=False)
        after = c.run(short, capture=sites, logits=True)
        reference = c.run(ids[:5], capture=sites, positions=[0, 1, 2, 3], logits=True)
        tolerance = 0 if moe else F16_CACHE
        assert_close_to_scale(after.logits, reference.logits, tolerance, "logits after a call without the head")
        # the first request again: the same bits
        again = c.run(ids, capture=sites, logits=True)
        np.testing.assert_array_equal(again.logits, every.logits)
        np.testing.assert_array_equal(again.hidden_states, every.hidden_states)
        if moe:
            # A subset: the same cuts, and every block but the last the same bits; llama.cpp computes the last
            # block for the output rows only, 3 rows here against 13, whose products round otherwise.
            part = c.run(ids, capture=sites, positions=[0, 5, -1], logits=True)
            last_block = f"blocks.{c.n_layer - 1}."
            for site, expected in every.captures.items():
                if site.startswith(last_block) or site == "ln_final":
                    assert_close_to_scale(part.captures[site], expected[[0, 5, -1]], F16_CACHE, f"{site} subset")
                else:
                    np.testing.assert_array_equal(part.captures[site], expected[[0, 5, -1]], err_msg=f"{site} subset")
            assert_close_to_scale(part.logits, every.logits[[0, 5, -1]], F16_CACHE, "logits of a subset")
            prompts = [ids[:3], ids, ids[2:9]]
            for prompt, batched in zip(prompts, c.run_batch(prompts, capture=sites, logits="last")):
                alone = c.run(prompt, capture=sites, logits="last")
                for site, expected in alone.captures.items():
                    np.testing.assert_array_equal(batched.captures[site], expected, err_msg=f"{site} in a batch")
                np.testing.assert_array_equal(batched.logits, alone.logits)


# ----- the options that remove what observing and batching change --------------------------------------------

def test_with_plain_attention_and_batch_invariance_observing_and_batching_change_no_bit(tiny_model):
    """`--flash-attn off`: every pass runs the kernel an attention capture needs, so capturing a pattern
    changes nothing else; `--batch-invariant`: each prompt is decoded in ubatches and cells of its own, so
    it gets the bits it gets alone, short prompts included."""
    args = SERVER_ARGS + ("--flash-attn", "off", "--batch-invariant")
    with launch_server(tiny_model, args=args) as server, Client(server.address) as c:
        info = c.model_info()
        assert not info.flash_attention and info.batch_invariant
        prompts = [[5, 9, 13], list(range(4, 4 + 3 * UBATCH + 1)), [100, 200], list(range(300, 300 + UBATCH))]
        sites = ["embed", "blocks.*.resid_post", "blocks.*.attn_out"]
        batch = c.run_batch(prompts, capture=sites + ["blocks.1.attn.pattern"])
        for p, batched in zip(prompts, batch):
            alone = c.run(p, capture=sites)
            for site in alone.captures:
                np.testing.assert_array_equal(batched.captures[site], alone.captures[site])
            np.testing.assert_array_equal(batched.logits, alone.logits)


def test_float16_refuses_values_it_cannot_hold_instead_of_sending_infinities(client):
    """Gemma's residual stream reaches 1e5; float16 holds at most 65,504: such an answer is refused with a
    message that names the site and the fix, never sent as inf."""
    from lmscope.client.interventions import Intervention

    big = [Intervention("set", "blocks.1.resid_post", np.full(64, 7e4, np.float32), positions=[1])]
    ids = list(range(10, 10 + 3))
    wide = client.run(ids, interventions=big, layers=[0, 1], logits=False)
    assert np.abs(wide.resid_post(1)).max() == np.float32(7e4)
    with pytest.raises(LmscopeError) as refused:
        client.run(ids, interventions=big, layers=[0, 1], logits=False, dtype="float16")
    assert refused.value.code.name == "OUT_OF_RANGE"
    assert "blocks.1.resid_post" in refused.value.message and "float32" in refused.value.message
    half = client.run(ids, interventions=big, layers=[0], logits=False, dtype="float16")  # block 0 fits
    assert_within(half.resid_post(0), wide.resid_post(0), U16 * np.abs(wide.resid_post(0)) + 2.0 ** -25, "block 0")
