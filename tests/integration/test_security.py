"""Network exposure, TLS, bearer tokens, and the guarantee that no request can name a file on the server."""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from reliability_support import PROMPT, SERVING, health

from lmscope.client import Client, LmscopeError
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service import server as server_module
from lmscope.service.launch import launch_server

TOKEN = "s3cret-token-for-tests-0123456789"
BASE_ARGS = ("--threads", "1", "--n-ctx", "512")


def _self_signed(directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A throw-away certificate for 127.0.0.1 / localhost, made with the openssl command."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    # Not a skip: scripts/setup.sh installs openssl where it is missing.
    assert shutil.which("openssl"), "the openssl command is needed to make a test certificate: run `make setup`"
    directory = tmp_path_factory.mktemp("tls")
    return {"server": _self_signed(directory, "server"), "other": _self_signed(directory, "other")}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def tls_server(tiny_model, certificates, token_file):
    cert, key = certificates["server"]
    with launch_server(tiny_model, args=BASE_ARGS + ("--tls-cert", str(cert), "--tls-key", str(key),
                                                     "--token-file", str(token_file))) as server:
        yield server


@pytest.fixture(scope="module")
def token_server(tiny_model, token_file):
    with launch_server(tiny_model, args=BASE_ARGS + ("--token-file", str(token_file))) as server:
        yield server


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmscope.client.cli", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


# ----- where the server listens -------------------------------------------------------------------

def test_the_server_binds_loopback_by_default(tiny_model):
    with launch_server(tiny_model, host=None, args=BASE_ARGS) as server:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        # 127.0.0.1, as an IPv4 socket or an IPv6 one bound to the v4-mapped ::ffff:127.0.0.1; nothing else.
        addresses = _listening_addresses(int(port))
        assert addresses and addresses <= {"0100007F", "0000000000000000FFFF00000100007F"}, addresses


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org"])
def test_a_non_loopback_host_is_refused_without_tls_or_insecure(tiny_model, host):
    started = time.monotonic()
    result = _serve("--model", str(tiny_model), "--host", host, "--port", "0")
    assert result.returncode == 2
    assert f"--host {host} exposes the server" in result.stderr
    assert "--tls-cert" in result.stderr and "--insecure" in result.stderr
    assert "lmscope serving" not in result.stdout
    assert time.monotonic() - started < 30  # refused before any model is loaded


def test_a_port_in_use_is_a_clear_error(tiny_model):
    with launch_server(tiny_model, args=BASE_ARGS) as server:
        port = server.address.rsplit(":", 1)[1]
        result = _serve("--model", str(tiny_model), "--port", port, *BASE_ARGS)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr and "lmscope serving" not in result.stdout


def test_tls_or_insecure_lets_a_non_loopback_host_pass_the_gate():
    parser = argparse.ArgumentParser()
    server_module.add_arguments(parser)
    gate = server_module._argument_error
    assert gate(parser.parse_args(["--host", "0.0.0.0"])) is not None
    assert gate(parser.parse_args(["--host", "0.0.0.0", "--insecure"])) is None
    assert gate(parser.parse_args(["--host", "0.0.0.0", "--tls-cert", "c", "--tls-key", "k"])) is None
    assert gate(parser.parse_args(["--host", "::1"])) is None
    assert gate(parser.parse_args(["--host", "localhost"])) is None


@pytest.mark.parametrize("make_args, words", [
    (lambda d: ["--tls-cert", str(d / "server.crt")], "TLS needs both --tls-cert and --tls-key"),
    (lambda d: ["--tls-cert", str(d / "missing.crt"), "--tls-key", str(d / "server.key")], "cannot read --tls-cert"),
    (lambda d: ["--tls-cert", str(d / "token"), "--tls-key", str(d / "server.key")], "is not a PEM file"),
    (lambda d: ["--token-file", str(d / "missing")], "cannot read --token-file"),
    (lambda d: ["--token-file", str(d / "short")], "shorter than 16 characters"),
    (lambda d: ["--workers", "0"], "--workers must be at least 1"),
    (lambda d: ["--max-message-mb", "1"], "--max-message-mb must be at least 2"),
    # the start-up probe needs two rows in one ubatch; llama.cpp would abort the worker on a longer batch
    (lambda d: ["--n-batch", "1"], "--n-batch must be at least 2"),
    (lambda d: ["--flash-attn", "maybe"], "invalid choice: 'maybe'"),
    (lambda d: ["--precise", "--requantize", "q8_0"], "cannot be combined with --requantize"),
])
def test_bad_security_arguments_stop_the_server_before_it_loads_a_model(tmp_path, certificates, make_args, words):
    cert, key = certificates["server"]
    (tmp_path / "server.crt").write_bytes(cert.read_bytes())
    (tmp_path / "server.key").write_bytes(key.read_bytes())
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "short").write_text("abc")
    # A model path that does not exist: these arguments must be refused before the model is even looked at.
    result = _serve("--model", str(tmp_path / "no-model.gguf"), "--port", "0", *make_args(tmp_path))
    assert result.returncode == 2
    assert words in result.stderr, result.stderr


