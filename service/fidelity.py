"""The fidelity map of a run: how much llama.cpp's rounding of matrix-product inputs moves each block's output.

Why. llama.cpp's CPU kernels multiply a quantized weight matrix by converting each float32 input row to the
weight type's `vec_dot_type` first: Q8_0 blocks of 32 values with one float16 scale amax/127 (Q4_0, Q5_0,
Q8_0 weights), Q8_1 (the same values plus a block sum, Q4_1/Q5_1), Q8_K blocks of 256 with a float32 scale
(k-quants, IQ types), float16 (F16 weights); float32 weights take the rows as they are. A row whose block
holds one massive value (an attention-sink token) loses the small components of that block, and the
block's output there can point elsewhere; through attention, every later row that reads it moves too.
Nothing else in a run shows where that happened.

What. For every block L and returned position p, and each of the block's four products with a weight matrix

    attn_in   the attention's normed input (`ln1`) times q/k/v (or the fused qkv),
    attn_out  the heads' output (`attn.z`) times the output projection,
    ffn_in    the FFN's normed input (`ln2`) times gate/up (or the fused up, or the router and experts),
    ffn_down  the neuron activations (`mlp.post`) times the down projection,

the map holds

* ``rounding``: ||round(x) - x|| / ||x|| for the product's input row x, exact: round() is ggml's own
  `from_float` for the weight's vec_dot type (`stored_matrix.rounded_as_vec_dot`), the very conversion the
  kernel makes (where one input feeds matrices of different vec_dot types, the largest of their errors);
* ``effect``: the estimated change of block L's output at p that this block's rounding of that product
  causes, over ||resid_post||;
* ``estimate``: the estimated relative deviation of block L's output at p from the same weights' exact
  products, everything the map follows included. A row is flagged when it exceeds the threshold
  (`lmscope.client.fidelity`).

How, and what it assumes. A perturbation e of a product's input y = W x, with components of zero mean that
are uncorrelated with each other and with W, changes y by E||W e||^2 = sum_j e_j^2 ||W[:, j]||^2: per-column
norms of each matrix (computed once per worker) make it one weighted sum per row. Per row:

* attention: row j's value changes by S_jg = sum_i e_ji^2 ||W_v,g[:, i]||^2 in kv head g; the heads' output at
  p is z_ph = sum_j a_pj v_jg, which changes by sum_j a_pj^2 S_jg (independent changes of different rows). The
  weights a are computed from the captured post-RoPE q and k rows (the family's scale 1/sqrt(head_dim),
  soft-capping, causal mask and sliding window, grouped kv heads). The output projection carries head h's
  change spread over its head_dim inputs: ||W_o[:, h]||_F^2 / head_dim. What moves the weights themselves
  (changes of q and k) is left out: first order in the scores, it moves z_p by sum_j da_pj v_j, small next to
  the value changes wherever the attended rows' values differ little, which is what a sink makes of them (it
  would need v, a site more);
* FFN: gate and up change by sigma_g, sigma_u per neuron (the row's summed variance over the neurons); a
  neuron n = act(g) u then changes by act'(g) u dg + act(g) du; the down projection's columns carry each
  neuron's change. The few neurons that dominate a row's change (`TOP_NEURONS`) are added coherently, the
  rest in quadrature: where a row's FFN output is a few massive neurons writing one direction (cancelling an
  attention sink's residual, Qwen2.5's first token in its last blocks), their changes do not average out;
* the output projections' inputs (`attn.z`, `mlp.post`) add their own rounding; through a post-norm
  (Gemma), RMSNorm(y) s changes by s dy / rms(y): the column norms are then of s W, divided by rms(y);
* the stream carries the squared deviation D^2 from block to block, and each block adds to it, in
  quadrature, its own products' changes and what reaches the row from other rows through attention: row j's
  deviation D_j moves its normed input by the same fraction D_j / ||stream_j|| (RMSNorm divides the scale
  out), taken as isotropic (D_j's direction is unknown: each component's variance (D_j / ||stream_j||)^2
  ||x_j||^2 / n), hence its value, which row p reads with weight a_pj^2. So a deviation at an attention sink
  reaches every row that attends to it. The row's own D passes its own branches unchanged: a branch's
  response J D is not independent of D; for an isotropic D its squared size D^2 ||J||_F^2 / n comes with a
  cross term 2 D . J D = D^2 2 tr(J) / n that cancels most of it (docs/fidelity.md has the figures), and
  carrying either term without an exact J compounds over the blocks.

Mixture-of-experts blocks: the `ffn_down` entry is the experts' down products, from each token's experts'
activations (`mlp.experts.post`) and the router's probabilities (`mlp.router`): the chosen experts are the
n_expert_used most probable (llama.cpp's top-k), their weights those probabilities (renormalised where the
family does), and the block's output moves by sum_slot w_slot^2 sum_j e_j^2 ||W_down,expert[:, j]||^2 (column
norms per expert), and the FFN's input is followed through each chosen expert's gate, up and activation as a
dense FFN's (`mlp.experts.gate`, `.up`), its neurons' changes scaled by the expert's weight; a shared
expert's own products are left out (its activations are not a site). Where a model lacks what a step needs
(a fused gate+up), the relative rounding of the product's input stands in for that of the branch's output.
With a subset of positions, attention reads the returned rows only. Also left out: the float16 rounding of
Q8_1 block sums (~2^-11 of a block's sum, ~40x below the values' rounding), the KV cache and flash attention
(docs/fidelity.md).

Cost: the rows are captured in the worker beside the request's own sites and reduced there (no extra bytes
on the wire); scripts/bench_fidelity.py measures it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf.quants import dequantize
from threadpoolctl import ThreadpoolController

from lmscope.proto.sites import block_site
from lmscope.proto.tensor_names import POST_ATTN_NORM, POST_FFN_NORM

from .stored_matrix import StoredMatrix, rounded_as_vec_dot, vec_dot_type

PRODUCTS = ("attn_in", "attn_out", "ffn_in", "ffn_down")
# Per row, the FFN neurons whose changes are added coherently (the rest in quadrature): see the FFN above.
TOP_NEURONS = 4
_GELU_C = math.sqrt(2 / math.pi)


@dataclass(frozen=True)
class _Block:
    """What the map reads for one block: sites (None where the model does not offer them) and tensors."""
    ln1: str | None
    q: str | None
    k: str | None
    z: str | None
    ln2: str | None
    gate: str | None
    up: str | None
    post: str | None
    resid_post: str
    attn_matrices: tuple[str, ...]   # what ln1 multiplies (vec_dot types)
    value: tuple[str, int] | None     # (tensor, first row) of W_v inside it
    output: str | None               # W_o
    ffn_matrices: tuple[str, ...]    # what ln2 multiplies
    down: str | None                 # W_down of a dense FFN whose activations (`mlp.post`) are offered
    neurons: bool                    # gate and up offered beside them: the FFN's change is followed per neuron
    router: str | None               # mixture of experts: the router's probabilities,
    experts: str | None              # the chosen experts' activations,
    down_experts: str | None         # and the stack of the experts' down projections;
    expert_gate: str | None          # the chosen experts' gate and up, offered beside them: the FFN's change
    expert_up: str | None            # is followed per neuron of each chosen expert
    attn_branch: str | None          # what the attention adds to the stream (the stand-in's size)
    ffn_branch: str | None           # what the FFN adds to the stream (the stand-in's size)
    attn_pre_norm: str | None        # the branch's output before a post-norm (Gemma)
    ffn_pre_norm: str | None
    attn_post_norm: str | None       # the post-norm weights
    ffn_post_norm: str | None
    sliding_window: int              # 0: full causal attention


def _block(layer: int, family, offered: set[str], tensors, window: int) -> _Block:
    def site(kind: str) -> str | None:
        name = block_site(layer, kind)
        return name if name in offered else None

    def weights(*kinds: str) -> tuple[str, ...]:
        return tuple(n for n in (f"blk.{layer}.{k}.weight" for k in kinds) if n in tensors)

    value = None
    if weights("attn_v"):
        value = (weights("attn_v")[0], 0)
    elif weights("attn_qkv"):  # [q; k; v]: v is the last n_head_kv * head_dim rows
        qkv = tensors[weights("attn_qkv")[0]]
        q_rows = int(tensors[weights("attn_output")[0]].shape[0]) if weights("attn_output") else 0  # W_o's inputs
        v_rows = (int(qkv.shape[1]) - q_rows) // 2
        value = (weights("attn_qkv")[0], int(qkv.shape[1]) - v_rows)
    post_norms = family.post_norms
    attn_post = POST_ATTN_NORM.format(L=layer) if post_norms and POST_ATTN_NORM.format(L=layer) in tensors else None
    ffn_post = POST_FFN_NORM.format(L=layer) if post_norms and POST_FFN_NORM.format(L=layer) in tensors else None
    gate, up, post = site("mlp.gate"), site("mlp.up"), site("mlp.post")
    down = weights("ffn_down")[0] if not family.moe and post and weights("ffn_down") else None
    neurons = bool(down and gate and up and len(weights("ffn_gate", "ffn_up")) == 2)
    router, experts = site("mlp.router"), site("mlp.experts.post")
    down_experts = weights("ffn_down_exps")[0] if family.moe and router and experts and weights("ffn_down_exps") \
        else None
    expert_gate, expert_up = site("mlp.experts.gate"), site("mlp.experts.up")
    expert_neurons = bool(down_experts and expert_gate and expert_up
                          and len(weights("ffn_gate_exps", "ffn_up_exps")) == 2)
    return _Block(
        ln1=site("ln1"), q=site("attn.q"), k=site("attn.k"), z=site("attn.z"), ln2=site("ln2"),
        gate=gate if neurons else None, up=up if neurons else None, post=post if down else None,
        resid_post=block_site(layer, "resid_post"),
        attn_matrices=weights("attn_q", "attn_k", "attn_v", "attn_qkv"), value=value,
        output=(weights("attn_output") or (None,))[0],
        ffn_matrices=weights("ffn_gate", "ffn_up", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                             "ffn_gate_shexp", "ffn_up_shexp"),
        down=down, neurons=neurons, router=router if down_experts else None,
        experts=experts if down_experts else None, down_experts=down_experts,
        expert_gate=expert_gate if expert_neurons else None, expert_up=expert_up if expert_neurons else None,
        attn_branch=site("attn_out"), ffn_branch=site("mlp_out"),
        attn_pre_norm=site("attn_out_pre_norm") if attn_post else None,
        ffn_pre_norm=site("mlp_out_pre_norm") if ffn_post else None,
        attn_post_norm=attn_post, ffn_post_norm=ffn_post, sliding_window=window)


class FidelityMap:
    """The products of every block of one model, and the reduction of a run's captured rows to the map."""

    def __init__(self, weights, site_shapes: dict[str, tuple[int, ...]], n_layer: int, n_head: int,
                 n_head_kv: int):
        self.tensors = weights.tensors
        self.n_layer = n_layer
        self.n_threads = weights.n_threads
        self.rms_eps = weights.rms_eps
        self.n_head, self.n_head_kv = n_head, n_head_kv
        family = weights.family
        self.gelu = family.ffn == "geglu"
        self.expert_weights_norm = family.expert_weights_norm
        self.site_shapes = site_shapes
        arch = weights.architecture
        period, default_window = family.sliding_window_period, family.sliding_window_default
        window = int(weights.field(f"{arch}.attention.sliding_window") or default_window) if period else 0
        period = int(weights.field(f"{arch}.attention.sliding_window_pattern") or period)
        cap = family.attn_softcap_default  # llama.cpp soft-caps the scores of the families with a default only
        self.softcap = float(weights.field(f"{arch}.attn_logit_softcapping") or cap) if cap else 0.0
        offered = set(site_shapes)
        self.blocks = [_block(L, family, offered, self.tensors,
                              window if window and (period == 0 or L % period < period - 1) else 0)
                       for L in range(n_layer)]
        needed = set()
        for b in self.blocks:  # each site costs a pause of the graph: only what the estimate reads
            needed.update((b.ln1, b.q, b.k, b.z, b.ln2, b.gate, b.up, b.post, b.resid_post,
                           b.attn_pre_norm, b.ffn_pre_norm, b.router, b.experts, b.expert_gate, b.expert_up))
            if b.value is None or b.output is None:
                needed.add(b.attn_branch)
            if not (b.neurons or b.expert_gate):
                needed.add(b.ffn_branch)
        # in graph order, as the engine captures them
        self.sites = [name for name in site_shapes if name in needed]
        self._column_norms: dict[tuple, np.ndarray] = {}
        self._blas = ThreadpoolController()
        self.vec_dot_types = {name: vec_dot_type(self.tensors[name].tensor_type)
                              for b in self.blocks for name in b.attn_matrices + b.ffn_matrices
                              + tuple(n for n in (b.output, b.down, b.down_experts) if n)}

    def squared_column_norms(self, name: str, scale: str | None = None, rows: tuple[int, int] | None = None,
                             groups: int | None = None) -> np.ndarray:
        """||s * W[r, j]||^2 summed over the output rows r of each of `groups` equal groups of rows
        `rows` (default: all) of matrix `name`, per input j: (n_cols,) without groups, else (n_cols, groups).
        Each output row i is scaled by s_i, the vector `scale` (a post-norm's weight; None: 1). Computed once,
        in float64, a row chunk at a time."""
        key = (name, scale, rows, groups)
        norms = self._column_norms.get(key)
        if norms is None:
            matrix = StoredMatrix(self.tensors[name], self.n_threads)
            first, last = rows or (0, matrix.n_rows)
            factor = None if scale is None else _vector(self.tensors[scale]).astype(np.float64)
            size = (last - first) // (groups or 1)
            squares = np.zeros((groups or 1, matrix.n_cols), np.float64)
            step = max(1, (16 << 20) // (4 * matrix.n_cols))
            for g in range(groups or 1):
                for start in range(first + g * size, first + (g + 1) * size, step):
                    stop = min(first + (g + 1) * size, start + step)
                    chunk = matrix.dequantize(start, stop).astype(np.float64)
                    if factor is not None:
                        chunk *= factor[start:stop, None]
                    squares[g] += np.einsum("ij,ij->j", chunk, chunk)
            norms = squares[0] if groups is None else squares.T
            norms = self._column_norms[key] = np.ascontiguousarray(norms, np.float32)
        return norms

    def compute(self, rows: dict[str, np.ndarray], positions: list[int]) -> dict[str, np.ndarray]:
        """The map of one prompt from its captured rows (site -> (n_positions, ...)) at `positions`:
        ``rounding`` and ``effect`` (n_layer, n_positions, 4), in `PRODUCTS` order (NaN where a block lacks
        the product), and ``estimate`` (n_layer, n_positions)."""
        order = np.argsort(positions, kind="stable")  # attention runs in position order
        ordered = np.asarray(positions)[order]
        n = len(order)
        in_order = bool((order == np.arange(n)).all())  # the usual case: the captured rows as they are
        rounding = np.full((self.n_layer, n, len(PRODUCTS)), np.nan, np.float32)
        effect = np.full_like(rounding, np.nan)
        estimate = np.zeros((self.n_layer, n), np.float32)
        carried = np.zeros(n)  # D^2: the squared deviation the stream carries into the block
        stream = None          # ||stream|| entering the block (None before block 0: nothing carried yet)
        # the map's matrix products are small: OpenBLAS's extra threads would not speed them up, and they
        # spin after each call, taking the cores from everything else (twice the map's CPU time on 2 cores)
        with self._blas.limit(limits=1, user_api="blas"):
            for layer, b in enumerate(self.blocks):
                def row(site: str) -> np.ndarray:
                    captured = rows[site] if in_order else rows[site][order]
                    return captured.reshape(n, -1)

                out_norm = _norms(row(b.resid_post))
                carried = carried + self._block(b, row, ordered, carried, stream, out_norm, rounding[layer],
                                                effect[layer])
                estimate[layer] = _ratio(np.sqrt(carried), out_norm)
                stream = out_norm
        back = np.argsort(order)
        return {"rounding": rounding[:, back], "effect": effect[:, back], "estimate": estimate[:, back]}

    def _block(self, b: _Block, row, positions, carried, stream, out_norm, rounding, effect) -> np.ndarray:
        """Fills this block's `rounding` and `effect` (n, 4); returns what the block adds to D^2."""
        n = len(positions)
        added = np.zeros(n)
        attn_rms, ffn_rms = self._rms(row, b.attn_pre_norm), self._rms(row, b.ffn_pre_norm)
        routing = self._routing(b, row) if b.down_experts is not None else None  # a mixture's chosen experts
        # --- attention ---
        if b.ln1 and b.attn_matrices:
            x = row(b.ln1)
            errors, relative, x_norm = self._rounding(x, b.attn_matrices)
            rounding[:, 0] = relative
            if b.value is not None and b.output is not None:
                name, first = b.value
                n_rows = int(self.tensors[name].shape[1]) - first
                value_norms = self.squared_column_norms(name, rows=(first, first + n_rows), groups=self.n_head_kv)
                own = errors[self.vec_dot_types[name]] @ value_norms           # (n, n_kv): rounding
                more = _spread(carried, stream, x_norm, x.shape[1])[:, None] * value_norms.sum(axis=0)  # carried
                head_norms = self.squared_column_norms(b.output, b.attn_post_norm)
                per_head = head_norms.reshape(self.n_head, -1).sum(axis=1) / (head_norms.size / self.n_head)
                attn_own, attn_more = np.zeros(n), np.zeros(n)
                for h, g, weights in self._attention(b, row, positions):
                    attn_own += per_head[h] * (weights @ own[:, g])
                    # other rows' deviations, through their values; the row's own is in the stream already
                    attn_more += per_head[h] * (weights @ more[:, g] - np.diagonal(weights) * more[:, g])
                attn_more = np.maximum(attn_more, 0.0)  # the difference of two sums: a rounding below 0
                attn_own = _through_post_norm(attn_own, attn_rms)
                added += _through_post_norm(attn_more, attn_rms)
            else:
                attn_own = _stand_in(relative, row, b.attn_branch)
            effect[:, 0] = _ratio(np.sqrt(attn_own), out_norm)
            added += attn_own
        if b.z and b.output:
            added += self._output_projection(row, b.z, b.output, b.attn_post_norm, attn_rms, out_norm,
                                             rounding[:, 1], effect[:, 1])
        # --- FFN ---
        if b.ln2 and b.ffn_matrices:
            x = row(b.ln2)
            errors, relative, _ = self._rounding(x, b.ffn_matrices)
            rounding[:, 2] = relative
            if b.neurons:
                ffn_own = _through_post_norm(self._neurons(b, row, errors), ffn_rms)
            elif b.expert_gate:
                ffn_own = _through_post_norm(self._expert_neurons(b, row, errors, routing), ffn_rms)
            else:
                ffn_own = _stand_in(relative, row, b.ffn_branch)
            effect[:, 2] = _ratio(np.sqrt(ffn_own), out_norm)
            added += ffn_own
        if b.post and b.down is not None:
            added += self._output_projection(row, b.post, b.down, b.ffn_post_norm, ffn_rms, out_norm,
                                             rounding[:, 3], effect[:, 3])
        if b.down_experts is not None:
            added += self._experts(b, row, routing, ffn_rms, out_norm, rounding[:, 3], effect[:, 3])
        return added

    def _experts(self, b: _Block, row, routing, rms: np.ndarray | None, out_norm, rounding: np.ndarray,
                 effect: np.ndarray) -> np.ndarray:
        """A mixture's down products (`mlp.experts.post` times each chosen expert's W_down, weighted): fills the
        `ffn_down` columns (the rounding: the largest over a token's experts); returns the squared change of
        the block's output, per row."""
        n, n_expert, used, width, chosen, weights = routing
        errors, relative, _ = self._rounding(row(b.experts).reshape(n * used, width), (b.down_experts,))
        rounding[:] = relative.reshape(n, used).max(axis=1)
        norms = self.squared_column_norms(b.down_experts, groups=n_expert).T  # (n_expert, width)
        per_slot = np.einsum("tsj,tsj->ts", errors[self.vec_dot_types[b.down_experts]].reshape(n, used, width),
                             norms[chosen])
        own = _through_post_norm((np.square(weights) * per_slot).sum(axis=1), rms)
        effect[:] = _ratio(np.sqrt(own), out_norm)
        return own

    def _output_projection(self, row, site: str, matrix: str, post_norm: str | None, rms: np.ndarray | None,
                           out_norm, rounding: np.ndarray, effect: np.ndarray) -> np.ndarray:
        """A branch's last product (`attn.z` times W_o, `mlp.post` times W_down): fills its column of `rounding`
        and `effect`; returns the squared change of the block's output it causes, per row."""
        errors, relative, _ = self._rounding(row(site), (matrix,))
        rounding[:] = relative
        own = _through_post_norm(errors[self.vec_dot_types[matrix]] @ self.squared_column_norms(matrix, post_norm),
                                 rms)
        effect[:] = _ratio(np.sqrt(own), out_norm)
        return own

    def _routing(self, b: _Block, row):
        """A mixture's rows: n, n_expert, n_expert_used, the experts' width, the chosen experts (n, used) and
        their weights (n, used), as llama.cpp chooses and weights them."""
        probs = row(b.router)
        n, n_expert = probs.shape
        used, width = self.site_shapes[b.experts]
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :used]  # llama.cpp's top-k, most probable first
        weights = np.take_along_axis(probs, chosen, axis=1).astype(np.float64)
        if self.expert_weights_norm:  # as llama.cpp: the sum clamped to float16's smallest normal
            weights /= np.maximum(weights.sum(axis=1, keepdims=True), 6.103515625e-5)
        return n, n_expert, used, width, chosen, weights

    def _expert_neurons(self, b: _Block, row, errors, routing) -> np.ndarray:
        """`_neurons` for a mixture: each chosen expert's neurons, their changes carried by that expert's down
        columns and scaled by its weight, combined over all of a token's experts' neurons."""
        n, n_expert, used, width, chosen, weights = routing
        gate = row(b.expert_gate).reshape(n, used, width)
        up = row(b.expert_up).reshape(n, used, width)
        variance = {}
        for role, name in (("gate", b.down_experts.replace("ffn_down_exps", "ffn_gate_exps")),
                           ("up", b.down_experts.replace("ffn_down_exps", "ffn_up_exps"))):
            per_expert = errors[self.vec_dot_types[name]] @ self.squared_column_norms(name, groups=n_expert) / width
            variance[role] = np.take_along_axis(per_expert, chosen, axis=1).astype(np.float32)[:, :, None]
        per_neuron = self._neuron_changes(gate, up, variance["gate"], variance["up"])
        per_neuron *= self.squared_column_norms(b.down_experts, groups=n_expert).T[chosen]
        per_neuron *= np.square(weights).astype(np.float32)[:, :, None]
        return _coherent_top(per_neuron.reshape(n, used * width))

    def _neurons(self, b: _Block, row, errors) -> np.ndarray:
        """The squared change of the FFN's output, per row, that the rounding of its input causes through gate,
        up, the activation and the down projection."""
        gate, up = row(b.gate), row(b.up)
        n_ff = gate.shape[1]
        # each neuron's gate and up change by the row's mean variance over the neurons
        variance = {role: errors[self.vec_dot_types[name]] @ self.squared_column_norms(name) / n_ff
                    for role, name in (("gate", b.down.replace("ffn_down", "ffn_gate")),
                                       ("up", b.down.replace("ffn_down", "ffn_up")))}
        per_neuron = self._neuron_changes(gate, up, variance["gate"].astype(np.float32)[:, None],
                                          variance["up"].astype(np.float32)[:, None])
        per_neuron *= self.squared_column_norms(b.down, b.ffn_post_norm)
        return _coherent_top(per_neuron)

    def _neuron_changes(self, gate: np.ndarray, up: np.ndarray, gate_variance, up_variance) -> np.ndarray:
        """Each neuron's squared change: n = act(g) u moves by act'(g) u dg + act(g) du, with dg and du of the
        variances given (broadcast over the neurons)."""
        value, slope = _activation(gate, self.gelu)
        slope *= up
        np.square(slope, out=slope)
        slope *= gate_variance
        per_neuron = np.square(value, out=value)
        per_neuron *= up_variance
        per_neuron += slope
        return per_neuron

    def _attention(self, b: _Block, row, positions: np.ndarray):
        """Per head h: h, its kv head and the squared attention weights a_pj^2 (n, n) of the returned rows,
        from the captured q and k (uniform over the visible rows where they are not offered); a head at a
        time, so a long prompt needs n^2 floats, not n_head n^2."""
        n = len(positions)
        offset = positions[:, None] - positions[None, :]
        visible = offset >= 0
        if b.sliding_window:
            visible &= offset < b.sliding_window
        group = self.n_head // self.n_head_kv
        if b.q is None or b.k is None:
            weights = np.square(visible / visible.sum(axis=1, keepdims=True))
            for h in range(self.n_head):
                yield h, h // group, weights
            return
        q = row(b.q).reshape(n, self.n_head, -1)
        k = row(b.k).reshape(n, self.n_head_kv, -1)
        scale = np.float32(1 / math.sqrt(q.shape[2]))
        for h in range(self.n_head):
            scores = q[:, h] @ k[:, h // group].T
            scores *= scale
            if self.softcap:
                scores = self.softcap * np.tanh(scores / self.softcap)
            scores[~visible] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            weights = np.exp(scores, out=scores)
            weights /= weights.sum(axis=1, keepdims=True)
            yield h, h // group, np.square(weights, out=weights)

    def _rounding(self, x: np.ndarray, matrices) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
        """Per vec_dot type of `matrices`: (round(x) - x)^2 (exact in float32: close float32 values); the
        relative rounding error of each row (the largest over the types) and the row norms."""
        errors = {}
        for name in matrices:
            kind = self.vec_dot_types[name]
            if kind not in errors:
                rounded = rounded_as_vec_dot(x, kind, name)  # float32 weights: x itself, never to be written
                error = np.subtract(rounded, x, out=None if np.shares_memory(rounded, x) else rounded)
                errors[kind] = np.square(error, out=error)
        x_norm = _norms(x)
        relative = np.max([_ratio(np.sqrt(e.sum(axis=1, dtype=np.float64)), x_norm) for e in errors.values()],
                          axis=0)
        return errors, relative, x_norm

    def _rms(self, row, site: str | None) -> np.ndarray | None:
        """The post-norm's divisor sqrt(mean(y^2) + eps) of the branch's output y (None without a post-norm):
        with eps, a branch that outputs zeros at a row (a sink's value) is moved by s dy / sqrt(eps)."""
        if site is None:
            return None
        y = row(site)
        return np.sqrt(np.square(_norms(y)) / y.shape[1] + self.rms_eps)


def _coherent_top(per_neuron: np.ndarray) -> np.ndarray:
    """Per row of squared neuron changes (n, neurons): the `TOP_NEURONS` largest added coherently, the rest in
    quadrature (the FFN step of the module docstring)."""
    top = np.partition(per_neuron, -TOP_NEURONS, axis=1)[:, -TOP_NEURONS:].astype(np.float64)
    rest = per_neuron.sum(axis=1, dtype=np.float64) - top.sum(axis=1)
    return np.square(np.sqrt(top).sum(axis=1)) + np.maximum(rest, 0.0)


def _spread(carried: np.ndarray, stream: np.ndarray | None, x_norm: np.ndarray, width: int) -> np.ndarray:
    """Per component variance of a normed row x (n, width) whose stream deviates by sqrt(carried) / ||stream||:
    the norm divides the stream's scale out, so x moves by the same fraction, taken as isotropic (the
    deviation's direction is not known)."""
    if stream is None:
        return np.zeros_like(x_norm)
    return _ratio(carried, np.square(stream)) * np.square(x_norm) / width


def _vector(tensor) -> np.ndarray:
    return np.asarray(dequantize(tensor.read(), tensor.tensor_type), np.float32).reshape(-1)


def _through_post_norm(squared: np.ndarray, rms: np.ndarray | None) -> np.ndarray:
    """A branch's squared change after its post-norm (Gemma): RMSNorm(y) s moves by s dy / rms(y), the s in the
    column norms; without a post-norm (rms None) unchanged."""
    return squared if rms is None else squared / rms ** 2


def _stand_in(relative: np.ndarray, row, branch: str | None) -> np.ndarray:
    """Where the model lacks what a branch's own step needs: the relative rounding of the branch's input stands
    in for that of its output (squared change; nothing without the branch's output site)."""
    return relative ** 2 * np.square(_norms(row(branch))) if branch else np.zeros(len(relative))


def _norms(x: np.ndarray) -> np.ndarray:
    """Row norms (float64 results of float32 sums: the map needs a few digits)."""
    x = x.reshape(x.shape[0], -1)
    return np.sqrt(np.einsum("ij,ij->i", x, x).astype(np.float64))


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b (float64), 0 where a is 0: an all-zero row is not moved."""
    a = np.asarray(a, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=a != 0)


def _activation(g: np.ndarray, gelu: bool) -> tuple[np.ndarray, np.ndarray]:
    """act(g) and act'(g) of the FFN's activation: GELU (tanh form, as ggml) for GeGLU, else SiLU."""
    if gelu:  # products, not g ** 3: numpy's float32 power is many times slower
        square = g * g
        t = np.tanh(_GELU_C * g * (1 + 0.044715 * square))
        half = 0.5 * (1 + t)
        slope = _GELU_C * (1 + 3 * 0.044715 * square)
        slope *= g
        slope *= 1 - t * t
        slope *= 0.5
        slope += half
        return g * half, slope
    sigmoid = np.tanh(0.5 * g)  # sigmoid(g) = (1 + tanh(g / 2)) / 2, without exp's overflow
    sigmoid *= 0.5
    sigmoid += 0.5
    slope = 1 - sigmoid
    slope *= g
    slope += 1
    slope *= sigmoid
    return g * sigmoid, slope
