"""The path between front end and worker: what the front end loads, how answers cross the pipe, which RPCs
the client retries, and how the test hooks are guarded.

The front-end checks read the running server's memory map (`/proc/PID/maps`), so they see what the
process really loaded, not what one import path pulls in.
"""
from __future__ import annotations

import multiprocessing as mp
import pathlib
import threading
import time

import numpy as np
from reliability_support import CRASH_METADATA, PROMPT, only_worker, stub

from lmscope.client import Client
from lmscope.client.servers import RETRIED_METHODS, service_config
from lmscope.proto import tensors
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service import procinfo
from lmscope.service.contracts import NamedTensor, Tensors
from lmscope.service.launch import launch_server
from lmscope.service.pipe import Kind, receive_message, send_message
from lmscope.service.server import _argument_error, add_arguments

NATIVE_LLAMA = ("libllama", "libggml", "llama_cpp")


def _llama_libraries(pid: int) -> list[str]:
    return sorted(p for p in procinfo.mapped_files(pid) if any(name in p for name in NATIVE_LLAMA))


def test_the_front_end_loads_no_native_library_and_maps_no_weights(tiny_server, tiny_model):
    front_end = tiny_server.process.pid
    workers = procinfo.worker_pids(front_end)
    assert workers
    for worker in workers:  # the check sees llama.cpp and the model where they are
        assert any("libllama" in p for p in _llama_libraries(worker)), _llama_libraries(worker)
        assert str(pathlib.Path(tiny_model).resolve()) in procinfo.mapped_files(worker)
    assert _llama_libraries(front_end) == []
    assert str(pathlib.Path(tiny_model).resolve()) not in procinfo.mapped_files(front_end)


def test_workers_load_neither_grpc_nor_llama_cpp_python_s_high_level_layer(tiny_server):
    """A worker needs llama.cpp's C API, numpy and protobuf: gRPC (lmscope.client's lazy exports),
    llama-cpp-python's `Llama` layer with its sqlite-backed cache (service/native.py) and OpenSSL (the front
    end hashes the model file) stay out of it. Their native modules show in the memory map when loaded."""
    for worker in procinfo.worker_pids(tiny_server.process.pid):
        mapped = procinfo.mapped_files(worker)
        assert any("libllama" in p for p in mapped)  # the check sees what the worker loaded
        assert not [p for p in mapped if "cygrpc" in p or "_sqlite3" in p or "libcrypto" in p]


def test_arrays_cross_the_pipe_intact_into_buffers_of_their_own():
    rng = np.random.default_rng(0)
    answer = Tensors([NamedTensor("f32", 0, rng.standard_normal((128, 1000), dtype=np.float32)),
                      NamedTensor("f16", 1, rng.standard_normal((3, 5)).astype(np.float16)),
                      NamedTensor("i32", 0, np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]),  # not contiguous
                      NamedTensor("empty", 0, np.zeros((0, 7), np.float32))])
    sender, receiver = mp.Pipe()
    writer = threading.Thread(target=send_message, args=(sender, (Kind.DONE, answer)))  # more than a pipe holds
    writer.start()
    try:
        kind, received = receive_message(receiver)
    finally:
        writer.join(10)
        sender.close()
        receiver.close()
    assert kind is Kind.DONE
    for sent, got in zip(answer.tensors, received.tensors):
        assert (got.name, got.sequence, got.array.dtype, got.array.shape) == \
               (sent.name, sent.sequence, sent.array.dtype, sent.array.shape)
        np.testing.assert_array_equal(got.array, sent.array)
    big = received.tensors[0].array
    owner = big
    while getattr(owner, "base", None) is not None or isinstance(owner, memoryview):
        owner = owner.obj if isinstance(owner, memoryview) else owner.base
    assert memoryview(owner).nbytes == big.nbytes  # one buffer of the array's own size, not a bigger message


