"""Every RPC refuses bad fields with a precise status and a message saying what to fix.

The server here runs with small limits (prompt tokens, generated tokens, batch size, answer bytes, message
size) so that each limit can be reached with small requests. Requests are built as raw proto messages so
that any field value can be sent, including ones the client library would never produce. Each case also
checks that the refusal cost nothing: the same worker process keeps serving.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from reliability_support import PROMPT, only_worker, stub

from lmscope.client import Client, LmscopeError
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service.launch import launch_server

LIMIT_ARGS = ("--threads", "1", "--n-ctx", "80", "--max-prompt-tokens", "64", "--max-generated-tokens", "32",
              "--max-batch-prompts", "4", "--max-capture-mb", "1", "--max-message-mb", "2")
N_EMBD, N_VOCAB = 64, 500


@pytest.fixture(scope="module")
def limited(tiny_model):
    with launch_server(tiny_model, args=LIMIT_ARGS) as server:
        server.first_worker = only_worker(server)
        yield server


@pytest.fixture(scope="module")
def inspector(limited):
    return stub(limited.address)


def call(inspector, method: str, request):
    """Call an RPC and consume its answer (streams included)."""
    answer = getattr(inspector, method)(request, timeout=30)
    return answer if isinstance(answer, Message) else list(answer)


def vector(array, dtype=pb.FLOAT32) -> pb.Tensor:
    array = np.asarray(array, dtype=np.float32)
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())


def ids_prompt(n: int) -> pb.Prompt:
    return pb.Prompt(token_ids=[(7 * i) % N_VOCAB + 1 for i in range(n)])


def run(**fields) -> pb.RunRequest:
    fields.setdefault("prompts", [pb.Prompt(text=PROMPT)])
    return pb.RunRequest(**fields)


def add(vec, sites=("blocks.1.resid_post",), **fields) -> pb.Intervention:
    return pb.Intervention(op=fields.pop("op", pb.Intervention.ADD), sites=list(sites), vector=vec, **fields)


def generate(**fields) -> pb.GenerateRequest:
    fields.setdefault("prompt", pb.Prompt(text=PROMPT))
    fields.setdefault("max_tokens", 4)
    return pb.GenerateRequest(**fields)


def lens(**fields) -> pb.LensSpec:
    return pb.LensSpec(enabled=True, **fields)


ONE = vector(np.ones(N_EMBD))
FIVE_SITES = ["embed"] + [f"blocks.{L}.resid_post" for L in range(4)]

CASES = [
    # Tokenize / Detokenize
    ("Tokenize", pb.TokenizeRequest(text="x" * ((1 << 20) + 1)), "INVALID_ARGUMENT", "longer than 1048576 bytes"),
    ("Detokenize", pb.DetokenizeRequest(token_ids=list(range(65))), "OUT_OF_RANGE", "at most 64"),
    ("Detokenize", pb.DetokenizeRequest(token_ids=[-1]), "OUT_OF_RANGE", "outside the vocabulary"),
    ("Detokenize", pb.DetokenizeRequest(token_ids=[N_VOCAB]), "OUT_OF_RANGE", "outside the vocabulary"),
    # Run: prompts, modes, positions
    ("Run", pb.RunRequest(), "INVALID_ARGUMENT", "at least one prompt"),
    ("Run", run(prompts=[pb.Prompt(text="a")] * 5), "RESOURCE_EXHAUSTED", "split the batch"),
    ("Run", run(prompts=[ids_prompt(65)]), "OUT_OF_RANGE", "at most 64"),
    ("Run", run(prompts=[pb.Prompt(text="word " * 100)]), "OUT_OF_RANGE", "at most 64"),
    ("Run", run(prompts=[pb.Prompt(token_ids=[1, 2], chat=True)]), "INVALID_ARGUMENT", "chat=true needs text"),
    ("Run", run(prompts=[pb.Prompt()]), "INVALID_ARGUMENT", "empty"),
    ("Run", run(logits=7), "INVALID_ARGUMENT", "unknown logits mode"),
    ("Run", run(dtype=pb.INT32), "INVALID_ARGUMENT", "FLOAT32 or FLOAT16"),
    ("Run", run(dtype=42), "INVALID_ARGUMENT", "FLOAT32 or FLOAT16"),
    ("Run", run(capture=["blocks.9.resid_post"]), "INVALID_ARGUMENT", "unknown capture site"),
    ("Run", run(positions=[0, 0]), "INVALID_ARGUMENT", "repeat"),
    ("Run", run(prompts=[ids_prompt(5)], positions=[1, -4]), "INVALID_ARGUMENT", "same token twice"),
    ("Run", run(positions=[10 ** 6]), "OUT_OF_RANGE", "outside any prompt"),
    ("Run", run(positions=[40]), "OUT_OF_RANGE", "outside a prompt"),
    # Run: answer size (1 MiB here)
    ("Run", run(prompts=[ids_prompt(64)] * 4, capture=["*"]), "RESOURCE_EXHAUSTED", "over the server's limit"),
    ("Run", run(prompts=[ids_prompt(64)] * 4, capture=FIVE_SITES, logits=pb.LOGITS_NONE,
                lens=lens(return_logits=True)), "RESOURCE_EXHAUSTED", "over the server's limit"),
    # Run: lens
    ("Run", run(capture=["blocks.0.attn.pattern"], lens=lens()), "INVALID_ARGUMENT", "not lensable"),
    ("Run", run(capture=["embed"], lens=lens(temperature=1e-9)), "INVALID_ARGUMENT", "lens temperature"),
    ("Run", run(capture=["embed"], lens=lens(temperature=float("nan"))), "INVALID_ARGUMENT", "lens temperature"),
    ("Run", run(capture=["embed"], lens=lens(temperature=float("inf"))), "INVALID_ARGUMENT", "lens temperature"),
    ("Run", run(capture=["embed"], lens=lens(top_k=1001)), "INVALID_ARGUMENT", "top_k 1001"),
    ("Run", run(capture=["embed"], lens=lens(target_ids=[1] * 1025)), "INVALID_ARGUMENT", "at most 1024"),
    ("Run", run(capture=["embed"], lens=lens(target_ids=[N_VOCAB])), "OUT_OF_RANGE", "outside the vocabulary"),
    # Run: interventions
    ("Run", run(interventions=[add(ONE, op=9)]), "INVALID_ARGUMENT", "unknown op"),
    ("Run", run(interventions=[add(ONE, sites=())]), "INVALID_ARGUMENT", "names no site"),
    ("Run", run(interventions=[add(vector(np.ones(0)))]), "INVALID_ARGUMENT", "must be a vector"),
    ("Run", run(interventions=[add(vector(np.ones((1, 1, N_EMBD))))]), "INVALID_ARGUMENT", "must be a vector"),
    ("Run", run(interventions=[add(vector(np.ones((2, N_EMBD))), positions=[0])]), "INVALID_ARGUMENT",
     "one position per row"),
    ("Run", run(interventions=[add(vector(np.zeros(N_EMBD)), op=pb.Intervention.ABLATE)]), "INVALID_ARGUMENT",
     "zero direction"),
    ("Run", run(interventions=[add(ONE, sites=["blocks.0.attn.pattern"])]), "INVALID_ARGUMENT", "cannot be edited"),
    ("Run", run(interventions=[add(ONE, sites=["blocks.0.attn.scores"])]), "INVALID_ARGUMENT", "cannot be edited"),
    ("Run", run(interventions=[add(ONE, sites=["blocks.0.attn.q"])]), "INVALID_ARGUMENT", "cannot be edited"),
    ("Run", run(interventions=[add(ONE, sites=["blocks.0.mlp.post"])]), "INVALID_ARGUMENT", "width"),
    ("Run", run(interventions=[add(ONE, sequences=[1])]), "OUT_OF_RANGE", "sequence index 1"),
    ("Run", run(interventions=[add(ONE, positions=[50])]), "OUT_OF_RANGE", "outside a prompt"),
    ("Run", run(interventions=[add(ONE, positions=[1, 1])]), "INVALID_ARGUMENT", "repeat"),
    ("Run", run(interventions=[add(ONE)] * 1025), "INVALID_ARGUMENT", "at most 1024"),
    ("Run", run(interventions=[add(vector(np.full(N_EMBD, 1e16)))]), "INVALID_ARGUMENT", "overflow"),
    ("Run", run(interventions=[add(vector(np.full(N_EMBD, np.nan)))]), "INVALID_ARGUMENT", "NaN"),
    ("Run", run(interventions=[add(pb.Tensor(dtype=pb.INT32, shape=[N_EMBD], data=bytes(4 * N_EMBD)))]),
     "INVALID_ARGUMENT", "FLOAT32 or FLOAT16"),
    ("Run", run(interventions=[add(pb.Tensor(dtype=pb.FLOAT32, shape=[N_EMBD], data=b"\0" * 5))]),
     "INVALID_ARGUMENT", "needs 256 bytes"),
    # Generate
    ("Generate", generate(max_tokens=0), "OUT_OF_RANGE", "between 1 and 32"),
    ("Generate", generate(max_tokens=33), "OUT_OF_RANGE", "between 1 and 32"),
    ("Generate", generate(prompt=ids_prompt(60), max_tokens=32), "OUT_OF_RANGE", "exceeds the context"),
    ("Generate", generate(prompt=pb.Prompt()), "INVALID_ARGUMENT", "empty"),
    ("Generate", generate(temperature=-1), "INVALID_ARGUMENT", "temperature"),
    ("Generate", generate(temperature=float("inf")), "INVALID_ARGUMENT", "temperature"),
    ("Generate", generate(top_p=1.5), "INVALID_ARGUMENT", "top_p"),
    ("Generate", generate(top_p=float("nan")), "INVALID_ARGUMENT", "top_p"),
    ("Generate", generate(top_k=N_VOCAB + 1), "INVALID_ARGUMENT", "larger than the vocabulary"),
    ("Generate", generate(stop=["x"] * 17), "INVALID_ARGUMENT", "stop strings"),
    ("Generate", generate(stop=["x" * 257]), "INVALID_ARGUMENT", "stop strings"),
    ("Generate", generate(interventions=[add(ONE, sequences=[1])]), "OUT_OF_RANGE", "sequence index"),
    ("Generate", generate(interventions=[add(ONE, positions=[-40])]), "OUT_OF_RANGE", "outside a prompt"),
    # Unembed
    ("Unembed", pb.UnembedRequest(vectors=vector(np.ones((1, 7))), spec=lens()), "INVALID_ARGUMENT", "width 7"),
    ("Unembed", pb.UnembedRequest(vectors=vector(np.ones((1, 1, N_EMBD))), spec=lens()), "INVALID_ARGUMENT",
     "must be a vector"),
    ("Unembed", pb.UnembedRequest(vectors=pb.Tensor(shape=[2 ** 32, 2 ** 32]), spec=lens()), "INVALID_ARGUMENT",
     "needs 73786976294838206464 bytes"),
    ("Unembed", pb.UnembedRequest(vectors=pb.Tensor(shape=[1] * 40), spec=lens()), "INVALID_ARGUMENT",
     "40 dimensions"),
    ("Unembed", pb.UnembedRequest(vectors=pb.Tensor(shape=[-1, N_EMBD]), spec=lens()), "INVALID_ARGUMENT",
     "negative dimension"),
    ("Unembed", pb.UnembedRequest(vectors=pb.Tensor(dtype=9, shape=[N_EMBD], data=bytes(256)), spec=lens()),
     "INVALID_ARGUMENT", "FLOAT32 or FLOAT16"),
    ("Unembed", pb.UnembedRequest(vectors=vector(np.full((2, N_EMBD), np.inf)), spec=lens()), "INVALID_ARGUMENT",
     "NaN or infinite"),
    ("Unembed", pb.UnembedRequest(vectors=vector(np.ones((600, N_EMBD))), spec=lens(return_logits=True)),
     "RESOURCE_EXHAUSTED", "rows of full logits"),
    ("Unembed", pb.UnembedRequest(vectors=ONE, spec=lens(temperature=-2)), "INVALID_ARGUMENT", "lens temperature"),
    # GetWeights
    ("GetWeights", pb.WeightsRequest(name="no.such"), "NOT_FOUND", "no tensor"),
    ("GetWeights", pb.WeightsRequest(name="token_embd.weight", indices=[0] * 5000), "RESOURCE_EXHAUSTED",
     "fewer indices"),
    ("GetWeights", pb.WeightsRequest(name="token_embd.weight", indices=[0], axis=5), "INVALID_ARGUMENT",
     "axis 5"),
    ("GetWeights", pb.WeightsRequest(name="token_embd.weight", indices=[N_VOCAB]), "OUT_OF_RANGE", "out of range"),
    ("GetWeights", pb.WeightsRequest(name="token_embd.weight", dtype=pb.INT32), "INVALID_ARGUMENT",
     "FLOAT32 or FLOAT16"),
]


@pytest.mark.parametrize("method, request_message, code, words", CASES,
                         ids=[f"{c[0]}-{i}-{c[3][:24]}" for i, c in enumerate(CASES)])
def test_bad_fields_get_a_precise_status(limited, inspector, method, request_message, code, words):
    with pytest.raises(grpc.RpcError) as info:
        call(inspector, method, request_message)
    assert info.value.code().name == code, info.value.details()
    assert words in info.value.details(), info.value.details()
    assert only_worker(limited) == limited.first_worker  # refused without harm: no crash, no restart


def test_the_lens_is_what_pushed_the_answer_over_the_limit(inspector):
    """The same request without the lens's full logits fits in the 1 MiB limit."""
    chunks = call(inspector, "Run", run(prompts=[ids_prompt(64)] * 4, capture=FIVE_SITES, logits=pb.LOGITS_NONE))
    assert sum(len(c.tensor.data) for c in chunks if c.HasField("tensor")) == 4 * 64 * 5 * N_EMBD * 4


