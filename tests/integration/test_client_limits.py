"""The client keeps within the server's limits (`ModelInfo.limits`) and answers bad arguments with `LmscopeError`.

One server on the tiny model with tight limits: at most 64 ids per token list (Detokenize included), 4 prompts
per request and 1 MiB per answer. Every analysis that looks tokens up or batches prompts must work whatever
the sizes the user asked for: the client splits what it sends (GitHub issue #22).
"""
from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from tolerances import SAME_KERNELS, assert_same_as_alone

from lmscope.client import Client
from lmscope.client.activation_patching import logit_difference
from lmscope.client.errors import LmscopeError
from lmscope.client.token_labels import snippet, token_labels
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service.launch import launch_server

MAX_TOKENS, MAX_PROMPTS = 64, 4
LIMIT_ARGS = ("--threads", "1", "--n-ctx", "256", "--max-prompt-tokens", str(MAX_TOKENS),
              "--max-batch-prompts", str(MAX_PROMPTS), "--max-capture-mb", "1")
MIB = 1 << 20


@pytest.fixture(scope="module")
def limited(tiny_model):
    with launch_server(tiny_model, args=LIMIT_ARGS) as server:
        with Client(server.address) as c:
            limits = c.model_info().limits
            assert (limits["max_prompt_tokens"], limits["max_batch_prompts"]) == (MAX_TOKENS, MAX_PROMPTS)
            assert limits["max_capture_bytes"] == MIB
            yield c


def ids(n: int, seed: int) -> list[int]:
    """A token-id prompt of n ordinary tokens (ids 4.. skip the tiny vocabulary's special tokens)."""
    return np.random.default_rng(seed).integers(4, 500, size=n).tolist()


def answer_bytes(run) -> int:
    return sum(a.nbytes for a in run.captures.values()) + (run.logits.nbytes if run.logits is not None else 0)


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lmscope.client" and "was refused" in r.getMessage()]


# ----- token lookups: every Detokenize the client makes fits max_prompt_tokens ---------------------------------


def test_token_pieces_of_more_ids_than_one_request_holds(limited):
    everything = list(range(limited.model_info().n_vocab))  # 500 ids: 8 requests of at most 64
    pieces = limited.token_pieces(everything)
    assert len(pieces) == len(everything) and all(isinstance(p, bytes) for p in pieces)
    for start in range(0, len(everything), MAX_TOKENS):
        part = everything[start:start + MAX_TOKENS]
        answer = limited.call("Detokenize", pb.DetokenizeRequest(token_ids=part))
        assert pieces[start:start + MAX_TOKENS] == list(answer.pieces)
    assert limited.tokenize_pieces(everything) == [p.decode("utf-8", "replace") for p in pieces]
    assert limited.token_pieces([]) == []
    table = limited.top_k(np.arange(500, dtype=np.float32), k=100)  # 100 pieces looked up at once
    assert table.pieces == limited.tokenize_pieces(range(499, 399, -1))


def test_logit_lens_with_more_distinct_tokens_than_the_limit(limited):
    prompt = ids(30, seed=1)
    lens = limited.logit_lens(prompt, top_k=5)
    unique = set(np.unique(lens.top_ids).tolist()) | set(prompt)
    assert len(unique) > MAX_TOKENS  # the lookup the lens makes cannot fit one Detokenize request
    assert set(lens.token_pieces) == unique
    for t in unique:
        assert lens.token_pieces[t] == limited.call("Detokenize", pb.DetokenizeRequest(token_ids=[t])).pieces[0]
    assert lens.prompt_tokens == [lens.token_pieces[t].decode("utf-8", "replace") for t in prompt]


