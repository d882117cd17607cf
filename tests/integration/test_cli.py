"""The `lmscope` command line: client commands start a server when none runs, and explain a missing one."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

PROMPT = "The capital of France is"
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lmscope(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LMSCOPE_SERVER"}
    return subprocess.run([sys.executable, "-m", "lmscope.client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def test_lens_starts_a_server_on_the_model_it_is_given(tiny_model):
    done = _lmscope("lens", PROMPT, "--model", str(tiny_model), "--top-k", "2")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[2:]] == ["embed", "0", "1", "2", "3"]
    assert f"starting a server on {tiny_model}" in done.stderr


def test_lens_with_no_server_running_starts_one_on_the_default_model(smol_model, tmp_path):
    # Either a server already listens on the default address (then it is used) or one is started on the
    # default model; both answer. Run from another directory: nothing depends on the working directory.
    done = _lmscope("lens", PROMPT, "--top-k", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2].split()[0] == "embed"


def test_a_missing_server_is_explained():
    address = f"127.0.0.1:{_free_port()}"
    for command in (["lens", PROMPT], ["info"]):
        done = _lmscope(*command, "--server", address, timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"no lmscope server answers at {address}" in done.stderr
        assert "lmscope serve" in done.stderr and "--server HOST:PORT" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_bad_argument_is_one_line_not_a_traceback(tiny_model):
    done = _lmscope("lens", PROMPT, "--model", str(tiny_model), "--temperature", "0")
    assert done.returncode == 1
    assert "error: INVALID_ARGUMENT: temperature must be > 0" in done.stderr and "Traceback" not in done.stderr
