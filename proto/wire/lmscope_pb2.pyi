from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]

class LogitsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGITS_ALL: _ClassVar[LogitsMode]
    LOGITS_LAST: _ClassVar[LogitsMode]
    LOGITS_NONE: _ClassVar[LogitsMode]
FLOAT32: DType
FLOAT16: DType
INT32: DType
LOGITS_ALL: LogitsMode
LOGITS_LAST: LogitsMode
LOGITS_NONE: LogitsMode

class TensorChunk(_message.Message):
    __slots__ = ("name", "sequence", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    sequence: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., sequence: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("architecture", "name", "description", "n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train", "n_ctx", "tied_embeddings", "tensor_types", "file_type", "has_chat_template", "chat_template", "bos_token_id", "eos_token_id", "capture_sites", "fingerprint", "n_params", "file_size", "limits", "backend", "n_gpu_layers", "n_workers", "unavailable_sites", "embedding_scale", "final_logit_softcapping", "site_rules", "verification", "unembed_error", "memory", "flash_attention", "batch_invariant", "ffn_value_tensor", "kv_cache_type", "cpu_variant")
    class TensorTypesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class UnavailableSitesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class VerificationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_KV_FIELD_NUMBER: _ClassVar[int]
    N_FF_FIELD_NUMBER: _ClassVar[int]
    N_VOCAB_FIELD_NUMBER: _ClassVar[int]
    N_CTX_TRAIN_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    TIED_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_TYPES_FIELD_NUMBER: _ClassVar[int]
    FILE_TYPE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_SITES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    N_PARAMS_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    N_GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_WORKERS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_SITES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SCALE_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOGIT_SOFTCAPPING_FIELD_NUMBER: _ClassVar[int]
    SITE_RULES_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    UNEMBED_ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    FLASH_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    FFN_VALUE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CPU_VARIANT_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    name: str
    description: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_ctx: int
    tied_embeddings: bool
    tensor_types: _containers.ScalarMap[str, int]
    file_type: str
    has_chat_template: bool
    chat_template: str
    bos_token_id: int
    eos_token_id: int
    capture_sites: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: str
    n_params: int
    file_size: int
    limits: Limits
    backend: str
    n_gpu_layers: int
    n_workers: int
    unavailable_sites: _containers.ScalarMap[str, str]
    embedding_scale: float
    final_logit_softcapping: float
    site_rules: str
    verification: _containers.ScalarMap[str, float]
    unembed_error: str
    memory: MemoryEstimate
    flash_attention: bool
    batch_invariant: bool
    ffn_value_tensor: str
    kv_cache_type: str
    cpu_variant: str
    def __init__(self, architecture: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., n_layer: _Optional[int] = ..., n_embd: _Optional[int] = ..., n_head: _Optional[int] = ..., n_head_kv: _Optional[int] = ..., n_ff: _Optional[int] = ..., n_vocab: _Optional[int] = ..., n_ctx_train: _Optional[int] = ..., n_ctx: _Optional[int] = ..., tied_embeddings: _Optional[bool] = ..., tensor_types: _Optional[_Mapping[str, int]] = ..., file_type: _Optional[str] = ..., has_chat_template: _Optional[bool] = ..., chat_template: _Optional[str] = ..., bos_token_id: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., capture_sites: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[str] = ..., n_params: _Optional[int] = ..., file_size: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., backend: _Optional[str] = ..., n_gpu_layers: _Optional[int] = ..., n_workers: _Optional[int] = ..., unavailable_sites: _Optional[_Mapping[str, str]] = ..., embedding_scale: _Optional[float] = ..., final_logit_softcapping: _Optional[float] = ..., site_rules: _Optional[str] = ..., verification: _Optional[_Mapping[str, float]] = ..., unembed_error: _Optional[str] = ..., memory: _Optional[_Union[MemoryEstimate, _Mapping]] = ..., flash_attention: _Optional[bool] = ..., batch_invariant: _Optional[bool] = ..., ffn_value_tensor: _Optional[str] = ..., kv_cache_type: _Optional[str] = ..., cpu_variant: _Optional[str] = ...) -> None: ...

class MemoryEstimate(_message.Message):
    __slots__ = ("mapped_weights", "kv_cache", "compute_buffer", "output_buffer", "reduction_budget", "contexts", "n_ubatch", "per_worker", "n_outputs_max")
    MAPPED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_BUFFER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BUFFER_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_BUDGET_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    N_UBATCH_FIELD_NUMBER: _ClassVar[int]
    PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    N_OUTPUTS_MAX_FIELD_NUMBER: _ClassVar[int]
    mapped_weights: int
    kv_cache: int
    compute_buffer: int
    output_buffer: int
    reduction_budget: int
    contexts: int
    n_ubatch: int
    per_worker: int
    n_outputs_max: int
    def __init__(self, mapped_weights: _Optional[int] = ..., kv_cache: _Optional[int] = ..., compute_buffer: _Optional[int] = ..., output_buffer: _Optional[int] = ..., reduction_budget: _Optional[int] = ..., contexts: _Optional[int] = ..., n_ubatch: _Optional[int] = ..., per_worker: _Optional[int] = ..., n_outputs_max: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_capture_bytes", "max_generated_tokens", "max_batch_prompts", "max_message_bytes")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPTURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_capture_bytes: int
    max_generated_tokens: int
    max_batch_prompts: int
    max_message_bytes: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_capture_bytes: _Optional[int] = ..., max_generated_tokens: _Optional[int] = ..., max_batch_prompts: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_special", "parse_special", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    PARSE_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_special: bool
    parse_special: bool
    chat: bool
    def __init__(self, text: _Optional[str] = ..., add_special: _Optional[bool] = ..., parse_special: _Optional[bool] = ..., chat: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "pieces", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    pieces: _containers.RepeatedScalarFieldContainer[bytes]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., pieces: _Optional[_Iterable[bytes]] = ..., text: _Optional[str] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text", "pieces")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    text: str
    pieces: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, text: _Optional[str] = ..., pieces: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids", "chat", "no_bos")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    NO_BOS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    chat: bool
    no_bos: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., chat: _Optional[bool] = ..., no_bos: _Optional[bool] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("op", "sites", "positions", "vector", "sequences")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ADD: _ClassVar[Intervention.Op]
        SET: _ClassVar[Intervention.Op]
        ABLATE: _ClassVar[Intervention.Op]
    ADD: Intervention.Op
    SET: Intervention.Op
    ABLATE: Intervention.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    op: Intervention.Op
    sites: _containers.RepeatedScalarFieldContainer[str]
    positions: _containers.RepeatedScalarFieldContainer[int]
    vector: Tensor
    sequences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, op: _Optional[_Union[Intervention.Op, str]] = ..., sites: _Optional[_Iterable[str]] = ..., positions: _Optional[_Iterable[int]] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., sequences: _Optional[_Iterable[int]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("prompts", "capture", "positions", "logits", "dtype", "interventions", "lens", "fidelity", "shared_memory")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    LENS_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    capture: _containers.RepeatedScalarFieldContainer[str]
    positions: _containers.RepeatedScalarFieldContainer[int]
    logits: LogitsMode
    dtype: DType
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    lens: LensSpec
    fidelity: bool
    shared_memory: SharedMemory
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., capture: _Optional[_Iterable[str]] = ..., positions: _Optional[_Iterable[int]] = ..., logits: _Optional[_Union[LogitsMode, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., lens: _Optional[_Union[LensSpec, _Mapping]] = ..., fidelity: _Optional[bool] = ..., shared_memory: _Optional[_Union[SharedMemory, _Mapping]] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("pid", "fd", "token")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    token: bytes
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class TensorPlacement(_message.Message):
    __slots__ = ("name", "sequence", "dtype", "shape", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    sequence: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, name: _Optional[str] = ..., sequence: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class LensSpec(_message.Message):
    __slots__ = ("enabled", "top_k", "temperature", "target_ids", "skip_final_norm", "return_logits", "keep_captures", "kl_reference_rows")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_FINAL_NORM_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    KEEP_CAPTURES_FIELD_NUMBER: _ClassVar[int]
    KL_REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    top_k: int
    temperature: float
    target_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_final_norm: bool
    return_logits: bool
    keep_captures: bool
    kl_reference_rows: int
    def __init__(self, enabled: _Optional[bool] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ..., target_ids: _Optional[_Iterable[int]] = ..., skip_final_norm: _Optional[bool] = ..., return_logits: _Optional[bool] = ..., keep_captures: _Optional[bool] = ..., kl_reference_rows: _Optional[int] = ...) -> None: ...

class RunHeader(_message.Message):
    __slots__ = ("sequences", "sites", "decode_ms", "total_ms", "n_ubatches", "placements", "shared_memory_refused")
    class Sequence(_message.Message):
        __slots__ = ("token_ids", "positions")
        TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
        POSITIONS_FIELD_NUMBER: _ClassVar[int]
        token_ids: _containers.RepeatedScalarFieldContainer[int]
        positions: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    N_UBATCHES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_REFUSED_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[RunHeader.Sequence]
    sites: _containers.RepeatedScalarFieldContainer[str]
    decode_ms: float
    total_ms: float
    n_ubatches: int
    placements: _containers.RepeatedCompositeFieldContainer[TensorPlacement]
    shared_memory_refused: str
    def __init__(self, sequences: _Optional[_Iterable[_Union[RunHeader.Sequence, _Mapping]]] = ..., sites: _Optional[_Iterable[str]] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., n_ubatches: _Optional[int] = ..., placements: _Optional[_Iterable[_Union[TensorPlacement, _Mapping]]] = ..., shared_memory_refused: _Optional[str] = ...) -> None: ...

class RunChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: RunHeader
    tensor: TensorChunk
    def __init__(self, header: _Optional[_Union[RunHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "interventions")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("start", "token", "end")
    class Start(_message.Message):
        __slots__ = ("prompt_token_ids",)
        PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
        prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
    class Token(_message.Message):
        __slots__ = ("id", "piece", "text")
        ID_FIELD_NUMBER: _ClassVar[int]
        PIECE_FIELD_NUMBER: _ClassVar[int]
        TEXT_FIELD_NUMBER: _ClassVar[int]
        id: int
        piece: bytes
        text: str
        def __init__(self, id: _Optional[int] = ..., piece: _Optional[bytes] = ..., text: _Optional[str] = ...) -> None: ...
    class End(_message.Message):
        __slots__ = ("finish_reason", "n_generated", "prompt_ms", "generate_ms", "text")
        FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
        N_GENERATED_FIELD_NUMBER: _ClassVar[int]
        PROMPT_MS_FIELD_NUMBER: _ClassVar[int]
        GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
        TEXT_FIELD_NUMBER: _ClassVar[int]
        finish_reason: str
        n_generated: int
        prompt_ms: float
        generate_ms: float
        text: str
        def __init__(self, finish_reason: _Optional[str] = ..., n_generated: _Optional[int] = ..., prompt_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...
    START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: GenerateEvent.Start
    token: GenerateEvent.Token
    end: GenerateEvent.End
    def __init__(self, start: _Optional[_Union[GenerateEvent.Start, _Mapping]] = ..., token: _Optional[_Union[GenerateEvent.Token, _Mapping]] = ..., end: _Optional[_Union[GenerateEvent.End, _Mapping]] = ...) -> None: ...

class UnembedRequest(_message.Message):
    __slots__ = ("vectors", "spec")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    vectors: Tensor
    spec: LensSpec
    def __init__(self, vectors: _Optional[_Union[Tensor, _Mapping]] = ..., spec: _Optional[_Union[LensSpec, _Mapping]] = ...) -> None: ...

class WeightsRequest(_message.Message):
    __slots__ = ("name", "axis", "indices", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    axis: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., axis: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class NearestTokensRequest(_message.Message):
    __slots__ = ("vectors", "k", "table", "exclude_ids")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IDS_FIELD_NUMBER: _ClassVar[int]
    vectors: Tensor
    k: int
    table: str
    exclude_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, vectors: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., table: _Optional[str] = ..., exclude_ids: _Optional[_Iterable[int]] = ...) -> None: ...
