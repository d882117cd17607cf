"""The llama.cpp engine: one model, its contexts, and forward passes with capture and interventions.

Architecture
------------
llama.cpp has no API for intermediate tensors, but its graph scheduler calls an *eval callback* for every
graph node: first asking whether we want the node (``ask=True``), then, if we said yes, calling again once
the node is computed (``ask=False``). In that second call we can read the tensor and also overwrite it,
and every later node sees the new values. That single hook implements capture (read), activation patching
(``SET``), steering (``ADD``) and directional ablation (``ABLATE``), at any site and any layer, block 0
included, for prompts and for generated tokens alike.

A forward pass is driven by a `_Pass`: it knows, for each decoded ubatch, which (prompt, position) each row
belongs to, which sites to read, and which interventions to apply. The engine packs several prompts into
one llama.cpp batch as separate sequences (a unified KV cache, so they share the context) and decodes in
ubatch-sized calls, which gives cancellation points between calls and a simple row <-> token mapping.

The engine is single-threaded: one request at a time per engine. Concurrency comes from several worker
processes, each with its own engine (`service/worker.py`).
"""
from __future__ import annotations

import codecs
import ctypes
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import llama_cpp as lc
import numpy as np

from lmscope.client.sites import all_site_names, site_kind

from . import ggml, llama_log, rpc
from .errors import RequestError
from .graph_sites import is_pattern_site, output_rows_only, rule_for
from .weights import Weights


@dataclass
class EngineConfig:
    model_path: str
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int = 0          # 0 = all cores
    n_gpu_layers: int = 0
    n_seq_max: int = 64
    flash_attn: bool = True     # for passes that do not capture attention patterns
    max_prompt_tokens: int = 0  # 0 = n_ctx
    max_capture_bytes: int = 2 << 30
    max_generated_tokens: int = 4096
    max_batch_prompts: int = 1024
    rpc_servers: tuple[str, ...] = ()  # ggml-rpc workers that take the n_gpu_layers layers (service/rpc.py)


@dataclass
class Intervention:
    """An edit at resolved sites. `positions` None = every position (and every generated token)."""
    op: str                               # "add" | "set" | "ablate"
    sites: list[str]
    vector: np.ndarray                    # (width,) or (len(positions), width), float32
    positions: list[int] | None = None    # relative (negative from the end) prompt positions
    sequences: list[int] | None = None    # prompt indices; None = all


@dataclass
class ForwardRequest:
    prompts: list[list[int]]
    capture: list[str] = field(default_factory=list)   # concrete site names
    positions: list[int] | None = None                  # relative positions to return; None = all
    logits: str = "all"                                 # "all" | "last" | "none"
    interventions: list[Intervention] = field(default_factory=list)
    lens_row_bytes: int = 0  # answer bytes a lens adds per captured (site, position) row; counts towards the limit


@dataclass
class ForwardResult:
    positions: list[list[int]]                          # absolute positions returned, per prompt
    captures: dict[str, list[np.ndarray]]               # site -> per prompt array
    logits: list[np.ndarray] | None                     # per prompt (n_positions, n_vocab), or (1, n_vocab) for "last"
    decode_ms: float


class Cancelled(Exception):
    pass


_PROBE_N_CTX = 256           # the start-up probe decodes one token
_CHECK_VOCAB_SAMPLE = 256    # vocabulary rows compared by the start-up unembedding check


def _resolve(positions: list[int] | None, n_tokens: int, what: str) -> list[int]:
    if positions is None:
        return list(range(n_tokens))
    out = []
    for p in positions:
        q = p + n_tokens if p < 0 else p
        if not 0 <= q < n_tokens:
            raise RequestError("OUT_OF_RANGE",
                               f"{what} position {p} is outside a prompt of {n_tokens} tokens "
                               f"(valid: {-n_tokens}..{n_tokens - 1})")
        out.append(q)
    if len(set(out)) != len(out):
        raise RequestError("INVALID_ARGUMENT", f"{what} positions {positions} name the same token twice in a prompt "
                                               f"of {n_tokens} tokens (a negative position counts from the end)")
    return out


