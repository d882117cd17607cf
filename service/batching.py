"""The llama.cpp context of one model (one at a time, sized to the requests), and the one loop that decodes
ubatches through it.

Several prompts are packed into one llama.cpp batch as separate sequences (a unified KV cache, so they
share the context) and decoded in ubatch-sized calls: that gives cancellation points between calls and a
simple row <-> token mapping for the eval callback. Prompt processing for `forward` and for `generate`,
and every generated token, go through the same `Contexts.decode` loop, which tells the active pass
(`service/capture.py`) which (prompt, position) each row of the ubatch is before llama.cpp computes it.

A context is single-threaded: one request at a time per engine. Concurrency comes from several worker
processes, each with its own engine (`service/worker.py`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import numpy as np

from .errors import Code, RequestError
from .native import llama as lc


class Row(NamedTuple):
    """One token of a ubatch."""
    token: int
    position: int
    prompt: int        # index in the request
    output: bool       # llama.cpp computes the row's last block (and its logits where the call has the head)
    logits: bool       # the request wants the row's logits: the call that decodes it computes the LM head


# Activation rows the repacked weight kernels (ggml-cpu/repack.cpp) multiply together; ubatches are cut on
# multiples of it (`Contexts.ubatches`).
ROW_GROUP = 4
# The fewest rows from which every CPU kernel computes a row as in a long ubatch: llama.cpp's tiled K-quant
# matmul (ggml-cpu/tiled, Q6_K and other unrepacked k-quants) takes ubatches from 8 rows, the vec_dot kernel
# shorter ones, and flash attention (patched) has one kernel for 2 rows and more (`Contexts.ubatches`).
MIN_UBATCH_ROWS = 8
# The fewest output rows whose logits are not wanted that a call with the LM head may carry
# (`Contexts.head_spare_rows`): a short last ubatch with the head borrows up to MIN_UBATCH_ROWS rows in whole
# row groups and holds up to ROW_GROUP - 1 rows of the group its first wanted row is in.
HEAD_SPARE_ROWS = MIN_UBATCH_ROWS + ROW_GROUP
# What one more llama_decode call costs, in rows of the blocks: each call streams every weight once and pauses
# for every captured site. SmolLM2, 128 tokens: the last 8 rows took 45-52 ms in a call of their own against
# 15-25 ms inside a long one, about 16 rows' worth (docs/performance.md).
CALL_COST_ROWS = 16


def head_spare_rows(block_params: int, head_params: int) -> int:
    """Output rows without wanted logits a call with the head may carry: HEAD_SPARE_ROWS, which the call that
    takes over the wanted rows carries anyway, plus as many as cost what another call costs (a row of the
    head is head_params multiply-adds, a row of the blocks about block_params). Gemma 3 270M: 22;
    SmolLM2-135M: 72; Qwen2.5-1.5B: 101."""
    return HEAD_SPARE_ROWS + round(CALL_COST_ROWS * block_params / max(head_params, 1))


class Cancelled(Exception):
    pass


class Pass(Protocol):
    """What the decode loop needs from the per-request state the eval callback routes to."""
    error: BaseException | None

    def begin_ubatch(self, rows: list[tuple[int, int]], outputs: list[bool], first_cell: int) -> None: ...

    def callback(self, tensor: int, ask: bool, user_data) -> bool: ...


# llama.cpp rounds n_ctx up to a multiple of 256 and attends over the used cells rounded up to 256 (at least
# 256, at most the context): contexts of 256 cells and up, sized by powers of two, compute any request that
# fits them over the same cells, so the same graph, whatever their size.
MIN_CONTEXT_CELLS = 256


class Contexts:
    """The engine's one llama.cpp context at a time, sized to the requests it has served.

    llama.cpp clears a context's KV cache when it creates it, so the whole cache is resident from then on
    (SmolLM2 90 MiB, Gemma 3 270M 72 MiB at 4096 cells). A context therefore starts at MIN_CONTEXT_CELLS and
    is replaced by one of the next power of two (at most `n_ctx`, the limit requests are validated against)
    when a request needs more cells; a context with flash attention (runs) and one without (attention
    captured) are never held together: switching frees one and creates the other. Creating a context of
    256-512 cells took 11-23 ms on SmolLM2 and Gemma 3 270M (flash on or off, 2 threads), 60-107 ms at
    4096 cells (clearing the cache), against 50-70 ms for decoding 8 tokens.
    """

    def __init__(self, model_handle, n_ctx: int, n_batch: int, n_outputs_max: int, n_seq_max: int, n_threads: int,
                 prompts_share_ubatches: bool = True, kv_cache_f32: bool = False,
                 head_spare_rows: int = HEAD_SPARE_ROWS):
        self.model_handle = model_handle
        self.prompts_share_ubatches = prompts_share_ubatches
        self.kv_cache_f32 = kv_cache_f32
        self.n_ctx = n_ctx
        self.n_batch = n_batch              # tokens per llama_decode call (one ubatch)
        self.n_outputs_max = min(n_outputs_max, n_batch)  # output rows of a call with logits: what their buffer holds
        self.n_seq_max = min(n_seq_max, self.n_outputs_max)  # llama.cpp reserves n_seq_max output rows at least
        self.n_threads = n_threads
        self.head_spare_rows = max(head_spare_rows, HEAD_SPARE_ROWS)
        # patches/ lets a context compute the LM head for some calls only (`llama_set_no_logits`); a plain
        # llama-cpp-python computes it on every call, so every call's output rows are bounded by n_outputs_max
        self.can_skip_head = hasattr(lc, "llama_set_no_logits")
        self._held: tuple[bool, int, object, object] | None = None  # (flash_attn, n_cells, ctx, callback)
        self._head: bool | None = None  # whether the held context computes the LM head on its next call
        self._active: Pass | None = None
        self.cancelled: Callable[[], bool] = lambda: False

    def cells_for(self, n_cells: int) -> int:
        """The context size that holds n_cells: a power of two from MIN_CONTEXT_CELLS, at most n_ctx."""
        size = MIN_CONTEXT_CELLS
        while size < n_cells:
            size *= 2
        return min(size, self.n_ctx)

    @property
    def n_cells(self) -> int:
        """Cells of the context held now (0: none)."""
        return self._held[1] if self._held else 0

    def most_outputs(self, logits: bool) -> int:
        """Output rows one call may have: n_outputs_max where it computes logits (llama.cpp's logits buffer
        holds n_vocab floats per output row of a call), a whole ubatch where it skips the LM head."""
        return self.n_outputs_max if logits or not self.can_skip_head else self.n_batch

    def get(self, flash_attn: bool, n_cells: int):
        """The context to decode with: with flash attention for speed, without it when attention is captured,
        holding at least `n_cells` KV cells (a forward pass: its largest group's tokens, `cells_needed`;
        generation: prompt + new tokens). The context it replaces, if any, is freed first."""
        if n_cells > self.n_ctx:
            raise RequestError(Code.OUT_OF_RANGE,
                               f"the request needs {n_cells} KV cells; the context holds {self.n_ctx}")
        held = self._held
        if held is not None and held[0] == flash_attn and held[1] >= n_cells:
            return held[2]
        self.close()
        size = self.cells_for(n_cells)
        ctx, callback = self._new(flash_attn, size)
        self._held = (flash_attn, size, ctx, callback)
        self._head = not self.can_skip_head
        return ctx

    def cells_needed(self, prompts: list[list[int]]) -> int:
        """KV cells a forward pass over `prompts` uses: the memory is emptied between `groups`."""
        return max(sum(len(prompts[i]) for i in group) for group in self.groups(prompts))

    def _new(self, flash_attn: bool, n_ctx: int):
        """A fresh context (and the callback object that must outlive it), its eval callback routed here.

        With patches/, the context starts without the LM head, so llama.cpp reserves its compute buffer for a
        whole ubatch of output rows without logits; a call with logits (`decode`) switches the head on, and its
        graph (n_outputs_max rows of logits) grows that buffer where it needs more."""
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = min(self.n_batch, params.n_ctx)
        params.n_ubatch = params.n_batch
        params.n_outputs_max = min(self.most_outputs(logits=False), params.n_batch)
        params.n_seq_max = min(self.n_seq_max, params.n_batch)
        if self.can_skip_head:
            params.no_logits = True
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.kv_unified = True  # prompts of one batch share the whole context, and rows keep batch order
        # Sliding-window layers (Gemma) keep a full-size cache too: attention capture maps KV cells to
        # positions in decode order, which a smaller ring-buffer SWA cache would reuse.
        params.swa_full = True
        if self.kv_cache_f32:
            params.type_k = params.type_v = lc.GGML_TYPE_F32
        params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        callback = lc.ggml_backend_sched_eval_callback(self._route)
        params.cb_eval = callback
        params.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(self.model_handle, params)
        if not ctx:
            raise RequestError(Code.RESOURCE_EXHAUSTED, "llama.cpp could not create a context (out of memory?)")
        return ctx, callback

    def _route(self, tensor, ask, user_data):
        active = self._active
        if active is None:
            return not ask
        return active.callback(tensor, ask, user_data)

    def close(self) -> None:
        """Free the context held, if any."""
        if self._held is not None:
            lc.llama_free(self._held[2])
            self._held = None

    # ----- the decode loop -------------------------------------------------------------------------

    def decode(self, ctx, active: Pass, ubatches: Iterable[list[Row]], first_cell: int = 0,
               on_decoded: Callable[[list[Row]], None] | None = None) -> int:
        """Decode ubatches in order with `active` receiving the eval callback; returns the next free KV cell.

        The KV cells are numbered from `first_cell` in decode order (a unified cache that was emptied before
        the first ubatch of the sequence group), which is how the pass maps attention columns to positions.
        """
        cell = first_cell
        self._active = active
        try:
            for ubatch in ubatches:
                if self.cancelled():
                    raise Cancelled()
                active.begin_ubatch([(row.prompt, row.position) for row in ubatch], [row.output for row in ubatch],
                                    cell)
                head = any(row.logits for row in ubatch) or not self.can_skip_head
                if head != self._head:
                    lc.llama_set_no_logits(ctx, not head)
                    self._head = head
                status = self._decode_one(ctx, ubatch)
                if active.error is not None:  # what the callback caught, rather than the abort it caused
                    raise active.error
                if status != 0:
                    raise RequestError(Code.INTERNAL, f"llama_decode failed with status {status}")
                cell += len(ubatch)
                if on_decoded is not None:
                    on_decoded(ubatch)
        finally:
            self._active = None
        return cell

    @staticmethod
    def _decode_one(ctx, rows: list[Row]) -> int:
        """Decode one ubatch. A row's sequence is its prompt's index in the request; llama.cpp's sequence id
        is that modulo the context's n_seq_max: a group (`groups`) is at most n_seq_max consecutive prompts,
        so their ids differ, and the memory is emptied between groups. (A request may hold more prompts than
        a context has sequences: Gemma 3's 16-token ubatches allow 16.)"""
        n = len(rows)
        n_seq_max = lc.llama_n_seq_max(ctx)
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, row in enumerate(rows):
                batch.token[i] = row.token
                batch.pos[i] = row.position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = row.prompt % n_seq_max
                batch.logits[i] = row.output
            return lc.llama_decode(ctx, batch)
        finally:
            lc.llama_batch_free(batch)

    @staticmethod
    def reset_memory(ctx) -> None:
        """Empty the KV cache without zeroing its data: zeroing is a memset of the whole cache (94 MB for
        SmolLM2 at n_ctx 4096, 10-20 ms, paid twice per request before). Emptied cells are masked out; what
        they still hold is finite (every K and V row is computed from a normed residual, and requests.py
        bounds edits), so the zero attention weight they get cancels them, as in llama.cpp's own server,
        which never zeroes the cache between requests either."""
        lc.llama_memory_clear(lc.llama_get_memory(ctx), False)

    # ----- packing prompts -------------------------------------------------------------------------

    def groups(self, prompts: list[list[int]]) -> Iterator[list[int]]:
        """Prompt indices decoded together: at most n_seq_max sequences and one batch of tokens per group.

        The memory is cleared between groups. Letting a group grow past one batch would make every later
        batch attend over (and mask out) the cache cells of all the group's earlier prompts: attention
        cost quadratic in the group's size, for nothing, since prompts never see each other.

        Without `prompts_share_ubatches` every prompt is a group of its own: its ubatches and KV cells are
        those of the prompt sent alone (`ubatches`), so kernels whose rounding depends on a row's neighbours
        in the ubatch (repacked weights, the plain attention's sums over cells) give it the same numbers.
        """
        group, tokens = [], 0
        for i, prompt in enumerate(prompts):
            if group and (not self.prompts_share_ubatches or len(group) == self.n_seq_max
                          or tokens + len(prompt) > self.n_batch):
                yield group
                group, tokens = [], 0
            group.append(i)
            tokens += len(prompt)
        if group:
            yield group

    def ubatches(self, group: list[int], prompts: list[list[int]], output_sets: list[set[int]],
                 logit_sets: list[set[int]]) -> Iterator[list[Row]]:
        """The group's tokens in order, cut into ubatches of at most n_batch rows, of which at most
        n_outputs_max are output rows in a ubatch that holds a row whose logits are wanted (`logit_sets`, a
        subset of `output_sets`; llama.cpp aborts on a call with more outputs than its logits buffer holds),
        and any number in one that holds none (decoded without the LM head, `most_outputs`); a ubatch with the
        head carries at most `head_spare_rows` output rows whose logits are not wanted. So a request that
        wants few outputs, or none of their logits, decodes in long ubatches, one that wants every row's
        logits in short ones, and one that wants every row's last block and the last row's logits in long
        ubatches without the head and a short last one with it.

        Where the cuts fall is chosen so that a row comes out of every block but the last (which llama.cpp
        computes for the output rows only) the same bits whatever the request asks of the other rows
        (docs/fidelity.md, "batch composition"). The CPU kernels compute each row on its own, with
        exceptions that depend on the ubatch's length: the repacked weight kernels multiply activation rows
        `ROW_GROUP` at a time and the ubatch's last few rows one by one; the tiled k-quant matmul takes
        ubatches of 8 rows and more, another kernel shorter ones; a ubatch of one row takes the one-row
        attention kernel (float16 accumulation; patches/ gives every longer ubatch the tiled float32 kernel).
        So every cut falls on a multiple of `ROW_GROUP` rows from the group's start, and the group's last
        ubatch takes rows from the one before until it has `MIN_UBATCH_ROWS`, or else at least two, where the
        limits allow it: a row then sits in the same group of four, in a ubatch that every kernel treats as
        long, whatever the cut. Each ubatch is otherwise the longest the limits allow. Beyond reach of the
        cuts: prompts that share ubatches (short prompts of a batch) sit at other offsets among the row groups,
        and their cache cells elsewhere among flash attention's key tiles, than alone (`--batch-invariant`).

        Without `prompts_share_ubatches` the cut is every n_outputs_max tokens whatever the outputs: a prompt's
        ubatches depend on the prompt alone (its promise covers request shapes too)."""
        rows = [Row(token, p, s, p in output_sets[s] or p in logit_sets[s], p in logit_sets[s])
                for s in group for p, token in enumerate(prompts[s])]
        longest = self.n_batch if self.prompts_share_ubatches else self.n_outputs_max
        start = 0
        while start < len(rows):
            end = self._ubatch_end(rows, start, longest)
            yield rows[start:end]
            start = end

    def fits(self, rows: list[Row]) -> bool:
        """Whether one call may decode `rows` as far as its output rows go."""
        return self._allows(sum(row.output for row in rows), sum(row.output and not row.logits for row in rows),
                            any(row.logits for row in rows))

    def _allows(self, outputs: int, spare: int, logits: bool) -> bool:
        """The limits on one call's output rows, `spare` of them without their logits wanted. Prompts that
        do not share ubatches are cut by their length alone (`ubatches`), so the spare rows do not count."""
        if outputs > self.most_outputs(logits):
            return False
        return not (logits and self.can_skip_head and self.prompts_share_ubatches and spare > self.head_spare_rows)

    def _ubatch_end(self, rows: list[Row], start: int, longest: int) -> int:
        end, outputs, spare, logits = start, 0, 0, False
        while end < len(rows) and end - start < longest:
            row = rows[end]
            if not self._allows(outputs + row.output, spare + (row.output and not row.logits), logits or row.logits):
                break
            outputs += row.output
            spare += row.output and not row.logits
            logits = logits or row.logits
            end += 1
        if end == len(rows):
            return end
        aligned = end - end % ROW_GROUP
        if aligned - start >= ROW_GROUP:  # with n_outputs_max below ROW_GROUP (tiny settings) groups are moot
            end = aligned
        # The group's last ubatch would be short: it takes rows from this one, whole row groups where this one
        # ends on one, if the limits allow, up to MIN_UBATCH_ROWS or else two (one row: another attention kernel).
        granule = ROW_GROUP if end % ROW_GROUP == 0 and end - start >= ROW_GROUP else 1
        for wanted in (MIN_UBATCH_ROWS, 2):
            short = wanted - (len(rows) - end)
            if short <= 0:
                break
            shorter = end - -(-short // granule) * granule
            if shorter - start >= wanted and len(rows) - shorter <= longest and self.fits(rows[shorter:]):
                return shorter
        return end


def _wanted_rows(ctx, ubatch: list[Row], n_vocab: int,
                 logit_slot: list[dict[int, int]]) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """llama.cpp's logits of the ubatch just decoded (a view of its output buffer) and the (row, prompt,
    slot) of each output row the request wants, in row order."""
    if not any(row.logits for row in ubatch):  # decoded without the LM head: no logits buffer
        return None, []
    n_out = sum(row.output for row in ubatch)
    table = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n_out, n_vocab))
    wanted, row = [], 0
    for token in ubatch:
        if not token.output:
            continue
        k = logit_slot[token.prompt].get(token.position)
        if k is not None:
            wanted.append((row, token.prompt, k))
        row += 1
    return table, wanted


