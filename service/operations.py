"""What a worker process does for each job (`contracts.py`), on top of its `Engine`.

Jobs arrive already validated against the model's shape (`service/requests.py`); what can only be checked
once prompts are tokenized (lengths, positions, capture size) is checked by the engine before any call into
llama.cpp. Small answers are the wire's own messages, arrays are `NamedTensor`s (or `TensorPiece`s sent ahead)
the front end streams, or, for a Run whose client offered shared memory, written into the client's file
(`lmscope.proto.shared_memory`).
"""
from __future__ import annotations

import ctypes
import math
import os
import time
from typing import Callable, Iterator

import numpy as np

from lmscope.proto.shared_memory import AnswerWriter, SharedMemoryRefused
from lmscope.proto.wire import lmscope_pb2 as pb

from .contracts import (
    CrashJob,
    DetokenizeJob,
    GenerateJob,
    Job,
    Lens,
    NamedTensor,
    NearestTokensJob,
    Prompt,
    RunJob,
    RunResult,
    Tensors,
    TokenizeJob,
    UnembedJob,
    WeightsJob,
    WorkerInfo,
    tensor_pieces,
)
from .engine import Engine, ForwardRequest
from .errors import Code, RequestError
from .fidelity import FidelityMap

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65,504
FLOAT16_OVERFLOW = FLOAT16_MAX + 16  # half a float16 step (32) above it: from here a value rounds to infinity


def as_float16(array: np.ndarray, name: str) -> np.ndarray:
    """`array` in float16, or OUT_OF_RANGE where a finite value would become infinite (Gemma's residual stream
    reaches 1e5): a float16 answer is float32 rounded to half a float16 step, never silently something else."""
    if np.abs(array).max(initial=0.0) < FLOAT16_OVERFLOW:  # one pass in the usual case; NaN and inf go on below
        return array.astype(np.float16)
    overflow = np.isfinite(array) & (np.abs(array) >= FLOAT16_OVERFLOW)
    if overflow.any():
        raise RequestError(Code.OUT_OF_RANGE, f"{name} has values up to {np.abs(array[overflow]).max():.4g}, beyond "
                                           f"float16's largest value {FLOAT16_MAX:,.0f}: ask for dtype float32")
    return array.astype(np.float16)


def _written(write, *args) -> None:
    """A write into the client's answer file; a full memory is the client's to hear about."""
    try:
        write(*args)
    except OSError as exc:
        raise RequestError(Code.RESOURCE_EXHAUSTED, f"could not write the answer into the client's shared memory "
                                                    f"({exc.strerror}): ask for less, or run without shared memory "
                                                    f"(Client(..., shared_memory=False))") from None


