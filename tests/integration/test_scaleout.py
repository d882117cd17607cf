"""Several servers behind one client: spreading, ordering, fail-over, and the same-model check.

Real `lmscope serve` processes on loopback (the tiny model, one thread each). The fail-over test kills one
server with SIGKILL while a 300-prompt batch is half done, as a crashed host would go, and compares every
result with a single-server run of the same batch (same request composition, so the numbers must be
bit-identical, whichever server computed them).
"""
from __future__ import annotations

import logging
import secrets
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from tolerances import SAME_KERNELS

from lmscope.client import Client, LmscopeError
from lmscope.client.core import ModelMismatchError
from lmscope.client.servers import ServerSet
from lmscope.service import procinfo
from lmscope.service.launch import launch_server
from lmscope.service.testing import build_tiny_model

SERVER_ARGS = ("--threads", "1", "--n-ctx", "1024")
WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars fade".split()
PROMPTS = [f"{i}: " + " ".join(WORDS[i % 5: i % 5 + 2 + i % 9]) for i in range(300)]
OPTIONS = dict(layers=[0, 3], logits="last", batch_size=4)


def _launch(models, extra_args=()):
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda m: launch_server(m, args=(*SERVER_ARGS, *extra_args), timeout=120), models))


@pytest.fixture
def three_servers(tiny_model):
    servers = _launch([tiny_model] * 3)
    yield servers
    for server in servers:
        server.stop()


def _assert_same_runs(runs, expected):
    assert len(runs) == len(expected)
    for run, ref in zip(runs, expected):
        assert run.token_ids == ref.token_ids
        assert run.positions == ref.positions
        assert np.array_equal(run.logits, ref.logits)
        assert run.captures.keys() == ref.captures.keys()
        for site in ref.captures:
            assert np.array_equal(run.captures[site], ref.captures[site]), site


