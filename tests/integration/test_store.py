"""Activation stores against the real tiny-model server: what is stored is what the server computed, a
killed collect resumes to the same bytes, mismatches are refused, and analyses read stores.

Equality here is exact, not approximate: a collect sends the same requests as `run_batch` with the same
batch size (batches aligned to absolute prompt indices), and llama.cpp on CPU is deterministic for a
given batch, so the stored rows are the very bytes the server sent.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from tolerances import assert_within, reordered

from lmscope.client import Client
from lmscope.client.cli import main as cli_main
from lmscope.client.store import ActivationStore, StoreMismatchError

PROMPTS = [f"Sample {i}: the {['red', 'green', 'blue'][i % 3]} box number {i * 7} is" for i in range(40)]
SITES = "blocks.*.resid_post"


def test_collect_stores_what_run_batch_returns(client, tmp_path):
    store = client.collect(PROMPTS, tmp_path / "s", sites=SITES, positions=[0, -1], dtype="float16", batch_size=8,
                           progress=False)
    runs = client.run_batch(PROMPTS, batch_size=8, capture=SITES, positions=[0, -1], dtype="float16", logits=False)
    info = client.model_info()
    assert len(store) == len(PROMPTS) and store.prompts == PROMPTS
    assert store.sites == [f"blocks.{L}.resid_post" for L in range(info.n_layer)]
    for site in store.sites:
        array = store[site]
        assert isinstance(array, np.memmap) or isinstance(array.base, np.memmap)
        assert array.shape == (len(PROMPTS), 2, info.n_embd) and array.dtype == np.float16
        np.testing.assert_array_equal(array, np.stack([r.captures[site] for r in runs]))
    for i, run in enumerate(runs):
        assert store.token_ids(i) == run.token_ids
        assert store.positions[i].tolist() == run.positions
    assert store.model["fingerprint"] == info.fingerprint
    assert store.request == {"sites": store.sites, "positions": [0, -1], "dtype": "float16", "chat": False,
                             "chat_template_sha256": None}
    # The files open with numpy alone: the site arrays are plain .npy files of the committed shape.
    plain = np.load(tmp_path / "s" / "sites" / "blocks.2.resid_post.npy", mmap_mode="r")
    np.testing.assert_array_equal(plain, store["blocks.2.resid_post"])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["n_prompts"] == len(PROMPTS)


def test_every_position_is_a_ragged_layout(client, tmp_path):
    store = client.collect(PROMPTS[:10], tmp_path / "r", sites=["embed", "blocks.1.resid_post"], positions=None,
                           dtype="float32", batch_size=4, progress=False)
    runs = client.run_batch(PROMPTS[:10], batch_size=4, capture=["embed", "blocks.1.resid_post"], logits=False)
    offsets = store.token_offsets
    assert store.ragged and store.positions is None
    assert offsets[0] == 0 and offsets[-1] == store.n_tokens == sum(len(r.token_ids) for r in runs)
    assert store["embed"].shape == (store.n_tokens, client.model_info().n_embd)
    for i, run in enumerate(runs):
        assert offsets[i + 1] - offsets[i] == len(run.token_ids)
        np.testing.assert_array_equal(store.rows("blocks.1.resid_post", i), run.captures["blocks.1.resid_post"])
        np.testing.assert_array_equal(store["embed"][offsets[i]:offsets[i + 1]], run.captures["embed"])
    # Any position can be read from an every-position store; "mean" leaves out the leading BOS.
    last = store.vectors("blocks.1.resid_post", -1)
    np.testing.assert_array_equal(last, np.stack([r.captures["blocks.1.resid_post"][-1] for r in runs]))
    bos = client.model_info().bos_token_id
    mean = store.vectors("blocks.1.resid_post", "mean", bos_token_id=bos)
    rows = [r.captures["blocks.1.resid_post"][1 if r.token_ids[0] == bos else 0:] for r in runs]
    # float32 means of the same values, perhaps summed in another order: reordered(n) of the mean of |x|
    bound = np.stack([reordered(len(x)) * np.abs(x).mean(axis=0) for x in rows])
    assert_within(mean, np.stack([x.mean(axis=0) for x in rows]), bound, "mean over the prompt")


def _files(path) -> dict[str, bytes]:
    """Every data file of a store, byte for byte (the manifest differs only in its timestamps)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and not f.name.startswith(("manifest.json", ".lock"))}