def test_top_activating_with_more_context_tokens_than_the_limit(limited):
    prompts = [ids(14, seed=10 + p) for p in range(6)]
    layer, neuron, k, context = 1, 7, 40, 6
    result = limited.top_activating(prompts, layer, neuron, k=k, context=context, batch_size=MAX_PROMPTS,
                                    progress=False)
    assert len(result.hits) == k
    assert sum(min(len(prompts[h.prompt]), h.position + context + 1) - max(0, h.position - context)
               for h in result.hits) > MAX_TOKENS  # the windows' ids cannot fit one Detokenize request
    for p, prompt in enumerate(prompts):
        # Batched (4 prompts, 56 rows) against alone: the same kernels row by row (SAME_KERNELS).
        alone = limited.neurons(prompt, layer).activations[:, neuron]
        np.testing.assert_allclose(result.activations[p], alone, rtol=SAME_KERNELS, atol=SAME_KERNELS)
    ranked = sorted(((float(a), p, i) for p, column in enumerate(result.activations) for i, a in enumerate(column)),
                    key=lambda hit: -hit[0])
    assert [(h.prompt, h.position, h.activation) for h in result.hits] == [(p, i, a) for a, p, i in ranked[:k]]
    for hit in result.hits:
        start = max(0, hit.position - context)
        window = limited.token_pieces(prompts[hit.prompt][start:hit.position + context + 1])
        assert hit.token == token_labels(window)[hit.position - start]
        assert hit.context == snippet(window, hit.position - start)


# ----- batches: at most max_batch_prompts prompts per request, split when an answer is too big ---------------


def test_run_batch_with_a_batch_size_above_max_batch_prompts(limited, caplog):
    caplog.set_level(logging.INFO, logger="lmscope.client")
    prompts = [ids(8 + 3 * p, seed=20 + p) for p in range(5)]
    runs = limited.run_batch(prompts, batch_size=64)
    assert not refusals(caplog)  # clamped to the server's 4 before sending, never refused
    assert len(runs) == len(prompts)
    for prompt, run in zip(prompts, runs):
        assert run.token_ids == prompt
        assert_same_as_alone(run, limited.run(prompt))  # batches of at most 50 rows (< 64)
    assert [r.token_ids for r in limited.iter_runs(prompts, batch_size=1000, logits="last")] == prompts


def test_run_batch_splits_requests_whose_answer_is_over_max_capture_bytes(limited, caplog):
    caplog.set_level(logging.INFO, logger="lmscope.client")
    long = [ids(31, seed=30 + p) for p in range(5)]
    short = [ids(6, seed=40 + p) for p in range(5)]
    prompts = [short[0], long[0], long[1], short[1],   # refused; halves (s, l) and (l, s) fit
               long[2], short[2], long[3], long[4],    # refused; (l, s) fits, (l, l) refused again: l, l
               short[3], short[4]]                     # fits
    alone = [limited.run(p, capture="*") for p in prompts]
    size = dict(zip(map(tuple, prompts), (answer_bytes(run) for run in alone)))
    # The premise: one long prompt's answer fits the 1 MiB limit, two do not; a short one fits with a long one.
    assert max(size.values()) < MIB < min(size[tuple(a)] + size[tuple(b)] for a in long for b in long if a != b)
    assert max(size[tuple(a)] + size[tuple(b)] for a in long for b in short) < MIB
    runs = limited.run_batch(prompts, batch_size=4, capture="*")
    assert len(refusals(caplog)) == 3
    assert [r.token_ids for r in runs] == prompts
    for run, single in zip(runs, alone):
        assert_same_as_alone(run, single)  # parts of at most 37 rows (< 64)
        assert run.captures.keys() == single.captures.keys()
        for site, array in run.captures.items():
            np.testing.assert_allclose(array, single.captures[site], rtol=SAME_KERNELS, atol=SAME_KERNELS,
                                       err_msg=site)
    # A single prompt whose answer is too big still gets the server's error, alone or after a split.
    big = ids(MAX_TOKENS, seed=50)
    for batch in ([big], [short[0], big]):
        with pytest.raises(LmscopeError) as info:
            limited.run_batch(batch, capture="*")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the server's limit of 1 MiB: capture fewer sites" in info.value.message


