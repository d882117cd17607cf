"""Fuzzing every RPC with requests derived from the proto by reflection, against a server with tiny ubatches.

`tests/integration/test_fuzz.py` draws requests from hand-written strategies, so a field added to the proto is fuzzed
only once somebody writes a strategy for it. Here the request strategy of each method of the Inspector
service is built from its input message's descriptor, recursively: every field of every type (integers
with their edge values, negatives for signed ones; enums with unknown numbers; bools; floats with NaN and
infinities; strings with unicode, control characters and long ones; bytes; repeated fields of 0..n
elements; nested messages to a bounded depth; oneofs and maps, which today's requests do not use). Each
request draws how hostile it is, then each field is either a value valid for the tiny model (`_HINTS`:
token ids in its vocabulary, the server's own capture sites, positions within a prompt, width-64
vectors, prompts of several ubatches, the model file's tensor names) or any value of its type. Fields
without a hint always get the generic values, so a new field is fuzzed the day it is added.

The server decodes with `--n-batch 4`, so every prompt of 5 tokens or more spans several ubatches (what
users' long prompts do with the default 512), with the small limits of `test_fuzz.FUZZ_ARGS`. Every answer
must be a well-formed success or a status that blames the request (`REQUEST_FAULTS`) in one line without a
traceback, never INTERNAL, UNKNOWN, UNAVAILABLE (a crashed worker) or DEADLINE_EXCEEDED; the worker must be
the one that started. Derandomized, so CI sees the same requests each run; a longer hunt with other
requests:
LMSCOPE_FUZZ_EXAMPLES=2000 LMSCOPE_FUZZ_SEED=1 .venv/bin/python -m pytest -q tests/integration/test_fuzz_reflection.py
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from reliability_support import PROMPT, SERVING, health, only_worker, stub
from test_fuzz import CALL_TIMEOUT_S, FUZZ_ARGS, HOSTILE_TEXT, PLAIN_TEXT, REQUEST_FAULTS

from lmscope.proto import tensors
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service.launch import launch_server

SERVICE = pb.DESCRIPTOR.services_by_name["Inspector"]
N_BATCH = int(os.environ.get("LMSCOPE_FUZZ_N_BATCH", "4"))  # tokens per ubatch: 5-token prompts span several
REFLECTION_ARGS = (*FUZZ_ARGS, "--n-batch", str(N_BATCH))
N_EMBD, N_FF, N_VOCAB = 64, 128, 500
# Requests per RPC in CI (the RPCs with many fields get 3x); a longer hunt sets LMSCOPE_FUZZ_EXAMPLES.
EXAMPLES = int(os.environ.get("LMSCOPE_FUZZ_EXAMPLES", "150"))
HUNT_SEED = os.environ.get("LMSCOPE_FUZZ_SEED")  # unset: derandomized (the same requests every run)
MANY_FIELDS = {"Run", "Generate"}
MAX_DEPTH = 4  # nested messages deeper than this stay unset (requests are 3 deep: RunRequest.interventions.vector)
MAX_REPEATED = 4
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
              HealthCheck.large_base_example]

# ----- generic values, by field type --------------------------------------------------------------

T = FieldDescriptor


def _ints(low: int, high: int, edges: tuple[int, ...]):
    return st.one_of(st.integers(max(low, -4), min(high, 40)), st.sampled_from([e for e in edges if low <= e <= high]),
                     st.integers(low, high))


_INT_EDGES = (0, 1, -1, 2, 4, 5, 127, 128, 129, 255, 256, N_VOCAB - 1, N_VOCAB, 1000, 1001, 1024, 1025, 4096,
              2 ** 31 - 1, -2 ** 31, 2 ** 31, 2 ** 32 - 1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1)
_INT32 = _ints(-2 ** 31, 2 ** 31 - 1, _INT_EDGES)
_INT64 = _ints(-2 ** 63, 2 ** 63 - 1, _INT_EDGES)
_UINT32 = _ints(0, 2 ** 32 - 1, _INT_EDGES)
_UINT64 = _ints(0, 2 ** 64 - 1, _INT_EDGES)
_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e-45, 1e-7, 1e6, 1e15, 1e16, 3.4e38)
_FLOAT = st.one_of(st.floats(width=32), st.sampled_from([float(np.float32(v)) for v in _FLOAT_EDGES]))
_DOUBLE = st.one_of(st.floats(), st.sampled_from(_FLOAT_EDGES + (1e308, 5e-324)))
_STRING = st.one_of(st.text(max_size=24), st.sampled_from(HOSTILE_TEXT),
                    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=3000))
_BYTES = st.one_of(st.binary(max_size=64), st.binary(min_size=256, max_size=4096))
_SCALARS = {
    T.TYPE_INT32: _INT32, T.TYPE_SINT32: _INT32, T.TYPE_SFIXED32: _INT32,
    T.TYPE_INT64: _INT64, T.TYPE_SINT64: _INT64, T.TYPE_SFIXED64: _INT64,
    T.TYPE_UINT32: _UINT32, T.TYPE_FIXED32: _UINT32, T.TYPE_UINT64: _UINT64, T.TYPE_FIXED64: _UINT64,
    T.TYPE_BOOL: st.booleans(), T.TYPE_FLOAT: _FLOAT, T.TYPE_DOUBLE: _DOUBLE,
    T.TYPE_STRING: _STRING, T.TYPE_BYTES: _BYTES,
}


def _enum_values(enum) -> st.SearchStrategy[int]:
    """Its numbers, and unknown ones (proto3 enums are open: a client may send any int32)."""
    known = [v.number for v in enum.values]
    return st.one_of(st.sampled_from(known), st.sampled_from(known).map(lambda k: k + len(known)), _INT32)


def _is_repeated(f: FieldDescriptor) -> bool:
    is_repeated = getattr(f, "is_repeated", None)  # newer protobuf; `label` is deprecated there
    return is_repeated if isinstance(is_repeated, bool) else f.label == FieldDescriptor.LABEL_REPEATED


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == T.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


# ----- values valid for the tiny model, by field ---------------------------------------------------

@dataclass
class World:
    """What a valid request may name on the server under fuzz (from its ModelInfo and its model file)."""
    sites: list[str]
    tensor_names: list[str]
    residual: list[str] = field(init=False)
    editable: list[str] = field(init=False)

    def __post_init__(self):
        residual = re.compile(r"^(embed|ln_final|blocks\.\d+\.(ln1|ln2|attn_out|resid_mid|mlp_out|resid_post))$")
        self.residual = [s for s in self.sites if residual.match(s)]  # width n_embd: lens-able and editable
        self.editable = self.residual + [s for s in self.sites if s.endswith(".mlp.post")]  # and width n_ff


@dataclass
class Building:
    """The messages under construction, outermost first (a hint may read fields drawn before its own)."""
    world: World
    stack: list = field(default_factory=list)

    def parent(self, name: str):
        return next((m for m in reversed(self.stack) if m.DESCRIPTOR.name == name), None)


def _token_ids(draw, n: int) -> list[int]:
    return draw(st.lists(st.integers(0, N_VOCAB - 1), min_size=n, max_size=n))


def _prompt_token_ids(draw, b: Building) -> list[int]:
    # A Prompt of text (drawn first) uses it half the time (non-empty ids win over text).
    if b.stack[-1].DESCRIPTOR.name == "Prompt" and b.stack[-1].text and draw(st.booleans()):
        return []
    # Mostly several ubatches, sometimes one token, sometimes past --max-prompt-tokens 128.
    n = draw(st.one_of(st.integers(1, 24), st.sampled_from([1, N_BATCH, N_BATCH + 1, 2 * N_BATCH + 1, 127, 128, 129])))
    return _token_ids(draw, n)


def _prompt_text(draw, b: Building) -> str:
    words = draw(st.lists(st.sampled_from(PLAIN_TEXT + [PROMPT, " the", "\n", "🙂"]), min_size=1, max_size=8))
    return " ".join(words)


def _positions(draw, b: Building) -> list[int]:
    """Positions within a prompt of a few ubatches, negative ones counting from the end."""
    return draw(st.lists(st.integers(-12, 11), max_size=3, unique=True))


def _vector(draw, b: Building) -> pb.Tensor:
    """A width-64 vector, or one row per position (an Intervention's positions are drawn before it)."""
    intervention = b.parent("Intervention")
    sites = list(intervention.sites) if intervention is not None else []
    width = N_FF if sites and all(s.endswith("mlp.post") for s in sites) else N_EMBD
    if intervention is not None:  # a row per position, or one vector for all of them
        rows = intervention.positions and draw(st.booleans())
        shape: tuple[int, ...] = (len(intervention.positions), width) if rows else (width,)
    else:
        shape = draw(st.sampled_from([(width,), (1, width), (3, width)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    array = (rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 4.0, 100.0]))).astype(np.float32)
    return tensors.to_tensor(array.astype(np.float16) if draw(st.integers(0, 3)) == 0 else array)


RESIDUAL_GLOBS = ["blocks.*.resid_post", "embed", "ln_final", "blocks.?.resid_mid"]


def _sites(pool_of, globs):
    def hint(draw, b: Building) -> list[str]:
        names = st.one_of(st.sampled_from(pool_of(b.world)), st.sampled_from(globs))
        return draw(st.lists(names, min_size=1, max_size=3))
    return hint


def _capture(draw, b: Building) -> list[str]:
    """Half the time residual-width sites only (what a lens needs), else any of the server's sites."""
    if draw(st.booleans()):
        return _sites(lambda w: w.residual, RESIDUAL_GLOBS)(draw, b)
    return _sites(lambda w: w.sites, RESIDUAL_GLOBS + ["blocks.1.*", "blocks.0.attn.pattern"])(draw, b)


def _lens_enabled(draw, b: Building) -> bool:
    """In a Run, mostly on when what it captures can be lensed, mostly off otherwise."""
    run = b.parent("RunRequest")
    if run is None:
        return draw(st.booleans())
    lensable = bool(run.capture) and all(s in b.world.residual or s in RESIDUAL_GLOBS for s in run.capture)
    return draw(st.integers(0, 3)) != 0 if lensable else draw(st.integers(0, 3)) == 0


def _sequences(draw, b: Building) -> list[int]:
    run = b.parent("RunRequest")
    n = len(run.prompts) if run is not None else 1
    return draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=2, unique=True))


