"""`lmscope serve --precise`: a float32 copy of the weights (dequantized exactly), a float32 KV cache and the
plain attention kernel, against the float64 numpy forward pass of the same GGUF weights (tests/reference.py,
float32 KV cache).

The issue's target for the mode is a cosine similarity of at least 0.9999 at every layer and position of
varied prompts (English, Chinese, code); what remains is float32 rounding of sums over at most n_ff terms
per product, far below it (scripts/bench_precise.py reports 1 - cosine). The default server on the same
file rounds every input row of a quantized product to 8 bits and keeps K and V in float16: it stays below
the precise mode, which is what makes the mode worth its memory.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import ReferenceModel

from lmscope.client import Client
from lmscope.service.launch import launch_server
from lmscope.service.testing import build_tiny_model

PRECISE_COSINE = 0.9999
PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin.",
           "今天天氣真好！我們去公園散步吧。",
           "def mean(xs):\n    return sum(xs) / len(xs)\n"]


def _cosines(client: Client, reference: ReferenceModel, prompt: str) -> np.ndarray:
    ids = client.tokenize(prompt).token_ids
    acts = reference.forward(ids)
    exact = np.concatenate([acts["embed"][None], acts["resid_post"]])
    states = client.run(ids, logits=False).hidden_states.astype(np.float64)
    return (states * exact).sum(-1) / np.linalg.norm(states, axis=-1) / np.linalg.norm(exact, axis=-1)


@pytest.fixture(scope="module")
def smol_reference(smol_model):
    return ReferenceModel(smol_model, dtype=np.float64, kv_cache="f32")


@pytest.fixture(scope="module")
def precise_smol(smol_model):
    with launch_server(smol_model, args=("--threads", "2", "--n-ctx", "512", "--precise")) as server, \
            Client(server.address) as client:
        yield client


def test_the_precise_mode_says_what_it_serves(precise_smol, smol_client):
    info = precise_smol.model_info()
    assert (info.file_type, info.kv_cache_type, info.flash_attention) == ("ALL_F32", "f32", False)
    assert info.fingerprint != smol_client.model_info().fingerprint  # the copy, not the shipped file
    assert smol_client.model_info().kv_cache_type == "f16"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_precise_hidden_states_are_exact_math_within_the_target(precise_smol, smol_client, smol_reference, prompt):
    precise = _cosines(precise_smol, smol_reference, prompt)
    assert precise.min() >= PRECISE_COSINE, np.unravel_index(precise.argmin(), precise.shape)
    default = _cosines(smol_client, smol_reference, prompt)
    assert default.min() < precise.min()  # the 8-bit activation rounding and the F16 cache are what it removes


def test_precise_mode_on_a_quantized_tiny_model_of_another_family(tmp_path):
    path = build_tiny_model(tmp_path / "gemma3-q8.gguf", family="gemma3", weight_type="q8_0")
    reference = ReferenceModel(path, dtype=np.float64, kv_cache="f32")
    with launch_server(path, args=("--threads", "1", "--precise")) as server, Client(server.address) as client:
        for prompt in PROMPTS:
            cosines = _cosines(client, reference, prompt)
            assert cosines.min() >= PRECISE_COSINE, (prompt, cosines.min())