def _kill_while_computing(server, timeout: float = 10.0) -> None:
    """SIGKILL the server while its worker computes a request, so that a request is in flight on it: the
    batch's later requests are already running on the three servers (the client keeps a window of them
    going), but on a fast model they can all have finished by the time the consumer gets here, and a kill
    then hits an idle server and tests no fail-over."""
    workers = procinfo.worker_pids(server.process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(_state(pid) == "R" for pid in workers):
            break
    server.process.kill()
    server.process.wait(10)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_batch_survives_a_server_killed_midway(three_servers, caplog):
    survivor, victim, third = three_servers
    with Client(survivor.address, max_in_flight=1, timeout=60) as single:
        expected = single.run_batch(PROMPTS, **OPTIONS)
        # Prompt order: each result is the prompt it belongs to (the prompts tokenize differently).
        for i in (0, 1, 150, 299):
            assert expected[i].token_ids == single.tokenize(PROMPTS[i]).token_ids
    assert len({tuple(r.token_ids) for r in expected}) == len(PROMPTS)

    caplog.set_level(logging.WARNING, logger="lmscope.client")
    runs = []
    with Client([s.address for s in three_servers], timeout=60) as client:
        assert client.model_info().n_workers == 1
        for i, run in enumerate(client.iter_runs(PROMPTS, **OPTIONS)):
            runs.append(run)
            if i == 100:
                _kill_while_computing(victim)
    assert victim.process.returncode is not None and survivor.process.poll() is None and third.process.poll() is None
    _assert_same_runs(runs, expected)
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retried, "the killed server had requests in flight, which should have been sent again"
    assert all("UNAVAILABLE" in message for message in retried)


def test_default_window_counts_every_servers_workers(three_servers):
    with Client([s.address for s in three_servers]) as client:
        client.model_info()
        assert client._n_workers == 3
        runs = client.run_batch(PROMPTS[:20], **OPTIONS)
    with Client(three_servers[0].address, max_in_flight=1) as single:
        _assert_same_runs(runs, single.run_batch(PROMPTS[:20], **OPTIONS))


def test_embed_spreads_and_keeps_order(three_servers):
    texts = PROMPTS[:24]
    with Client([s.address for s in three_servers]) as client:
        spread = client.embed(texts, batch_size=2)
    with Client(three_servers[0].address, max_in_flight=1) as single:
        one_by_one = np.stack([single.embed(t) for t in texts])
    assert spread.shape == one_by_one.shape
    # Batches of 2 short prompts (< 64 rows): the same kernels row by row (tests/tolerances.py); unit
    # vectors, so a relative SAME_KERNELS per state is at most twice that after normalizing.
    np.testing.assert_allclose(spread, one_by_one, atol=2 * SAME_KERNELS)


def test_servers_holding_different_models_are_refused(tiny_model, model_dir):
    other = build_tiny_model(model_dir / "tiny-seed1.gguf", n_layer=4, n_embd=64, n_head=4, n_head_kv=2,
                             n_ff=128, seed=1)
    servers = _launch([tiny_model, other])
    try:
        with Client([s.address for s in servers]) as client:
            with pytest.raises(ModelMismatchError) as caught:
                client.run_batch(PROMPTS[:8], **OPTIONS)
        error = caught.value
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert set(error.fingerprints) == {s.address for s in servers}
        assert len(set(error.fingerprints.values())) == 2
        for server in servers:
            assert server.address in error.message
    finally:
        for server in servers:
            server.stop()


def test_a_server_that_is_down_at_start_is_left_out(tiny_server, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    caplog.set_level(logging.WARNING, logger="lmscope.client")
    with Client([tiny_server.address, closed], timeout=30) as client:
        runs = client.run_batch(PROMPTS[:12], **OPTIONS)
    with Client(tiny_server.address) as alone:
        expected = alone.run_batch(PROMPTS[:12], **OPTIONS)
    assert [r.token_ids for r in runs] == [r.token_ids for r in expected]
    assert any(closed in r.getMessage() for r in caplog.records)


def test_a_refused_request_is_raised_at_once_not_retried(tiny_server, caplog):
    caplog.set_level(logging.WARNING, logger="lmscope.client")
    with Client(tiny_server.address) as client:
        with pytest.raises(LmscopeError) as caught:
            client.run_batch(PROMPTS[:12], positions=[500], **OPTIONS)
    assert caught.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_a_dns_name_reaches_the_server_behind_it(tiny_server):
    port = tiny_server.address.rsplit(":", 1)[1]
    with Client(f"dns:///localhost:{port}") as client:
        runs = client.run_batch(PROMPTS[:6], **OPTIONS)
    with Client(tiny_server.address, max_in_flight=1) as single:
        _assert_same_runs(runs, single.run_batch(PROMPTS[:6], **OPTIONS))


def test_ipv4_and_ipv6_servers_behind_one_channel(tiny_model):
    v4 = launch_server(tiny_model, args=SERVER_ARGS, timeout=120)
    v6 = launch_server(tiny_model, host="::1", args=SERVER_ARGS, timeout=120)
    try:
        assert v6.address.startswith("[::1]:")
        with Client([v4.address, v6.address]) as client:
            assert client.servers.target.startswith("ipv6:")
            runs = client.run_batch(PROMPTS[:10], **OPTIONS)
        with Client(v6.address, max_in_flight=1) as single:
            _assert_same_runs(runs, single.run_batch(PROMPTS[:10], **OPTIONS))
    finally:
        v4.stop()
        v6.stop()


@pytest.mark.parametrize("address, target, endpoints", [
    ("10.0.0.5:50051", "10.0.0.5:50051", ("10.0.0.5:50051",)),
    (["10.0.0.5:50051", "10.0.0.6:50052"], "ipv4:10.0.0.5:50051,10.0.0.6:50052", ("10.0.0.5:50051", "10.0.0.6:50052")),
    ("10.0.0.5:1,10.0.0.6:2", "ipv4:10.0.0.5:1,10.0.0.6:2", ("10.0.0.5:1", "10.0.0.6:2")),
    (["[::1]:7", "[fe80::1]:8"], "ipv6:[::1]:7,[fe80::1]:8", ("[::1]:7", "[fe80::1]:8")),
    (["10.0.0.5:1", "[::1]:2"], "ipv6:[::ffff:10.0.0.5]:1,[::1]:2", ("10.0.0.5:1", "[::1]:2")),
    ("ipv4:1.2.3.4:5,1.2.3.5:5", "ipv4:1.2.3.4:5,1.2.3.5:5", ("1.2.3.4:5", "1.2.3.5:5")),
    (["10.0.0.5"], "10.0.0.5:50051", ("10.0.0.5:50051",)),
])
def test_addresses_become_one_balanced_target(address, target, endpoints):
    servers = ServerSet.parse(address)
    assert servers.target == target
    assert servers.endpoints == endpoints


# Host names resolve through the system's resolver, where 'localhost' is 127.0.0.1 alone on some machines and
# ::1 and 127.0.0.1 on others: both answers are given here, so both cases run everywhere.
RESOLVERS = {
    "ipv4 only": [(socket.AF_INET, "127.0.0.1")],
    "ipv6 and ipv4": [(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")],
}


@pytest.mark.parametrize("resolver, address, target, endpoints", [
    ("ipv4 only", ["localhost:1", "10.0.0.6:2"], "ipv4:127.0.0.1:1,10.0.0.6:2", ("localhost:1", "10.0.0.6:2")),
    ("ipv6 and ipv4", ["localhost:1", "10.0.0.6:2"], "ipv6:[::1]:1,[::ffff:127.0.0.1]:1,[::ffff:10.0.0.6]:2",
     ("localhost:1", "10.0.0.6:2")),
    ("ipv4 only", "dns:///localhost:9", "dns:///localhost:9", ("127.0.0.1:9",)),
    ("ipv6 and ipv4", "dns:///localhost:9", "dns:///localhost:9", ("[::1]:9", "127.0.0.1:9")),
])
def test_host_names_become_every_address_they_resolve_to(monkeypatch, resolver, address, target, endpoints):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        return [(family, socket.SOCK_STREAM, 6, "", (ip, port) if family == socket.AF_INET else (ip, port, 0, 0))
                for family, ip in RESOLVERS[resolver]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    servers = ServerSet.parse(address)
    assert servers.target == target
    assert servers.endpoints == endpoints
    assert servers.authority == ("localhost" if isinstance(address, list) else None)


@pytest.mark.parametrize("address, message", [
    ("::1:50051", "needs brackets"),
    ("10.0.0.5:http", "bad port"),
    ([], "no server address"),
    ([":50051", "10.0.0.5:1"], "no host"),
])
def test_bad_addresses_say_what_to_fix(address, message):
    with pytest.raises(ValueError, match=message):
        ServerSet.parse(address)


@pytest.fixture
def tls_files(tmp_path):
    # Not a skip: scripts/setup.sh installs openssl where it is missing.
    assert shutil.which("openssl"), "the openssl command is needed to make a test certificate: run `make setup`"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", tmp_path / "tls.key", "-out", tmp_path / "tls.crt", "-subj", "/CN=inspect.internal",
                    "-addext", "subjectAltName=DNS:inspect.internal"], check=True, capture_output=True)
    (tmp_path / "token").write_text(secrets.token_hex(16))
    return tmp_path


def test_tls_and_token_across_replicas(tiny_model, tls_files):
    """The container's default: TLS and a bearer token; clients dial IPs and check the certificate's name."""
    servers = _launch([tiny_model] * 2, ("--tls-cert", str(tls_files / "tls.crt"), "--tls-key",
                                         str(tls_files / "tls.key"), "--token-file", str(tls_files / "token")))
    addresses = [s.address for s in servers]
    tls = dict(tls=True, root_certificates=(tls_files / "tls.crt").read_bytes(), tls_server_name="inspect.internal")
    try:
        with Client(addresses, token=(tls_files / "token").read_text(), **tls) as client:
            runs = client.run_batch(PROMPTS[:8], **OPTIONS)
            assert [r.token_ids for r in runs] == [client.tokenize(p).token_ids for p in PROMPTS[:8]]
        with Client(addresses, token="wrong-token-of-enough-length", **tls) as client:
            with pytest.raises(LmscopeError) as caught:
                client.run_batch(PROMPTS[:2], **OPTIONS)
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        # The exec health probe of docs/deployment.md: TLS, no token (health is exempt from it).
        probe = ("import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
                 f"ch = grpc.secure_channel('{addresses[0]}', grpc.ssl_channel_credentials("
                 f"open('{tls_files / 'tls.crt'}', 'rb').read()), "
                 "options=[('grpc.ssl_target_name_override', 'inspect.internal')]); "
                 "sys.exit(g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=3).status "
                 "!= h.HealthCheckResponse.SERVING)")
        assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
    finally:
        for server in servers:
            server.stop()