def _one_of(*values):
    return lambda draw, b: draw(st.sampled_from(values))


def _between(low, high):
    return lambda draw, b: draw(st.integers(low, high))


# "Message.field" -> hint(draw, building) -> a value valid for the tiny model (or nearly: a plausible one).
_HINTS = {
    "Prompt.text": _prompt_text,
    "Prompt.token_ids": _prompt_token_ids,
    "Prompt.chat": lambda draw, b: not b.stack[-1].token_ids and draw(st.integers(0, 3)) == 0,
    "TokenizeRequest.text": _prompt_text,
    "DetokenizeRequest.token_ids": _prompt_token_ids,
    "RunRequest.capture": _capture,
    "RunRequest.positions": _positions,
    "RunRequest.logits": _one_of(pb.LOGITS_ALL, pb.LOGITS_LAST, pb.LOGITS_NONE),
    "RunRequest.dtype": _one_of(pb.FLOAT32, pb.FLOAT16),
    "Intervention.op": _one_of(pb.Intervention.ADD, pb.Intervention.SET, pb.Intervention.ABLATE),
    "Intervention.sites": lambda draw, b: _sites(lambda w: w.editable if draw(st.integers(0, 4)) == 0 else w.residual,
                                                 RESIDUAL_GLOBS)(draw, b),
    "Intervention.positions": _positions,
    "Intervention.vector": _vector,
    "Intervention.sequences": _sequences,
    "LensSpec.enabled": _lens_enabled,
    "LensSpec.top_k": _between(0, 10),
    "LensSpec.temperature": _one_of(0.0, 0.5, 1.0, 2.0),
    "LensSpec.target_ids": lambda draw, b: _token_ids(draw, draw(st.integers(0, 4))),
    "LensSpec.kl_reference_rows": _between(0, 3),
    "GenerateRequest.max_tokens": _between(1, 16),
    "GenerateRequest.temperature": lambda draw, b: draw(st.sampled_from([0.0, 0.0, 0.7, 1.0, 2.0])),
    "GenerateRequest.top_k": _between(0, 50),
    "GenerateRequest.top_p": _one_of(0.0, 0.5, 0.9, 1.0),
    "GenerateRequest.stop": lambda draw, b: draw(st.lists(st.sampled_from([".", "\n", " the", "🙂", "France"]),
                                                          max_size=2)),
    "UnembedRequest.vectors": _vector,
    "WeightsRequest.name": lambda draw, b: draw(st.sampled_from(b.world.tensor_names)),
    "WeightsRequest.axis": _between(0, 1),
    "WeightsRequest.indices": lambda draw, b: draw(st.lists(st.integers(0, N_EMBD - 1), max_size=6)),
    "WeightsRequest.dtype": _one_of(pb.FLOAT32, pb.FLOAT16),
    "NearestTokensRequest.vectors": _vector,
    "NearestTokensRequest.k": _between(1, 10),
    "NearestTokensRequest.table": _one_of("", "embedding", "lm_head"),
    "NearestTokensRequest.exclude_ids": lambda draw, b: _token_ids(draw, draw(st.integers(0, 3))),
}
# Repeated messages: built field by field, this many when the field is not drawn hostile (--max-batch-prompts 8).
_COUNTS = {"RunRequest.prompts": (1, 3), "RunRequest.interventions": (0, 2), "GenerateRequest.interventions": (0, 2)}


