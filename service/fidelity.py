"""The fidelity map of a run: how much llama.cpp's rounding of matrix-product inputs moves each block's output.

Why. llama.cpp's CPU kernels multiply a quantized weight matrix by converting each float32 input row to the
weight type's `vec_dot_type` first: Q8_0 blocks of 32 values with one float16 scale amax/127 (Q4_0, Q5_0,
Q8_0 weights), Q8_1 (the same values plus a block sum, Q4_1/Q5_1), Q8_K blocks of 256 with a float32 scale
(k-quants, IQ types), float16 (F16 weights); float32 weights take the rows as they are. A row whose block
holds one massive value (an attention-sink token) loses the small components of that block, and the
block's output there can point elsewhere. Nothing else in a run shows where that happened.

What. For every block L and returned position p, and each of the block's four products with a weight matrix

    attn_in   the attention's normed input (`ln1`) times q/k/v (or the fused qkv),
    attn_out  the heads' output (`attn.z`) times the output projection,
    ffn_in    the FFN's normed input (`ln2`) times gate/up (or the fused up, or the router and experts),
    ffn_down  the neuron activations (`mlp.post`) times the down projection,

the map holds

* ``rounding``: ||round(x) - x|| / ||x|| for the product's input row x, exact: round() is ggml's own
  `from_float` for the weight's vec_dot type (`stored_matrix.rounded_as_vec_dot`), the very conversion the
  kernel makes (where one input feeds matrices of different vec_dot types, the largest of their errors);
* ``effect``: the estimated change of the block's output that the rounding causes, over the norm of the
  block's output ||resid_post||. The rounding error e = round(x) - x has components of zero mean that are
  uncorrelated with each other and with the weights, so for y = W x, E||W e||^2 = sum_j e_j^2 ||W[:, j]||^2:
  per-column norms of each matrix (computed once per worker) make it one weighted sum per row. The output
  projections (attn_out, ffn_down) use it as it is. Through a post-norm (Gemma), RMSNorm(y) * s changes by
  s * dy / rms(y): the column norms are then taken of s * W. The inputs go one step further: attn_in through v
  (each row's v changes by sigma_j per component; z_p = sum_j a_pj v_j changes by sum_j a_pj^2 sigma_j^2 per
  component, sum_j a_pj^2 estimated by ||z_p||^2 / mean ||v_j||^2, which is exact at the first position) and
  the output projection (||W_o||_F^2); ffn_in through gate and up (sigma_g, sigma_u per neuron), the
  activation (a neuron n = act(g) u changes by n (du / u + dg / g), g act'(g) / act(g) taken as 1, with the
  captured n, g and u) and the down projection's columns. The few neurons that dominate a row's change
  (`TOP_NEURONS`) are added coherently, the rest in quadrature: where a row's FFN output is a few massive
  neurons writing one direction (cancelling an attention sink's residual), their changes do not average out
  (on Qwen2.5-Coder-1.5B's first token in block 26, quadrature alone gave 1/15 of the exact change).
  Where a model lacks what a step needs (a fused qkv or gate+up, experts), the relative change of the
  product's input stands in for that of the branch's output;
* ``estimate``: the estimated relative deviation of the block's output: the changes of this block and of
  every block before it, added in quadrature (the residual stream carries each block's change on), over
  ||resid_post||. A row is flagged when it exceeds the threshold (`lmscope.client.fidelity`).

What it leaves out: a row's change reaching *later* rows through attention (their keys and values move with
it), the softmax's response to rounded q and k, the float16 rounding of Q8_1 block sums (~2^-11 of a block's
sum, ~40x below the values' rounding), the KV cache and flash attention (docs/fidelity.md). MoE blocks have
no ffn_down entry (each expert's activations are not a site). With a subset of positions, the attention term
averages over the returned rows only.

Cost: the input and output rows of the products are captured in the worker and reduced there (no extra
bytes on the wire); scripts/bench_fidelity.py measures it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf.quants import dequantize

from lmscope.proto.sites import block_site
from lmscope.proto.tensor_names import POST_ATTN_NORM, POST_FFN_NORM

from .architectures import Family
from .stored_matrix import StoredMatrix, rounded_as_vec_dot, vec_dot_type

PRODUCTS = ("attn_in", "attn_out", "ffn_in", "ffn_down")
# Per row, the FFN neurons whose changes are added coherently (the rest in quadrature): see ffn_in above.
TOP_NEURONS = 4


@dataclass(frozen=True)
class _Product:
    """One product of a block: its input site, the matrices it multiplies, the sites and weights its change
    is propagated with (`propagated`: False where the model lacks them), the branch's output before any
    post-norm (`pre_norm_site`) and after it (`branch_site`, what the branch adds to the stream)."""
    name: str
    input_site: str
    matrices: tuple[str, ...]
    weights: dict[str, str]   # role ("v", "o", "gate", "up", "down") -> tensor name
    sites: dict[str, str]     # role ("v", "z", "gate", "up", "post") -> site name
    propagated: bool
    pre_norm_site: str
    branch_site: str
    post_norm: str | None     # the branch's post-norm weight (Gemma), None without one


def _products(layer: int, family: Family, offered: set[str], tensors) -> list[_Product]:
    def site(kind: str) -> str:
        return block_site(layer, kind)

    def weight(kind: str) -> str:
        return f"blk.{layer}.{kind}.weight"

    def present(*kinds: str) -> tuple[str, ...]:
        return tuple(weight(k) for k in kinds if weight(k) in tensors)

    def product(name, input_kind, matrices, weights, sites, branch):
        weights = {role: weight(kind) for role, kind in weights.items()}
        sites = {role: site(kind) for role, kind in sites.items()}
        propagated = all(w in tensors for w in weights.values()) and all(s in offered for s in sites.values())
        pre_norm = f"{branch}_pre_norm" if family.post_norms else branch
        post_norm = (POST_ATTN_NORM if branch == "attn_out" else POST_FFN_NORM).format(L=layer)
        return _Product(name, site(input_kind), present(*matrices), weights, sites, propagated, site(pre_norm),
                        site(branch), post_norm if family.post_norms and post_norm in tensors else None)

    products = [
        product("attn_in", "ln1", ("attn_q", "attn_k", "attn_v", "attn_qkv"),
                {"v": "attn_v", "o": "attn_output"}, {"v": "attn.v", "z": "attn.z"}, "attn_out"),
        product("attn_out", "attn.z", ("attn_output",), {"o": "attn_output"}, {}, "attn_out"),
        product("ffn_in", "ln2", ("ffn_gate", "ffn_up", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                  "ffn_gate_shexp", "ffn_up_shexp"),
                {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"},
                {"gate": "mlp.gate", "up": "mlp.up", "post": "mlp.post"},
                "mlp_out"),
    ]
    if not family.moe:
        products.append(product("ffn_down", "mlp.post", ("ffn_down",), {"down": "ffn_down"}, {}, "mlp_out"))
    return [p for p in products
            if p.matrices and {p.input_site, p.pre_norm_site, p.branch_site} <= offered]


class FidelityMap:
    """The products of every block of one model, and the reduction of a run's captured rows to the map."""

    def __init__(self, family: Family, tensors, site_shapes: dict[str, tuple[int, ...]], n_layer: int,
                 n_threads: int = 1):
        self.tensors = tensors
        self.n_layer = n_layer
        self.n_threads = n_threads
        offered = set(site_shapes)
        self.blocks = [_products(L, family, offered, tensors) for L in range(n_layer)]
        needed = {block_site(L, "resid_post") for L in range(n_layer)}
        for block in self.blocks:
            for p in block:  # each site costs a pause of the graph: only what the estimate reads
                needed.update((p.input_site, p.pre_norm_site))
                needed.update(p.sites.values() if p.propagated else (p.branch_site,))
        # in graph order, as the engine captures them
        self.sites = [name for name in site_shapes if name in needed]
        self._column_norms: dict[tuple[str, str | None], np.ndarray] = {}
        self.vec_dot_types = {name: vec_dot_type(tensors[name].tensor_type)
                              for block in self.blocks for p in block for name in p.matrices + tuple(p.weights.values())
                              if name in tensors}

    def squared_column_norms(self, name: str, scale: str | None = None) -> np.ndarray:
        """||s * W[:, j]||^2 for every input j of matrix `name`, each output i scaled by s_i, the vector `scale`
        (a post-norm's weight; None: 1), computed once (in float64, a row chunk at a time)."""
        norms = self._column_norms.get((name, scale))
        if norms is None:
            matrix = StoredMatrix(self.tensors[name], self.n_threads)
            factor = None if scale is None else _vector(self.tensors[scale]).astype(np.float64)
            squares = np.zeros(matrix.n_cols, np.float64)
            step = max(1, (16 << 20) // (4 * matrix.n_cols))
            for start in range(0, matrix.n_rows, step):
                stop = min(matrix.n_rows, start + step)
                chunk = matrix.dequantize(start, stop).astype(np.float64)
                if factor is not None:
                    chunk *= factor[start:stop, None]
                squares += np.einsum("ij,ij->j", chunk, chunk)
            norms = self._column_norms[(name, scale)] = squares.astype(np.float32)
        return norms

    def _change(self, p: _Product, errors: dict[int, np.ndarray], rows: dict[str, np.ndarray],
                order: np.ndarray) -> np.ndarray:
        """The estimated norm of the change of the branch's output before any post-norm, per row: for a product
        y = W x with rounding error e of independent components, E||W e||^2 = sum_j e_j^2 ||W[:, j]||^2."""
        def spread(role: str, scale: str | None = None) -> np.ndarray:  # E||s * W e||^2 of the matrix in `role`
            name = p.weights[role]
            return errors[self.vec_dot_types[name]] @ self.squared_column_norms(name, scale)

        def outputs(role: str) -> int:
            return self.tensors[p.weights[role]].shape[1]

        if p.name in ("attn_out", "ffn_down"):
            return np.sqrt(spread("o" if p.name == "attn_out" else "down", p.post_norm))
        if p.name == "attn_in":
            # Each row's v changes by sigma_j per component; z_p = sum_j a_pj v_j changes by sum_j a_pj^2 sigma_j^2
            # per component, and the output projection carries it: E||W_o dz||^2 = that x ||W_o||_F^2. Without
            # the attention weights: sum_j a_pj^2 ~ ||z_p||^2 / mean ||v_j||^2 for values of independent
            # directions (at most 1, and exactly 1 at the first position, which attends to itself only).
            v = rows[p.sites["v"]].reshape(len(order), -1)
            copies = rows[p.sites["z"]][0].size / v.shape[1]
            concentration = np.minimum(1.0, _ratio(_norms(rows[p.sites["z"]]) ** 2,
                                                   copies * _running_mean(_norms(v) ** 2, order)))
            per_component = _running_mean(spread("v") / outputs("v"), order)
            return np.sqrt(concentration * per_component
                           * float(self.squared_column_norms(p.weights["o"], p.post_norm).sum()))
        # ffn_in: gate and up change by sigma_g, sigma_u per neuron; a neuron n = act(g) u then changes by
        # act(g) du + act'(g) u dg = n (du / u + (g act'(g) / act(g)) dg / g), and g act'(g) / act(g) is 1 for
        # the large positive g of the neurons that dominate (SiLU and GELU alike; it is taken as 1: less
        # than 1.3x off from g = 1 on); the down projection carries each neuron's change through its column
        neurons, down = rows[p.sites["post"]], self.squared_column_norms(p.weights["down"], p.post_norm)
        per_neuron = np.zeros_like(neurons)
        for role in ("up", "gate"):
            factor = rows[p.sites[role]]
            ratio = np.divide(neurons, factor, out=np.zeros_like(neurons), where=factor != 0)
            per_neuron += (spread(role) / outputs(role)).astype(np.float32)[:, None] * np.square(ratio)
        per_neuron *= down
        top = np.partition(per_neuron, -TOP_NEURONS, axis=1)[:, -TOP_NEURONS:].astype(np.float64)
        rest = per_neuron.sum(axis=1, dtype=np.float64) - top.sum(axis=1)
        return np.sqrt(np.square(np.sqrt(top).sum(axis=1)) + np.maximum(rest, 0.0))

    def compute(self, rows: dict[str, np.ndarray], positions: list[int]) -> dict[str, np.ndarray]:
        """The map of one prompt from its captured rows (site -> (n_positions, ...)) at `positions`:
        ``rounding`` and ``effect`` (n_layer, n_positions, 4), in `PRODUCTS` order (NaN where a block lacks
        the product), and ``estimate`` (n_layer, n_positions)."""
        order = np.argsort(positions, kind="stable")
        blocks = [self._block(layer, rows, order) for layer in range(self.n_layer)]
        rounding = np.stack([b[0] for b in blocks])
        effect = np.stack([b[1] for b in blocks])
        # the residual stream carries each block's change on: squared changes add up over the blocks
        carried = np.sqrt(np.cumsum([b[2] for b in blocks], axis=0))
        estimate = np.stack([_ratio(c, b[3]) for c, b in zip(carried, blocks)]).astype(np.float32)
        return {"rounding": rounding, "effect": effect, "estimate": estimate}

    def _block(self, layer: int, rows: dict[str, np.ndarray], order: np.ndarray):
        """(rounding, effect) (n_positions, 4), the squared change the block adds to the stream and the norm
        of its output, per row."""
        n_positions = len(order)
        rounding = np.full((n_positions, len(PRODUCTS)), np.nan, np.float32)
        effect = np.full_like(rounding, np.nan)
        added = np.zeros(n_positions, np.float64)
        norms: dict[str, np.ndarray] = {}

        def norm(site: str) -> np.ndarray:
            if site not in norms:
                norms[site] = _norms(rows[site])
            return norms[site]

        out_norm = norm(block_site(layer, "resid_post"))
        for p in self.blocks[layer]:
            k = PRODUCTS.index(p.name)
            x = rows[p.input_site].reshape(n_positions, -1)
            errors = {}  # per vec_dot type: (round(x) - x)^2, exact in float32 (close float32 values)
            for name in p.matrices:
                kind = self.vec_dot_types[name]
                if kind not in errors:
                    rounded = rounded_as_vec_dot(x, kind, name)  # float32 weights: x itself, never to be written
                    error = np.subtract(rounded, x, out=None if np.shares_memory(rounded, x) else rounded)
                    errors[kind] = np.square(error, out=error)
            relative = np.max([_ratio(np.sqrt(e.sum(axis=1, dtype=np.float64)), norm(p.input_site))
                               for e in errors.values()], axis=0)
            rounding[:, k] = relative
            if p.propagated and p.post_norm:  # RMSNorm(y) * s: s * dy / rms(y), s already in the estimate
                rms = norm(p.pre_norm_site) / math.sqrt(rows[p.pre_norm_site][0].size)
                change = _ratio(self._change(p, errors, rows, order), rms)
            elif p.propagated:
                change = self._change(p, errors, rows, order)
            else:  # the input's relative change stands in for the branch's
                change = relative * norm(p.branch_site)
            effect[:, k] = _ratio(change, out_norm)
            added += change ** 2
        return rounding, effect, added, out_norm


def _vector(tensor) -> np.ndarray:
    return np.asarray(dequantize(tensor.read(), tensor.tensor_type), np.float32).reshape(-1)


def _running_mean(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each row, the mean of `values` over the rows at its position and before (in `order`)."""
    out = np.empty_like(values, dtype=np.float64)
    out[order] = np.cumsum(values[order]) / np.arange(1, len(order) + 1)
    return out


def _norms(x: np.ndarray) -> np.ndarray:
    """Row norms (float64 results of float32 sums: the map needs a few digits)."""
    x = x.reshape(x.shape[0], -1)
    return np.sqrt(np.einsum("ij,ij->i", x, x).astype(np.float64))


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b (float64), 0 where a is 0: an all-zero row is not moved."""
    a = np.asarray(a, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=a != 0)
