"""Abliteration (`lmscope abliterate`, `lmscope.service.abliterate`) on tiny models: what the file holds, and
that a model served from it keeps its residual stream orthogonal to the direction.

Bounds, from the arithmetic (tests/tolerances.py):

- F32 weights: the projection is computed in float64 and stored in float32, so each stored weight is within
  u = 2**-24 of the exact projection, relative to itself (plus float64 rounding, far below).
- Q8_0 weights quantized once (corrections=0): each value is q * d with q = round(x / d), d = amax / 127 of
  its block of 32, d stored as float16: within d / 2 of x, plus 127 |d| 2**-11 for the scale's rounding.
- The served abliterated model: every branch output is y = W' x with r^T W' within 2u of 0 elementwise
  (|W' - P| <= u |P|, P the exact projection, r^T P = 0), and the float32 product adds at most
  gamma(n_in) sum |W'| |x|, so |r . y| <= (gamma(n_in) + 2u) |r|^T |W'| |x|, with x the captured input of the
  output projection (attn.z, mlp.post). Each residual add rounds every element by u of its result, which
  moves r . h by at most u |r|^T |h|; the embedding row, stored in float32, is off by u |r|^T |e|.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tolerances import U16, U32, gamma

from lmscope.client import Client, LmscopeError, RefusalDirection
from lmscope.client.refusal import load_prompts
from lmscope.service.abliterate import AbliterationError, abliterate, project_out, quantize, read_abliteration
from lmscope.service.gguf_index import GGUFIndex
from lmscope.service.launch import launch_server
from lmscope.service.stored_matrix import dequantize_raw
from lmscope.service.testing import build_tiny_model

N_EMBD = 64
WRITERS = ("token_embd.weight",) + tuple(f"blk.{L}.{k}.weight" for L in range(4) for k in ("attn_output", "ffn_down"))
PROMPT = "The quick brown fox jumps over the lazy dog because it wants to see what lies beyond the hill."


def _unit(seed: int = 3) -> np.ndarray:
    r = np.random.default_rng(seed).standard_normal(N_EMBD)
    return r / np.linalg.norm(r)


def _projected(name: str, w: np.ndarray, r: np.ndarray) -> np.ndarray:
    w = w.astype(np.float64)
    return w - np.outer(w @ r, r) if name == "token_embd.weight" else w - np.outer(r, r @ w)


@pytest.fixture(scope="module")
def f32_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("abliterate")
    source = build_tiny_model(folder / "tiny.gguf", n_embd=N_EMBD)
    report = abliterate(source, _unit() * 7.0, folder / "tiny-abliterated.gguf", layer=2)  # any length: normalized
    return source, report


def test_only_the_residual_writers_change_and_metadata_says_what_was_done(f32_pair):
    source, report = f32_pair
    before, after = GGUFIndex(str(source)), GGUFIndex(str(report.path))
    (_, data_before), (head_after, data_after) = _sections(source), _sections(report.path)
    assert data_after == data_before and head_after[:4] == b"GGUF"  # same tensor bytes: only the header grew
    assert report.bytes == report.path.stat().st_size
    assert list(before.tensors) == list(after.tensors)
    assert sorted(e.name for e in report.edits) == sorted(WRITERS)
    for name, tensor in before.tensors.items():
        stored = np.asarray(after.tensors[name].data).view(np.uint8)
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8), stored) == (name not in WRITERS), name
    added = {k: v for k, v in after.fields.items() if k not in before.fields}
    assert all(after.fields[k] == v for k, v in before.fields.items() if v is not None)
    meta = read_abliteration(report.path)
    assert set(added) == {f"lmscope.abliteration.{k}" for k in meta}
    assert meta["layer"] == 2 and meta["source_sha256"] == report.source_sha256 and meta["tensors"] == 9
    assert meta["source_file"] == "tiny.gguf" and meta["corrections"] == 3
    np.testing.assert_array_equal(meta["direction"], _unit().astype(np.float32))
    assert read_abliteration(source) == {}


def _sections(path) -> tuple[bytes, int]:
    """(the bytes before the data section, the data section's size)."""
    from lmscope.proto.gguf_file import GGUFHeader

    data = np.memmap(path, mode="r", dtype=np.uint8)
    header = GGUFHeader(data)
    header.tensor_infos()
    return bytes(data[:header.data_start]), len(data) - header.data_start


def test_f32_weights_are_the_exact_projection_rounded_once(f32_pair):
    source, report = f32_pair
    before, after = GGUFIndex(str(source)), GGUFIndex(str(report.path))
    r = _unit()
    for name in WRITERS:
        exact = _projected(name, np.asarray(before.tensors[name].data), r)
        stored = np.asarray(after.tensors[name].data, np.float64)
        assert np.all(np.abs(stored - exact) <= 2 * U32 * np.abs(exact)), name
    for edit in report.edits:
        assert edit.requantize_error <= 2 * U32 and edit.surviving_write <= 64 * U32, edit
        assert edit.change > 0.01, edit  # a random direction carries ~1/sqrt(64) of each matrix


def test_q8_0_weights_quantized_once_are_within_half_a_step(tmp_path):
    source = build_tiny_model(tmp_path / "tiny-q8.gguf", n_embd=N_EMBD, weight_type="q8_0")
    r = _unit()
    once = abliterate(source, r, tmp_path / "once.gguf", corrections=0)
    before, after = GGUFIndex(str(source)), GGUFIndex(str(once.path))
    for name in WRITERS:
        exact = _projected(name, dequantize(np.asarray(before.tensors[name].data), before.tensors[name].tensor_type), r)
        stored = dequantize(np.asarray(after.tensors[name].data), after.tensors[name].tensor_type).astype(np.float64)
        blocks = np.abs(exact).reshape(exact.shape[0], -1, 32).max(axis=-1, keepdims=True) / 127
        step = np.broadcast_to(blocks, exact.shape[:1] + (exact.shape[1] // 32, 32)).reshape(exact.shape)
        assert np.all(np.abs(stored - exact) <= step / 2 + 127 * step * U16 + 1e-12), name


def test_error_feedback_removes_the_write_that_rounding_puts_back():
    """Weights on the Q4_K grid, a direction carrying 1/sqrt(1536) of them (the edit is below a step): one
    quantization rounds most of the edit back; three rounds of error feedback leave far less."""
    rng = np.random.default_rng(0)
    q4_k = int(GGMLQuantizationType.Q4_K)
    w = dequantize_raw(quantize(rng.standard_normal((256, 1536)), q4_k), q4_k, 1536).astype(np.float64)
    r = rng.standard_normal(1536)
    r /= np.linalg.norm(r)
    left = {}
    for corrections in (0, 3):
        _, back, projected = project_out(w, r, "rows", q4_k, corrections)
        np.testing.assert_allclose(projected @ r, 0, atol=1e-12 * np.abs(w).max())
        left[corrections] = np.linalg.norm(back @ r) / np.linalg.norm(w @ r)
    assert left[0] > 0.5 and left[3] < left[0] / 2, left


def test_served_abliterated_model_keeps_the_stream_orthogonal_to_the_direction(f32_pair):
    _, report = f32_pair
    r = _unit()
    weights = GGUFIndex(str(report.path))
    with launch_server(report.path, args=("--threads", "2", "--n-ctx", "256")) as server, Client(server.address) as c:
        run = c.run(PROMPT, capture=["embed", "blocks.*.attn.z", "blocks.*.attn_out", "blocks.*.resid_mid",
                                     "blocks.*.mlp.post", "blocks.*.mlp_out", "blocks.*.resid_post"])
        assert c.model_info().fingerprint != report.source_sha256  # a file of its own
    cap = {k: v.astype(np.float64) for k, v in run.captures.items()}
    abs_r = np.abs(r)
    bound = 2 * U32 * np.abs(cap["embed"]) @ abs_r
    assert np.all(np.abs(cap["embed"] @ r) <= bound)
    for L in range(4):
        for branch, source_site, tensor in (("attn_out", "attn.z", "attn_output"), ("mlp_out", "mlp.post", "ffn_down")):
            w = np.abs(np.asarray(weights.tensors[f"blk.{L}.{tensor}.weight"].data, np.float64))
            x = np.abs(cap[f"blocks.{L}.{source_site}"])
            branch_bound = (gamma(w.shape[1]) + 2 * U32) * (x @ (abs_r @ w))
            along = np.abs(cap[f"blocks.{L}.{branch}"] @ r)
            assert np.all(along <= branch_bound), (L, branch, along.max(), branch_bound.max())
            bound = bound + branch_bound
            stream = f"blocks.{L}.{'resid_mid' if branch == 'attn_out' else 'resid_post'}"
            bound = bound + U32 * np.abs(cap[stream]) @ abs_r
            assert np.all(np.abs(cap[stream] @ r) <= bound), (stream, np.abs(cap[stream] @ r).max(), bound.max())


def test_the_original_model_does_carry_the_direction(f32_pair):
    """The bound above is not vacuous: without the edit, the stream carries the direction far above it."""
    source, _ = f32_pair
    with launch_server(source, args=("--threads", "2", "--n-ctx", "256")) as server, Client(server.address) as c:
        states = c.run(PROMPT, capture=["blocks.*.resid_post"]).captures
    along = max(np.abs(states[f"blocks.{L}.resid_post"].astype(np.float64) @ _unit()).max() for L in range(4))
    norms = max(np.linalg.norm(states[f"blocks.{L}.resid_post"], axis=-1).max() for L in range(4))
    assert along > 1e-3 * norms  # a random direction holds ~1/8 of a 64-wide state: far above rounding


def test_bad_requests_are_refused_with_what_to_fix(f32_pair, tmp_path):
    source, report = f32_pair
    with pytest.raises(AbliterationError, match="shape"):
        abliterate(source, np.ones(N_EMBD + 1), tmp_path / "x.gguf")
    with pytest.raises(AbliterationError, match="nonzero"):
        abliterate(source, np.zeros(N_EMBD), tmp_path / "x.gguf")
    with pytest.raises(AbliterationError, match="already abliterated"):
        abliterate(report.path, _unit(), tmp_path / "x.gguf")
    with pytest.raises(AbliterationError, match="another model"):
        abliterate(source, _unit(), tmp_path / "x.gguf", expected_sha256="0" * 64)
    with pytest.raises(AbliterationError, match="corrections"):
        abliterate(source, _unit(), tmp_path / "x.gguf", corrections=-1)
    gemma = build_tiny_model(tmp_path / "gemma.gguf", family="gemma3", n_embd=N_EMBD)
    with pytest.raises(AbliterationError, match="norm after its output matrix"):
        abliterate(gemma, _unit(), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_and_refusal_direction_abliterate_check_the_model(client, tiny_model, tmp_path):
    harmful, harmless = load_prompts("harmful", ["en"])[:3], load_prompts("harmless", ["en"])[:3]
    rd = client.refusal_direction(harmful, harmless, layers=[1, 2], batch_size=6, progress=False)
    assert rd.model_fingerprint == client.model_info().fingerprint
    saved = rd.save(tmp_path / "rd.npz")
    loaded = RefusalDirection.load(saved)
    np.testing.assert_array_equal(loaded.per_layer, rd.per_layer)
    assert loaded.best_layer == rd.best_layer and loaded.scores == rd.scores
    out = rd.abliterate(tiny_model, tmp_path / "tiny-abliterated.gguf")
    meta = read_abliteration(out)
    assert meta["layer"] == rd.best_layer
    np.testing.assert_allclose(meta["direction"], rd.vector(), atol=U32)
    other = build_tiny_model(tmp_path / "other.gguf", n_embd=64, seed=5)
    with pytest.raises(LmscopeError, match="another model"):
        rd.abliterate(other, tmp_path / "other-abliterated.gguf")
    done = subprocess.run([sys.executable, "-m", "lmscope.client.cli", "abliterate", "--model", str(tiny_model),
                           "--direction", str(saved), "--out", str(tmp_path / "cli.gguf"), "--report",
                           "--check-load"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "blk.0.ffn_down.weight" in done.stdout and "plain llama.cpp (llama_cpp.Llama) loaded it" in done.stdout
    assert (tmp_path / "cli.gguf").read_bytes() == out.read_bytes()  # the same edit, whichever way it is asked