# ----- the builder ---------------------------------------------------------------------------------

def _generic(draw, f: FieldDescriptor, b: Building, depth: int):
    """Any value of the field's type (one element of a repeated field)."""
    if f.type == T.TYPE_MESSAGE:
        return _message(draw, f.message_type, b, depth + 1, hostile=1.0)
    if f.type == T.TYPE_ENUM:
        return draw(_enum_values(f.enum_type))
    return draw(_SCALARS[f.type])


def _fill(draw, message, f: FieldDescriptor, b: Building, depth: int, hostile: float) -> None:
    key = f"{f.containing_type.name}.{f.name}"
    generic = draw(st.integers(0, 99)) < 100 * hostile or (key not in _HINTS and key not in _COUNTS)
    if _is_map(f):
        entry = f.message_type
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        container = getattr(message, f.name)
        for _ in range(draw(st.integers(0, MAX_REPEATED))):
            k = _generic(draw, key_field, b, depth)
            if value_field.type == T.TYPE_MESSAGE:
                container[k].CopyFrom(_generic(draw, value_field, b, depth))
            else:
                container[k] = _generic(draw, value_field, b, depth)
        return
    hint = None if generic else _HINTS.get(key)
    if hint is not None:
        value = hint(draw, b)
        if _is_repeated(f):
            getattr(message, f.name).extend(value)
        elif f.type == T.TYPE_MESSAGE:
            getattr(message, f.name).CopyFrom(value)
        else:
            setattr(message, f.name, value)
        return
    if _is_repeated(f):
        low, high = _COUNTS.get(key, (0, MAX_REPEATED)) if not generic else (0, MAX_REPEATED)
        n = draw(st.one_of(st.integers(low, high), st.just(2 * high + 5))) if generic else draw(st.integers(low, high))
        container = getattr(message, f.name)
        for _ in range(n):
            if f.type == T.TYPE_MESSAGE:
                if depth + 1 > MAX_DEPTH:
                    return
                container.add().CopyFrom(_message(draw, f.message_type, b, depth + 1, hostile))
            else:
                container.append(_generic(draw, f, b, depth))
        return
    if f.type == T.TYPE_MESSAGE:
        if depth + 1 <= MAX_DEPTH:
            getattr(message, f.name).CopyFrom(_message(draw, f.message_type, b, depth + 1, hostile))
        return
    setattr(message, f.name, _generic(draw, f, b, depth))