class Operations:
    def __init__(self, engine: Engine, test_hooks: bool = False, emit: Callable[[object], None] | None = None):
        """`emit(item)` sends an item ahead of the job's answer (the worker's pipe); with it, a Run's
        all-position logits leave as `TensorPiece`s straight from llama.cpp's output buffer, ubatch by
        ubatch, instead of being collected into the answer."""
        self.engine = engine
        self.test_hooks = test_hooks
        self.emit = emit
        self._fidelity: FidelityMap | None = None  # built on the first run that asks for it (column norms)
        self._handlers = {TokenizeJob: self.tokenize, DetokenizeJob: self.detokenize, RunJob: self.run,
                          GenerateJob: self.generate, UnembedJob: self.unembed, WeightsJob: self.weights,
                          NearestTokensJob: self.nearest_tokens, CrashJob: self.crash}

    def execute(self, job: Job):
        """The answer to one job: a message or `RunResult`/`Tensors`, or an iterator of messages (Generate)."""
        return self._handlers[type(job)](job)

    def info(self) -> WorkerInfo:
        return WorkerInfo(model=self.engine.model_info(), site_shapes=dict(self.engine.site_shapes))

    def _tokens(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids:
            return list(prompt.token_ids)
        return self.engine.model.prompt_tokens(prompt.text, chat=prompt.chat, bos=prompt.bos)

    def tokenize(self, job: TokenizeJob) -> pb.TokenizeResponse:
        text, parse_special = job.text, job.parse_special
        if job.chat:
            text = self.engine.model.apply_chat_template(text)
            parse_special = True
        ids = self.engine.model.tokenize(text, add_special=job.add_special, parse_special=parse_special)
        return pb.TokenizeResponse(token_ids=ids, pieces=[self.engine.model.piece(t) for t in ids], text=text)

    def detokenize(self, job: DetokenizeJob) -> pb.DetokenizeResponse:
        return pb.DetokenizeResponse(text=self.engine.model.detokenize(job.token_ids),
                                     pieces=[self.engine.model.piece(t) for t in job.token_ids])

    def run(self, job: RunJob) -> RunResult:
        start = time.perf_counter()
        token_lists = [self._tokens(p) for p in job.prompts]
        writer, refused = None, job.shared_memory_refused
        if job.shared_memory is not None:
            try:
                writer = AnswerWriter(*job.shared_memory)
            except SharedMemoryRefused as exc:
                refused = str(exc)
        try:
            result = self._run(job, token_lists, writer)
        finally:
            if writer is not None:
                writer.close()
        result.header.shared_memory_refused = refused
        result.header.total_ms = (time.perf_counter() - start) * 1e3
        return result

    def _run(self, job: RunJob, token_lists: list[list[int]], writer: AnswerWriter | None) -> RunResult:
        sink = None
        if writer is not None or self.emit is not None:
            def sink(sequence: int, shape: tuple[int, int], first_row: int, rows: np.ndarray) -> None:
                rows = as_float16(rows, "logits") if job.float16 else rows
                if writer is not None:
                    offset = writer.place("logits", sequence, shape, rows.dtype)
                    _written(writer.write, offset + first_row * shape[1] * rows.itemsize, rows)
                    return
                for piece in tensor_pieces("logits", sequence, shape, rows, first_row * shape[1] * rows.itemsize):
                    self.emit(piece)
        fidelity = self._fidelity_map() if job.fidelity else None
        # the map's rows are captured beside the asked sites, reduced below and never sent
        extra = [site for site in fidelity.sites if site not in job.capture] if fidelity else []
        result = self.engine.forward(ForwardRequest(prompts=token_lists, capture=job.capture + extra,
                                                    positions=job.positions,
                                                    logits=job.logits, interventions=job.interventions,
                                                    lens_row_bytes=self._lens_row_bytes(job.lens),
                                                    logits_sink=sink))
        tensors: list[NamedTensor] = []
        if fidelity is not None:
            for s in range(len(token_lists)):
                rows = {site: result.captures[site][s] for site in fidelity.sites}
                tensors += [NamedTensor(f"fidelity.{name}", s, a)
                            for name, a in fidelity.compute(rows, result.positions[s]).items()]
            for site in extra:
                del result.captures[site]
        if job.lens is not None:
            tensors += self._lens_of_run(job.capture, result, job.lens)
        if job.lens is None or job.lens.keep_captures:
            for site in job.capture:
                tensors += [NamedTensor(site, s, a) for s, a in enumerate(result.captures[site])]
        if result.logits is not None:
            tensors += [NamedTensor("logits", s, a) for s, a in enumerate(result.logits)]
        header = pb.RunHeader(sequences=[pb.RunHeader.Sequence(token_ids=t, positions=p)
                                         for t, p in zip(token_lists, result.positions)],
                              sites=job.capture, decode_ms=result.decode_ms,
                              n_ubatches=result.n_ubatches)
        del result  # `tensors` now owns the arrays: converting one frees its float32 original at once
        for i, tensor in enumerate(tensors):
            array = tensor.array
            if job.float16 and array.dtype == np.float32:
                array = as_float16(array, tensor.name)
            if writer is not None:
                _written(writer.write_tensor, tensor.name, tensor.sequence, array)
                tensors[i] = None  # written: its memory can go
            else:
                tensors[i] = NamedTensor(tensor.name, tensor.sequence, array)
        if writer is not None:
            header.placements.extend(writer.placements())
            tensors = []
        return RunResult(header=header, tensors=tensors)

    def _fidelity_map(self) -> FidelityMap:
        if self._fidelity is None:
            engine = self.engine
            self._fidelity = FidelityMap(engine.weights, engine.site_shapes, engine.n_layer, engine.n_head,
                                         engine.n_head_kv)
        return self._fidelity

    def _lens_row_bytes(self, lens: Lens | None) -> int:
        """Bytes of lens results per unembedded row: top ids and probabilities, targets, entropy, logits."""
        if lens is None:
            return 0
        per_row = 8 * min(lens.top_k, self.engine.n_vocab) + 8 * len(lens.target_ids) + 8  # + entropy, KL
        return per_row + (4 * self.engine.n_vocab if lens.return_logits else 0)

    def _check_lens(self) -> None:
        if self.engine.unembed_error:
            raise RequestError(Code.FAILED_PRECONDITION, self.engine.unembed_error)

    def _lens_of_run(self, capture, result, lens: Lens) -> list[NamedTensor]:
        """Lens reductions per prompt, stacked over the captured sites: (n_sites, n_positions, ...).

        When the final block's output is captured, `lens.kl_to_final` (n_sites, n_positions) is KL(final
        layer's distribution || each site's) at the same position, computed in the same vocabulary pass: the
        final site's rows go last, as the reduction's reference rows.
        """
        self._check_lens()
        final = f"blocks.{self.engine.n_layer - 1}.resid_post"
        order = [site for site in capture if site != final] + [final] * (final in capture)
        back = np.argsort([capture.index(site) for site in order])  # computed order -> requested order
        out = []
        for s in range(len(result.positions)):
            blocks = [result.captures[site][s] for site in order]  # (positions, n_embd) each
            shape = (len(blocks), blocks[0].shape[0])
            if not lens.keep_captures:  # the lens copies each block in and drops it: no second copy of all
                for site in capture:
                    result.captures[site][s] = None
            reduced = self._lens(blocks, lens, reference_rows=shape[1] if final in capture else 0)
            for name, array in reduced.items():
                out.append(NamedTensor(f"lens.{name}", s, array.reshape(shape + array.shape[1:])[back]))
        return out

    def _lens(self, vectors: np.ndarray | list[np.ndarray], lens: Lens,
              reference_rows: int = 0) -> dict[str, np.ndarray]:
        return self.engine.weights.lens(vectors, top_k=lens.top_k, temperature=lens.temperature,
                                        target_ids=lens.target_ids, final_norm=lens.final_norm,
                                        keep_logits=lens.return_logits, reference_rows=reference_rows)

    def unembed(self, job: UnembedJob) -> Tensors:
        self._check_lens()
        reduced = self._lens(job.vectors.astype(np.float32), job.lens, reference_rows=job.reference_rows)
        return Tensors([NamedTensor(f"lens.{name}", 0, a) for name, a in reduced.items()])

    def weights(self, job: WeightsJob) -> Tensors:
        weights = self.engine.weights
        name, axis, indices = job.name, job.axis, job.indices
        tensor = weights.tensors.get(name)
        if tensor is None:
            raise RequestError(Code.NOT_FOUND, f"the model has no tensor {name!r}; ModelInfo.tensor_types counts them, "
                                            f"GGUF names look like 'token_embd.weight' or 'blk.0.ffn_down.weight'")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if indices:
            if not 0 <= axis < len(shape):
                raise RequestError(Code.INVALID_ARGUMENT,
                                   f"axis {axis} is out of range for {name} of shape {list(shape)}")
            bad = [i for i in indices if not 0 <= i < shape[axis]]
            if bad:
                raise RequestError(Code.OUT_OF_RANGE,
                                   f"index {bad[0]} is out of range for axis {axis} of {name} (size {shape[axis]})")
            self._check_answer_size(name, len(indices) * math.prod(shape) // shape[axis])
            index = np.asarray(indices, dtype=np.int64)
            array = (weights.rows(name, index) if axis == 0 and len(shape) == 2
                     else np.take(weights.read(name), index, axis=axis))
        else:
            self._check_answer_size(name, math.prod(shape))
            array = weights.read(name)
        return Tensors([NamedTensor("weights", 0, as_float16(array, name) if job.float16 else array)])

    def _check_answer_size(self, name: str, n_values: int) -> None:
        limit = self.engine.config.max_capture_bytes
        if 4 * n_values > limit:
            raise RequestError(Code.RESOURCE_EXHAUSTED,
                               f"{n_values} values of {name} ({4 * n_values / 2**20:.1f} MiB as float32) exceed the "
                               f"server's limit of {limit / 2**20:.0f} MiB per answer: ask for fewer indices")

    def nearest_tokens(self, job: NearestTokensJob) -> Tensors:
        found = self.engine.weights.nearest(job.vectors, job.k, job.table, job.exclude_ids)
        return Tensors([NamedTensor(f"nearest.{name}", 0, a) for name, a in found.items()])

    def generate(self, job: GenerateJob) -> Iterator[pb.GenerateEvent]:
        tokens = self._tokens(job.prompt)
        yield pb.GenerateEvent(start=pb.GenerateEvent.Start(prompt_token_ids=tokens))
        yield from self.engine.generate(tokens, job.max_tokens, temperature=job.temperature, top_k=job.top_k,
                                        top_p=job.top_p, seed=job.seed, stop=job.stop,
                                        interventions=job.interventions)

    def crash(self, job: CrashJob) -> None:
        """Test hook (honoured only by a server started with --test-hooks): kill this worker the way native
        code would ("segv", "abort"), or hang it like a native call that never returns and ignores
        cancellation ("hang"), or fail it with a plain Python exception, as a bug would ("raise")."""
        if not self.test_hooks:
            raise RequestError(Code.PERMISSION_DENIED, "test hooks are disabled on this server")
        if job.how == "raise":  # its text names a path, which must stay in the server's log
            raise RuntimeError(f"test hook: an unexpected error in {os.path.abspath(__file__)}")
        if job.how == "abort":
            os.abort()
        if job.how == "hang":
            time.sleep(24 * 3600)
        ctypes.string_at(0)  # segmentation fault