def collect_logits(ctx, ubatch: list[Row], n_vocab: int, logits: list[np.ndarray],
                   logit_slot: list[dict[int, int]]) -> None:
    """Copy the output rows' logits of the ubatch just decoded into the per-prompt arrays."""
    table, wanted = _wanted_rows(ctx, ubatch, n_vocab, logit_slot)
    for row, s, k in wanted:
        logits[s][k] = table[row]


def stream_logits(ctx, ubatch: list[Row], n_vocab: int, logit_slot: list[dict[int, int]],
                  sink: Callable[[int, int, np.ndarray], None]) -> None:
    """Hand the output rows' logits of the ubatch just decoded to `sink(prompt, first slot, rows)`, one call
    per run of consecutive slots of one prompt, the rows viewed in llama.cpp's output buffer (no copy)."""
    table, wanted = _wanted_rows(ctx, ubatch, n_vocab, logit_slot)
    runs: list[list[int]] = []  # [prompt, first slot, first row, rows]
    for row, s, k in wanted:
        last = runs[-1] if runs else None
        if last is not None and last[0] == s and last[1] + last[3] == k and last[2] + last[3] == row:
            last[3] += 1
        else:
            runs.append([s, k, row, 1])
    for s, k, first_row, n in runs:
        sink(s, k, table[first_row:first_row + n])