@pytest.mark.parametrize("method", list(pb.DESCRIPTOR.services_by_name["Inspector"].methods), ids=lambda m: m.name)
@pytest.mark.parametrize("raw", [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff", b"\x0a\x80\x80\x80\x80\x10"])
def test_undecodable_requests_are_invalid_argument(limited, method, raw):
    """Garbage, truncated fields and non-UTF-8 strings never reach the servicer, and do not read as the
    server's fault (grpc's own answer would be INTERNAL)."""
    channel = grpc.insecure_channel(limited.address)
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            list(channel.unary_stream(path)(raw, timeout=30))
        else:
            channel.unary_unary(path)(raw, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "is not a valid lmscope.v1." in error.details()
    else:
        # ModelInfoRequest has no fields: any well-formed field is just unknown; a broken one still fails.
        assert method.name == "GetModelInfo" and raw == b"\x0a\x02\xff\xfe"


def test_strings_the_client_cannot_encode_fail_in_the_client(limited):
    with Client(limited.address, timeout=10) as client:
        with pytest.raises(ValueError):  # UnicodeEncodeError: a lone surrogate is not UTF-8
            client.tokenize("\ud800")


def test_message_size_is_limited_on_both_sides(limited):
    big = np.ones((12_000, N_EMBD), np.float32)  # 3 MB, over the server's 2 MiB
    with Client(limited.address, timeout=30, max_message_mb=8) as client:
        assert client.model_info().limits["max_message_bytes"] == 2 << 20
        with pytest.raises(LmscopeError) as info:
            client.lens_vectors(big)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(limited.address, timeout=30, max_message_mb=2) as client:
        with pytest.raises(LmscopeError) as info:
            client.lens_vectors(big)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.lens_vectors(big[:4000], top_k=3)["top_ids"].shape == (4000, 3)
