"""The typed contract between the gRPC front end and a model worker.

The front end (`servicer.py`) turns each validated proto request into one of the `*Job` objects below
(`requests.py` builds them), hands it to the `WorkerPool`, and the worker's `Operations.execute` runs the
method registered for the job's type. Answers come back as the wire's own messages where they are small
(`pb.TokenizeResponse`, `pb.GenerateEvent`, `pb.RunHeader`, `pb.ModelInfo`) and as `NamedTensor`s where they
are arrays, which leave the worker as `TensorPiece`s ahead of the answer (all-position logits as they are
computed) and reach the client as `TensorChunk`s. So reading one RPC is a straight walk:
`InspectorServicer.Run` -> `RequestParser.run` -> `RunJob` -> `Operations.run` -> `Engine.forward`.

This module imports no native code: the front end loads it, and it must stay free of llama.cpp (the test
`tests/integration/test_wire_contract.py` checks the running server's memory map).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from lmscope.proto.wire import lmscope_pb2 as pb

EditOp = Literal["add", "set", "ablate"]
LogitsMode = Literal["all", "last", "none"]  # every requested position, the prompt's last token, none
VocabularyTable = Literal["embedding", "lm_head"]

@dataclass
class EngineConfig:
    """What a worker needs to load its model (chosen once, when the server starts)."""
    model_path: str
    n_ctx: int = 4096
    n_batch: int = 512          # tokens per ubatch: see service/engine.py
    n_outputs: int = 0          # output rows per ubatch; 0 = engine.output_rows_per_ubatch(n_vocab)
    n_threads: int = 0          # 0 = all cores
    n_gpu_layers: int = 0
    n_seq_max: int = 64
    flash_attn: bool = True     # for passes that do not capture attention patterns
    batch_invariant: bool = False  # decode each prompt of a request as if alone (its own ubatches and cells)
    kv_cache_f32: bool = False  # K and V kept in float32 instead of llama.cpp's default float16 (--precise)
    max_prompt_tokens: int = 0  # 0 = n_ctx
    max_capture_bytes: int = 2 << 30
    max_generated_tokens: int = 4096
    max_batch_prompts: int = 1024
    rpc_servers: tuple[str, ...] = ()  # ggml-rpc workers that take the n_gpu_layers layers (service/llama_rpc.py)


@dataclass
class Intervention:
    """An edit at resolved sites. `positions` None = every position (and every generated token)."""
    op: EditOp
    sites: list[str]
    vector: np.ndarray                    # (width,) or (len(positions), width), float32
    positions: list[int] | None = None    # relative (negative from the end) prompt positions
    sequences: list[int] | None = None    # prompt indices; None = all


@dataclass
class Prompt:
    """Text (tokenized by the worker) or token ids (used as they are)."""
    text: str = ""
    token_ids: list[int] | None = None
    chat: bool = False
    bos: bool = True


@dataclass
class Lens:
    """The reduction of unembedded rows that a Run's lens or an Unembed asks for (see proto `LensSpec`)."""
    top_k: int
    temperature: float
    target_ids: list[int]
    final_norm: bool
    return_logits: bool
    keep_captures: bool = False


# ----- jobs: one per RPC that needs a worker ------------------------------------------------------------

@dataclass
class TokenizeJob:
    text: str
    add_special: bool
    parse_special: bool
    chat: bool


@dataclass
class DetokenizeJob:
    token_ids: list[int]


@dataclass
class RunJob:
    prompts: list[Prompt]
    capture: list[str]                 # concrete site names
    positions: list[int] | None        # None = every position
    logits: LogitsMode
    float16: bool
    interventions: list[Intervention] = field(default_factory=list)
    lens: Lens | None = None
    fidelity: bool = False             # also return the fidelity map (service/fidelity.py)
    shared_memory: tuple[int, int, bytes] | None = None  # the client's offered answer file: pid, fd, token
    shared_memory_refused: str = ""    # why an offer was set aside before the worker (the client is elsewhere)


@dataclass
class GenerateJob:
    prompt: Prompt
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: list[str]
    interventions: list[Intervention] = field(default_factory=list)


@dataclass
class UnembedJob:
    vectors: np.ndarray  # (n, n_embd) float32
    lens: Lens
    reference_rows: int = 0  # the last rows are the final layer's, the reference of lens.kl_to_final


@dataclass
class WeightsJob:
    name: str
    axis: int
    indices: list[int]
    float16: bool


@dataclass
class NearestTokensJob:
    vectors: np.ndarray  # (n, n_embd) float32, no zero rows
    k: int
    table: VocabularyTable
    exclude_ids: list[int]


@dataclass
class CrashJob:
    """Test hook (see docs/reliability.md): make the worker die ("segv", "abort"), hang ("hang") or fail with a
    plain Python exception, as a bug would ("raise")."""
    how: Literal["segv", "abort", "hang", "raise"]


Job = TokenizeJob | DetokenizeJob | RunJob | GenerateJob | UnembedJob | WeightsJob | NearestTokensJob | CrashJob


# ----- answers -------------------------------------------------------------------------------------------

@dataclass
class NamedTensor:
    name: str
    sequence: int
    array: np.ndarray


@dataclass
class TensorPiece:
    """Bytes [offset, offset + array.nbytes) of the row-major tensor `name` (of prompt `sequence`) whose
    whole shape is `shape` and dtype the array's: how a big answer leaves a worker ahead of its "done"."""
    name: str
    sequence: int
    shape: tuple[int, ...]
    offset: int
    array: np.ndarray


PIECE_BYTES = 1 << 19  # what the front end holds of one answer in flight is a few of these


def tensor_pieces(name: str, sequence: int, shape: tuple[int, ...], array: np.ndarray,
                  offset: int = 0) -> Iterator[TensorPiece]:
    """`array` (the part of tensor `name` of `shape` that starts at byte `offset`) as pieces of at most
    PIECE_BYTES, each a view of its memory."""
    flat = np.ascontiguousarray(array).reshape(-1)
    step = max(1, PIECE_BYTES // flat.itemsize)
    for start in range(0, max(flat.size, 1), step):  # an empty tensor is one empty piece: it has a shape
        yield TensorPiece(name, sequence, tuple(shape), offset + start * flat.itemsize, flat[start:start + step])


@dataclass
class RunResult:
    header: pb.RunHeader
    tensors: list[NamedTensor]


@dataclass
class Tensors:
    tensors: list[NamedTensor]


@dataclass
class WorkerInfo:
    """What a worker reports once its model is loaded: the model as the wire describes it, plus the shape
    of every capture site (which the front end's request checks need and the wire does not carry)."""
    model: pb.ModelInfo
    site_shapes: dict[str, tuple[int, ...]]
