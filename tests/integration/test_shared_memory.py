"""Answers in shared memory (`lmscope.proto.shared_memory`) against the stream, and what the server refuses.

A Run's tensors take one of two ways to a client on the server's host: written into the client's memfd, or
streamed as chunks. The same request must give the same bits either way, for every shape of answer: a batch
of prompts of mixed lengths decoded over several ubatches (served with ubatches of 4 tokens; a llama and a
gemma3 tiny model), requests in
flight at once on two workers, a position subset, every logits mode (all-position logits leave the worker
ubatch by ubatch), float16, the lens with and without the raw states, the fidelity map. The refusals: an
offer the server cannot use is answered on the stream with the reason, and the server never writes into a
file that is not the client's answer file.
"""
from __future__ import annotations

import fcntl
import os
import tempfile

import grpc
import numpy as np
import pytest

from lmscope.client import Client
from lmscope.client.servers import ServerSet
from lmscope.proto import shared_memory as shared
from lmscope.proto import tensors
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service.launch import launch_server
from lmscope.service.testing import build_tiny_model

pytestmark = pytest.mark.skipif(not shared.SUPPORTED, reason="answers in shared memory need Linux's memfd")

SERVER_ARGS = ("--threads", "1", "--n-ctx", "512", "--n-batch", "4", "--workers", "2")
PROMPTS = [[1, 5, 9, 13], [1] + list(range(4, 27)), [1, 7], [1] + list(range(30, 41))]  # 4, 24, 2, 12 tokens