def _message(draw, descriptor: Descriptor, b: Building, depth: int, hostile: float):
    """A message of `descriptor`: each field set or left at its default; of each oneof at most one member."""
    message = message_factory.GetMessageClass(descriptor)()
    b.stack.append(message)
    try:
        in_oneof = {f.name for o in descriptor.oneofs for f in o.fields}
        for oneof in descriptor.oneofs:
            chosen = draw(st.integers(-1, len(oneof.fields) - 1))
            if chosen >= 0:
                f = oneof.fields[chosen]
                if f.type != T.TYPE_MESSAGE or depth + 1 <= MAX_DEPTH:
                    _fill(draw, message, f, b, depth, hostile)
                    if f.type == T.TYPE_MESSAGE:
                        getattr(message, f.name).SetInParent()  # set even when all its fields are defaults
        for f in descriptor.fields:  # in declaration order: a hint may read fields drawn before its own
            key = f"{descriptor.name}.{f.name}"
            if f.name in in_oneof:
                continue
            # A field with a hint is set (usually, in a hostile request); any other half the time (else its default).
            if key in _HINTS or key in _COUNTS or f.type == T.TYPE_MESSAGE:
                present = hostile == 0 or draw(st.integers(0, 9)) > 0
            else:
                present = draw(st.booleans())
            if present:
                _fill(draw, message, f, b, depth, hostile)
        return message
    finally:
        b.stack.pop()


