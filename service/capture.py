"""The capture/edit pass: what the eval callback does with each graph node of one request.

llama.cpp has no API for intermediate tensors, but its graph scheduler calls an *eval callback* for every
graph node: first asking whether we want the node (``ask=True``), then, if we said yes, calling again once
the node is computed (``ask=False``). In that second call we can read the tensor and also overwrite it,
and every later node sees the new values. That single hook implements capture (read), activation patching
(``SET``), steering (``ADD``) and directional ablation (``ABLATE``), at any site and any layer, block 0
included, for prompts and for generated tokens alike.

A `CapturePass` knows, for each decoded ubatch, which (prompt, position) each row belongs to, which sites to
read, and which interventions to apply; the decode loop (`service/batching.py`) tells it about each ubatch.
"""
from __future__ import annotations

import numpy as np

from lmscope.proto.sites import is_pattern_site

from . import ggml
from .contracts import Intervention
from .errors import Code, RequestError
from .graph_sites import SiteRules


def resolve_positions(positions: list[int] | None, n_tokens: int, what: str) -> list[int]:
    if positions is None:
        return list(range(n_tokens))
    out = []
    for p in positions:
        q = p + n_tokens if p < 0 else p
        if not 0 <= q < n_tokens:
            raise RequestError(Code.OUT_OF_RANGE,
                               f"{what} position {p} is outside a prompt of {n_tokens} tokens "
                               f"(valid: {-n_tokens}..{n_tokens - 1})")
        out.append(q)
    if len(set(out)) != len(out):
        raise RequestError(Code.INVALID_ARGUMENT, f"{what} positions {positions} name the same token twice in a prompt "
                                               f"of {n_tokens} tokens (a negative position counts from the end)")
    return out