def test_patch_sweep_batches_are_split_with_their_own_interventions(limited):
    clean = ids(12, seed=60)
    corrupted = list(clean)
    corrupted[4] = (clean[4] + 1) % 500 or 4
    metric = logit_difference(7, 8)
    batched = limited.patch_sweep(clean, corrupted, metric=metric, positions=[2, 4, -1], batch_size=32)
    single = limited.patch_sweep(clean, corrupted, metric=metric, positions=[2, 4, -1], batch_size=1)
    logits = limited.run(corrupted, logits="last").logits
    # Batches of 4 prompts (48 rows) against single runs: the same kernels row by row; a logit difference is
    # within twice SAME_KERNELS of the largest logit (as in tests/integration/test_inside.py).
    same = 2 * SAME_KERNELS * (1 + float(np.abs(logits).max()))
    np.testing.assert_allclose(batched.values, single.values, rtol=0, atol=same)
    assert np.ptp(single.values) > 100 * same  # the cells differ: a mixed-up intervention would show


def test_split_run_request_keeps_each_interventions_sequences():
    from lmscope.client.core import split_run_request

    vector = pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=np.ones(2, np.float32).tobytes())
    edits = [pb.Intervention(op=pb.Intervention.SET, sites=["embed"], vector=vector, sequences=[0]),
             pb.Intervention(op=pb.Intervention.ADD, sites=["embed"], vector=vector, sequences=[2, 4]),
             pb.Intervention(op=pb.Intervention.ABLATE, sites=["embed"], vector=vector)]
    request = pb.RunRequest(prompts=[pb.Prompt(token_ids=[i + 4]) for i in range(5)], capture=["embed"],
                            positions=[-1], logits=pb.LOGITS_LAST, interventions=edits)
    halves = split_run_request(request)
    assert [[p.token_ids[0] for p in h.prompts] for h in halves] == [[4, 5, 6], [7, 8]]
    assert [[(e.op, list(e.sequences)) for e in h.interventions] for h in halves] == [
        [(pb.Intervention.SET, [0]), (pb.Intervention.ADD, [2]), (pb.Intervention.ABLATE, [])],
        [(pb.Intervention.ADD, [1]), (pb.Intervention.ABLATE, [])]]
    for half in halves:
        assert (list(half.capture), list(half.positions), half.logits) == (["embed"], [-1], pb.LOGITS_LAST)
    assert [len(p.prompts) for p in split_run_request(request, 2)] == [2, 2, 1]
    assert split_run_request(pb.RunRequest(prompts=request.prompts[:1])) is None


# ----- bad arguments: LmscopeError with a message that says what to fix ------------------------------------------


@pytest.mark.parametrize("call", [
    lambda c: c.run_batch(["a b c"], batch_size=0),
    lambda c: c.run_batch(["a b c"], batch_size=-1),
    lambda c: c.run_batch(["a b c"], batch_size=1.5),
    lambda c: c.iter_runs(["a b c"], batch_size=0),
    lambda c: c.embed(["a b c"], batch_size=0),
    lambda c: c.top_activating(["a b c"], 0, 0, batch_size=0, progress=False),
    lambda c: c.patch_sweep("a b c", "a b d", metric=logit_difference(7, 8), batch_size=-2),
], ids=["run_batch-0", "run_batch-negative", "run_batch-float", "iter_runs", "embed", "top_activating",
        "patch_sweep"])
def test_a_bad_batch_size_is_invalid_argument(limited, call):
    with pytest.raises(LmscopeError) as info:
        call(limited)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch_size must be a positive int" in info.value.message


def test_embedding_no_texts_gives_an_empty_result(limited):
    n_embd = limited.model_info().n_embd
    for pooling in ("mean", "last"):
        empty = limited.embed([], pooling=pooling)
        assert empty.shape == (0, n_embd) and empty.dtype == limited.embed(["a b"], pooling=pooling).dtype
    assert limited.embed([], pooling="none") == []
    assert limited.run_batch([]) == []


@pytest.mark.parametrize("call", [
    lambda c, p: c.run(p, chat=True),
    lambda c, p: c.run_batch([p, p], chat=True),
    lambda c, p: c.generate(p, chat=True, max_tokens=2),
], ids=["run", "run_batch", "generate"])
def test_chat_with_token_ids_is_refused_not_ignored(limited, call):
    prompt = limited.tokenize("hello world").token_ids
    with pytest.raises(LmscopeError) as info:
        call(limited, prompt)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat=true needs text, not token ids" in info.value.message
    call(limited, "hello world")  # text with the chat template is fine