@st.composite
def messages(draw, descriptor: Descriptor, world: World):
    """A request of `descriptor`: first how hostile it is (the share of fields that get any value of their
    type instead of a valid one), then its fields."""
    hostile = draw(st.sampled_from([0.0, 0.0, 0.05, 0.15, 0.4, 1.0]))
    event(f"hostile {hostile}")
    return _message(draw, descriptor, Building(world), 0, hostile)


# ----- the server under fuzz -----------------------------------------------------------------------

def _tensor_names(path) -> list[str]:
    import gguf

    names = [t.name for t in gguf.GGUFReader(path).tensors]
    return names + ["", "blk.99.ffn_up.weight", "../token_embd.weight"]


class Target:
    """The server under fuzz: its process, log, stub and `World`, with a short repr (hypothesis prints a failing
    test's arguments, and a ServerProcess's repr holds its whole log)."""

    def __init__(self, server, tiny_model):
        self.process, self.address, self.log = server.process, server.address, server.log
        self.first_worker = only_worker(server)
        self.channel = grpc.insecure_channel(server.address)
        self.stub = stub(server.address, self.channel)
        info = self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=CALL_TIMEOUT_S)
        assert info.memory.n_ubatch == N_BATCH, info.memory
        self.world = World(sites=list(info.capture_sites), tensor_names=_tensor_names(tiny_model))

    def __repr__(self) -> str:
        return f"<lmscope serve {' '.join(REFLECTION_ARGS)} on {self.address}>"


@pytest.fixture(scope="module")
def reflection_server(tiny_model):
    with launch_server(tiny_model, args=REFLECTION_ARGS) as server:
        target = Target(server, tiny_model)
        yield target
        target.channel.close()


def _logged_traceback(server, details: str) -> str:
    """The server log's lines under the error id of an INTERNAL answer (`errors.internal_error`)."""
    match = re.match(r"internal error ([0-9a-f]{8}) ", details)
    if not match:
        return ""
    time.sleep(0.2)  # the log reaches `server.log` through a pipe and a thread
    log = list(server.log)
    start = next((i for i, line in enumerate(log) if f"internal error {match.group(1)}" in line), None)
    if start is None:
        return "\n(no log line has this id)"
    end = next((i for i in range(start + 2, len(log)) if not log[i].startswith((" ", "Traceback", "During"))
                and ": " in log[i]), len(log) - 1)
    return "\nserver log:\n" + "\n".join(log[start:end + 1])