class CapturePass:
    """The per-request state the eval callback routes to."""

    def __init__(self, site_rules: SiteRules, site_shapes: dict[str, tuple[int, ...]],
                 output_rows_sites: set[str], prompts: list[list[int]], capture: list[str],
                 capture_positions: list[list[int]], interventions: list[Intervention], stop_when_done: bool = False):
        self.capture = capture
        self.output_rows_sites = output_rows_sites
        self.error: BaseException | None = None
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
                                    else resolve_positions(iv.positions, len(tokens), "intervention"))
            for site in iv.sites:
                self.interventions.setdefault(site, []).append((iv, resolved, vector))
        self.matcher = site_rules.matcher(set(capture) | set(self.interventions))
        # When nothing after the last wanted node is needed (no logits), the callback ends the graph there:
        # a probe of layer 5 then costs 6 of 30 layers, and an all-layer capture skips the final norm and
        # the LM head over every output row. Later ubatches never need what was skipped: layer k only reads
        # the KV cache of layers <= k, and any node of layer k that is wanted comes after layer k's KV store
        # or needs no KV of its own layer.
        self.stop_when_done = stop_when_done and self.matcher.n_sites > 0
        self.positions = capture_positions
        self.slot = [{p: k for k, p in enumerate(pos)} for pos in capture_positions]
        shapes = site_shapes
        self.row_size = {site: int(np.prod(shapes[site])) for site in set(capture) | set(self.interventions)}
        self.out: dict[str, list[np.ndarray]] = {}
        for site in capture:
            if is_pattern_site(site):
                n_head = shapes[site][0]
                self.out[site] = [np.zeros((n_head, len(pos), len(tokens)), np.float32)
                                  for pos, tokens in zip(capture_positions, prompts)]
            else:
                self.out[site] = [np.zeros((len(pos),) + shapes[site], np.float32) for pos in capture_positions]
        # Per ubatch, set by the decode loop before each decode:
        self.rows: list[tuple[int, int]] = []          # (prompt, position) of every token row
        self.output_rows: list[tuple[int, int]] = []   # the same for rows marked as outputs
        self.cells: list[list[int]] = [[] for _ in prompts]  # KV cell of each decoded token, per prompt
        self._pending: list[str] = []
        self._row_copies: list = []     # `_copy_plan` of self.rows, of self.output_rows
        self._output_copies: list = []

    def begin_ubatch(self, rows: list[tuple[int, int]], outputs: list[bool], first_cell: int) -> None:
        self.rows = rows
        self.output_rows = [r for r, o in zip(rows, outputs) if o]
        for k, (s, _) in enumerate(rows):
            self.cells[s].append(first_cell + k)
        self._row_copies, self._output_copies = self._copy_plan(self.rows), self._copy_plan(self.output_rows)
        self.matcher.begin_ubatch()

    def _copy_plan(self, rows: list[tuple[int, int]]) -> list[tuple[int, slice | np.ndarray, slice | np.ndarray]]:
        """Per prompt with captured rows in this ubatch: (prompt, ubatch rows, output slots), as slices where
        both run consecutively (the usual case: one copy per prompt and site instead of one per row)."""
        plan = []
        for s in sorted({s for s, _ in rows}):
            pairs = [(r, self.slot[s][p]) for r, (t, p) in enumerate(rows) if t == s and p in self.slot[s]]
            if not pairs:
                continue
            picked, slots = (np.array(a, np.intp) for a in zip(*pairs))
            if (np.diff(picked) == 1).all() and (np.diff(slots) == 1).all():
                picked, slots = slice(int(picked[0]), int(picked[-1]) + 1), slice(int(slots[0]), int(slots[-1]) + 1)
            plan.append((s, picked, slots))
        return plan

    def callback(self, tensor: int, ask: bool, _user_data) -> bool:
        try:
            if ask:
                self._pending = self.matcher.match(tensor)
                return bool(self._pending)
            for site in self._pending:
                self._visit(site, tensor)
            return not (self.stop_when_done and len(self.matcher.found) == self.matcher.n_sites)
        except BaseException as exc:  # an exception must not unwind through C
            if self.error is None:
                self.error = exc
            return not ask

    def _visit(self, site: str, tensor: int) -> None:
        if ggml.type_of(tensor) != ggml.GGML_TYPE_F32 or not ggml.is_contiguous(tensor):
            raise RequestError(Code.FAILED_PRECONDITION,
                               f"site {site} is not a contiguous float32 tensor in this build/model")
        ne = ggml.shape_of(tensor)
        if is_pattern_site(site):
            self._capture_pattern(site, tensor, ne)
            return
        late = site in self.output_rows_sites
        rows = self.output_rows if late else self.rows
        size = int(np.prod(ne))
        if size != len(rows) * self.row_size[site]:
            raise RequestError(Code.INTERNAL, f"site {site} holds {size} values in a ubatch of {len(rows)} rows of "
                                           f"{self.row_size[site]}: the graph no longer has the layout verified "
                                           f"at start-up")
        if not rows:  # a ubatch without output rows: the last block's output-rows-only sites are empty
            return
        plan = self._output_copies if late else self._row_copies
        if site not in self.interventions and all(isinstance(picked, slice) for _, picked, _ in plan):
            # runs of consecutive rows go from llama.cpp's buffer straight into their slots, without a copy
            # between (SmolLM2's 270 sites of the fidelity map: the decode 194-197 ms with it, 186-189 without)
            out, row_bytes = self.out[site], self.row_size[site] * 4
            for s, picked, slots in plan:
                ggml.read(tensor, out[s].reshape(len(out[s]), -1)[slots], picked.start * row_bytes)
            return
        data = np.empty(size, np.float32)
        ggml.read(tensor, data)
        data = data.reshape(len(rows), -1)
        if site in self.interventions and self._intervene(site, data, rows):
            ggml.write(tensor, data)
        if site in self.out:
            out = self.out[site]
            for s, picked, slots in plan:
                out[s].reshape(len(out[s]), -1)[slots] = data[picked]

    def _intervene(self, site: str, data: np.ndarray, rows: list[tuple[int, int]]) -> bool:
        changed = False
        for iv, resolved, vector in self.interventions[site]:
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
