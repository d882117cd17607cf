"""The engine's shortcuts for speed change no result.

- A pass that needs no logits ends the graph after the last wanted node: captures must equal those of a
  full pass (and the numpy reference), also when the prompt spans several ubatches, whose later pieces
  read the KV cache the earlier, shortened ones wrote.
- The KV cache is emptied without zeroing its data: what an earlier request left in the cells, extreme
  edits included, must not reach a later request.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from tolerances import FLASH_F16, assert_same_as_alone

from lmscope.client import Client, Intervention
from lmscope.service import procinfo
from lmscope.service.launch import launch_server
from lmscope.service.worker import openmp_wait_settings

PROMPT_WORDS = "one two three four five six seven eight nine ten " * 4


@pytest.fixture(scope="module")
def small_batch_client(tiny_model):
    # n_batch 16: a 40-token prompt is decoded as three ubatches.
    with launch_server(tiny_model, args=("--threads", "2", "--n-ctx", "256", "--n-batch", "16")) as server:
        with Client(server.address) as c:
            yield c


@pytest.mark.parametrize("capture", [
    ["blocks.1.resid_post"],                                   # ends mid-graph, layers 2-3 skipped
    ["blocks.2.attn.q"],                                       # ends before layer 2 stores its KV
    ["embed", "blocks.*.resid_post"],                          # ends before the final norm and LM head
    ["blocks.0.mlp.post", "blocks.3.resid_mid", "ln_final"],   # last-layer output rows, sites out of order
])
def test_a_pass_without_logits_captures_what_a_full_pass_captures(small_batch_client, reference, capture):
    ids = small_batch_client.tokenize(PROMPT_WORDS).token_ids
    assert len(ids) > 32
    shortened = small_batch_client.run(ids, capture=capture, logits=False)
    full = small_batch_client.run(ids, capture=capture, logits=True)
    assert shortened.captures.keys() == full.captures.keys() and shortened.logits is None
    for site, array in full.captures.items():
        np.testing.assert_array_equal(shortened.captures[site], array, err_msg=site)


def test_a_shortened_multi_ubatch_pass_matches_the_numpy_reference(small_batch_client, reference):
    ids = small_batch_client.tokenize(PROMPT_WORDS).token_ids
    run = small_batch_client.run(ids, capture=["blocks.2.resid_post"], logits=False)
    got, expected = run.captures["blocks.2.resid_post"], reference.forward(ids)["resid_post"][2]
    # Flash attention (on when no pattern is captured) accumulates softmax(QK) V in float16.
    np.testing.assert_allclose(got, expected, atol=FLASH_F16)


def test_an_edited_request_leaves_nothing_behind_for_the_next_one(small_batch_client):
    # Without flash attention (patterns captured) masked cache cells are multiplied by zero probabilities.
    ids = small_batch_client.tokenize(PROMPT_WORDS).token_ids
    capture = ["blocks.3.resid_post", "blocks.3.attn.pattern"]
    before = small_batch_client.run(ids[:20], capture=capture)
    huge = np.full(small_batch_client.model_info().n_embd, 1e15, np.float32)  # the largest edit accepted
    edited = small_batch_client.run(ids, capture=capture,
                                    interventions=[Intervention("set", "blocks.1.resid_post", huge, positions=[5])])
    assert not np.allclose(edited.captures["blocks.3.resid_post"][:20], before.captures["blocks.3.resid_post"])
    after = small_batch_client.run(ids[:20], capture=capture)
    for site in capture:
        np.testing.assert_array_equal(after.captures[site], before.captures[site], err_msg=site)
    np.testing.assert_array_equal(after.logits, before.logits)


def _worker_environments(server) -> list[dict[str, str]]:
    return [dict(item.split("=", 1) for item in open(f"/proc/{c}/environ").read().split("\0") if "=" in item)
            for c in procinfo.worker_pids(server.process.pid)]


def test_workers_spin_briefly_between_openmp_regions_unless_they_outnumber_the_cores(tiny_server, client):
    client.model_info()
    workers = _worker_environments(tiny_server)
    assert workers
    variables = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    # a setting the user made is kept; otherwise the server's one worker of 2 threads (--threads 2)
    expected = ({k: os.environ[k] for k in variables if k in os.environ}
                or openmp_wait_settings({}, n_threads=2, n_workers=1))
    for environment in workers:
        assert {k: environment[k] for k in variables if k in environment} == expected
    # numpy's BLAS gets the worker's threads (--threads 2 here), not every core; a setting the user made is kept.
    assert all(e.get("OPENBLAS_NUM_THREADS") == os.environ.get("OPENBLAS_NUM_THREADS", "2") for e in workers)


def test_workers_that_outnumber_the_cores_wait_passively():
    cores = os.cpu_count() or 1
    assert openmp_wait_settings({}, n_threads=cores, n_workers=1) == {"GOMP_SPINCOUNT": "1000"}
    assert openmp_wait_settings({}, n_threads=cores, n_workers=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_wait_settings({}, n_threads=cores + 1, n_workers=1) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_wait_settings({"OMP_WAIT_POLICY": "ACTIVE"}, n_threads=cores, n_workers=2) == {}
    assert openmp_wait_settings({"GOMP_SPINCOUNT": "0"}, n_threads=1, n_workers=1) == {}


def test_workers_share_the_cores_unless_told_otherwise(tiny_model):
    """Without --threads, two workers get half the cores each (at least one), for llama.cpp and BLAS alike."""
    with launch_server(tiny_model, args=("--workers", "2", "--n-ctx", "256")) as server:
        workers = _worker_environments(server)
    assert len(workers) == 2
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(e.get("OPENBLAS_NUM_THREADS") == os.environ.get("OPENBLAS_NUM_THREADS", share) for e in workers)


def test_a_request_may_hold_more_prompts_than_a_context_has_sequences(small_batch_client):
    """With 16-token ubatches a context has 16 sequences (llama.cpp: n_seq_max <= n_batch), as Gemma 3's
    vocabulary-sized ubatches give; a request of 24 prompts is decoded in groups, each prompt still the
    same as alone. llama.cpp refuses a sequence id past n_seq_max (llama_decode -1)."""
    words = PROMPT_WORDS.split()
    prompts = [" ".join(words[i:i + 2]) for i in range(24)]
    batch = small_batch_client.run_batch(prompts, batch_size=24)
    for prompt, run in zip(prompts, batch):
        assert_same_as_alone(run, small_batch_client.run(prompt))