def test_the_client_retries_exactly_the_reads_the_proto_marks_side_effect_free():
    service = pb.DESCRIPTOR.services_by_name["Inspector"]
    marked = [m.name for m in service.methods if m.GetOptions().idempotency_level]
    assert set(RETRIED_METHODS) == set(marked)
    assert "NearestTokens" in RETRIED_METHODS  # once missing from a hand-kept list
    assert "Run" not in RETRIED_METHODS and "Generate" not in RETRIED_METHODS
    assert all(f'"method": "{m}"' in service_config() for m in RETRIED_METHODS)


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_test_hooks_are_on_only_by_flag_and_only_on_loopback(monkeypatch):
    monkeypatch.setenv("LMSCOPE_TEST_HOOKS", "1")
    assert _parse([]).test_hooks is False
    assert _argument_error(_parse(["--test-hooks"])) is None
    problem = _argument_error(_parse(["--test-hooks", "--host", "0.0.0.0", "--insecure"]))
    assert problem is not None and "--test-hooks" in problem


def test_without_test_hooks_the_crash_metadata_is_ignored(tiny_model):
    with launch_server(tiny_model, args=("--threads", "1", "--n-ctx", "256")) as server:
        worker = only_worker(server)
        chunks = list(stub(server.address).Run(pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)]),
                                               metadata=((CRASH_METADATA, "segv"),), timeout=60))
        assert sum(c.HasField("header") for c in chunks) == 1 and len(chunks) > 1
        assert only_worker(server) == worker
        with Client(server.address) as client:
            assert client.tokenize(PROMPT).token_ids


def test_every_rpc_is_served_by_the_typed_path(client):
    """One call of each RPC through the whole path (servicer -> job -> worker -> answer)."""
    info = client.model_info()
    ids = client.tokenize(PROMPT).token_ids
    assert client.detokenize(ids).endswith(PROMPT.split()[-1])
    run = client.run(ids, layers=[0], logits="all")
    assert run.logits.shape == (len(ids), info.n_vocab)
    generation = client.generate(ids, max_tokens=2)
    assert generation.prompt_token_ids == ids and generation.finish_reason in ("length", "eos")
    assert client.unembed(run.resid_post(0)[-1:]).shape == (1, info.n_vocab)
    assert client.weights("token_embd.weight", [1, 2]).shape == (2, info.n_embd)
    nearest_ids, scores = client.nearest_token_ids(run.resid_post(0)[-1:], k=3)
    assert nearest_ids.shape == scores.shape == (1, 3)


def _peak_reset(pid: int) -> int:
    """Reset the process's peak resident memory (VmHWM) to its current size; return that size in bytes."""
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_bytes(pid, "VmHWM")


