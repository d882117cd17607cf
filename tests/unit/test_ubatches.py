"""How the decode loop cuts a request into llama.cpp calls (`Contexts.groups`, `Contexts.ubatches`).

llama.cpp aborts the whole process on a call with more tokens than n_batch or more output rows than its
logits buffer holds (n_outputs_max in a call with the LM head), so these limits are checked here on every
shape hypothesis draws, without a model: the cutting is pure Python over `Row`s. The cuts also carry the rules that
make a row's numbers independent of the request's shape: every cut on a multiple of `ROW_GROUP` rows from
the group's start, a group's last ubatch at least `MIN_UBATCH_ROWS` long (or else two rows) where the limits
allow, and otherwise the longest ubatches the limits allow (what makes a request that wants few output rows
decode in whole ubatches).
"""
from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lmscope.service.batching import HEAD_SPARE_ROWS, MIN_UBATCH_ROWS, ROW_GROUP, Contexts, Row, head_spare_rows


def contexts(n_batch: int, n_outputs_max: int, n_seq_max: int, share: bool = True,
             skip_head: bool = True, spare: int = HEAD_SPARE_ROWS) -> Contexts:
    """`skip_head`: whether llama.cpp can leave the LM head out of a call (patches/; a plain build cannot)."""
    made = Contexts(None, n_ctx=4096, n_batch=n_batch, n_outputs_max=n_outputs_max, n_seq_max=n_seq_max,
                    n_threads=1, prompts_share_ubatches=share, head_spare_rows=spare)
    made.can_skip_head = skip_head
    return made


@st.composite
def requests(draw):
    n_batch = draw(st.integers(2, 12))
    n_outputs_max = draw(st.integers(2, n_batch + 3))
    n_seq_max = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, 30), min_size=1, max_size=6))
    prompts = [[100 + 7 * s + p for p in range(n)] for s, n in enumerate(lengths)]
    outputs = [set(draw(st.lists(st.integers(0, n - 1), max_size=n))) | {n - 1} for n in lengths]
    logits = [set(draw(st.lists(st.sampled_from(sorted(out)), max_size=len(out)))) for out in outputs]
    share, skip_head = draw(st.booleans()), draw(st.booleans())
    spare = draw(st.integers(HEAD_SPARE_ROWS, HEAD_SPARE_ROWS + 20))
    return contexts(n_batch, n_outputs_max, n_seq_max, share, skip_head, spare), prompts, outputs, logits