# ----- TLS -----------------------------------------------------------------------------------------

def test_a_tls_client_with_the_servers_certificate_and_token_is_served(tls_server, certificates):
    cert = certificates["server"][0].read_bytes()
    with Client(tls_server.address, root_certificates=cert, token=TOKEN, timeout=30) as client:
        run = client.run(PROMPT, layers=[1])
        assert run.resid_post(1).shape == (len(run.token_ids), 64)
        assert client.generate(PROMPT, max_tokens=3).token_ids


def test_tls_refuses_plaintext_clients_and_untrusted_certificates(tls_server, certificates):
    with Client(tls_server.address, token=TOKEN, timeout=10) as plaintext:
        with pytest.raises(LmscopeError) as info:
            plaintext.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    other = certificates["other"][0].read_bytes()
    with Client(tls_server.address, root_certificates=other, token=TOKEN, timeout=10) as wrong_trust:
        with pytest.raises(LmscopeError) as info:
            wrong_trust.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_still_requires_the_token_but_not_for_health(tls_server, certificates):
    cert = certificates["server"][0].read_bytes()
    with Client(tls_server.address, root_certificates=cert, timeout=10) as anonymous:
        with pytest.raises(LmscopeError) as info:
            anonymous.model_info()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    channel = grpc.secure_channel(tls_server.address, grpc.ssl_channel_credentials(root_certificates=cert))
    assert health(tls_server.address, channel) == SERVING


# ----- bearer token --------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda c: c.model_info(),
    lambda c: c.tokenize("hi"),
    lambda c: c.run(PROMPT),
    lambda c: c.generate(PROMPT, max_tokens=2),
    lambda c: c.unembed(np.zeros((1, 64), np.float32)),
    lambda c: c.weights("output_norm.weight"),
])
@pytest.mark.parametrize("token", [None, "wrong-token-of-good-length-0000000", TOKEN + "x", TOKEN[:-1], ""])
def test_every_rpc_needs_the_right_token(token_server, call, token, monkeypatch):
    monkeypatch.delenv("LMSCOPE_TOKEN", raising=False)
    with Client(token_server.address, token=token, timeout=10) as client:
        with pytest.raises(LmscopeError) as info:
            call(client)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "LMSCOPE_TOKEN" in info.value.message


def test_the_token_comes_from_an_argument_or_the_environment(token_server, monkeypatch):
    monkeypatch.delenv("LMSCOPE_TOKEN", raising=False)
    with Client(token_server.address, token=TOKEN, timeout=10) as client:
        assert client.model_info().n_layer == 4
        assert client.run(PROMPT, layers=[0]).resid_post(0).shape[1] == 64
    monkeypatch.setenv("LMSCOPE_TOKEN", TOKEN)
    with Client(token_server.address, timeout=10) as client:
        assert client.generate(PROMPT, max_tokens=2).token_ids


def test_health_checks_need_no_token(token_server):
    assert health(token_server.address) == SERVING


def test_the_token_is_compared_in_constant_time():
    import inspect

    source = inspect.getsource(server_module._TokenAuth)
    assert "hmac.compare_digest" in source and "==" not in source


# ----- no request names a file ---------------------------------------------------------------------

