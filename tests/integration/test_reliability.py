"""Crash isolation, deadlines and cancellation, queue limits, isolation under concurrency, memory, shutdown.

Every test runs a real `lmscope serve` on the tiny model and checks, besides what the client sees, what
only the operating system can tell: which worker processes exist, whether a worker is still computing
(its CPU time), and how much memory the processes hold (`lmscope.service.procinfo`).
"""
from __future__ import annotations

import random
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from exercise import endless, endless_request
from reliability_support import (
    CRASH_METADATA,
    NOT_SERVING,
    PROMPT,
    SERVING,
    as_arrays,
    crash_run,
    health,
    only_worker,
    stub,
)

from lmscope.client import Client, Intervention, LmscopeError, Patch
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service import procinfo
from lmscope.service.launch import launch_server

TINY_ARGS = ("--threads", "1", "--n-ctx", "4096", "--test-hooks")


@pytest.fixture(scope="module")
def one_worker(tiny_model):
    with launch_server(tiny_model, args=TINY_ARGS + ("--workers", "1", "--max-queue", "2")) as server:
        yield server


@pytest.fixture(scope="module")
def two_workers(tiny_model):
    with launch_server(tiny_model, args=TINY_ARGS + ("--workers", "2")) as server:
        yield server


# ----- crash isolation -----------------------------------------------------------------------------

@pytest.mark.parametrize("how, signal_number", [("segv", signal.SIGSEGV), ("abort", signal.SIGABRT)])
def test_a_crashing_worker_fails_its_request_and_is_replaced(one_worker, how, signal_number):
    with Client(one_worker.address, timeout=120) as client:
        before = client.run(PROMPT, layers=[1])
        old_worker = only_worker(one_worker)
        error = crash_run(one_worker.address, how)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert f"the model worker crashed (signal {int(signal_number)})" in error.details()
        assert "retry the request" in error.details()
        after = client.run(PROMPT, layers=[1])  # waits in the queue for the replacement worker
    new_worker = only_worker(one_worker)
    assert new_worker != old_worker
    assert after.token_ids == before.token_ids
    np.testing.assert_array_equal(after.resid_post(1), before.resid_post(1))
    np.testing.assert_array_equal(after.logits, before.logits)