def _call(server, method, request) -> None:
    """Call; a success must be a well-formed answer, a failure a one-line status that blames the request."""
    try:
        answer = getattr(server.stub, method.name)(request, timeout=CALL_TIMEOUT_S)
        if method.output_type.name == "RunChunk":
            assembler, headers = tensors.Assembler(), []
            for chunk in answer:
                if chunk.HasField("tensor"):
                    assembler.add(chunk.tensor)
                else:
                    headers.append(chunk.header)
            arrays = assembler.arrays()
            if method.name == "Run":
                _check_run(request, headers, arrays)
                event(f"Run answered: {len(request.prompts)} prompt(s), {len(request.interventions)} edit(s), "
                      f"lens {'on' if any(name.startswith('lens.') for name, _ in arrays) else 'off'}")
        elif method.output_type.name == "GenerateEvent":
            events = list(answer)
            assert events[0].HasField("start") and events[-1].HasField("end"), events
            tokens = [e.token.id for e in events if e.HasField("token")]
            assert len(tokens) == events[-1].end.n_generated <= request.max_tokens, events[-1]
            assert all(0 <= t < N_VOCAB for t in tokens), tokens
        else:
            assert answer.DESCRIPTOR.full_name == method.output_type.full_name
    except grpc.RpcError as error:
        code, details = error.code().name, error.details() or ""
        assert code in REQUEST_FAULTS, (f"{method.name}: {code}: {details}\nrequest:\n{str(request)[:3000]}"
                                        f"{_logged_traceback(server, details)}")
        assert details and "\n" not in details and "Traceback" not in details, (code, details)
        event(f"{code}: {details[:32]}")
    else:
        event("answered")
    assert only_worker(server) == server.first_worker, f"{method.name}: the worker was replaced"


def _check_run(request: pb.RunRequest, headers: list, arrays: dict) -> None:
    """A Run's answer fits its request: one header, a sequence per prompt, each tensor one row per returned
    position (logits: per position, or the last token's one)."""
    assert len(headers) == 1, headers
    sequences = headers[0].sequences
    assert len(sequences) == len(request.prompts), headers[0]
    for s, sequence in enumerate(sequences):
        n_rows = len(sequence.positions)
        assert 0 < n_rows <= len(sequence.token_ids), sequence
        assert all(0 <= p < len(sequence.token_ids) for p in sequence.positions), sequence
        if request.positions:
            assert n_rows == len(request.positions), sequence
        expected_logits = {pb.LOGITS_ALL: (n_rows, N_VOCAB), pb.LOGITS_LAST: (1, N_VOCAB)}.get(request.logits)
        assert (arrays[("logits", s)].shape if ("logits", s) in arrays else None) == expected_logits
        for site in headers[0].sites:
            if (site, s) in arrays and not site.endswith(("attn.pattern", "attn.scores")):
                assert arrays[(site, s)].shape[0] == n_rows, (site, arrays[(site, s)].shape, sequence)
        for (name, sequence_index), array in arrays.items():
            if name.startswith("lens.") and sequence_index == s:  # (sites, positions, ...)
                assert array.shape[:2] == (len(headers[0].sites), n_rows), (name, array.shape, sequence)


def _fuzz_test(method):
    examples = EXAMPLES * (3 if method.name in MANY_FIELDS else 1)
    config = settings(max_examples=examples, deadline=None, derandomize=HUNT_SEED is None, database=None,
                      suppress_health_check=SUPPRESSED)

    @config
    @given(data=st.data())
    def test(reflection_server, data):
        request = data.draw(messages(method.input_type, reflection_server.world), label="request")
        _call(reflection_server, method, request)

    if HUNT_SEED is not None:
        test = seed(int(HUNT_SEED))(test)
    test.__name__ = f"test_reflection_fuzz_{method.name}"
    test.__doc__ = f"{method.name}({method.input_type.name}) from reflection: a success or a request fault."
    return test


for _method in SERVICE.methods:
    globals()[f"test_reflection_fuzz_{_method.name}"] = _fuzz_test(_method)
del _method


