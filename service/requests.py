"""Request validation: proto messages -> checked worker jobs (`contracts.py`), before anything reaches native code.

Everything that can be checked from the request and the model's shape is checked here, in the front-end
process: strings are valid UTF-8 and bounded, site names exist, vector widths match their sites, numbers
are finite, indices are in range. What depends on tokenization (prompt length, resolved positions, the
size of the answer) is checked by the engine in the worker, still before llama.cpp is called.
"""
from __future__ import annotations

import math

import numpy as np

from lmscope.proto import shared_memory, tensors
from lmscope.proto.sites import select_sites, site_editable
from lmscope.proto.wire import lmscope_pb2 as pb

from .contracts import (
    DetokenizeJob,
    GenerateJob,
    Intervention,
    Lens,
    NearestTokensJob,
    Prompt,
    RunJob,
    TokenizeJob,
    UnembedJob,
    WeightsJob,
    WorkerInfo,
)
from .errors import Code, RequestError

MAX_TEXT_BYTES = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_SITES_PER_REQUEST = 10_000
MAX_TOP_K = 1000
MAX_TARGET_IDS = 1024
MAX_INTERVENTIONS = 1024
# RMSNorm squares the residual stream in float32 (largest finite value 3.4e38): a value above 1e15 would
# make the sum of squares overflow to inf and every later activation NaN.
MAX_ABS_VALUE = 1e15
# Lens temperatures outside this range overflow float32 logits / temperature (NaN probabilities).
LENS_TEMPERATURE_RANGE = (1e-6, 1e6)
# Sampling divides float32 logits by the temperature: below 1e-6 they overflow to infinity and the sampler's
# probabilities are NaN (it then drew the vocabulary's last token every time, whatever the prompt).
GENERATE_TEMPERATURE_RANGE = LENS_TEMPERATURE_RANGE
MAX_NEAREST_ROWS = 4096  # query vectors per NearestTokens request (each costs a pass over the vocabulary)
VOCABULARY_TABLES = ("embedding", "lm_head")


def _fail(code: str, message: str):
    raise RequestError(code, message)


def _within(value: float, bounds: tuple[float, float]) -> bool:
    """low <= value <= high for the value of a float32 field, whose bounds arrive rounded as it rounds them (1e-6
    as 9.99999997e-07: a client sending a bound gets it); False for NaN."""
    return float(np.float32(bounds[0])) <= value <= float(np.float32(bounds[1]))


def _dtype_name(value: int) -> str:
    return pb.DType.Name(value) if value in pb.DType.values() else str(value)