def test_with_two_workers_a_crash_fails_only_its_own_request(two_workers):
    with Client(two_workers.address, timeout=120) as client:
        pin = endless(client)
        expected = client.generate(PROMPT, max_tokens=1500, interventions=pin)
        assert len(expected.token_ids) == 1500
        first_token = threading.Event()
        outcome = {}

        def long_generation():
            outcome["generation"] = client.generate(PROMPT, max_tokens=1500, interventions=pin,
                                                    on_token=lambda _: first_token.set())
            outcome["finished"] = time.monotonic()

        thread = threading.Thread(target=long_generation)
        thread.start()
        assert first_token.wait(60)
        error = crash_run(two_workers.address, "segv")
        crash_answered = time.monotonic()
        thread.join(120)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "crashed" in error.details()
    assert crash_answered < outcome["finished"], "the crash did not overlap the generation"
    assert outcome["generation"].token_ids == expected.token_ids
    assert outcome["generation"].finish_reason == "length"
    deadline = time.monotonic() + 60
    while len(procinfo.worker_pids(two_workers.process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(procinfo.worker_pids(two_workers.process.pid)) == 2


def test_a_worker_that_cannot_be_restarted_fails_fast_and_recovers(tiny_model, tmp_path):
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_model, model)
    with launch_server(model, args=TINY_ARGS) as server, Client(server.address, timeout=60) as client:
        expected = client.run(PROMPT, layers=[0]).resid_post(0)
        model.rename(tmp_path / "moved-away.gguf")
        assert crash_run(server.address, "segv").code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 30
        while health(server.address) == SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health(server.address) == NOT_SERVING
        started = time.monotonic()
        with pytest.raises(LmscopeError) as info:
            client.run(PROMPT, layers=[0])
        assert time.monotonic() - started < 5, "a request waited for a worker that cannot start"
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "restarting it failed" in info.value.message and "could not load the model" in info.value.message
        (tmp_path / "moved-away.gguf").rename(model)
        deadline = time.monotonic() + 60
        while health(server.address) != SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health(server.address) == SERVING
        np.testing.assert_array_equal(client.run(PROMPT, layers=[0]).resid_post(0), expected)


# ----- deadlines and cancellation ------------------------------------------------------------------

def test_a_deadline_stops_a_long_generation_and_frees_the_worker(one_worker):
    with Client(one_worker.address, timeout=60) as client, Client(one_worker.address, timeout=0.5) as hasty:
        pin = endless(client)
        started = time.monotonic()
        with pytest.raises(LmscopeError) as info:
            hasty.generate(PROMPT, max_tokens=4000, interventions=pin)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        # 4000 pinned tokens take many seconds; the worker must stop at once instead.
        assert procinfo.seconds_until_idle(only_worker(one_worker)) < 5
        started = time.monotonic()
        assert client.run(PROMPT, layers=[0], logits=False).resid_post(0).shape[1] == 64
        assert time.monotonic() - started < 5


def test_a_deadline_stops_a_long_batched_run(one_worker):
    with Client(one_worker.address, timeout=60) as client, Client(one_worker.address, timeout=0.5) as hasty:
        ids = client.tokenize("one two three four five six seven eight nine ten " * 100).token_ids[:1000]
        with pytest.raises(LmscopeError) as info:
            hasty.run_batch([ids] * 64, batch_size=64, logits=False, capture=[])
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert procinfo.seconds_until_idle(only_worker(one_worker)) < 5
        assert client.run(PROMPT, layers=[0], logits=False).resid_post(0).shape[1] == 64


def test_a_streaming_generation_stops_when_its_client_goes_away(one_worker):
    with Client(one_worker.address, timeout=60) as client:
        request = endless_request(client)
        channel = grpc.insecure_channel(one_worker.address)
        stream = stub(one_worker.address, channel).Generate(request, timeout=60)
        events = [next(stream) for _ in range(5)]
        assert events[0].HasField("start") and events[4].HasField("token")
        channel.close()  # the client goes away mid-stream
        assert procinfo.seconds_until_idle(only_worker(one_worker)) < 5
        started = time.monotonic()
        client.run(PROMPT, layers=[0], logits=False)
        assert time.monotonic() - started < 5


def test_a_worker_that_ignores_a_cancel_is_replaced(one_worker):
    """A worker stuck in a call that never checks the cancel flag (test hook: it sleeps) is killed once
    the request has been cancelled for 10 s, and a new worker serves the next request."""
    old_worker = only_worker(one_worker)
    request = pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)])
    with pytest.raises(grpc.RpcError) as info:
        list(stub(one_worker.address).Run(request, metadata=((CRASH_METADATA, "hang"),), timeout=1))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    with Client(one_worker.address, timeout=60) as client:
        client.run(PROMPT, layers=[0], logits=False)
    assert 5 < time.monotonic() - started < 30  # it waited for the 10 s grace, then for the new worker
    assert only_worker(one_worker) != old_worker


# ----- queue limit and health ----------------------------------------------------------------------