def _status_bytes(pid: int, key: str) -> int:
    line = next(x for x in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def test_a_big_answer_is_never_whole_in_the_front_end(smol_server, smol_client):
    """All-position logits of 128 tokens (24 MiB on SmolLM2) pass through the front end in pieces.

    What the front end may hold at once: the pieces its queue keeps while the client reads
    (`_Inbox.QUEUED_BYTES`) plus the one the reader thread has just taken, the one being cut into gRPC
    chunks and their bytes copies, and what gRPC buffers for the connection: a few MiB. Half the answer
    leaves room for all that, and a front end that takes the answer whole (as before) adds at least all of
    it."""
    from lmscope.service.contracts import PIECE_BYTES
    from lmscope.service.worker import _Inbox

    prompt = smol_client.tokenize("The quick brown fox jumps over the lazy dog. " * 20).token_ids[:128]
    smol_client.run(prompt[:8], logits=True)  # threads, gRPC buffers and the reader path warm
    front_end = smol_server.process.pid
    before = _peak_reset(front_end)
    run = smol_client.run(prompt, logits=True)
    added = _status_bytes(front_end, "VmHWM") - before
    answer = run.logits.nbytes + sum(a.nbytes for a in run.hidden_states)
    assert answer > 8 * (_Inbox.QUEUED_BYTES + PIECE_BYTES)  # big enough to tell a queue from a whole answer
    assert added < answer / 2, f"the front end grew by {added / 2**20:.1f} MiB for a {answer / 2**20:.1f} MiB answer"
    # A client slower than the worker (here one that pauses at each chunk): the queue's bound, not the
    # client's speed, is what keeps the answer out of the front end.
    request = pb.UnembedRequest(vectors=tensors.to_tensor(run.hidden_states[-1]),
                                spec=pb.LensSpec(enabled=True, top_k=1, return_logits=True))
    before = _peak_reset(front_end)
    received = 0
    for chunk in stub(smol_server.address).Unembed(request, timeout=120):
        received += len(chunk.tensor.data)
        time.sleep(0.02)
    added = _status_bytes(front_end, "VmHWM") - before
    assert received > 8 * (_Inbox.QUEUED_BYTES + PIECE_BYTES)
    assert added < received / 2, \
        f"the front end grew by {added / 2**20:.1f} MiB for a {received / 2**20:.1f} MiB answer"


def test_a_stalled_client_holds_memory_in_the_front_end_never_the_worker(smol_server, smol_client):
    """A client that stops reading a big answer does not keep the (only) worker from others: after
    `_Inbox.STALLED_CLIENT_S` without progress the rest of the answer queues in the front end. When the
    client reads again, the answer is whole and equal to the one a reading client gets."""
    from lmscope.service.worker import _Inbox

    assert smol_client.model_info().n_workers == 1
    prompt = smol_client.tokenize("Once upon a time there was a lighthouse keeper. " * 20).token_ids[:128]
    request = pb.RunRequest(prompts=[pb.Prompt(token_ids=prompt)], logits=pb.LOGITS_ALL)
    expected = tensors.assemble(c.tensor for c in stub(smol_server.address).Run(request, timeout=120)
                                if c.HasField("tensor"))[("logits", 0)]
    assert expected.nbytes > 8 * _Inbox.QUEUED_BYTES  # more than the queue and the connection's window hold
    stalled = stub(smol_server.address).Run(request, timeout=120)
    first = next(stalled)  # the request is running; then this client reads nothing for a while
    started = time.monotonic()
    assert smol_client.tokenize("still served").token_ids
    waited = time.monotonic() - started
    # The worker answers the stalled request (a forward pass, well under a minute here) and is freed once the
    # front end stops waiting for the stalled client; generous, since the machine may be loaded.
    assert waited < _Inbox.STALLED_CLIENT_S + 60
    assembler = tensors.Assembler()
    for chunk in [first, *stalled]:
        if chunk.HasField("tensor"):
            assembler.add(chunk.tensor)
    np.testing.assert_array_equal(assembler.arrays()[("logits", 0)], expected)


def test_logits_at_positions_out_of_order_come_back_in_the_order_asked(smol_client):
    """Ascending positions stream logits as llama.cpp computes them; others are collected, then sent."""
    prompt = smol_client.tokenize("Paris is the capital of France and Rome of Italy.").token_ids
    forward = smol_client.run(prompt, logits=True, positions=[1, 4, 7])
    backward = smol_client.run(prompt, logits=True, positions=[7, 4, 1])
    np.testing.assert_array_equal(backward.logits, forward.logits[::-1])


def test_a_client_is_stalled_when_it_takes_nothing_from_a_full_queue_not_since_the_request_began():
    """A long computation before the first piece (a big Unembed) must not count as the client stalling:
    the grace starts when the queue is full, or at the client's last take if that is later."""
    from lmscope.service.contracts import PIECE_BYTES, TensorPiece
    from lmscope.service.worker import _Inbox

    inbox = _Inbox()
    inbox._taken_at -= 60  # the request began a minute ago and the client has had nothing to take since
    piece = TensorPiece("logits", 0, (3 * PIECE_BYTES // 4,), 0, np.zeros(PIECE_BYTES // 4, np.float32))
    for _ in range(3):
        inbox.put((Kind.ITEM, piece))
    started = time.monotonic()
    inbox.wait_for_room(give_up=lambda: time.monotonic() - started > 0.5)
    assert time.monotonic() - started >= 0.5  # it waited for the client, who may still read
    assert not inbox._stalled