class RequestParser:
    def __init__(self, worker: WorkerInfo):
        self.info = worker.model
        self.sites = list(worker.model.capture_sites)
        self.shapes = worker.site_shapes
        self.limits = worker.model.limits
        self.n_vocab = worker.model.n_vocab

    # ----- pieces ----------------------------------------------------------------------------------

    def text(self, value: str, what: str) -> str:
        if len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
            _fail(Code.INVALID_ARGUMENT, f"{what} is longer than {MAX_TEXT_BYTES} bytes")
        return value

    def token_ids(self, ids, what: str) -> list[int]:
        ids = list(ids)
        if len(ids) > self.limits.max_prompt_tokens:
            _fail(Code.OUT_OF_RANGE, f"{what} has {len(ids)} tokens; the server accepts at most "
                                  f"{self.limits.max_prompt_tokens}")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            _fail(Code.OUT_OF_RANGE, f"{what} has token id {bad[0]} outside the vocabulary [0, {self.n_vocab})")
        return ids

    def prompt(self, prompt: pb.Prompt, what: str = "the prompt") -> Prompt:
        if prompt.token_ids:
            if prompt.chat:
                _fail(Code.INVALID_ARGUMENT, f"{what}: chat=true needs text, not token ids")
            return Prompt(token_ids=self.token_ids(prompt.token_ids, what))
        if not prompt.text:
            _fail(Code.INVALID_ARGUMENT, f"{what} is empty: send text or token ids")
        if prompt.chat and not self.info.has_chat_template:
            _fail(Code.FAILED_PRECONDITION, "this model has no chat template; send chat=false")
        return Prompt(text=self.text(prompt.text, what), chat=prompt.chat, bos=not prompt.no_bos)

    def select(self, patterns, what: str) -> list[str]:
        patterns = list(patterns)
        if not patterns:
            return []
        try:
            chosen = select_sites(self.sites, patterns, dict(self.info.unavailable_sites))
        except KeyError as exc:
            _fail(Code.INVALID_ARGUMENT, f"{what}: {exc.args[0]}")
        if len(chosen) > MAX_SITES_PER_REQUEST:
            _fail(Code.INVALID_ARGUMENT, f"{what} selects {len(chosen)} sites; at most {MAX_SITES_PER_REQUEST}")
        return chosen

    def vector(self, tensor: pb.Tensor, what: str) -> np.ndarray:
        if tensor.dtype not in (pb.FLOAT32, pb.FLOAT16):
            _fail(Code.INVALID_ARGUMENT, f"{what} must be FLOAT32 or FLOAT16, not {_dtype_name(tensor.dtype)}")
        try:
            array = tensors.from_tensor(tensor)
        except tensors.TensorCodecError as exc:
            _fail(Code.INVALID_ARGUMENT, f"{what}: {exc}")
        if array.ndim not in (1, 2) or array.size == 0:
            _fail(Code.INVALID_ARGUMENT, f"{what} must be a vector (width,) or a matrix (positions, width), "
                                      f"got shape {list(array.shape)}")
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            _fail(Code.INVALID_ARGUMENT, f"{what} contains NaN or infinite values")
        if np.max(np.abs(array)) > MAX_ABS_VALUE:
            _fail(Code.INVALID_ARGUMENT, f"{what} has values above {MAX_ABS_VALUE:g} in magnitude, which overflow "
                                      f"the model's float32 arithmetic; scale it down")
        return array

    def positions(self, values, what: str) -> list[int] | None:
        values = list(values)
        if not values:
            return None
        limit = self.limits.max_prompt_tokens
        bad = [p for p in values if not -limit <= p < limit]
        if bad:
            _fail(Code.OUT_OF_RANGE, f"{what} position {bad[0]} is outside any prompt this server accepts "
                                  f"(at most {limit} tokens)")
        if len(set(values)) != len(values):
            _fail(Code.INVALID_ARGUMENT, f"{what} positions repeat: {values}")
        return values

    def interventions(self, messages, n_prompts: int) -> list[Intervention]:
        if len(messages) > MAX_INTERVENTIONS:
            _fail(Code.INVALID_ARGUMENT, f"{len(messages)} interventions in one request; at most {MAX_INTERVENTIONS} "
                                      f"(one intervention may name many sites)")
        out = []
        for i, message in enumerate(messages):
            what = f"intervention {i}"
            if message.op not in (pb.Intervention.ADD, pb.Intervention.SET, pb.Intervention.ABLATE):
                _fail(Code.INVALID_ARGUMENT, f"{what}: unknown op {message.op}; use ADD, SET or ABLATE")
            op = {pb.Intervention.ADD: "add", pb.Intervention.SET: "set", pb.Intervention.ABLATE: "ablate"}[message.op]
            sites = self.select(message.sites, what)
            if not sites:
                _fail(Code.INVALID_ARGUMENT, f"{what} names no site")
            vector = self.vector(message.vector, f"{what} vector")
            positions = self.positions(message.positions, what)
            for site in sites:
                shape = self.shapes[site]
                if not site_editable(site):
                    _fail(Code.INVALID_ARGUMENT, f"{what}: {site} cannot be edited; edit a residual-stream, "
                                              f"attention/MLP output or MLP neuron site")
                if vector.shape[-1] != shape[0]:
                    _fail(Code.INVALID_ARGUMENT, f"{what}: the vector has width {vector.shape[-1]} but {site} has "
                                              f"width {shape[0]}")
            if vector.ndim == 2 and (positions is None or vector.shape[0] != len(positions)):
                _fail(Code.INVALID_ARGUMENT, f"{what}: a (rows, width) vector needs one position per row; got "
                                          f"{vector.shape[0]} rows and {len(positions or [])} positions")
            if op == "ablate" and np.any(np.linalg.norm(vector, axis=-1) == 0):
                _fail(Code.INVALID_ARGUMENT, f"{what}: cannot ablate a zero direction")
            sequences = list(message.sequences) or None
            if sequences and any(s >= n_prompts for s in sequences):
                _fail(Code.OUT_OF_RANGE, f"{what}: sequence index {max(sequences)} but only {n_prompts} prompts")
            out.append(Intervention(op=op, sites=sites, vector=vector, positions=positions, sequences=sequences))
        return out

    def lens(self, spec: pb.LensSpec) -> Lens:
        if spec.top_k > MAX_TOP_K:
            _fail(Code.INVALID_ARGUMENT, f"lens top_k {spec.top_k} is over the limit of {MAX_TOP_K}")
        temperature = spec.temperature or 1.0
        low, high = LENS_TEMPERATURE_RANGE
        if not _within(temperature, LENS_TEMPERATURE_RANGE):
            _fail(Code.INVALID_ARGUMENT, f"lens temperature must be between {low:g} and {high:g} (0 means 1), "
                                      f"got {spec.temperature}")
        if len(spec.target_ids) > MAX_TARGET_IDS:
            _fail(Code.INVALID_ARGUMENT, f"{len(spec.target_ids)} lens target_ids; at most {MAX_TARGET_IDS}")
        targets = self.token_ids(spec.target_ids, "lens target_ids")
        return Lens(top_k=spec.top_k, temperature=temperature, target_ids=targets,
                    final_norm=not spec.skip_final_norm, return_logits=spec.return_logits,
                    keep_captures=spec.keep_captures)

    def dtype(self, value: int) -> bool:
        """True for float16."""
        if value not in (pb.FLOAT32, pb.FLOAT16):
            _fail(Code.INVALID_ARGUMENT, f"results can be FLOAT32 or FLOAT16, not {_dtype_name(value)}")
        return value == pb.FLOAT16

    # ----- requests --------------------------------------------------------------------------------

    def run(self, request: pb.RunRequest) -> RunJob:
        if not request.prompts:
            _fail(Code.INVALID_ARGUMENT, "send at least one prompt")
        if len(request.prompts) > self.limits.max_batch_prompts:
            _fail(Code.RESOURCE_EXHAUSTED, f"{len(request.prompts)} prompts in one request; the server accepts at most "
                                        f"{self.limits.max_batch_prompts}: split the batch")
        logits = {pb.LOGITS_ALL: "all", pb.LOGITS_LAST: "last", pb.LOGITS_NONE: "none"}.get(request.logits)
        if logits is None:
            _fail(Code.INVALID_ARGUMENT, f"unknown logits mode {request.logits}")
        capture = self.select(request.capture, "capture")
        lens = None
        if request.lens.enabled:
            lens = self.lens(request.lens)
            not_residual = [s for s in capture if self.shapes[s] != (self.info.n_embd,)]
            if not capture or not_residual:
                _fail(Code.INVALID_ARGUMENT, "the lens needs captured residual-width sites (e.g. embed, "
                                          f"blocks.*.resid_post); not lensable: {not_residual[:3]}")
        return RunJob(prompts=[self.prompt(p, f"prompt {i}") for i, p in enumerate(request.prompts)],
                      capture=capture, positions=self.positions(request.positions, "capture"), logits=logits,
                      float16=self.dtype(request.dtype),
                      interventions=self.interventions(request.interventions, len(request.prompts)), lens=lens,
                      fidelity=request.fidelity, shared_memory=self.shared_memory(request))

    def shared_memory(self, request: pb.RunRequest) -> tuple[int, int, bytes] | None:
        if not request.HasField("shared_memory"):
            return None
        offer = request.shared_memory
        if offer.pid <= 0 or offer.fd < 0 or len(offer.token) != shared_memory.TOKEN_BYTES:
            _fail(Code.INVALID_ARGUMENT, f"shared_memory needs the client's pid (> 0), its file's descriptor "
                                      f"(>= 0) and a token of {shared_memory.TOKEN_BYTES} bytes; got pid {offer.pid}, "
                                      f"fd {offer.fd}, {len(offer.token)} bytes")
        return offer.pid, offer.fd, bytes(offer.token)

    def generate(self, request: pb.GenerateRequest) -> GenerateJob:
        limit = self.limits.max_generated_tokens
        if request.max_tokens == 0 or request.max_tokens > limit:
            _fail(Code.OUT_OF_RANGE, f"max_tokens must be between 1 and {limit}, got {request.max_tokens}")
        low, high = GENERATE_TEMPERATURE_RANGE
        if request.temperature != 0 and not _within(request.temperature, GENERATE_TEMPERATURE_RANGE):
            _fail(Code.INVALID_ARGUMENT, f"temperature must be 0 (greedy) or between {low:g} and {high:g}, "
                                      f"got {request.temperature:g}")
        if not math.isfinite(request.top_p) or not 0 <= request.top_p <= 1:
            _fail(Code.INVALID_ARGUMENT, f"top_p must be in [0, 1], got {request.top_p}")
        if request.top_k > self.n_vocab:
            _fail(Code.INVALID_ARGUMENT, f"top_k {request.top_k} is larger than the vocabulary ({self.n_vocab})")
        if len(request.stop) > MAX_STOP_STRINGS or any(len(s.encode()) > MAX_STOP_BYTES for s in request.stop):
            _fail(Code.INVALID_ARGUMENT, f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes")
        interventions = self.interventions(request.interventions, 1)
        return GenerateJob(prompt=self.prompt(request.prompt), max_tokens=request.max_tokens,
                           temperature=request.temperature, top_k=request.top_k, top_p=request.top_p or 1.0,
                           seed=request.seed, stop=list(request.stop), interventions=interventions)

    def unembed(self, request: pb.UnembedRequest) -> UnembedJob:
        vectors = self.vector(request.vectors, "vectors")
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.shape[1] != self.info.n_embd:
            _fail(Code.INVALID_ARGUMENT, f"vectors have width {vectors.shape[1]}; this model's residual width is "
                                      f"{self.info.n_embd}")
        rows_limit = max(1, self.limits.max_capture_bytes // (4 * self.n_vocab))
        if request.spec.return_logits and vectors.shape[0] > rows_limit:
            _fail(Code.RESOURCE_EXHAUSTED, f"{vectors.shape[0]} rows of full logits exceed the server's limit "
                                        f"({rows_limit} rows); ask for top_k instead or send fewer vectors")
        reference_rows = request.spec.kl_reference_rows
        if reference_rows > vectors.shape[0]:
            _fail(Code.INVALID_ARGUMENT, f"kl_reference_rows {reference_rows} is more than the {vectors.shape[0]} "
                                      f"vectors sent; the reference rows are the last ones of the request")
        return UnembedJob(vectors=vectors, lens=self.lens(request.spec), reference_rows=reference_rows)

    def nearest_tokens(self, request: pb.NearestTokensRequest) -> NearestTokensJob:
        table = request.table or "embedding"
        if table not in VOCABULARY_TABLES:
            _fail(Code.INVALID_ARGUMENT, f"unknown table {request.table!r}; use 'embedding' or 'lm_head'")
        exclude = sorted(set(self.token_ids(request.exclude_ids, "exclude_ids")))
        limit = min(self.n_vocab - len(exclude), MAX_TOP_K)
        if not 1 <= request.k <= limit:
            _fail(Code.OUT_OF_RANGE, f"k must be between 1 and {limit}, got {request.k}")
        vectors = self.vector(request.vectors, "vectors")
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.shape[1] != self.info.n_embd:
            _fail(Code.INVALID_ARGUMENT, f"vectors have width {vectors.shape[1]}; this model's {table} rows have "
                                      f"width {self.info.n_embd}")
        if vectors.shape[0] > MAX_NEAREST_ROWS:
            _fail(Code.RESOURCE_EXHAUSTED, f"{vectors.shape[0]} query vectors in one request; at most "
                                        f"{MAX_NEAREST_ROWS}: split them")
        zero = np.flatnonzero(np.linalg.norm(vectors, axis=1) == 0)
        if len(zero):
            _fail(Code.INVALID_ARGUMENT, f"vector {zero[0]} is all zeros, so its cosine similarity is undefined")
        return NearestTokensJob(vectors=vectors, k=request.k, table=table, exclude_ids=exclude)

    def weights(self, request: pb.WeightsRequest) -> WeightsJob:
        return WeightsJob(name=self.text(request.name, "name"), axis=request.axis, indices=list(request.indices),
                          float16=self.dtype(request.dtype))

    def tokenize(self, request: pb.TokenizeRequest) -> TokenizeJob:
        if request.chat and not self.info.has_chat_template:
            _fail(Code.FAILED_PRECONDITION, "this model has no chat template; send chat=false")
        return TokenizeJob(text=self.text(request.text, "text"), add_special=request.add_special,
                           parse_special=request.parse_special, chat=request.chat)

    def detokenize(self, request: pb.DetokenizeRequest) -> DetokenizeJob:
        return DetokenizeJob(token_ids=self.token_ids(request.token_ids, "token_ids"))