class _Pass:
    """The per-request state the eval callback routes to."""

    def __init__(self, engine: "Engine", prompts: list[list[int]], capture: list[str],
                 capture_positions: list[list[int]], interventions: list[Intervention],
                 stop_when_done: bool = False):
        self.engine = engine
        self.n_layer = engine.n_layer
        self.capture = capture
        self.error: BaseException | None = None
        # Node name -> [(site, op code or None)] for every site we read or write.
        self.targets: dict[bytes, list[tuple[str, int | None]]] = {}
        self.interventions: dict[str, list[tuple[Intervention, list[set[int] | None], np.ndarray]]] = {}
        for iv in interventions:
            vector = iv.vector.astype(np.float32)
            if iv.op == "ablate":
                vector = vector / np.linalg.norm(vector, axis=-1, keepdims=True).astype(np.float32)
            resolved = []
            for s, tokens in enumerate(prompts):
                if iv.sequences is not None and s not in iv.sequences:
                    resolved.append([])
                else:
                    resolved.append(None if iv.positions is None
                                    else _resolve(iv.positions, len(tokens), "intervention"))
            for site in iv.sites:
                self.interventions.setdefault(site, []).append((iv, resolved, vector))
        for site in set(capture) | set(self.interventions):
            node, op = rule_for(site)
            op_code = ggml.OP_CODES[op] if op else None
            self.targets.setdefault(node.encode(), []).append((site, op_code))
        # When nothing after the last wanted node is needed (no logits), the callback ends the graph there:
        # a probe of layer 5 then costs 6 of 30 layers, and an all-layer capture skips the final norm and
        # the LM head over every output row. Later ubatches never need what was skipped: layer k only reads
        # the KV cache of layers <= k, and any node of layer k that is wanted comes after layer k's KV store
        # or needs no KV of its own layer.
        self.stop_when_done = stop_when_done and bool(self.targets)
        self.n_sites = len({site for wanted in self.targets.values() for site, _ in wanted})
        self.positions = capture_positions
        self.slot = [{p: k for k, p in enumerate(pos)} for pos in capture_positions]
        shapes = engine.site_shapes
        self.out: dict[str, list[np.ndarray]] = {}
        for site in capture:
            if is_pattern_site(site):
                n_head = shapes[site][0]
                self.out[site] = [np.zeros((n_head, len(pos), len(tokens)), np.float32)
                                  for pos, tokens in zip(capture_positions, prompts)]
            else:
                self.out[site] = [np.zeros((len(pos),) + shapes[site], np.float32) for pos in capture_positions]
        # Per ubatch, set by the engine before each decode:
        self.rows: list[tuple[int, int]] = []          # (prompt, position) of every token row
        self.output_rows: list[tuple[int, int]] = []   # the same for rows marked as outputs
        self.cells: list[list[int]] = [[] for _ in prompts]  # KV cell of each decoded token, per prompt
        self._seen: set[str] = set()
        self._pending: list[str] = []

    def begin_ubatch(self, rows: list[tuple[int, int]], outputs: list[bool], first_cell: int) -> None:
        self.rows = rows
        self.output_rows = [r for r, o in zip(rows, outputs) if o]
        for k, (s, _) in enumerate(rows):
            self.cells[s].append(first_cell + k)
        self._seen.clear()

    def callback(self, tensor: int, ask: bool, _user_data) -> bool:
        try:
            if ask:
                wanted = self.targets.get(ggml.name_of(tensor))
                if not wanted:
                    return False
                op = ggml.op_of(tensor)
                self._pending = []
                for site, op_code in wanted:
                    if op_code is None:
                        if site in self._seen:
                            continue
                    elif op != op_code:
                        continue
                    self._seen.add(site)
                    self._pending.append(site)
                return bool(self._pending)
            for site in self._pending:
                self._visit(site, tensor)
            return not (self.stop_when_done and len(self._seen) == self.n_sites)
        except BaseException as exc:  # an exception must not unwind through C
            if self.error is None:
                self.error = exc
            return not ask

    def _visit(self, site: str, tensor: int) -> None:
        if ggml.type_of(tensor) != ggml.GGML_TYPE_F32 or not ggml.is_contiguous(tensor):
            raise RequestError("FAILED_PRECONDITION",
                               f"site {site} is not a contiguous float32 tensor in this build/model")
        ne = ggml.shape_of(tensor)
        if is_pattern_site(site):
            self._capture_pattern(site, tensor, ne)
            return
        rows = self.output_rows if output_rows_only(site, self.n_layer) else self.rows
        data = np.empty(int(np.prod(ne)), np.float32)
        ggml.read(tensor, data)
        data = data.reshape(len(rows), -1)
        if site in self.interventions and self._intervene(site, data, rows):
            ggml.write(tensor, data)
        if site in self.out:
            out = self.out[site]
            for r, (s, p) in enumerate(rows):
                k = self.slot[s].get(p)
                if k is not None:
                    out[s][k] = data[r].reshape(out[s].shape[1:])

    def _intervene(self, site: str, data: np.ndarray, rows: list[tuple[int, int]]) -> bool:
        changed = False
        for iv, resolved, vector in self.interventions[site]:
            if vector.shape[-1] != data.shape[1]:
                raise RequestError("INVALID_ARGUMENT",
                                   f"intervention at {site} has width {vector.shape[-1]}, the site has {data.shape[1]}")
            picked, which = [], []
            for r, (s, p) in enumerate(rows):
                selected = resolved[s]
                if selected is None:
                    picked.append(r)
                    which.append(0)
                elif p in selected:
                    picked.append(r)
                    which.append(selected.index(p))
            if not picked:
                continue
            x = data[picked]
            v = vector if vector.ndim == 1 else vector[which]
            if iv.op == "add":
                x += v
            elif iv.op == "set":
                x[:] = v
            else:
                x -= (x * v).sum(axis=-1, keepdims=True) * v
            data[picked] = x
            changed = True
        return changed

    def _capture_pattern(self, site: str, tensor: int, ne) -> None:
        n_kv, n_rows, n_head = ne[0], ne[1], ne[2]
        data = np.empty((n_head, n_rows, n_kv), np.float32)
        ggml.read(tensor, data)
        out = self.out[site]
        for r, (s, p) in enumerate(self.rows):
            k = self.slot[s].get(p)
            if k is not None:
                cells = self.cells[s][:p + 1]
                out[s][:, k, :p + 1] = data[:, r, cells]


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        llama_log.install()
        lc.llama_backend_init()
        if config.rpc_servers:
            rpc.add_devices(list(config.rpc_servers))
        params = lc.llama_model_default_params()
        params.n_gpu_layers = config.n_gpu_layers
        llama_log.clear()
        self.model = lc.llama_model_load_from_file(config.model_path.encode(), params)
        if not self.model:
            raise RequestError("INVALID_ARGUMENT", f"llama.cpp could not load the model {config.model_path}: "
                                                   f"{llama_log.recent_problems() or 'no reason given'}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_layer = lc.llama_model_n_layer(self.model)
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_head = lc.llama_model_n_head(self.model)
        self.n_head_kv = lc.llama_model_n_head_kv(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = config.n_ctx
        self.n_batch = min(config.n_batch, config.n_ctx)
        self.n_threads = config.n_threads or os.cpu_count() or 1
        self.n_seq_max = min(config.n_seq_max, self.n_batch)  # llama.cpp needs n_seq_max <= n_batch
        self.weights = Weights(config.model_path)
        self._contexts: dict[bool, tuple[int, object]] = {}
        self._pass: _Pass | None = None
        self._cancel: Callable[[], bool] = lambda: False
        self.site_shapes: dict[str, tuple[int, ...]] = {}
        self._fingerprint: str | None = None
        self._probe_sites()

    # ----- metadata -------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        tmpl = lc.llama_model_chat_template(self.model, None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode()

    def model_info(self) -> dict:
        limits = self.limits()
        template = self.chat_template()
        return dict(
            architecture=self.meta("general.architecture") or "",
            name=self.meta("general.name") or os.path.basename(self.config.model_path),
            description=self.description(),
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_head_kv=self.n_head_kv,
            n_ff=self.weights.n_ff, n_vocab=self.n_vocab,
            n_ctx_train=lc.llama_model_n_ctx_train(self.model), n_ctx=self.n_ctx,
            tied_embeddings=self.weights.tied, tensor_types=self.weights.tensor_types(),
            file_type=self.weights.file_type_name(),
            has_chat_template=template is not None, chat_template=template or "",
            bos_token_id=lc.llama_vocab_bos(self.vocab), eos_token_id=lc.llama_vocab_eos(self.vocab),
            capture_sites=list(self.site_shapes),
            site_shapes={k: list(v) for k, v in self.site_shapes.items()},
            fingerprint=self.fingerprint(),
            n_params=lc.llama_model_n_params(self.model), file_size=os.path.getsize(self.config.model_path),
            limits=limits, backend="RPC" if self.config.rpc_servers else (
                "CUDA" if lc.llama_supports_gpu_offload() and self.config.n_gpu_layers else "CPU"),
            n_gpu_layers=self.config.n_gpu_layers,
        )

    def limits(self) -> dict:
        c = self.config
        return dict(max_prompt_tokens=min(c.max_prompt_tokens or c.n_ctx, c.n_ctx),
                    max_capture_bytes=c.max_capture_bytes, max_generated_tokens=c.max_generated_tokens,
                    max_batch_prompts=c.max_batch_prompts)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._hash_file()
        return self._fingerprint

    def _hash_file(self) -> str:
        digest = hashlib.sha256()
        with open(self.config.model_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    # ----- tokens -----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        capacity = len(raw) + 16
        while True:
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def piece(self, token: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t, special=False) for t in tokens).decode("utf-8", "replace")

    def apply_chat_template(self, user_text: str) -> str:
        template = lc.llama_model_chat_template(self.model, None)
        if not template:
            raise RequestError("FAILED_PRECONDITION", "this model has no chat template; send chat=false")
        role, content = b"user", user_text.encode("utf-8")
        messages = (lc.llama_chat_message * 1)(lc.llama_chat_message(role=role, content=content))
        size = len(content) * 2 + 512
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_chat_apply_template(template, messages, 1, True, buf, size)
            if n < 0:
                raise RequestError("FAILED_PRECONDITION", "llama.cpp does not support this model's chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n

    def prompt_tokens(self, text: str, chat: bool, bos: bool = True) -> list[int]:
        if chat:
            return self.tokenize(self.apply_chat_template(text), add_special=bos, parse_special=True)
        return self.tokenize(text, add_special=bos, parse_special=False)

    # ----- contexts --------------------------------------------------------------------------------

    def _new_context(self, flash_attn: bool, n_ctx: int | None = None):
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx or self.n_ctx
        params.n_batch = min(self.n_batch, params.n_ctx)
        params.n_ubatch = params.n_batch
        params.n_seq_max = min(self.n_seq_max, params.n_batch)
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.kv_unified = True  # prompts of one batch share the whole context, and rows keep batch order
        params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        callback = lc.ggml_backend_sched_eval_callback(self._route)
        params.cb_eval = callback
        params.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(self.model, params)
        if not ctx:
            raise RequestError("RESOURCE_EXHAUSTED", "llama.cpp could not create a context (out of memory?)")
        return ctx, callback

    def _context(self, flash_attn: bool):
        """A reusable context: with flash attention for speed, without it when attention is captured."""
        if flash_attn not in self._contexts:
            self._contexts[flash_attn] = self._new_context(flash_attn)
        return self._contexts[flash_attn][0]

    def _route(self, tensor, ask, user_data):
        active = self._pass
        if active is None:
            return not ask
        return active.callback(tensor, ask, user_data)

    def close(self) -> None:
        for ctx, _ in self._contexts.values():
            lc.llama_free(ctx)
        self._contexts.clear()
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None

    # ----- forward ---------------------------------------------------------------------------------

    def _probe_sites(self) -> None:
        """Decode one token recording every node, to learn which sites exist and their shapes."""
        wanted: dict[bytes, list[tuple[str, int | None]]] = {}
        for site in all_site_names(self.n_layer):
            node, op = rule_for(site)
            wanted.setdefault(node.encode(), []).append((site, ggml.OP_CODES[op] if op else None))
        seen: dict[str, tuple] = {}

        class Probe:
            error = None

            @staticmethod
            def callback(tensor, ask, _):
                if ask:
                    if not seen:
                        ggml.check_layout(tensor)
                    for site, op in wanted.get(ggml.name_of(tensor), ()):
                        if site not in seen and (op is None or ggml.op_of(tensor) == op):
                            seen[site] = ggml.shape_of(tensor)
                    seen.setdefault("", ())
                return not ask

        # Without flash attention, so that the attention-pattern nodes exist; freed afterwards. One token needs
        # no more than llama.cpp's smallest context (a full-size one would raise the worker's peak memory).
        ctx, callback = self._new_context(flash_attn=False, n_ctx=min(self.n_ctx, _PROBE_N_CTX))
        self._pass = Probe()
        try:
            bos = lc.llama_vocab_bos(self.vocab)
            self._decode_tokens(ctx, [(bos if bos >= 0 else 0, 0, 0, True)])
        finally:
            self._pass = None
            lc.llama_free(ctx)
        del callback
        shapes = {}
        for site in all_site_names(self.n_layer):
            if site not in seen:
                continue
            ne = seen[site]
            kind = site_kind(site)
            if is_pattern_site(site):
                shapes[site] = (ne[2],)                    # heads; the rest depends on the prompt
            elif kind in ("attn.q", "attn.k"):
                shapes[site] = (ne[1], ne[0])              # (heads, head_dim)
            elif kind == "attn.v":
                width = ne[0] * ne[1] * ne[2]
                shapes[site] = (self.n_head_kv, width // self.n_head_kv)
            else:
                shapes[site] = (ne[0],)
        self.site_shapes = shapes
        self.unembed_error = self._check_unembedding()

    def _check_unembedding(self) -> str | None:
        """None if numpy's final norm + LM head reproduce llama.cpp's logits, else why not.

        Only some vocabulary rows are compared (each position's top logits and a fixed random sample):
        dequantizing the whole LM head here would cost every worker its size in float32 (113 MB for
        SmolLM2) before anyone asked for a lens.
        """
        last = f"blocks.{self.n_layer - 1}.resid_post"
        if last not in self.site_shapes:
            return f"this model has no {last} site, so the lens cannot be checked"
        tokens = self.tokenize("The quick brown fox jumps", add_special=True)[:8] or [0]
        result = self.forward(ForwardRequest(prompts=[tokens], capture=[last], logits="all"))
        top = np.argsort(-result.logits[0], axis=1)[:, :8].reshape(-1)
        sample = np.random.default_rng(0).choice(self.n_vocab, min(self.n_vocab, _CHECK_VOCAB_SAMPLE), replace=False)
        ids = np.unique(np.concatenate([top, sample]))
        theirs = result.logits[0][:, ids]
        head = self.weights.rows("token_embd.weight" if self.weights.tied else "output.weight", ids)
        ours = self.weights.final_norm(result.captures[last][0]) @ head.T
        error = float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-6))
        if not error < 0.05:
            return (f"final norm + LM head computed from the GGUF weights differ from llama.cpp's logits "
                    f"(relative error {error:.3f}) for architecture {self.weights.architecture}: "
                    f"the lens and Unembed are disabled for this model")
        return None

    def _decode_tokens(self, ctx, tokens: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, output) tuples as one ubatch."""
        n = len(tokens)
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, (token, pos, seq, out) in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = out
            status = lc.llama_decode(ctx, batch)
        finally:
            lc.llama_batch_free(batch)
        if self._pass is not None and getattr(self._pass, "error", None) is not None:
            raise self._pass.error
        if status != 0:
            raise RequestError("INTERNAL", f"llama_decode failed with status {status}")

    @staticmethod
    def _reset_memory(memory) -> None:
        """Empty the KV cache without zeroing its data: zeroing is a memset of the whole cache (94 MB for
        SmolLM2 at n_ctx 4096, 10-20 ms, paid twice per request before). Emptied cells are masked out; what
        they still hold is finite (every K and V row is computed from a normed residual, and requests.py
        bounds edits), so the zero attention weight they get cancels them, as in llama.cpp's own server,
        which never zeroes the cache between requests either."""
        lc.llama_memory_clear(memory, False)

    def set_cancel(self, cancelled: Callable[[], bool]) -> None:
        self._cancel = cancelled

    def validate_prompts(self, prompts: list[list[int]]) -> None:
        limit = self.limits()["max_prompt_tokens"]
        if not prompts:
            raise RequestError("INVALID_ARGUMENT", "no prompt given")
        if len(prompts) > self.config.max_batch_prompts:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"{len(prompts)} prompts in one request; the server accepts at most "
                               f"{self.config.max_batch_prompts}: split the batch")
        for i, tokens in enumerate(prompts):
            if not tokens:
                raise RequestError("INVALID_ARGUMENT", f"prompt {i} is empty: send at least one token")
            if len(tokens) > limit:
                raise RequestError("OUT_OF_RANGE",
                                   f"prompt {i} has {len(tokens)} tokens; the server accepts at most {limit}")
            bad = [t for t in tokens if not 0 <= t < self.n_vocab]
            if bad:
                raise RequestError("OUT_OF_RANGE",
                                   f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {self.n_vocab})")

    def forward(self, request: ForwardRequest) -> ForwardResult:
        prompts = request.prompts
        self.validate_prompts(prompts)
        capture_positions = [_resolve(request.positions, len(t), "capture") for t in prompts]
        self._check_capture_size(request, prompts, capture_positions)
        need_pattern = any(is_pattern_site(s) for s in request.capture)
        ctx = self._context(flash_attn=self.config.flash_attn and not need_pattern)
        output_sets = self._outputs(request, prompts, capture_positions)
        active = _Pass(self, prompts, request.capture, capture_positions, request.interventions,
                       stop_when_done=request.logits == "none")
        logits: list[np.ndarray] | None = None
        if request.logits != "none":
            logits = [np.zeros((len(pos) if request.logits == "all" else 1, self.n_vocab), np.float32)
                      for pos in capture_positions]
        logit_slot = [({p: k for k, p in enumerate(pos)} if request.logits == "all" else {len(t) - 1: 0})
                      for pos, t in zip(capture_positions, prompts)]
        start = time.perf_counter()
        memory = lc.llama_get_memory(ctx)
        self._pass = active
        try:
            for group in self._groups(prompts):
                self._reset_memory(memory)
                cell = 0
                for ubatch in self._ubatches(group, prompts, output_sets):
                    if self._cancel():
                        raise Cancelled()
                    rows = [(s, p) for _, p, s, _ in ubatch]
                    active.begin_ubatch(rows, [o for *_, o in ubatch], cell)
                    self._decode_tokens(ctx, ubatch)
                    cell += len(ubatch)
                    if logits is not None:
                        self._collect_logits(ctx, ubatch, logits, logit_slot)
        finally:
            self._pass = None
            self._reset_memory(memory)
        return ForwardResult(positions=capture_positions, captures=active.out, logits=logits,
                             decode_ms=(time.perf_counter() - start) * 1e3)

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
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"the request would return {total / 2**20:.1f} MiB, over the server's limit of "
                               f"{self.config.max_capture_bytes / 2**20:.0f} MiB: capture fewer sites or "
                               f"positions, skip logits, or split the prompts")

    def _outputs(self, request, prompts, capture_positions) -> list[set[int]]:
        """Positions llama.cpp must treat as outputs, per prompt.

        Interventions add none: in the last block, rows of non-output tokens are dropped before the
        output-rows-only sites, and nothing downstream reads them, so an edit there could change nothing
        observable, while every extra output row costs a full LM-head row (a whole-prompt ablation would
        otherwise compute logits for every token)."""
        late_sites = [s for s in request.capture if output_rows_only(s, self.n_layer)]
        outputs = []
        for tokens, pos in zip(prompts, capture_positions):
            chosen = {len(tokens) - 1}
            if request.logits == "all" or late_sites:
                chosen.update(pos)
            outputs.append(chosen)
        return outputs

    def _groups(self, prompts: list[list[int]]) -> Iterator[list[int]]:
        """Prompt indices decoded together: at most n_seq_max sequences and one batch of tokens per group.

        The memory is cleared between groups. Letting a group grow past one batch would make every later
        batch attend over (and mask out) the cache cells of all the group's earlier prompts: attention
        cost quadratic in the group's size, for nothing, since prompts never see each other.
        """
        group, tokens = [], 0
        for i, prompt in enumerate(prompts):
            if group and (len(group) == self.n_seq_max or tokens + len(prompt) > self.n_batch):
                yield group
                group, tokens = [], 0
            group.append(i)
            tokens += len(prompt)
        if group:
            yield group

    def _ubatches(self, group, prompts, output_sets) -> Iterator[list[tuple[int, int, int, bool]]]:
        current: list[tuple[int, int, int, bool]] = []
        for s in group:
            for p, token in enumerate(prompts[s]):
                current.append((token, p, s, p in output_sets[s]))
                if len(current) == self.n_batch:
                    yield current
                    current = []
        if current:
            yield current

    def _collect_logits(self, ctx, ubatch, logits, logit_slot) -> None:
        n_out = sum(1 for *_, o in ubatch if o)
        if n_out == 0:
            return
        table = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n_out, self.n_vocab))
        row = 0
        for _, p, s, out in ubatch:
            if not out:
                continue
            k = logit_slot[s].get(p)
            if k is not None:
                logits[s][k] = table[row]
            row += 1

    # ----- generation ------------------------------------------------------------------------------

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: list[str] = (),
                 interventions: list[Intervention] = ()) -> Iterator[dict]:
        """Yields {"token": id, "piece": bytes, "text": str} per token, then {"end": ...}."""
        self.validate_prompts([prompt])
        if len(prompt) + max_tokens > self.n_ctx:
            raise RequestError("OUT_OF_RANGE",
                               f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                               f"of {self.n_ctx} tokens")
        ctx = self._context(flash_attn=self.config.flash_attn)
        memory = lc.llama_get_memory(ctx)
        sampler = self._sampler(temperature, top_k, top_p, seed)
        active = _Pass(self, [prompt], [], [[]], list(interventions))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text, finish, n_generated = "", "length", 0
        start = time.perf_counter()
        self._pass = active
        try:
            self._reset_memory(memory)
            cell = 0
            for offset in range(0, len(prompt), self.n_batch):
                if self._cancel():
                    raise Cancelled()
                chunk = [(t, offset + i, 0, offset + i == len(prompt) - 1)
                         for i, t in enumerate(prompt[offset:offset + self.n_batch])]
                active.begin_ubatch([(0, p) for _, p, _, _ in chunk], [o for *_, o in chunk], cell)
                self._decode_tokens(ctx, chunk)
                cell += len(chunk)
            prompt_ms = (time.perf_counter() - start) * 1e3
            position = len(prompt)
            while n_generated < max_tokens:
                if self._cancel():
                    raise Cancelled()
                token = lc.llama_sampler_sample(sampler, ctx, -1)
                if lc.llama_vocab_is_eog(self.vocab, token):
                    finish = "eos"
                    break
                n_generated += 1
                piece = self.piece(token, special=False)
                new_text = decoder.decode(piece)
                text += new_text
                hit = next((s for s in stop if s and s in text), None)
                if hit is not None:
                    text = text[:text.index(hit)]
                    yield {"token": token, "piece": piece, "text": new_text}
                    finish = "stop"
                    break
                yield {"token": token, "piece": piece, "text": new_text}
                if n_generated == max_tokens:
                    break
                active.begin_ubatch([(0, position)], [True], cell)
                self._decode_tokens(ctx, [(token, position, 0, True)])
                cell += 1
                position += 1
        finally:
            self._pass = None
            lc.llama_sampler_free(sampler)
            self._reset_memory(memory)
        yield {"end": {"finish_reason": finish, "n_generated": n_generated, "prompt_ms": prompt_ms,
                       "generate_ms": (time.perf_counter() - start) * 1e3 - prompt_ms, "text": text}}

    def _sampler(self, temperature: float, top_k: int, top_p: float, seed: int):
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
        if 0 < top_p < 1:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain
