"""`lmscope serve --requantize`: a derived copy of the model, made once, cached, served on request only."""
from __future__ import annotations

import os

import numpy as np
import pytest

from lmscope.client import Client
from lmscope.service.gguf_index import GGUFIndex
from lmscope.service.launch import launch_server
from lmscope.service.requantize import RequantizeError, derived_path, requantized


@pytest.fixture
def lmscope_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCOPE_HOME", str(tmp_path))
    return tmp_path


def test_requantized_copy_is_made_once_and_remade_when_the_source_changes(tiny_model, lmscope_home, tmp_path):
    source = tmp_path / "source.gguf"
    source.write_bytes(tiny_model.read_bytes())
    out = requantized(source, "q8_0")
    assert out == derived_path(source, "q8_0") and out.is_relative_to(lmscope_home)
    matrices = [t for t in GGUFIndex(str(out)).tensors.values() if len(t.shape) == 2]
    assert matrices and all(t.tensor_type.name == "Q8_0" for t in matrices)
    made = out.stat().st_mtime_ns
    assert requantized(source, "q8_0").stat().st_mtime_ns == made          # cached
    os.utime(source, ns=(made + 10**9, made + 10**9))
    assert requantized(source, "q8_0").stat().st_mtime_ns != made          # source changed: made again
    with pytest.raises(RequantizeError, match="q8_0, q4_0"):
        requantized(source, "q2_k")


def test_server_serves_the_requantized_copy_when_asked(tiny_model, client, lmscope_home):
    prompt = "one two three four five"
    original = client.run(prompt, logits=True)
    env = {"LMSCOPE_HOME": str(lmscope_home)}
    args = ("--threads", "2", "--n-ctx", "256", "--requantize", "q8_0")
    with launch_server(tiny_model, args=args, env=env) as server:
        with Client(server.address) as c:
            info = c.model_info()
            derived = c.run(prompt, logits=True)
    assert info.file_type == "MOSTLY_Q8_0" and info.fingerprint != client.model_info().fingerprint
    # Close to the original, not equal to it: the weights were rounded to 8 bits.
    assert not np.array_equal(derived.logits, original.logits)
    # Q8_0 weights and activations: 1/254 of a block's max per value, through 4 layers: tests/unit/test_reference.py
    # (CASES, "q8_0-exact") bounds the max error by 0.1 of the largest value.
    np.testing.assert_allclose(derived.logits, original.logits, atol=0.1 * np.abs(original.logits).max())
    assert (derived.logits.argmax(axis=1) == original.logits.argmax(axis=1)).mean() >= 0.8