@pytest.fixture(scope="module", params=["llama", "gemma3"])  # gemma3: sliding window, post-norms, GeGLU
def server(request, tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("shared") / f"{request.param}.gguf", family=request.param)
    with launch_server(model, args=SERVER_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def clients(server):
    with Client(server.address, shared_memory=True) as mapped, Client(server.address, shared_memory=False) as streamed:
        yield mapped, streamed


def _arrays(run) -> dict[str, np.ndarray]:
    out = {f"capture {k}": v for k, v in run.captures.items()}
    out.update({f"extra {k}": v for k, v in run.extra.items()})
    if run.logits is not None:
        out["logits"] = run.logits
    return out


@pytest.mark.parametrize("options", [
    {},
    {"logits": "last"},
    {"logits": False, "positions": [0, -1]},
    {"positions": [-1, 0]},
    {"dtype": "float16"},
    {"fidelity": True, "logits": False},
    {"capture": "blocks.*.attn.pattern", "logits": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_a_batch_in_shared_memory_is_the_streamed_batch(clients, options):
    mapped, streamed = clients
    a = mapped.run_batch(PROMPTS, batch_size=len(PROMPTS), **options)
    b = streamed.run_batch(PROMPTS, batch_size=len(PROMPTS), **options)
    assert mapped.answers_in_shared_memory, "the server refused the offer"
    for run_a, run_b in zip(a, b):
        arrays_a, arrays_b = _arrays(run_a), _arrays(run_b)
        assert arrays_a.keys() == arrays_b.keys() and arrays_a
        for name in arrays_b:
            assert arrays_a[name].dtype == arrays_b[name].dtype, name
            np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_requests_in_flight_at_once_each_get_their_own_answer(server, clients):
    _, streamed = clients
    prompts = PROMPTS * 3
    expected = streamed.run_batch(prompts, batch_size=1)
    with Client(server.address, shared_memory=True, max_in_flight=4) as c:
        for got, want in zip(c.run_batch(prompts, batch_size=1), expected):
            assert got.token_ids == want.token_ids
            np.testing.assert_array_equal(got.logits, want.logits)
            np.testing.assert_array_equal(got.hidden_states, want.hidden_states)
        assert c.answers_in_shared_memory


def test_the_lens_in_shared_memory_is_the_streamed_lens(clients):
    mapped, streamed = clients
    a = mapped.logit_lens(PROMPTS[1], top_k=3, keep_states=True)
    b = streamed.logit_lens(PROMPTS[1], top_k=3, keep_states=True)
    for name in ("top_ids", "top_probs", "entropy", "kl_to_final", "hidden_states"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_arrays_from_shared_memory_are_the_clients_own(clients):
    """Writable, and a fresh file per request: writing into one answer changes no other."""
    mapped, _ = clients
    first = mapped.run(PROMPTS[0])
    again = first.logits.copy()
    first.logits[:] = 0
    np.testing.assert_array_equal(mapped.run(PROMPTS[0]).logits, again)


def _raw_run(client, offer: pb.SharedMemory) -> tuple[pb.RunHeader, int]:
    """A Run of PROMPTS[0] with this offer: its header and how many tensor chunks came on the stream."""
    request = client.run_request([PROMPTS[0]])
    request.shared_memory.CopyFrom(offer)
    header, chunks = None, 0
    for message in client._stub.Run(request):
        if message.HasField("header"):
            header = message.header
        else:
            chunks += 1
    return header, chunks


def test_a_used_offer_places_every_tensor_and_streams_none(clients):
    _, streamed = clients
    with shared.AnswerFile() as answer:
        header, chunks = _raw_run(streamed, answer.offer())
        arrays = answer.arrays(header.placements)
    assert chunks == 0 and not header.shared_memory_refused
    assert {name for name, _ in arrays} == {"logits", *header.sites}
    np.testing.assert_array_equal(arrays[("logits", 0)], streamed.run(PROMPTS[0]).logits)


def test_an_offer_with_the_wrong_token_is_refused_and_the_answer_streamed(clients):
    _, streamed = clients
    with shared.AnswerFile() as answer:
        offer = answer.offer()
        offer.token = bytes(b ^ 1 for b in offer.token)
        header, chunks = _raw_run(streamed, offer)
        assert os.fstat(answer.fd).st_size == shared.TOKEN_BYTES  # nothing written
    assert "token" in header.shared_memory_refused and chunks > 0 and not header.placements


def test_an_offer_of_another_kind_of_file_is_refused_untouched(clients):
    """A file that is not an answer memfd is never written, even with the right first bytes."""
    _, streamed = clients
    with tempfile.TemporaryFile() as f:
        token = os.urandom(shared.TOKEN_BYTES)
        f.write(token)
        f.flush()
        header, chunks = _raw_run(streamed, pb.SharedMemory(pid=os.getpid(), fd=f.fileno(), token=token))
        assert os.fstat(f.fileno()).st_size == shared.TOKEN_BYTES
    assert "is not an lmscope-answer memfd" in header.shared_memory_refused and chunks > 0


def test_a_file_swapped_in_after_the_name_was_checked_is_refused(monkeypatch):
    """The client could put another file at the offered number between the server's look at its name and
    its open: the name is checked again on the file the server holds."""
    real_readlink = os.readlink

    def claimed(path):  # the offered number looks like an answer memfd when first looked at
        return f"/memfd:{shared.NAME} (deleted)" if str(path).startswith(f"/proc/{os.getpid()}/fd/") \
            else real_readlink(path)

    with tempfile.TemporaryFile() as f:
        token = os.urandom(shared.TOKEN_BYTES)
        f.write(token)
        f.flush()
        monkeypatch.setattr(os, "readlink", claimed)
        with pytest.raises(shared.SharedMemoryRefused, match="is not an lmscope-answer memfd"):
            shared.AnswerWriter(os.getpid(), f.fileno(), token)
        assert os.fstat(f.fileno()).st_size == shared.TOKEN_BYTES


def test_a_file_that_cannot_hold_the_answer_is_a_clear_error_and_the_server_goes_on(clients):
    """A write into the client's file that fails (here a memfd sealed against growing; in life a full
    memory) is RESOURCE_EXHAUSTED with what to do, not INTERNAL; the worker serves the next request."""
    _, streamed = clients
    fd = os.memfd_create(shared.NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        token = os.urandom(shared.TOKEN_BYTES)
        os.pwrite(fd, token, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        with pytest.raises(grpc.RpcError) as caught:
            _raw_run(streamed, pb.SharedMemory(pid=os.getpid(), fd=fd, token=token))
    finally:
        os.close(fd)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shared_memory=False" in caught.value.details()
    assert streamed.run(PROMPTS[0]).logits.shape == (len(PROMPTS[0]), streamed.model_info().n_vocab)


def test_an_offer_from_elsewhere_is_refused(clients):
    """A process the server cannot see (another host or pid namespace: here, a pid that does not exist)."""
    _, streamed = clients
    with open("/proc/sys/kernel/pid_max") as f:
        missing = int(f.read()) + 1
    header, chunks = _raw_run(streamed, pb.SharedMemory(pid=missing, fd=3, token=b"x" * shared.TOKEN_BYTES))
    assert "cannot see the client's file" in header.shared_memory_refused and chunks > 0


@pytest.mark.parametrize("pid, fd, token", [(0, 3, 16), (1, -1, 16), (1, 3, 15)])
def test_a_malformed_offer_is_invalid(clients, pid, fd, token):
    _, streamed = clients
    with pytest.raises(grpc.RpcError) as caught:
        _raw_run(streamed, pb.SharedMemory(pid=pid, fd=fd, token=b"x" * token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared_memory needs" in caught.value.details()


def test_a_client_whose_offer_is_refused_streams_from_then_on(clients, server, monkeypatch):
    _, streamed = clients
    expected = streamed.run(PROMPTS[1]).logits
    original = shared.AnswerFile.offer
    monkeypatch.setattr(shared.AnswerFile, "offer",
                        lambda self: pb.SharedMemory(pid=os.getpid(), fd=original(self).fd, token=b"y" * 16))
    with Client(server.address, shared_memory=True) as c:
        np.testing.assert_array_equal(c.run(PROMPTS[1]).logits, expected)  # refused: streamed
        assert not c.answers_in_shared_memory
        np.testing.assert_array_equal(c.run(PROMPTS[1]).logits, expected)


def test_a_mapped_tensor_gives_its_pages_back_when_its_last_array_dies():
    """A kept tensor holds its own pages, not the whole answer's: the others' leave the file as they die."""
    size = shared.MAPPED_BYTES
    with shared.AnswerFile() as answer:
        placements = []
        for k in range(2):
            offset = shared.DATA_OFFSET + k * size
            os.pwrite(answer.fd, np.full(size // 4, k, np.float32).tobytes(), offset)
            placements.append(pb.TensorPlacement(name=f"t{k}", dtype=pb.FLOAT32, shape=[size // 4], offset=offset))
        arrays = answer.arrays(placements)
        assert not arrays[("t0", 0)].flags.owndata and arrays[("t1", 0)][0] == 1
        before = os.fstat(answer.fd).st_blocks * 512
        del arrays[("t0", 0)]
        assert before - os.fstat(answer.fd).st_blocks * 512 == size
        assert (arrays[("t1", 0)] == 1).all()


def test_a_placement_outside_the_file_is_refused_by_the_client():
    with shared.AnswerFile() as answer:
        os.pwrite(answer.fd, b"\0" * 64, shared.DATA_OFFSET)
        bad = pb.TensorPlacement(name="logits", dtype=pb.FLOAT32, shape=[4, 8], offset=shared.DATA_OFFSET)
        with pytest.raises(tensors.TensorCodecError, match="placed at bytes"):
            answer.arrays([bad])


@pytest.mark.parametrize("address, here", [
    ("127.0.0.1:5000", True), ("localhost:5000", True), ("[::1]:5000", True), ("127.0.0.1:1,127.0.0.1:2", True),
    ("unix:/tmp/lmscope.sock", True), ("dns:///localhost:5000", True),
    ("10.0.0.1:5000", False), ("127.0.0.1:1,10.0.0.1:2", False), ("ipv4:192.0.2.2:5000", False),
])
def test_a_client_offers_shared_memory_only_where_every_server_is_on_this_host(address, here):
    assert ServerSet.parse(address).local is here
    with Client(address) as c:
        assert c.answers_in_shared_memory is here
