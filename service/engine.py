"""The engine a worker process drives: one model, its contexts, forward passes and generation.

`Engine` is a thin facade over the modules that do the work, one concern each:

- `service/model.py`: the loaded model, its metadata and vocabulary (tokens, pieces, chat template);
- `service/batching.py`: contexts, packing prompts into ubatches, and the one decode loop;
- `service/capture.py`: the capture/edit pass the eval callback routes to (reads, patches, steering, ablation);
- `service/generation.py`: sampling and the generation loop;
- `service/architectures.py` + `service/graph_sites.py`: where each family keeps each site in the graph;
- `service/verification.py`: the start-up probe that finds the sites and proves what they hold.

The engine is single-threaded: one request at a time per engine. Concurrency comes from several worker
processes, each with its own engine (`service/worker.py`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from lmscope.proto.sites import all_site_names, is_pattern_site
from lmscope.proto.wire import lmscope_pb2 as pb

from . import generation
from .architectures import embedding_scale
from .batching import Cancelled, Contexts, collect_logits, head_spare_rows, stream_logits
from .capture import CapturePass, Intervention, resolve_positions
from .contracts import EngineConfig, LogitsMode
from .errors import Code, RequestError
from .graph_sites import SiteRules
from .memory import expected_memory
from .model import Model
from .native import CPU_VARIANT
from .native import llama as lc
from .verification import verify
from .weights import Weights

__all__ = ["Cancelled", "Engine", "EngineConfig", "ForwardRequest", "ForwardResult", "Intervention"]


# llama.cpp reserves each context's compute buffer for its worst ubatch and grows its output buffer to the most
# output rows of one call, n_vocab float32 logits per output row (Gemma 3's 262,144-token vocabulary: 1 MiB a
# row). Its `n_outputs_max` context parameter bounds the output rows of one call apart from the ubatch's
# tokens, so the two limits are separate: ubatches of n_batch tokens (`--n-batch`), of which at most
# `output_rows_per_ubatch` are outputs, keeping the logits within LOGITS_RESERVE_BYTES per buffer. A request
# that wants few output rows (a position subset, last-token logits, an intermediate layer, a generation's
# prompt) decodes in ubatches of n_batch tokens; one that wants every row's logits in ubatches cut at that
# many output rows (`Contexts.ubatches`). A ubatch none of whose rows' logits are wanted is decoded without
# the LM head (patches/ switch it per call), so the last block's sites at every position (llama.cpp computes
# the last block for output rows only) decode in ubatches of n_batch tokens, and with last-token logits, the
# prompt's last rows in a short ubatch with the head. Where the cuts fall keeps a row's numbers independent
# of the ubatch it is decoded in (`Contexts.ubatches` says how; patches/ gives flash attention one kernel for
# every ubatch of two rows or more), so a position subset is the full run indexed, bit for bit, though the
# two decode in ubatches of other lengths, and n_batch can be as long as speed wants. The curve these are
# chosen from is in docs/performance.md (scripts/bench_ubatch.py). A call with the head streams the whole head
# through the CPU kernels whatever its rows, which costs Gemma 3 (a 262,144 x 640 head) about 25 ms a call:
# every position's logits of 128 tokens took 340 ms in-process in 4 calls of 32 rows, 288 in 2 of 64, 264 in
# one of 128, for a worker's peak of 542, 606 and 735 MiB. A big vocabulary gets MIN_OUTPUT_ROWS rows, more
# than LOGITS_RESERVE_BYTES holds; 64, not 128: the session of docs/performance.md (scripts/bench_session.py)
# peaks at 597, 661 and 791 MB with 32, 64 and 128 rows, against 2,622-3,260 MB for transformers.
LOGITS_RESERVE_BYTES = 32 << 20
MIN_OUTPUT_ROWS = 64


def output_rows_per_ubatch(n_vocab: int) -> int:
    """A multiple of 4: llama.cpp's repacked kernels multiply activation rows four at a time (the rest one by
    one), so ubatch lengths that are multiples of 4 keep every row's place in its group of four."""
    rows = max(MIN_OUTPUT_ROWS, LOGITS_RESERVE_BYTES // (4 * n_vocab))
    return rows - rows % 4


@dataclass
class ForwardRequest:
    prompts: list[list[int]]
    capture: list[str] = field(default_factory=list)   # concrete site names
    positions: list[int] | None = None                  # relative positions to return; None = all
    logits: LogitsMode = "all"
    interventions: list[Intervention] = field(default_factory=list)
    lens_row_bytes: int = 0  # answer bytes a lens adds per captured (site, position) row; counts towards the limit
    # With logits "all" and ascending positions: sink(prompt, (n_positions, n_vocab), first row, rows) receives
    # each ubatch's logits as it is decoded (rows: a view of llama.cpp's output buffer, valid during the call),
    # and the result carries none, so that an all-logits answer is never whole in the worker.
    logits_sink: Callable[[int, tuple[int, int], int, np.ndarray], None] | None = None


@dataclass
class ForwardResult:
    positions: list[list[int]]                          # absolute positions returned, per prompt
    captures: dict[str, list[np.ndarray]]               # site -> per prompt array
    logits: list[np.ndarray] | None                     # per prompt (n_positions, n_vocab), or (1, n_vocab) for "last"
    decode_ms: float
    n_ubatches: int                                     # llama_decode calls


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = Model(config.model_path, config.n_gpu_layers, config.rpc_servers)
        self.n_layer = self.model.n_layer
        self.n_embd = self.model.n_embd
        self.n_head = self.model.n_head
        self.n_head_kv = self.model.n_head_kv
        self.n_vocab = self.model.n_vocab
        self.n_ctx = config.n_ctx
        n_threads = config.n_threads or os.cpu_count() or 1
        self.weights = Weights(config.model_path, n_threads=n_threads)
        head = self.n_vocab * self.n_embd
        self.contexts = Contexts(self.model.handle, n_ctx=config.n_ctx, n_batch=min(config.n_batch, config.n_ctx),
                                 n_outputs_max=config.n_outputs or output_rows_per_ubatch(self.n_vocab),
                                 n_seq_max=config.n_seq_max, n_threads=n_threads,
                                 prompts_share_ubatches=not config.batch_invariant,
                                 kv_cache_f32=config.kv_cache_f32,
                                 head_spare_rows=head_spare_rows(
                                     self.model.n_params - head * (1 if self.weights.tied else 2), head))
        self.family = self.weights.family
        self.site_rules = SiteRules(self.family, all_site_names(self.n_layer), self.weights.tensors)
        verified = verify(self.model, self.contexts, self.weights, self.site_rules)
        self.site_shapes: dict[str, tuple[int, ...]] = verified.site_shapes
        self.output_rows_sites = verified.output_rows_sites
        self.unavailable_sites = verified.unavailable
        self.unembed_error = verified.unembed_error
        self.verification = verified.checks

    # ----- the model as the wire describes it ----------------------------------------------------------

    def model_info(self) -> pb.ModelInfo:
        model = self.model
        template = model.chat_template()
        return pb.ModelInfo(
            architecture=model.meta("general.architecture") or "",
            name=model.meta("general.name") or os.path.basename(self.config.model_path),
            description=model.description(),
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_head_kv=self.n_head_kv,
            n_ff=self.weights.n_ff, n_vocab=self.n_vocab,
            n_ctx_train=model.n_ctx_train, n_ctx=self.n_ctx,
            tied_embeddings=self.weights.tied, tensor_types=self.weights.tensor_types(),
            file_type=self.weights.file_type_name(),
            has_chat_template=template is not None, chat_template=template or "",
            bos_token_id=model.bos, eos_token_id=model.eos,
            capture_sites=list(self.site_shapes),
            n_params=model.n_params, file_size=os.path.getsize(self.config.model_path),
            limits=self.limits(), backend="RPC" if self.config.rpc_servers else (
                "CUDA" if lc.llama_supports_gpu_offload() and self.config.n_gpu_layers else "CPU"),
            n_gpu_layers=self.config.n_gpu_layers, flash_attention=self.config.flash_attn,
            batch_invariant=self.config.batch_invariant, ffn_value_tensor=self.family.ffn_value_tensor or "",
            kv_cache_type="f32" if self.config.kv_cache_f32 else "f16", cpu_variant=CPU_VARIANT,
            unavailable_sites=dict(self.unavailable_sites),
            embedding_scale=embedding_scale(self.family, self.n_embd),
            final_logit_softcapping=self.weights.final_logit_softcapping,
            site_rules=self.family.name,
            verification=dict(self.verification),
            unembed_error=self.unembed_error or "",
            memory=expected_memory(self.weights, n_layer=self.n_layer, n_head=self.n_head, n_head_kv=self.n_head_kv,
                                   n_embd=self.n_embd, n_vocab=self.n_vocab, n_ctx=self.n_ctx,
                                   n_ubatch=self.contexts.n_batch, n_outputs_max=self.contexts.n_outputs_max,
                                   n_seq_max=self.contexts.n_seq_max),
        )

    def limits(self) -> pb.Limits:
        c = self.config
        return pb.Limits(max_prompt_tokens=min(c.max_prompt_tokens or c.n_ctx, c.n_ctx),
                         max_capture_bytes=c.max_capture_bytes, max_generated_tokens=c.max_generated_tokens,
                         max_batch_prompts=c.max_batch_prompts)

    def set_cancel(self, cancelled: Callable[[], bool]) -> None:
        self.contexts.cancelled = cancelled

    def close(self) -> None:
        self.contexts.close()
        self.model.close()

    # ----- forward ---------------------------------------------------------------------------------

    def validate_prompts(self, prompts: list[list[int]]) -> None:
        """What only the tokenized prompts show: a text that tokenizes to nothing or past the limit. Everything
        the request itself shows (token ids, the number of prompts) the front end checked
        (`service/requests.py`)."""
        limit = self.limits().max_prompt_tokens
        for i, tokens in enumerate(prompts):
            if not tokens:
                raise RequestError(Code.INVALID_ARGUMENT, f"prompt {i} is empty: send at least one token")
            if len(tokens) > limit:
                raise RequestError(Code.OUT_OF_RANGE,
                                   f"prompt {i} has {len(tokens)} tokens; the server accepts at most {limit}")

    def forward(self, request: ForwardRequest) -> ForwardResult:
        prompts = request.prompts
        self.validate_prompts(prompts)
        capture_positions = [resolve_positions(request.positions, len(t), "capture") for t in prompts]
        self._check_capture_size(request, prompts, capture_positions)
        need_pattern = any(is_pattern_site(s) for s in request.capture)
        output_sets = self._outputs(request, prompts, capture_positions)
        # the slot of each position whose logits the request wants, per prompt
        logit_slot = [{} if request.logits == "none" else {p: k for k, p in enumerate(pos)}
                      if request.logits == "all" else {len(t) - 1: 0} for pos, t in zip(capture_positions, prompts)]
        ctx = self.contexts.get(flash_attn=self.config.flash_attn and not need_pattern,
                                n_cells=self.contexts.cells_needed(prompts))
        active = CapturePass(self.site_rules, self.site_shapes, self.output_rows_sites, prompts, request.capture,
                             capture_positions, request.interventions, stop_when_done=request.logits == "none")
        logits: list[np.ndarray] | None = None
        on_decoded = None
        if request.logits != "none":
            sink = request.logits_sink
            if sink is not None and request.logits == "all" and all(pos == sorted(pos) for pos in capture_positions):
                shapes = [(len(pos), self.n_vocab) for pos in capture_positions]

                def on_decoded(ubatch):
                    stream_logits(ctx, ubatch, self.n_vocab, logit_slot,
                                  lambda s, first, rows: sink(s, shapes[s], first, rows))
            else:
                logits = [np.zeros((len(pos) if request.logits == "all" else 1, self.n_vocab), np.float32)
                          for pos in capture_positions]

                def on_decoded(ubatch):
                    collect_logits(ctx, ubatch, self.n_vocab, logits, logit_slot)
        start = time.perf_counter()
        n_ubatches = 0
        try:
            for group in self.contexts.groups(prompts):
                self.contexts.reset_memory(ctx)
                ubatches = list(self.contexts.ubatches(group, prompts, output_sets, [set(s) for s in logit_slot]))
                n_ubatches += len(ubatches)
                self.contexts.decode(ctx, active, ubatches, on_decoded=on_decoded)
        finally:
            self.contexts.reset_memory(ctx)
        return ForwardResult(positions=capture_positions, captures=active.out, logits=logits,
                             decode_ms=(time.perf_counter() - start) * 1e3, n_ubatches=n_ubatches)

    def _check_capture_size(self, request, prompts, capture_positions) -> None:
        total = 0
        for site in request.capture:
            per_row = int(np.prod(self.site_shapes[site])) * 4
            for pos, tokens in zip(capture_positions, prompts):
                total += len(pos) * per_row * (len(tokens) if is_pattern_site(site) else 1)
        if request.logits == "all":
            total += sum(len(p) for p in capture_positions) * self.n_vocab * 4
        total += request.lens_row_bytes * len(request.capture) * sum(len(p) for p in capture_positions)
        if total > self.config.max_capture_bytes:
            raise RequestError(Code.RESOURCE_EXHAUSTED,
                               f"the request would return {total / 2**20:.1f} MiB, over the server's limit of "
                               f"{self.config.max_capture_bytes / 2**20:.0f} MiB: capture fewer sites or "
                               f"positions, skip logits, or split the prompts")

    def _outputs(self, request, prompts, capture_positions) -> list[set[int]]:
        """Positions llama.cpp must treat as outputs, per prompt.

        Interventions add none: in the last block, rows of non-output tokens are dropped before the
        output-rows-only sites, and nothing downstream reads them, so an edit there could change nothing
        observable, while every extra output row costs a full LM-head row (a whole-prompt ablation would
        otherwise compute logits for every token)."""
        late_sites = [s for s in request.capture if s in self.output_rows_sites]
        outputs = []
        for tokens, pos in zip(prompts, capture_positions):
            chosen = {len(tokens) - 1}
            if request.logits == "all" or late_sites:
                chosen.update(pos)
            outputs.append(chosen)
        return outputs

    # ----- generation ------------------------------------------------------------------------------

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: list[str] = (),
                 interventions: list[Intervention] = ()) -> Iterator[pb.GenerateEvent]:
        """The wire's events: a `token` per generated token, then `end` (`service/generation.py`)."""
        self.validate_prompts([prompt])
        if len(prompt) + max_tokens > self.n_ctx:
            raise RequestError(Code.OUT_OF_RANGE,
                               f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                               f"of {self.n_ctx} tokens")
        ctx = self.contexts.get(flash_attn=self.config.flash_attn, n_cells=len(prompt) + max_tokens)
        active = CapturePass(self.site_rules, self.site_shapes, self.output_rows_sites, [prompt], [], [[]],
                             list(interventions))
        yield from generation.generate(self.model, self.contexts, ctx, active, prompt, max_tokens,
                            temperature, top_k, top_p, seed, stop)
