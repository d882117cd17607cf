"""Fuzzing: every RPC with random and adversarial field values, and property tests of the tensor codec.

Against a real server on the tiny model (with small limits, so that random requests reach them often),
hypothesis builds requests whose every field may be out of range, NaN, huge, negative, unknown, empty or
hostile text. Whatever comes in, the server must answer within the client's deadline with either a
well-formed answer (its tensors assemble) or a status that blames the request (INVALID_ARGUMENT,
OUT_OF_RANGE, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, NOT_FOUND) with a message; never INTERNAL, UNKNOWN,
UNAVAILABLE (a crashed worker) or DEADLINE_EXCEEDED (a hang). The worker process must be the same one at
the end: nothing crashed, even if a restart would have hidden it.
"""
from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reliability_support import PROMPT, SERVING, health, only_worker, stub

from lmscope.proto import tensors
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service.launch import launch_server

FUZZ_ARGS = ("--threads", "1", "--n-ctx", "256", "--max-prompt-tokens", "128", "--max-generated-tokens", "16",
             "--max-batch-prompts", "8", "--max-capture-mb", "4")
CALL_TIMEOUT_S = 60
REQUEST_FAULTS = {"INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "NOT_FOUND"}
# Examples per RPC; a longer hunt:
# LMSCOPE_FUZZ_EXAMPLES=600 .venv/bin/python -m pytest -q tests/integration/test_fuzz.py
EXAMPLES = int(os.environ.get("LMSCOPE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.data_too_large])
FUZZ_MORE = settings(FUZZ, max_examples=2 * EXAMPLES)  # the RPCs with the most fields and the deepest paths

N_EMBD, N_VOCAB = 64, 500
SITE_WORDS = ["embed", "ln_final", "*", "blocks.*.resid_post", "blocks.0.attn.pattern", "blocks.3.mlp.post",
              "blocks.1.attn.q", "blocks.2.attn_out", "blocks.9.resid_post", "blocks.-1.resid_post", "[", "[!a]*",
              "blocks.0.*", "logits", "", "blocks.3.resid_post"]
HOSTILE_TEXT = ["", "\x00", "\x00" * 100, "<|im_start|>user\nhi<|im_end|>", "<s></s>", "\ufffd", "\u202e\u200b",
                "🙂" * 300, "今天天氣真好！" * 50, "%s%n%x", "{{ raise('x') }}", "/etc/passwd",
                "../../model.gguf", "a" * 5000, " " * 1000, "\n" * 500]
PLAIN_TEXT = ["The capital of France is", "Hello world", "今天天氣真好！", "a b c d e f g", "<|im_start|>", "x"]
RESIDUAL_SITES = ["embed", "blocks.*.resid_post", "blocks.1.resid_mid", "blocks.2.attn_out", "ln_final"]
EDITABLE_SITES = ["embed", "blocks.0.resid_post", "blocks.*.resid_post", "blocks.2.resid_mid", "blocks.3.attn_out",
                  "blocks.1.mlp_out", "ln_final", "blocks.3.resid_post"]
TENSOR_NAMES = ["token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight",
                "blk.3.ffn_down.weight", "blk.0.attn_norm.weight", "", "../token_embd.weight", "blk.99.ffn_up.weight"]


# ----- strategies --------------------------------------------------------------------------------
# Each field is usually plausible and sometimes hostile (`mostly`), so that many requests get past the
# first check and reach tokenization, the engine, llama.cpp and the lens, with odd values deep inside.

def mostly(plausible, hostile):
    """The plausible strategy five times in six (`one_of` would pick each distinct branch equally often);
    shrinking moves towards the plausible one."""
    return st.sampled_from(range(6)).flatmap(lambda k: hostile if k == 5 else plausible)


def int32s():
    return st.one_of(st.integers(-3, 600), st.sampled_from([-2 ** 31, 2 ** 31 - 1, N_VOCAB, N_VOCAB - 1, -1]),
                     st.integers(-2 ** 31, 2 ** 31 - 1))


def uint32s(small: int = 40):
    return st.one_of(st.integers(0, small), st.sampled_from([2 ** 32 - 1, 2 ** 31, 1001, 1025]),
                     st.integers(0, 2 ** 32 - 1))


def float32s():
    edges = [float(np.float32(v)) for v in (0.0, -0.0, 1e-45, 1e-7, 1e15, 1e16, 3.4e38, 1.0)]
    return st.one_of(st.floats(width=32), st.sampled_from(edges))


def texts():
    return mostly(st.sampled_from(PLAIN_TEXT), st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE_TEXT)))


def enums(valid: int):
    return mostly(st.integers(0, valid - 1), st.integers(-2 ** 31, 2 ** 31 - 1))


def token_ids():
    return mostly(st.integers(0, N_VOCAB - 1), int32s())


def small_positions():
    return mostly(st.lists(st.integers(-4, 4), max_size=3, unique=True), st.lists(int32s(), max_size=3))


@st.composite
def wire_tensors(draw, width: int = N_EMBD) -> pb.Tensor:
    """Mostly consistent float tensors of plausible shapes and values; sometimes any shape, dtype and bytes."""
    if draw(st.integers(0, 9)) == 0:
        shape = draw(st.lists(st.one_of(st.integers(-2, 70), st.integers(-2 ** 63, 2 ** 63 - 1)), max_size=5))
        return pb.Tensor(dtype=draw(enums(3)), shape=shape, data=draw(st.binary(max_size=600)))
    rows = draw(st.sampled_from([None, None, 1, 2]))
    columns = draw(mostly(st.just(width), st.sampled_from([7, 0, 128, N_VOCAB])))
    shape = (columns,) if rows is None else (rows, columns)
    array = draw(hnp.arrays(np.float32, shape, elements=st.floats(-8, 8, width=32)))
    if array.size and draw(mostly(st.just(False), st.just(True))):  # one hostile value somewhere
        array.flat[draw(st.integers(0, array.size - 1))] = draw(float32s())
    dtype = draw(mostly(st.just(pb.FLOAT32), st.just(pb.FLOAT16)))
    with np.errstate(over="ignore"):  # huge values become inf in float16, which is what we want to send
        return tensors.to_tensor(array.astype(np.float16) if dtype == pb.FLOAT16 else array)


@st.composite
def prompts(draw) -> pb.Prompt:
    if draw(st.booleans()):
        ids = draw(st.lists(token_ids(), min_size=draw(mostly(st.just(1), st.just(0))),
                            max_size=draw(mostly(st.just(12), st.just(200)))))
        return pb.Prompt(token_ids=ids, chat=draw(mostly(st.just(False), st.just(True))))
    return pb.Prompt(text=draw(texts()), chat=draw(st.booleans()), no_bos=draw(st.booleans()))


def site_lists(plausible=SITE_WORDS[:8]):
    return st.lists(mostly(st.sampled_from(plausible), st.one_of(st.sampled_from(SITE_WORDS), st.text(max_size=12))),
                    min_size=1, max_size=3)


@st.composite
def interventions(draw) -> pb.Intervention:
    return pb.Intervention(op=draw(enums(3)), sites=draw(site_lists(EDITABLE_SITES)),
                           positions=draw(small_positions()), vector=draw(wire_tensors()),
                           sequences=draw(st.lists(mostly(st.integers(0, 1), uint32s(4)), max_size=2)))


@st.composite
def lens_specs(draw) -> pb.LensSpec:
    return pb.LensSpec(enabled=draw(st.booleans()), top_k=draw(mostly(st.integers(0, 10), uint32s())),
                       temperature=draw(mostly(st.sampled_from([0.0, 0.5, 1.0, 2.0]), float32s())),
                       target_ids=draw(st.lists(token_ids(), max_size=4)), skip_final_norm=draw(st.booleans()),
                       return_logits=draw(st.booleans()), keep_captures=draw(st.booleans()))


@st.composite
def run_requests(draw) -> pb.RunRequest:
    lens = draw(lens_specs())
    capture = draw(mostly(site_lists(RESIDUAL_SITES), site_lists()) if lens.enabled else site_lists())
    return pb.RunRequest(prompts=draw(st.lists(prompts(), min_size=draw(mostly(st.just(1), st.just(0))),
                                               max_size=draw(mostly(st.just(3), st.just(10))))),
                         capture=capture, positions=draw(small_positions()), logits=draw(enums(3)),
                         dtype=draw(enums(2)), interventions=draw(st.lists(interventions(), max_size=2)),
                         lens=lens)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=draw(prompts()), max_tokens=draw(mostly(st.integers(1, 16), uint32s())),
                              temperature=draw(mostly(st.floats(0, 2, width=32), float32s())),
                              top_k=draw(mostly(st.integers(0, 50), uint32s(600))),
                              top_p=draw(mostly(st.floats(0, 1, width=32), float32s())),
                              seed=draw(st.integers(0, 2 ** 64 - 1)),
                              stop=draw(st.lists(texts(), max_size=draw(mostly(st.just(2), st.just(20))))),
                              interventions=draw(st.lists(interventions(), max_size=2)))