@given(requests())
@settings(max_examples=300, deadline=None, derandomize=True)
def test_ubatches_keep_order_and_both_limits_cut_on_row_groups_and_are_as_long_as_they_allow(request):
    ctx, prompts, outputs, logits = request
    n_out_max = ctx.n_outputs_max
    assert ctx.n_seq_max <= n_out_max <= ctx.n_batch  # llama.cpp reserves n_seq_max output rows at least
    longest = ctx.n_batch if ctx.prompts_share_ubatches else n_out_max
    seen = []
    for group in ctx.groups(prompts):
        assert len(group) <= ctx.n_seq_max
        ubatches = list(ctx.ubatches(group, prompts, outputs, logits))
        rows = [row for ubatch in ubatches for row in ubatch]
        assert rows == [Row(token, p, s, p in outputs[s], p in logits[s])
                        for s in group for p, token in enumerate(prompts[s])]

        def fits(a: int, b: int) -> bool:
            """A call with the head (a row's logits wanted, or a build that cannot leave it out) holds at
            most n_outputs_max output rows, and where the head can be left out at most HEAD_SPARE_ROWS of
            them without their logits wanted (prompts cut by their length alone aside); one without, a whole
            ubatch."""
            wanted = any(row.logits for row in rows[a:b])
            head = wanted or not ctx.can_skip_head
            outputs = sum(row.output for row in rows[a:b])
            spare = sum(row.output and not row.logits for row in rows[a:b])
            if wanted and ctx.can_skip_head and ctx.prompts_share_ubatches and spare > ctx.head_spare_rows:
                return False
            return b - a <= longest and outputs <= (n_out_max if head else ctx.n_batch)

        ends = list(itertools.accumulate(len(u) for u in ubatches))
        starts = [0] + ends[:-1]
        for k, (a, b) in enumerate(zip(starts, ends)):
            assert 0 < b - a and fits(a, b)
            if k + 1 == len(ubatches):
                continue
            aligned = b - b % ROW_GROUP
            assert aligned == b or aligned - a < ROW_GROUP  # only limits below ROW_GROUP cut elsewhere
            grown = min(aligned + ROW_GROUP, len(rows))
            if k + 2 < len(ubatches):  # cut only where the next aligned end would break a limit
                assert not fits(a, grown)
            elif fits(a, grown):  # the one before the last may only have given rows to the last
                assert len(rows) - b >= 2 and b - a >= 2
        if len(ubatches) > 1:  # a short last ubatch: the limits say so
            a, b = starts[-2], ends[-2]
            granule = ROW_GROUP if b % ROW_GROUP == 0 and b - a >= ROW_GROUP else 1
            for wanted in (MIN_UBATCH_ROWS, 2):
                if len(ubatches[-1]) < wanted:
                    given_up = -(-(wanted - len(ubatches[-1])) // granule) * granule
                    assert b - given_up - a < wanted or not fits(b - given_up, len(rows)), wanted
        seen += group
    assert seen == list(range(len(prompts)))


def test_few_outputs_decode_in_whole_ubatches_and_every_row_an_output_in_output_sized_ones():
    ctx = contexts(n_batch=64, n_outputs_max=16, n_seq_max=16)
    prompt = list(range(150))
    every = set(range(150))
    last_only = [len(u) for u in ctx.ubatches([0], [prompt], [{149}], [{149}])]
    every_row = [len(u) for u in ctx.ubatches([0], [prompt], [every], [every])]
    assert last_only == [64, 64, 22]
    assert every_row == [16] * 8 + [12, 10]  # the last ubatch takes a row group from the one before
    assert [len(u) for u in ctx.ubatches([0], [prompt[:131]], [{130}], [{130}])] == [64, 56, 11]
    small = contexts(n_batch=8, n_outputs_max=3, n_seq_max=1)  # limits too short for 8 rows: at least two
    assert [len(u) for u in small.ubatches([0], [prompt[:25]], [{24}], [{24}])] == [8, 8, 4, 5]
    assert [len(u) for u in small.ubatches([0], [prompt[:25]], [set(range(25))], [set(range(25))])] == [3] * 7 + [2, 2]


def test_every_rows_last_block_decodes_in_whole_ubatches_and_the_head_only_where_logits_are_wanted():
    """Every row an output (the last block's sites at every position): without logits, whole ubatches
    without the LM head; with the last row's logits, whole ubatches up to a short last one that has the head;
    a build that cannot leave the head out decodes both in output-sized ubatches."""
    ctx = contexts(n_batch=64, n_outputs_max=16, n_seq_max=16)
    prompt = list(range(150))
    every = set(range(150))
    assert [len(u) for u in ctx.ubatches([0], [prompt], [every], [set()])] == [64, 64, 22]
    ubatches = list(ctx.ubatches([0], [prompt], [every], [{149}]))
    assert [len(u) for u in ubatches] == [64, 64, 12, 10]
    assert [any(row.logits for row in u) for u in ubatches] == [False, False, False, True]
    plain = contexts(n_batch=64, n_outputs_max=16, n_seq_max=16, skip_head=False)
    for logits in (set(), {149}):
        assert [len(u) for u in plain.ubatches([0], [prompt], [every], [logits])] == [16] * 8 + [12, 10]
    # Where a call costs more than the head's rows (a small vocabulary), a short prompt stays in one call.
    cheap_head = contexts(n_batch=64, n_outputs_max=32, n_seq_max=16, spare=40)
    assert [len(u) for u in cheap_head.ubatches([0], [prompt[:30]], [set(range(30))], [{29}])] == [30]
    assert [len(u) for u in ctx.ubatches([0], [prompt[:30]], [set(range(30))], [{29}])] == [20, 10]


def test_a_call_with_the_head_carries_spare_rows_while_they_cost_less_than_another_call():
    """Rows of the head against rows of the blocks: the real models' parameter counts."""
    assert head_spare_rows(block_params=100_000_000, head_params=262_144 * 640) == 22  # Gemma 3
    assert head_spare_rows(block_params=106_000_000, head_params=49_152 * 576) == 72  # SmolLM2
    assert head_spare_rows(block_params=0, head_params=0) == HEAD_SPARE_ROWS


def test_batch_invariant_ubatches_depend_on_the_prompt_alone():
    """--batch-invariant: the same cut whatever the request wants of the prompt (kernels whose rounding
    depends on a ubatch's length then give every request shape the same numbers)."""
    ctx = contexts(n_batch=64, n_outputs_max=16, n_seq_max=16, share=False)
    prompt = list(range(150))
    for outputs in ({149}, set(range(150)), {3, 70, 149}):
        for logits in (set(), {149}, outputs):
            assert [len(u) for u in ctx.ubatches([0], [prompt], [outputs], [logits])] == [16] * 8 + [12, 10]


def test_the_output_limit_caps_the_sequences_of_a_context():
    assert contexts(n_batch=512, n_outputs_max=16, n_seq_max=64).n_seq_max == 16
    assert contexts(n_batch=8, n_outputs_max=64, n_seq_max=64).n_outputs_max == 8