def test_the_server_survived_the_reflection_fuzz(reflection_server):
    """Runs after the fuzz tests above (file order): same worker, healthy, and a long prompt still right."""
    assert only_worker(reflection_server) == reflection_server.first_worker
    assert health(reflection_server.address) == SERVING
    request = pb.RunRequest(prompts=[pb.Prompt(text=PROMPT * 3)], capture=["embed"], positions=[0, -1])
    chunks = list(reflection_server.stub.Run(request, timeout=CALL_TIMEOUT_S))
    arrays = tensors.assemble(c.tensor for c in chunks if c.HasField("tensor"))
    assert np.isfinite(arrays[("logits", 0)]).all() and arrays[("embed", 0)].shape == (2, N_EMBD)


# ----- properties of answers the status alone does not show -----------------------------------------

@settings(max_examples=max(10, EXAMPLES // 4), deadline=None, derandomize=True, database=None,
          suppress_health_check=SUPPRESSED)
@given(temperature=st.one_of(st.floats(0, 2 ** -17, width=32, exclude_min=True),
                             st.sampled_from([1e-45, 1e-38, 1e-30, 1e-7, 9.99999997e-07, 1e-6])))
def test_a_near_zero_temperature_samples_greedily_or_is_refused(reflection_server, temperature):
    """Sampling divides float32 logits by the temperature: a temperature that overflows them must be refused,
    not sampled from NaN probabilities (which drew the vocabulary's last token every time)."""
    prompt = pb.Prompt(text=PROMPT)

    def tokens(t: float) -> list[int]:
        request = pb.GenerateRequest(prompt=prompt, max_tokens=6, temperature=t, seed=7)
        events = reflection_server.stub.Generate(request, timeout=CALL_TIMEOUT_S)
        return [e.token.id for e in events if e.HasField("token")]

    try:
        sampled = tokens(temperature)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in error.details()
        assert float(np.float32(temperature)) < float(np.float32(1e-6)), error.details()
        return
    assert sampled == tokens(0.0)


@pytest.mark.parametrize("temperature", [1e-6, 1e6])
def test_the_temperature_bounds_themselves_are_accepted(reflection_server, temperature):
    """A float32 field holds 1e-6 as 9.99999997e-07: a client sending the documented bound must not be refused."""
    run = pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)], capture=["embed"],
                        lens=pb.LensSpec(enabled=True, top_k=3, temperature=temperature))
    assert list(reflection_server.stub.Run(run, timeout=CALL_TIMEOUT_S))
    generate = pb.GenerateRequest(prompt=pb.Prompt(text=PROMPT), max_tokens=2, temperature=temperature)
    assert list(reflection_server.stub.Generate(generate, timeout=CALL_TIMEOUT_S))


# ----- the builder itself (no server) --------------------------------------------------------------

@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=SUPPRESSED)
@given(data=st.data(), name=st.sampled_from(sorted(pb.DESCRIPTOR.message_types_by_name)))
def test_the_builder_makes_every_message_of_the_proto(data, name):
    """Every message of the file, responses included (they have the oneofs and maps requests do not yet), is
    built and survives its own wire form."""
    descriptor = pb.DESCRIPTOR.message_types_by_name[name]
    world = World(sites=["embed", "blocks.0.resid_post", "blocks.0.mlp.post"], tensor_names=["token_embd.weight"])
    message = data.draw(messages(descriptor, world))
    assert message.DESCRIPTOR is descriptor
    again = type(message).FromString(message.SerializeToString())
    assert again.SerializeToString(deterministic=True) == message.SerializeToString(deterministic=True)


def test_every_request_field_is_reached():
    """The fields of every RPC's request, nested ones included: each has a hint or a generic type (so a new
    field is fuzzed at once), and the hints name only fields that exist."""
    seen, todo = set(), [m.input_type for m in SERVICE.methods]
    while todo:
        descriptor = todo.pop()
        for f in descriptor.fields:
            key = f"{descriptor.name}.{f.name}"
            if key in seen:
                continue
            seen.add(key)
            assert f.type in _SCALARS or f.type in (T.TYPE_ENUM, T.TYPE_MESSAGE), key
            if f.type == T.TYPE_MESSAGE:
                todo.append(f.message_type)
    assert set(_HINTS) <= seen and set(_COUNTS) <= seen, (set(_HINTS) | set(_COUNTS)) - seen