@st.composite
def unembed_requests(draw) -> pb.UnembedRequest:
    return pb.UnembedRequest(vectors=draw(wire_tensors()), spec=draw(lens_specs()))


@st.composite
def weights_requests(draw) -> pb.WeightsRequest:
    return pb.WeightsRequest(name=draw(mostly(st.sampled_from(TENSOR_NAMES[:6]),
                                              st.one_of(st.sampled_from(TENSOR_NAMES), st.text(max_size=20)))),
                             axis=draw(mostly(st.integers(0, 1), int32s())), dtype=draw(enums(2)),
                             indices=draw(st.lists(mostly(st.integers(0, 63), st.one_of(
                                 st.integers(-2, 600), st.integers(-2 ** 63, 2 ** 63 - 1))), max_size=6)))


@st.composite
def tokenize_requests(draw) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(text=draw(texts()), add_special=draw(st.booleans()),
                              parse_special=draw(st.booleans()), chat=draw(st.booleans()))


@st.composite
def detokenize_requests(draw) -> pb.DetokenizeRequest:
    return pb.DetokenizeRequest(token_ids=draw(st.lists(token_ids(), max_size=draw(mostly(st.just(8),
                                                                                           st.just(200))))))


# ----- the server under fuzz -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    with launch_server(tiny_model, args=FUZZ_ARGS) as server:
        server.first_worker = only_worker(server)
        server.channel = grpc.insecure_channel(server.address)
        server.stub = stub(server.address, server.channel)
        yield server