# Every string or bytes field a client can send, and what the server does with it. None is a path: a new
# field of either type must be added here only after checking that the server never opens it as one. The one
# file a request can have the server open is a local client's own answer file (`RunRequest.shared_memory`):
# /proc/{pid}/fd/{fd}, two integers, used only from a client on this host, only if it is a memfd named
# lmscope-answer whose first bytes are the request's random token (tests/integration/test_shared_memory.py
# offers other files and other tokens; below, a client from another address).
CLIENT_TEXT_FIELDS = {
    "lmscope.v1.SharedMemory.token": "16 random bytes compared with the first bytes of the client's answer file",
    "lmscope.v1.TokenizeRequest.text": "text to tokenize",
    "lmscope.v1.Prompt.text": "prompt text",
    "lmscope.v1.Intervention.sites": "site names or globs, matched against ModelInfo.capture_sites",
    "lmscope.v1.Tensor.data": "raw little-endian numbers",
    "lmscope.v1.RunRequest.capture": "site names or globs, matched against ModelInfo.capture_sites",
    "lmscope.v1.GenerateRequest.stop": "stop strings",
    "lmscope.v1.WeightsRequest.name": "a tensor name looked up in the loaded GGUF's tensor table",
    "lmscope.v1.NearestTokensRequest.table": "\"embedding\" or \"lm_head\", checked against a fixed list",
}


def _request_fields():
    seen, stack = set(), [m.input_type for m in pb.DESCRIPTOR.services_by_name["Inspector"].methods]
    while stack:
        message = stack.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            yield field
            if field.message_type is not None:
                stack.append(field.message_type)


def test_no_request_field_names_a_file():
    fields = list(_request_fields())
    text_fields = {f.full_name for f in fields if f.type in (f.TYPE_STRING, f.TYPE_BYTES)}
    assert text_fields == set(CLIENT_TEXT_FIELDS)
    suspicious = [f.full_name for f in fields if any(w in f.name.lower() for w in ("path", "file", "dir", "url"))]
    assert suspicious == []


def test_path_like_strings_are_only_names_or_text(token_server, tiny_model):
    with Client(token_server.address, token=TOKEN, timeout=10) as client:
        for name in (str(tiny_model), "/etc/passwd", "../../../../etc/passwd", "file:///etc/passwd"):
            with pytest.raises(LmscopeError) as info:
                client.weights(name)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert client.tokenize("/etc/passwd", add_special=False).text == "/etc/passwd"
        with pytest.raises(LmscopeError) as info:
            client.run(PROMPT, capture=["/etc/passwd"])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ----- shared memory only for clients on this host ------------------------------------------------------

@pytest.mark.parametrize("peer, here", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.8.9.1:5000", True), ("ipv6:%5B::1%5D:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:5000", True), ("unix:/tmp/lmscope.sock", True), ("unix-abstract:lmscope", True),
    ("ipv4:192.0.2.2:5000", False), ("ipv6:%5Bfd00::2%5D:5000", False), ("ipv6:[::ffff:10.0.0.1]:5000", False),
    ("dns:example.org:5000", False), ("ipv4:not-an-ip:1", False), ("", False),
])
def test_only_a_peer_on_this_host_counts_as_local(peer, here):
    from lmscope.service.servicer import on_this_host

    assert on_this_host(peer) is here


def _address_of_this_host() -> str | None:
    """An IPv4 address of this machine other than loopback (None without a network interface)."""
    import socket

    for target in ("10.1.2.3", "198.51.100.1"):  # no packet leaves: connecting a UDP socket picks a route
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))
            except OSError:
                continue
            address = s.getsockname()[0]
            if not address.startswith("127."):
                return address
    return None


def test_a_shared_memory_offer_over_the_network_is_not_looked_at(tiny_model, token_file):
    from lmscope.proto import shared_memory as shared

    address = _address_of_this_host()
    if address is None or not shared.SUPPORTED:
        pytest.skip("needs a network interface besides loopback, and Linux")
    args = BASE_ARGS + ("--token-file", str(token_file), "--insecure")
    with launch_server(tiny_model, host=address, args=args) as server, \
            Client(server.address, token=TOKEN, shared_memory=True) as client, shared.AnswerFile() as answer:
        request = client.run_request([PROMPT])
        request.shared_memory.CopyFrom(answer.offer())
        chunks = list(client._stream("Run", request))
        header = next(c.header for c in chunks if c.HasField("header"))
        assert "not from this host" in header.shared_memory_refused and len(chunks) > 1
        assert os.fstat(answer.fd).st_size == shared.TOKEN_BYTES  # never written
