"""Shared fixtures: real servers (real llama.cpp, real GGUF files) on free localhost ports.

- `tiny_model` / `tiny_server` / `client`: a deterministic 4-layer random-weight model built by
  `lmscope.service.testing` (untied output, GQA), served by `lmscope serve` in a child process.
- `smol_model` / `smol_client`: the default model (SmolLM2-135M-Instruct Q4_1), fetched and verified by
  `lmscope pull` during set-up; used for the real-model checks.
- `reference`: the independent numpy forward pass of the tiny model (`tests/reference.py`).
"""
from __future__ import annotations

import pathlib
import sys

import pytest

# The shared helpers (reference.py, tolerances.py, ...) live here; a few test modules of one folder read
# helpers of a module in the other (test_families reads test_reference's runner), so both folders too.
TESTS = pathlib.Path(__file__).parent
sys.path[:0] = [str(TESTS), str(TESTS / "unit"), str(TESTS / "integration")]

from lmscope.client import Client  # noqa: E402
from lmscope.service.launch import launch_server  # noqa: E402
from lmscope.service.testing import build_tiny_model  # noqa: E402

SERVER_ARGS = ("--threads", "2", "--n-ctx", "1024", "--test-hooks")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir) -> pathlib.Path:
    return build_tiny_model(model_dir / "tiny.gguf", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    with launch_server(tiny_model, args=SERVER_ARGS) as server:
        yield server


@pytest.fixture(scope="session")
def client(tiny_server):
    with Client(tiny_server.address) as c:
        yield c


@pytest.fixture(scope="session")
def reference(tiny_model):
    from reference import ReferenceModel

    # llama.cpp keeps K and V in an F16 cache by default.
    return ReferenceModel(tiny_model, kv_cache="f16")


@pytest.fixture(scope="session")
def smol_model() -> pathlib.Path:
    from lmscope.service.model_files import pull_default_model

    return pull_default_model(progress=None)


@pytest.fixture(scope="session")
def smol_server(smol_model):
    with launch_server(smol_model, args=("--threads", "2", "--n-ctx", "2048")) as server:
        yield server


@pytest.fixture(scope="session")
def smol_client(smol_server):
    with Client(smol_server.address) as c:
        yield c
