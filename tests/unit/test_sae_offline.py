"""Sparse autoencoders without a server: the fit recovers planted features, resumes to the same bytes, and the
SAELens layout round-trips and is read as the format specifies."""
from __future__ import annotations

import json
import struct
import types

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lmscope.client import sae_io
from lmscope.client.sae import FitSettings, SaeMismatchError, SparseAutoencoder, fit_topk


def planted(seed=1, d=32, m=48, n=6000, active=3):
    """Rows that are sums of `active` of `m` unit directions (magnitudes 1..3) plus a constant offset."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((m, d)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    chosen = np.stack([rng.choice(m, active, replace=False) for _ in range(n)])
    magnitudes = rng.uniform(1, 3, (n, active)).astype(np.float32)
    rows = np.einsum("na,nad->nd", magnitudes, directions[chosen]) + np.float32(0.7)
    return rows.astype(np.float32), directions


SMALL = dict(n_features=96, k=3, epochs=4, batch_size=64, lr=1e-2, dead_after=3000)


def fit(rows, **options):
    settings = FitSettings(**{**SMALL, **{k: v for k, v in options.items() if k in FitSettings.__dataclass_fields__}})
    rest = {k: v for k, v in options.items() if k not in FitSettings.__dataclass_fields__}
    with threadpool_limits(limits=1, user_api="blas"):  # one BLAS thread: bytes independent of the machine's cores
        return fit_topk(rows, settings, site="blocks.3.resid_post", model={"name": "test", "n_embd": rows.shape[1]},
                        progress=False, **rest)


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def fitted(data):
    return fit(data[0])


def test_fit_recovers_planted_sparse_directions(data, fitted):
    rows, directions = data
    cosines = directions @ fitted.W_dec.T            # both unit rows
    best = cosines.max(axis=1)
    assert (best >= 0.9).mean() >= 0.9, np.sort(best)[:10]
    scores = fitted.evaluate(rows)
    assert scores.l0 <= 3 and scores.fve > 0.9, scores


def test_decoder_rows_are_unit_vectors_and_activations_are_in_the_data_units(data, fitted):
    rows, directions = data
    np.testing.assert_allclose(np.linalg.norm(fitted.W_dec, axis=1), 1, atol=1e-5)
    # a planted direction's magnitude (1..3) is read back by its matched feature (scale folded into the weights)
    codes = fitted.encode(rows[:500])
    assert 0.5 < codes[codes > 0].mean() < 3.5


def test_topk_encoding_matches_a_direct_computation(data, fitted):
    rows = data[0][:200]
    pre = (rows - fitted.b_dec) @ fitted.W_enc + fitted.b_enc
    expected = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row, kind="stable")[:fitted.k]
        expected[i, top] = np.maximum(row[top], 0)
    np.testing.assert_allclose(fitted.encode(rows), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fitted.reconstruct(rows), expected @ fitted.W_dec + fitted.b_dec, rtol=1e-5, atol=1e-5)


def test_interrupted_fit_resumes_to_the_same_bytes(data, tmp_path):
    rows = data[0][:2048]
    options = dict(epochs=3, checkpoint_every=5)
    straight = fit(rows, **options)

    class Stop(Exception):
        pass

    def stop_at_17(step, metrics):
        if step == 17:
            raise Stop

    checkpoint = tmp_path / "fit.npz"
    with pytest.raises(Stop):
        fit(rows, checkpoint=checkpoint, on_step=stop_at_17, **options)
    with np.load(checkpoint) as state:
        assert int(state["step"]) == 15   # the last checkpoint before the interruption
    resumed = fit(rows, checkpoint=checkpoint, **options)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(resumed, name).tobytes() == getattr(straight, name).tobytes(), name


def test_a_checkpoint_of_another_fit_is_refused(data, tmp_path):
    rows = data[0][:1024]
    checkpoint = tmp_path / "fit.npz"
    fit(rows, epochs=1, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="belongs to another fit"):
        fit(rows, epochs=1, k=4, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="belongs to another fit"):
        fit(rows[::-1].copy(), epochs=1, checkpoint=checkpoint)


def test_same_seed_same_sae_other_seed_other_sae(data):
    rows = data[0][:1024]
    a, b, c = fit(rows, epochs=1), fit(rows, epochs=1), fit(rows, epochs=1, seed=1)
    assert a.W_dec.tobytes() == b.W_dec.tobytes()
    assert a.W_dec.tobytes() != c.W_dec.tobytes()


# ----- SAELens layout -------------------------------------------------------------------------------------

def test_save_load_round_trip_in_saelens_layout(fitted, tmp_path):
    fitted.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert config["architecture"] == "topk" and config["k"] == fitted.k
    assert (config["d_in"], config["d_sae"]) == (32, 96)
    assert config["metadata"]["hook_name"] == config["hook_name"] == "blocks.3.hook_resid_post"
    assert config["normalize_activations"] == "none" and config["apply_b_dec_to_input"] is True
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(loaded, name).tobytes() == getattr(fitted, name).tobytes()
    assert (loaded.site, loaded.k, loaded.architecture, loaded.model) == (fitted.site, 3, "topk", fitted.model)


def test_safetensors_file_is_laid_out_as_the_format_specifies(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    h = np.array([1.5, -2.0], dtype=np.float16)
    sae_io.write_safetensors(tmp_path / "t.safetensors", {"w": w, "h": h})
    data = (tmp_path / "t.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert header == {"h": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
                      "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}}
    body = data[8 + length:]
    assert body[:4] == struct.pack("<2e", 1.5, -2.0) and body[4:] == struct.pack("<6f", *range(6))


def test_safetensors_written_by_hand_is_read_including_bf16(tmp_path):
    values = [1.0, -0.5, 3.25]
    bf16 = b"".join(struct.pack("<f", v)[2:] for v in values)   # bfloat16 = the top two bytes of a float32
    f32 = struct.pack("<4f", 1, 2, 3, 4)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                         "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + f32 + bf16)
    tensors, metadata = sae_io.read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"format": "pt"}
    np.testing.assert_array_equal(tensors["a"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(tensors["b"], np.array(values, np.float32))


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}, "not contiguous"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "8 bytes for 3 F32"),
    ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "does not handle"),
])
def test_broken_safetensors_are_refused_with_the_reason(tmp_path, entry, message):
    header = json.dumps({"t": entry}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(sae_io.SafetensorsError, match=message):
        sae_io.read_safetensors(tmp_path / "bad.safetensors")


def write_foreign_sae(directory, architecture="jumprelu", model_name="gemma-2-2b", hook="blocks.12.hook_resid_post",
                      d_in=8, d_sae=16):
    """An SAE directory as SAELens (v6) writes one for a model trained elsewhere."""
    rng = np.random.default_rng(0)
    tensors = {"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
               "b_enc": rng.standard_normal(d_sae).astype(np.float32),
               "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32),
               "b_dec": rng.standard_normal(d_in).astype(np.float32)}
    if architecture == "jumprelu":
        tensors["threshold"] = np.abs(rng.standard_normal(d_sae)).astype(np.float32)
    directory.mkdir()
    sae_io.write_safetensors(directory / "sae_weights.safetensors", tensors)
    (directory / "cfg.json").write_text(json.dumps({
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook, "sae_lens_version": "6.12.1"}}))
    return tensors


def info(name="Gemma 2 2b", n_embd=8, n_layer=26, fingerprint="f" * 64, n_ff=32):
    return types.SimpleNamespace(name=name, n_embd=n_embd, n_layer=n_layer, fingerprint=fingerprint, n_ff=n_ff)


def test_a_jumprelu_sae_from_saelens_loads_encodes_and_checks_its_model(tmp_path):
    tensors = write_foreign_sae(tmp_path / "gemmascope")
    sae = SparseAutoencoder.load(tmp_path / "gemmascope")
    assert (sae.site, sae.architecture, sae.apply_b_dec_to_input) == ("blocks.12.resid_post", "jumprelu", False)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    np.testing.assert_allclose(sae.encode(x), np.where(pre > tensors["threshold"], pre, 0), rtol=1e-6, atol=1e-6)
    sae.check_model(info())                                   # "gemma-2-2b" names the GGUF "Gemma 2 2b"
    with pytest.raises(SaeMismatchError, match="trained on 'gemma-2-2b'"):
        sae.check_model(info(name="SmolLM2 135M Instruct"))
    with pytest.raises(SaeMismatchError, match="width 8"):
        sae.check_model(info(n_embd=2304))
    with pytest.raises(SaeMismatchError, match="has 10 blocks"):
        sae.check_model(info(n_layer=10))
    with pytest.raises(SaeMismatchError, match="not blocks.3.resid_post"):
        sae.check_model(info(), site="blocks.3.resid_post")
    with pytest.raises(SaeMismatchError, match="width 3"):
        sae.encode(np.zeros((2, 3)))


def test_an_sae_fitted_here_is_bound_to_its_gguf_by_fingerprint(fitted):
    ours = SparseAutoencoder(fitted.W_enc, fitted.b_enc, fitted.W_dec, fitted.b_dec, site=fitted.site, k=fitted.k,
                             model={"name": "test", "fingerprint": "a" * 64})
    ours.check_model(info(name="test", n_embd=32, fingerprint="a" * 64))
    with pytest.raises(SaeMismatchError, match="fitted on model aaaaaaaaaaaa"):
        ours.check_model(info(name="test", n_embd=32, fingerprint="b" * 64))


def test_older_saelens_configs_and_resid_pre_hooks_are_read(tmp_path):
    write_foreign_sae(tmp_path / "old", architecture="standard", hook="blocks.0.hook_resid_pre")
    config = json.loads((tmp_path / "old" / "cfg.json").read_text())
    config.update(activation_fn_str="topk", activation_fn_kwargs={"k": 4}, model_name="gpt2")
    del config["metadata"]
    config["hook_name"] = "blocks.5.hook_resid_pre"
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(config))
    sae = SparseAutoencoder.load(tmp_path / "old")
    assert (sae.architecture, sae.k, sae.site, sae.model["name"]) == ("topk", 4, "blocks.4.resid_post", "gpt2")
    assert sae_io.hook_to_site("blocks.0.hook_resid_pre") == "embed"
    assert sae_io.hook_to_site("blocks.7.hook_mlp_out") == "blocks.7.mlp_out"
    assert sae_io.hook_to_site("blocks.7.mlp.hook_post") == "blocks.7.mlp.post"
    assert sae_io.site_to_hook("blocks.7.mlp.post") == "blocks.7.mlp.hook_post"
    with pytest.raises(ValueError, match="no lmscope site"):
        sae_io.hook_to_site("blocks.7.attn.hook_z")


def test_scaled_inputs_need_their_scale(tmp_path):
    write_foreign_sae(tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "cfg.json").read_text())
    config["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "scaled" / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="normalize_activations"):
        SparseAutoencoder.load(tmp_path / "scaled")


def test_steering_is_an_add_of_the_scaled_decoder_direction(fitted):
    edit = fitted.steering(5, 4.0)
    assert (edit.op, edit.sites, edit.positions) == ("add", ["blocks.3.resid_post"], None)
    np.testing.assert_array_equal(edit.vector, 4.0 * fitted.W_dec[5])
    with pytest.raises(IndexError, match="outside this SAE's 96 features"):
        fitted.steering(96, 1.0)


def test_corpus_passages_keep_the_text_and_their_length():
    from lmscope.client.corpus import _topics, python_reference

    passages = python_reference(max_chars=300)
    assert all(len(p) <= 300 for p in passages)
    kept = "".join("".join(p.split()) for p in passages)
    original = "".join("".join(_topics()[name].split()) for name in sorted(_topics()))
    assert kept == original


@pytest.mark.parametrize("trained_on, served, same", [
    ("gemma-2-2b", "Gemma 2 2b", True),
    ("google/gemma-2-2b", "Gemma 2 2b", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "Smollm2 135M 8k Lc100K Mix1 Ep2", True),
    ("meta-llama/Llama-3.1-8B", "Meta Llama 3.1 8B Instruct", True),
    ("gemma-2-9b", "Gemma 2 2b", False),
    ("gpt2", "Smollm2 135M 8k Lc100K Mix1 Ep2", False),
    ("", "Gemma 2 2b", False),
])
def test_model_names_from_elsewhere_match_by_family_and_size(trained_on, served, same):
    from lmscope.client.sae import _same_model_name

    assert _same_model_name(trained_on, served) is same