def answer_or_request_fault(server, method: str, request) -> None:
    """Call; a success must be a well-formed answer, a failure a status that blames the request."""
    try:
        answer = getattr(server.stub, method)(request, timeout=CALL_TIMEOUT_S)
        if method in ("Run", "Unembed", "GetWeights", "NearestTokens"):
            assembler = tensors.Assembler()
            for chunk in answer:
                if chunk.HasField("tensor"):
                    assembler.add(chunk.tensor)
            assembler.arrays()
        elif method == "Generate":
            events = list(answer)
            assert events[0].HasField("start") and events[-1].HasField("end")
    except grpc.RpcError as error:
        assert error.code().name in REQUEST_FAULTS, f"{method}: {error.code().name}: {error.details()}"
        assert error.details() and "Traceback" not in error.details() and "\n" not in error.details()
        event(f"{error.code().name}: {error.details()[:40]}")
    else:
        event("answered")


@FUZZ_MORE
@given(request=run_requests())
def test_fuzz_run(fuzz_server, request):
    answer_or_request_fault(fuzz_server, "Run", request)


@FUZZ_MORE
@given(request=generate_requests())
def test_fuzz_generate(fuzz_server, request):
    answer_or_request_fault(fuzz_server, "Generate", request)


@FUZZ
@given(request=unembed_requests())
def test_fuzz_unembed(fuzz_server, request):
    answer_or_request_fault(fuzz_server, "Unembed", request)


@FUZZ
@given(request=weights_requests())
def test_fuzz_get_weights(fuzz_server, request):
    answer_or_request_fault(fuzz_server, "GetWeights", request)


@FUZZ
@given(request=tokenize_requests())
def test_fuzz_tokenize(fuzz_server, request):
    answer_or_request_fault(fuzz_server, "Tokenize", request)


@FUZZ
@given(request=detokenize_requests())
def test_fuzz_detokenize(fuzz_server, request):
    answer_or_request_fault(fuzz_server, "Detokenize", request)


@FUZZ
@given(method=st.sampled_from([m for m in pb.DESCRIPTOR.services_by_name["Inspector"].methods]),
       raw=st.binary(max_size=200))
def test_fuzz_raw_bytes_on_every_rpc(fuzz_server, method, raw):
    """Arbitrary bytes as the request of any RPC (they may happen to decode as a valid message)."""
    channel = fuzz_server.channel
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            list(channel.unary_stream(path)(raw, timeout=CALL_TIMEOUT_S))
        else:
            channel.unary_unary(path)(raw, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        assert error.code().name in REQUEST_FAULTS, f"{method.name}: {error.code().name}: {error.details()}"


def test_the_server_survived_the_fuzzing_unharmed(fuzz_server):
    """Runs after the fuzz tests above (file order): same worker, healthy, and still right."""
    assert only_worker(fuzz_server) == fuzz_server.first_worker
    assert health(fuzz_server.address) == SERVING
    chunks = list(fuzz_server.stub.Run(pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)], capture=["embed"]),
                                       timeout=CALL_TIMEOUT_S))
    arrays = tensors.assemble(c.tensor for c in chunks if c.HasField("tensor"))
    assert np.isfinite(arrays[("logits", 0)]).all() and arrays[("embed", 0)].shape[1] == N_EMBD
