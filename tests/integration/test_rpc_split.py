"""One model split across processes with llama.cpp's RPC backend (`lmscope serve --rpc`, `lmscope rpc-worker`).

The split itself needs a llama.cpp built with GGML_RPC=ON (`LMSCOPE_CMAKE_ARGS=... scripts/setup.sh`, see
docs/deployment.md); the default portable wheel has no RPC backend, and then the server must say exactly
that. Option errors are checked with either build.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tolerances import F16_CACHE, SAME_KERNELS, assert_close_to_scale

from lmscope.client import Client
from lmscope.service import llama_rpc
from lmscope.service.launch import LaunchError, launch_server

PROMPT = "The capital of France is"
RPC_SUPPORTED = llama_rpc.supported()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(model, *args) -> str:
    with pytest.raises(LaunchError) as caught:
        launch_server(model, args=("--threads", "1", "--n-ctx", "256", *args), timeout=60)
    assert "exited with code 2" in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("args, message", [
    (("--rpc", "127.0.0.1:1", "--workers", "2", "--n-gpu-layers", "99"), "--rpc needs --workers 1"),
    (("--rpc", "127.0.0.1:1"), "--rpc needs --n-gpu-layers"),
    (("--rpc", "nohost", "--n-gpu-layers", "99"), "is not HOST:PORT"),
    (("--rpc", "[::1]:50052", "--n-gpu-layers", "99"), "IPv4 only"),
])
def test_rpc_options_are_checked_before_anything_loads(tiny_model, args, message):
    assert message in _refused(tiny_model, *args)


def test_serve_rpc_says_what_is_missing(tiny_model):
    log = _refused(tiny_model, "--rpc", f"127.0.0.1:{_free_port()}", "--n-gpu-layers", "99")
    if RPC_SUPPORTED:
        assert "cannot reach the RPC worker" in log and "lmscope rpc-worker" in log
    else:
        assert "no RPC backend" in log and "-DGGML_RPC=ON" in log


def test_rpc_worker_refuses_a_build_without_rpc_or_a_public_bind():
    command = [sys.executable, "-m", "lmscope.client.cli", "rpc-worker", "--host", "0.0.0.0", "--port", "1"]
    public = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert public.returncode == 2 and "--insecure" in public.stderr
    if not RPC_SUPPORTED:
        local = subprocess.run(command[:-4] + ["--port", str(_free_port())], capture_output=True, text=True,
                               timeout=60)
        assert local.returncode == 2 and "no RPC backend" in local.stderr


@pytest.fixture
def rpc_worker():
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmscope.client.cli", "rpc-worker", "--port", str(port),
                                "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"rpc-worker did not start: {process.stdout.read()}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    process.kill()
    process.wait()


def test_a_model_split_across_an_rpc_worker_gives_the_same_states(tiny_model, tiny_server, rpc_worker, reference):
    # Not skipped: scripts/setup.sh builds llama.cpp with -DGGML_RPC=ON (a build without it is a set-up bug).
    assert RPC_SUPPORTED, "llama.cpp was built without GGML_RPC: rerun `make setup` (see docs/deployment.md)"
    # --n-gpu-layers counts the output layer too: 3 = blocks 2 and 3 (weights and KV cache) and the LM head
    # live in the worker process; the eval callback reads and writes their tensors over the RPC connection.
    with launch_server(tiny_model, args=("--threads", "1", "--n-ctx", "1024", "--rpc", rpc_worker,
                                         "--n-gpu-layers", "3"), timeout=120) as split, \
            Client(split.address) as remote, Client(tiny_server.address) as local:
        assert remote.model_info().backend == "RPC"
        assert remote.model_info().fingerprint == local.model_info().fingerprint
        capture = ["embed", "blocks.*.resid_post", "blocks.0.attn.pattern"]
        run = remote.run(PROMPT, capture=capture)
        ref = reference.forward(run.token_ids)
        assert_close_to_scale(run.hidden_states[1:], ref["resid_post"], F16_CACHE)
        assert_close_to_scale(run.logits, ref["logits"], F16_CACHE)
        # The worker runs the same ggml CPU kernels on its layers (tests/tolerances.py, SAME_KERNELS).
        np.testing.assert_allclose(run.hidden_states, local.run(PROMPT, capture=capture).hidden_states,
                                   rtol=SAME_KERNELS, atol=SAME_KERNELS)
        # An edit on a layer held by the worker: steering block 2 adds the vector to its output.
        vector = np.linspace(-1, 1, 64).astype(np.float32)
        steered = remote.run(PROMPT, steer={2: vector}, capture=capture)
        expected = reference.forward(run.token_ids, resid_post_hook=lambda L, h: h + vector if L == 2 else None)
        assert_close_to_scale(steered.hidden_states[1:], expected["resid_post"], F16_CACHE)
        assert_close_to_scale(steered.logits, expected["logits"], F16_CACHE)
        assert not np.allclose(steered.logits, run.logits, atol=1e-2)