CHILD = textwrap.dedent("""
    import sys, time
    from lmscope.client import Client
    from lmscope.client import store as store_module

    # Slow the child down so the parent can kill it mid-way: every commit pauses after its rows and the
    # .npy headers are written and before its manifest is (the worst moment to die).
    write_manifest = store_module._write_json_atomic
    def slow_manifest(path, value):
        time.sleep(0.3)
        write_manifest(path, value)
    store_module._write_json_atomic = slow_manifest

    address, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = [line for line in open(sys.argv[4], encoding="utf-8").read().split("\\n")[:n]]
    Client(address).collect(prompts, path, sites="blocks.*.resid_post", positions=[-1], dtype="float16",
                            batch_size=4, commit_seconds=0, progress=False)
""")


def test_a_killed_collect_resumes_to_the_same_bytes(client, tiny_server, tmp_path):
    prompts = PROMPTS
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts), encoding="utf-8")
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, tiny_server.address, str(killed), str(len(prompts)),
                              str(prompts_file)])
    deadline = time.monotonic() + 120
    committed = 0
    try:
        while committed < len(prompts) // 2:
            assert child.poll() is None, "the collecting process ended before it was killed"
            assert time.monotonic() < deadline, "the collect did not reach half way in 120 s"
            try:
                committed = json.loads((killed / "manifest.json").read_text())["n_prompts"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # What the kill left: a readable store of the committed prompts, and rows past them on disk.
    partial = ActivationStore.open(killed)
    assert len(prompts) // 2 <= len(partial) < len(prompts)
    assert partial.prompts == prompts[:len(partial)]
    stored_before = {site: np.array(partial[site]) for site in partial.sites}

    resumed = client.collect(prompts, killed, sites=SITES, positions=[-1], dtype="float16", progress=False)
    assert resumed.stats.skipped == len(partial) and resumed.stats.computed == len(prompts) - len(partial)
    whole = client.collect(prompts, tmp_path / "whole", sites=SITES, positions=[-1], dtype="float16", batch_size=4,
                           progress=False)
    assert _files(killed) == _files(tmp_path / "whole")
    for site, before in stored_before.items():
        np.testing.assert_array_equal(resumed[site][:len(before)], before)
    assert len(resumed) == len(whole) == len(prompts)


def test_a_store_grows_by_appending_prompts(client, tmp_path):
    first = client.collect(PROMPTS[:10], tmp_path / "grown", batch_size=4, progress=False)
    stored = {site: np.array(first[site]) for site in first.sites}
    grown = client.collect(PROMPTS[:25], tmp_path / "grown", progress=False)
    assert grown.stats.skipped == 10 and grown.stats.computed == 15 and grown.prompts == PROMPTS[:25]
    once = client.collect(PROMPTS[:25], tmp_path / "once", batch_size=4, progress=False)
    for site in grown.sites:
        # Committed rows are never rewritten; new rows come from the batches an uninterrupted collect sends
        # (prompts 8..11 together). Only rows 8 and 9, computed first in a batch of two, may differ from the
        # one-go store, by batch-dependent rounding (docs/gotchas.md).
        np.testing.assert_array_equal(grown[site][:10], stored[site])
        np.testing.assert_array_equal(grown[site][:8], once[site][:8])
        np.testing.assert_array_equal(grown[site][10:], once[site][10:])
    np.testing.assert_array_equal(grown.tokens, once.tokens)
    again = client.collect(PROMPTS[:25], tmp_path / "grown", progress=False)
    assert again.stats.computed == 0


def test_mismatched_collects_are_refused(client, tmp_path):
    path = tmp_path / "s"
    client.collect(PROMPTS[:6], path, batch_size=4, progress=False)
    before = _files(path)
    with pytest.raises(StoreMismatchError, match="dtype"):
        client.collect(PROMPTS[:6], path, dtype="float32", progress=False)
    with pytest.raises(StoreMismatchError, match="sites"):
        client.collect(PROMPTS[:6], path, sites="blocks.0.resid_post", progress=False)
    with pytest.raises(StoreMismatchError, match="positions"):
        client.collect(PROMPTS[:6], path, positions=[-2], progress=False)
    with pytest.raises(StoreMismatchError, match="chat"):
        client.collect(PROMPTS[:6], path, chat=True, progress=False)
    with pytest.raises(StoreMismatchError, match="first prompts"):
        client.collect(PROMPTS[1:7], path, progress=False)
    with pytest.raises(ValueError, match="batches of 4"):
        client.collect(PROMPTS[:8], path, batch_size=8, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match="another model"):
        client.collect(PROMPTS[:6], path, progress=False)
    assert _files(path) == before
    with pytest.raises(ValueError, match="pattern"):
        client.collect(PROMPTS[:2], tmp_path / "p", sites="blocks.0.attn.pattern", progress=False)
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore.open(tmp_path / "nothing")


def test_project_and_probe_read_a_store_without_a_server(client, tmp_path):
    prompts = PROMPTS[:30]
    targets = np.arange(30, dtype=np.float64) % 7
    store = client.collect(prompts, tmp_path / "s", sites=["embed", SITES], dtype="float32", batch_size=64,
                           progress=False)
    from_prompts = client.probe(prompts, targets, layer=["embed", 1, 3], folds=3, progress=False)
    offline = Client("127.0.0.1:9")  # nothing listens there: any request would fail
    from_store = offline.probe(store, targets, layer=["embed", 1, 3], folds=3)
    np.testing.assert_array_equal(from_store.scores, from_prompts.scores)
    projection = offline.project(store, layer=[0, 2])
    expected = client.project(prompts, layer=[0, 2], progress=False)
    for layer in (0, 2):
        np.testing.assert_array_equal(projection.states[layer], expected.states[layer])
        np.testing.assert_allclose(np.abs(projection.coords[layer]), np.abs(expected.coords[layer]), rtol=1e-9,
                                   atol=1e-9)
    assert offline.probe(store, targets, folds=3).layers == ["embed", 0, 1, 2, 3]
    with pytest.raises(ValueError, match="was not stored"):
        offline.project(store, layer=1, position=0)
    offline.close()


def test_refusal_means_from_stores_equal_means_from_prompts(client, tmp_path):
    harmful, harmless = PROMPTS[:12], PROMPTS[12:20]
    stores = [client.collect(p, tmp_path / name, dtype="float32", batch_size=32, progress=False)
              for p, name in ((harmful, "harmful"), (harmless, "harmless"))]
    expected = client.refusal_direction(harmful, harmless, chat=False, select=False, progress=False)
    found = client.refusal_direction(*stores, chat=False, select=False, progress=False)
    # Same rows, float64 sums in another order: equal to float64 rounding of sums of ~12 terms.
    scale = np.abs(expected.per_layer).max()
    np.testing.assert_allclose(found.per_layer, expected.per_layer, rtol=0, atol=1e-12 * scale)
    with pytest.raises(ValueError, match="chat=False"):
        client.refusal_direction(*stores, chat=True, select=False, progress=False)


def test_cli_collect(tiny_server, tmp_path, capsys):
    text = tmp_path / "prompts.txt"
    text.write_text("one prompt\nanother prompt\n\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "one prompt"}\n"another prompt"\n[1, 2, 3]\n', encoding="utf-8")
    assert cli_main(["collect", str(text), str(tmp_path / "a"), "--server", tiny_server.address,
                     "--sites", "blocks.0.resid_post", "--positions=-1,0", "--no-progress"]) == 0
    store = ActivationStore.open(tmp_path / "a")
    assert store.prompts == ["one prompt", "another prompt"] and store.request["positions"] == [-1, 0]
    assert "2 prompts" in capsys.readouterr().out
    assert cli_main(["collect", str(jsonl), str(tmp_path / "b"), "--server", tiny_server.address,
                     "--positions", "all", "--no-progress"]) == 0
    store = ActivationStore.open(tmp_path / "b")
    assert store.prompts == ["one prompt", "another prompt", [1, 2, 3]] and store.ragged


def test_an_empty_collect_makes_an_empty_store(client, tmp_path):
    store = client.collect([], tmp_path / "e", progress=False)
    assert len(store) == 0 and store.prompts == [] and store.token_offsets.tolist() == [0]
    with pytest.raises(ValueError, match="no prompts yet"):
        store["blocks.0.resid_post"]
    grown = client.collect(PROMPTS[:3], tmp_path / "e", progress=False)
    assert len(grown) == 3 and grown["blocks.0.resid_post"].shape[:2] == (3, 1)
