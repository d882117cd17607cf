"""What a worker holds resident: one llama.cpp context, sized to the requests (`service/batching.py`), and
the model file counted once (`service/gguf_index.py`).

A context's results do not depend on the size it has grown to, nor on which requests came before. Why exact
equality: a context holds n cells (256, 512, 1024, ...: multiples of 256); llama.cpp builds each
ubatch's graph over the used cells rounded up to 256, so a request that fits a 256-cell context is computed
over the same cells, by the same kernels, in a bigger one, and a 600-token request over 768 cells whether its
context was created for it or grown to it after short requests. Cells past the used ones are masked to -inf
before the softmax (weight exactly 0, whatever stale K/V they hold from an earlier request: finite values), so
every float operation is the same and the same thread count gives the same bits.
"""
from __future__ import annotations

import numpy as np
import pytest

from lmscope.client import Client
from lmscope.service.launch import launch_server
from lmscope.service.procinfo import rss_bytes, worker_pids

ARGS = ("--threads", "2", "--n-ctx", "1024")
PATTERN = "blocks.1.attn.pattern"  # capturing it turns flash attention off for the request
HIDDEN = ["embed", "blocks.0.resid_post", "blocks.3.resid_post"]


def _prompt(n: int, n_vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, n_vocab, n).tolist()


def _requests(c: Client, prompt: list[int]) -> dict[str, np.ndarray]:
    """A flash run (hidden states + logits), a non-flash run (attention pattern), and greedy generation."""
    flash = c.run(prompt, capture=HIDDEN)
    plain = c.run(prompt, capture=HIDDEN + [PATTERN])
    generated = c.generate(prompt, max_tokens=8)
    out = {f"flash {k}": v for k, v in flash.captures.items()}
    out.update({f"plain {k}": v for k, v in plain.captures.items()})
    out.update({"flash logits": flash.logits, "plain logits": plain.logits,
                "generated": np.asarray(generated.token_ids)})
    return out


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_grown_context_gives_what_a_fresh_server_gives(tiny_model):
    with launch_server(tiny_model, args=ARGS) as server, Client(server.address) as c:
        n_vocab = c.model_info().n_vocab
        short, long = _prompt(40, n_vocab, 1), _prompt(600, n_vocab, 2)  # 48 cells (256); 608 cells (1024)
        short_first = _requests(c, short)
        long_after_short = _requests(c, long)  # the context grows from 256 to 1024 cells
        short_in_grown = _requests(c, short)
    with launch_server(tiny_model, args=ARGS) as server, Client(server.address) as c:
        long_fresh = _requests(c, long)
    assert long_after_short["plain " + PATTERN].shape == (4, 600, 600)  # (heads, positions, keys)
    _assert_same(long_after_short, long_fresh)
    _assert_same(short_in_grown, short_first)


def test_the_worker_holds_one_context_sized_to_its_requests(smol_model):
    """SmolLM2's KV cache is 30 layers x (K + V) x 3 heads x 64 x 2 bytes = 22.5 KiB per cell, all resident
    (llama.cpp clears it at creation): 5.6 MiB at 256 cells, 45 MiB at 2048. A 1500-token request grows the
    worker by about the 39.4 MiB difference; a request that captures attention afterwards needs the other
    kind of context, and the 2048-cell one is freed for a 256-cell one, so the worker shrinks by as much.
    The margin of 10 MiB is for everything else a request allocates and frees (no logits, no captures:
    a few MiB of graph and batch data)."""
    kv_difference = (2048 - 256) * 30 * 2 * 3 * 64 * 2
    margin = 10 << 20
    with launch_server(smol_model, args=("--threads", "2", "--n-ctx", "2048")) as server, \
            Client(server.address) as c:
        (worker,) = worker_pids(server.process.pid)
        prompt = _prompt(1500, c.model_info().n_vocab, 3)
        c.run(prompt[:20], capture=[], logits=False)
        small = rss_bytes(worker)
        c.run(prompt, capture=[], logits=False)
        grown = rss_bytes(worker)
        c.run(prompt[:20], capture=["blocks.0.attn.pattern"], logits=False)
        switched = rss_bytes(worker)
    assert grown - small > kv_difference - margin
    assert grown - switched > kv_difference - margin


@pytest.mark.parametrize("n_ctx", [80, 1000])
def test_requests_up_to_the_configured_context_are_served(tiny_model, n_ctx):
    """n_ctx stays the limit requests are validated against, also when it is no power of two."""
    with launch_server(tiny_model, args=("--threads", "2", "--n-ctx", str(n_ctx))) as server, \
            Client(server.address) as c:
        n_vocab = c.model_info().n_vocab
        prompt = _prompt(n_ctx - 8, n_vocab, 4)
        assert c.run(prompt, capture=HIDDEN).logits.shape == (n_ctx - 8, n_vocab)
        assert len(c.generate(prompt, max_tokens=8).token_ids) <= 8
        with pytest.raises(Exception, match="exceeds the context"):
            c.generate(prompt, max_tokens=9)


def _file_mappings_rss(pid: int, path: str) -> list[int]:
    """Resident bytes of each mapping of `path` in process `pid` (/proc/PID/smaps), largest first."""
    sizes, current = [], False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                current = len(fields) == 6 and fields[5] == path
            elif current and fields[0] == "Rss:":
                sizes.append(int(fields[1]) * 1024)
    return sorted(sizes, reverse=True)


def test_the_worker_maps_the_model_file_once(smol_model):
    """The worker maps the GGUF twice: llama.cpp's mapping (its weights) and the index's (`gguf_index`, for
    the vocabulary math). RSS counts a page once per mapping that touched it, and one touch maps a whole
    folio (1 MiB on some kernels), so the index's mapping must hold no page after start-up and after each
    operation that reads weights: every read by id goes through the file descriptor, and every operation that
    used the mapping releases it. Any page left shows as >= 4 KiB, so the bound is 0."""
    path = str(smol_model.resolve())
    with launch_server(smol_model, args=("--threads", "2", "--n-ctx", "256")) as server, \
            Client(server.address) as c:
        (worker,) = worker_pids(server.process.pid)

        def ours_after(what: str) -> None:
            llama, *ours = _file_mappings_rss(worker, path)
            assert ours, "the index's mapping of the file was not found"
            assert llama > 50 << 20, what  # llama.cpp's: the weights it computes with (92 MiB)
            assert sum(ours) == 0, what

        ours_after("start-up")
        prompt = c.tokenize("The capital of France is Paris, and the capital of Italy is Rome.").token_ids
        run = c.run(prompt)
        ours_after("run")
        c.logit_lens(prompt, top_k=5)
        ours_after("logit lens")
        c.unembed(run.hidden_states[-1])
        ours_after("unembed")
        c.nearest_tokens(" Paris", k=5)
        c.nearest_tokens(" Paris", k=5, table="lm_head")
        ours_after("nearest tokens")
        c.embedding_rows([1, 500, 20_000, 40_000])
        c.weights("blk.3.ffn_down.weight", indices=[0, 7])
        c.weights("output_norm.weight")
        ours_after("weights")