def test_past_the_queue_limit_requests_are_refused_and_health_still_answers(one_worker):
    # One worker and --max-queue 2: one request runs, two wait, the rest are refused at once.
    with Client(one_worker.address, timeout=60) as client:
        request = endless_request(client)
    channel = grpc.insecure_channel(one_worker.address)
    inspector = stub(one_worker.address, channel)
    running = inspector.Generate(request, timeout=60)
    assert next(running).HasField("start")
    queued = [inspector.Generate(request, timeout=60) for _ in range(2)]
    time.sleep(1.0)  # let both reach the server's queue
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(inspector.Generate(request, timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in info.value.details() and "limit 2" in info.value.details()
        assert time.monotonic() - started < 5
    started = time.monotonic()
    assert health(one_worker.address) == SERVING
    assert inspector.GetModelInfo(pb.ModelInfoRequest(), timeout=10).n_layer == 4
    assert time.monotonic() - started < 2
    channel.close()
    del running, queued
    assert procinfo.seconds_until_idle(only_worker(one_worker), timeout=20) < 20
    with Client(one_worker.address, timeout=30) as client:
        client.run(PROMPT, layers=[0], logits=False)


# ----- isolation under concurrency ---------------------------------------------------------------

def _mixed_requests(client) -> list:
    """Requests whose results differ from each other, so that any cross-talk shows."""
    direction = np.random.default_rng(3).standard_normal(64).astype(np.float32) * 4
    donor = client.run("A completely different sentence", layers=[1, 2])
    ids = client.tokenize("Hello world, this is a longer prompt with more tokens").token_ids
    return [
        lambda c: c.run(PROMPT),
        lambda c: c.run(PROMPT, steer={1: direction}),
        lambda c: c.run(ids, steer={2: np.ones(64, np.float32) * -3}, capture=["blocks.*.mlp_out"]),
        lambda c: c.run(PROMPT, ablate=np.eye(64, dtype=np.float32)[5]),
        lambda c: c.run(ids, patch=[Patch(1, -1, donor.resid_post(1)[-1])], positions=[0, -1]),
        lambda c: c.run(PROMPT, capture=["blocks.0.attn.pattern", "blocks.3.mlp.post"], logits="last"),
        lambda c: c.run(ids, interventions=[Intervention("add", ["blocks.0.attn_out"], np.full(64, 0.5, np.float32),
                                                         positions=[2])]),
    ]


def test_concurrent_clients_get_the_same_results_as_serial_ones(two_workers):
    with Client(two_workers.address, timeout=120) as client:
        requests = _mixed_requests(client)
        serial = [as_arrays(request(client)) for request in requests]
    jobs = [(i, request) for i, request in enumerate(requests)] * 4
    random.Random(5).shuffle(jobs)
    results: list[tuple[int, dict]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_thread(my_jobs):
        try:
            with Client(two_workers.address, timeout=120) as own:
                for i, request in my_jobs:
                    arrays = as_arrays(request(own))
                    with lock:
                        results.append((i, arrays))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(jobs[k::8],)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(results) == len(jobs)
    for i, arrays in results:
        assert arrays.keys() == serial[i].keys()
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, serial[i][name], err_msg=f"request {i}, {name}")


# ----- memory ----------------------------------------------------------------------------------------

def test_memory_stays_flat_over_many_requests(one_worker):
    """No per-request leak: after a warm-up, 300 more requests (each returning ~250 KB of captures and
    logits, with interventions) leave the resident memory of the front end and the worker flat."""
    pid = one_worker.process.pid
    with Client(one_worker.address, timeout=60) as client:
        steer = {2: np.ones(64, np.float32)}

        def mixed(k):
            kind = k % 4
            if kind == 0:
                client.run(PROMPT, capture="*")
            elif kind == 1:
                client.run(PROMPT, steer=steer, capture=["blocks.*.resid_post", "blocks.1.attn.pattern"])
            elif kind == 2:
                client.generate(PROMPT, max_tokens=8, steer=steer)
            else:
                client.lens_vectors(np.ones((16, 64), np.float32), top_k=5, target_ids=[1, 2, 3])

        for k in range(100):
            mixed(k)
        before = procinfo.server_rss_bytes(pid)
        for k in range(300):
            mixed(k)
        after = procinfo.server_rss_bytes(pid)
    growth = {name: (after[name] - before[name]) / 2**20 for name in before}
    assert growth["workers"] < 16 and growth["front_end"] < 16, (before, after)


# ----- graceful shutdown -----------------------------------------------------------------------------

def _serving(address: str) -> bool:
    try:
        return health(address, timeout=2) == SERVING
    except grpc.RpcError:
        return False


def test_sigterm_lets_an_in_flight_generation_finish_and_exits_zero(tiny_model):
    server = launch_server(tiny_model, args=TINY_ARGS + ("--grace", "60"))
    with Client(server.address, timeout=120) as client:
        pin = endless(client)
        first_token = threading.Event()
        outcome = {}

        def generation():
            outcome["generation"] = client.generate(PROMPT, max_tokens=600, interventions=pin,
                                                    on_token=lambda _: first_token.set())

        thread = threading.Thread(target=generation)
        thread.start()
        assert first_token.wait(60)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _serving(server.address):
            time.sleep(0.05)
        time.sleep(0.5)  # health turns NOT_SERVING just before the gRPC server stops taking calls
        with pytest.raises(LmscopeError) as refused:
            client.run(PROMPT)  # no new work once stopping
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        thread.join(120)
        assert server.process.wait(60) == 0
    assert len(outcome["generation"].token_ids) == 600
    assert any(line.startswith("lmscope: stopping") for line in server.log)


def test_sigterm_cancels_what_outlasts_the_grace_period_and_exits_zero(tiny_model):
    server = launch_server(tiny_model, args=TINY_ARGS + ("--grace", "1"))
    with Client(server.address, timeout=120) as client:
        request = endless_request(client)
        stream = stub(server.address).Generate(request, timeout=120)
        assert next(stream).HasField("start")
        worker = only_worker(server)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert server.process.wait(30) == 0
        assert time.monotonic() - started < 15
    with pytest.raises(OSError):
        procinfo.cpu_seconds(worker)  # the worker is gone too
