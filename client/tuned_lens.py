"""The tuned lens (Belrose et al. 2023, arXiv 2303.08112), fitted in numpy on an activation store.

The logit lens decodes hidden state i with the model's final norm and LM head as if it were the last one;
early layers then look like noise, partly because their basis differs from the last layer's. The tuned
lens puts one affine *translator* in front of the head for each hidden state, h -> h + A_i h + b_i (A_i and
b_i start at 0, i.e. at the logit lens), trained to minimise KL(p_final || p_lens): the divergence from the
model's own next-token distribution to what the translated state predicts. The last hidden state needs
no translator (its lens is the model's output).

How it is fitted here, in numpy on the client (no torch):
1. Data: hidden states of many tokens, from an `ActivationStore` (`Client.collect`) or from prompts
   (collected into a temporary store first). Stores of every position leave out each prompt's leading BOS
   (an attention sink whose state is an outlier of huge norm). A held-out share of the tokens
   (`validation`, default 10 %) is kept for choosing among candidates.
2. The head on the client: the final norm's weight and the LM head come from the server (`Client.weights`)
   once, dequantized to float32 (SmolLM2: 49152 x 576, 113 MB), and are checked against the server's own
   unembedding of a few states.
3. Warm start: ridge least squares of the last hidden state on hidden state i (the translator that best
   maps h_i onto h_final in the mean-square sense), for a few ridge strengths; each candidate and the
   identity (the logit lens) is scored by validation KL and the best one starts step 4. This is closed
   form (d x d solves) and does most of the work.
4. Adam on the exact KL gradient, over random minibatches of training tokens, all hidden states stacked in
   one product. Per token, per hidden state and step the cost is two (d x V) products (forward logits,
   backward d logits @ W): 2 * 2 * 576 * 49152 = 113 MFLOP on SmolLM2, so steps and batch are small and the
   validation KL is checked every `eval_every` steps; each translator keeps its best validated parameters
   (so it is never worse than the warm start on the validation tokens).

Gradient (rows are tokens; u = h + h A^T + b; n = u / rms(u) * g; z = n W^T; q = softmax(z)):
dL/dz = (q - p) / N; dn = dz W; dn_hat = dn * g; du = (dn_hat - n_hat * mean(dn_hat * n_hat)) / rms(u);
dA = du^T h; db = sum(du). (The final norm's epsilon is `norm_eps`, 1e-5 for llama-family GGUFs.)
"""
from __future__ import annotations

import json
import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lmscope.proto.tensor_names import OUTPUT_NORM, OUTPUT_NORM_BIAS, head_tensor_name

from .store import ActivationStore

RIDGE_ALPHAS = (1e-2, 1e-1, 1.0)
ROWS_PER_PRODUCT = 1024  # rows of one (rows, V) logits block: 200 MB at V = 49152


@dataclass
class Head:
    """The model's final norm (RMSNorm, or LayerNorm when it has a bias) and LM head, on the client."""

    norm_weight: np.ndarray
    norm_bias: np.ndarray | None
    lm_head: np.ndarray  # (n_vocab, n_embd) float32
    eps: float = 1e-5

    def normalize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n_hat, rms): the normalized rows before the weight, and each row's scale."""
        if self.norm_bias is not None:
            x = x - x.mean(axis=-1, keepdims=True)
        rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(self.eps))
        return x / rms, rms

    def logits(self, x: np.ndarray) -> np.ndarray:
        n_hat, _ = self.normalize(np.asarray(x))
        n = n_hat * self.norm_weight + (self.norm_bias if self.norm_bias is not None else 0)
        return n @ self.lm_head.T


@dataclass
class Targets:
    """The final distributions of some tokens: p (n, V) and sum(p log p) per row (minus their entropy)."""

    p: np.ndarray
    p_log_p: np.ndarray

    def __getitem__(self, rows) -> "Targets":
        return Targets(self.p[rows], self.p_log_p[rows])


def _shift(z: np.ndarray) -> np.ndarray:
    """z -= rowwise max, in place; returns log(sum(exp(z))) per row (the passes over (n, V) dominate)."""
    z -= z.max(axis=-1, keepdims=True)
    return np.log(np.exp(z).sum(axis=-1))


def final_targets(head: Head, final: np.ndarray) -> Targets:
    parts_p, parts_plogp = [], []
    for s in range(0, len(final), ROWS_PER_PRODUCT):
        z = head.logits(final[s:s + ROWS_PER_PRODUCT])
        z -= z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        total = p.sum(axis=-1)
        p /= total[:, None]
        parts_p.append(p)
        parts_plogp.append(np.einsum("ij,ij->i", p, z) - np.log(total))
    if not parts_p:
        return Targets(np.zeros((0, head.lm_head.shape[0]), np.float32), np.zeros(0, np.float32))
    return Targets(np.concatenate(parts_p), np.concatenate(parts_plogp))


def kl_rows(targets: Targets, z: np.ndarray) -> np.ndarray:
    """KL(p || softmax(z)) per row, in nats (z is shifted in place)."""
    lse = _shift(z)
    return targets.p_log_p - (np.einsum("ij,ij->i", targets.p, z) - lse)


@dataclass
class TunedLens:
    """One affine translator per hidden state: h -> h + h @ A[i].T + b[i] before the final norm and head.

    Keys are hidden-state indices as everywhere in lmscope: 0 = embed, L + 1 = the output of block L; a
    missing index is the identity (the logit lens). `c.logit_lens(prompt, lens=tuned)` applies it.
    training: how it was fitted (tokens, steps, seconds, validation KL per hidden state).
    """

    matrices: dict[int, np.ndarray]
    biases: dict[int, np.ndarray]
    model: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def affine(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{i: (I + A_i, b_i)}: the maps `logit_lens(affine=...)` applies (h -> h @ M.T + b)."""
        return {i: (np.eye(a.shape[0], dtype=np.float32) + a, self.biases[i]) for i, a in self.matrices.items()}

    def translate(self, i: int, states: np.ndarray) -> np.ndarray:
        """Hidden state i's rows (..., n_embd) through its translator."""
        states = np.asarray(states, np.float32)
        if i not in self.matrices:
            return states
        return states + states @ self.matrices[i].T + self.biases[i]

    def save(self, path) -> pathlib.Path:
        """One .npz file (numpy only): A_<i>, b_<i> and a JSON `meta` entry (model, training)."""
        path = pathlib.Path(path)
        arrays = {f"A_{i}": a for i, a in self.matrices.items()} | {f"b_{i}": b for i, b in self.biases.items()}
        meta = json.dumps({"format": "lmscope-tuned-lens", "version": 1, "model": self.model,
                           "training": self.training})
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(meta), **arrays)
        return path

    @classmethod
    def load(cls, path) -> "TunedLens":
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != "lmscope-tuned-lens":
                raise ValueError(f"{path} is not a tuned lens saved by lmscope")
            matrices = {int(k[2:]): data[k] for k in data.files if k.startswith("A_")}
            biases = {int(k[2:]): data[k] for k in data.files if k.startswith("b_")}
        return cls(matrices=matrices, biases=biases, model=meta["model"], training=meta["training"])

    def __repr__(self) -> str:
        fitted = sorted(self.matrices)
        return (f"TunedLens({len(fitted)} translators for hidden states {fitted[:3]}...{fitted[-1:]}, model "
                f"{self.model.get('name')!r}, {self.training.get('n_train_tokens')} training tokens, "
                f"{self.training.get('seconds', 0):.0f} s)")


# ----- data ---------------------------------------------------------------------------------------------

def store_states(store: ActivationStore) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """({hidden-state index: (n_tokens, d) float32}, final (n_tokens, d)) from a store's resid_post/embed
    sites; for every-position stores each prompt's leading BOS row is left out."""
    n_layer = store.model["n_layer"]
    sites = store.layer_sites()
    last = n_layer - 1
    if last not in sites:
        raise ValueError(f"the store lacks the last block's output (blocks.{last}.resid_post), the lens's target; "
                         f"collect with sites='blocks.*.resid_post'")
    keep = _rows_to_keep(store)

    def rows(site: str) -> np.ndarray:
        array = store[site]
        flat = array.reshape(-1, array.shape[-1]) if not store.ragged else array
        return np.asarray(flat[keep] if keep is not None else flat, dtype=np.float32)

    states = {(0 if key == "embed" else key + 1): rows(site) for key, site in sites.items() if key != last}
    return states, rows(sites[last])


def _rows_to_keep(store: ActivationStore) -> np.ndarray | None:
    if not store.ragged:
        return None
    offsets = store.token_offsets
    tokens = store.tokens
    bos = store.model.get("bos_token_id")
    keep = np.ones(store.n_tokens, bool)
    starts = offsets[:-1][np.diff(offsets) > 1]
    keep[starts[tokens[starts] == bos]] = False
    return np.flatnonzero(keep)


# ----- evaluation ---------------------------------------------------------------------------------------

def mean_kl(head: Head, states: np.ndarray, targets: Targets, matrix=None, bias=None) -> float:
    """Mean over rows of KL(p || lens(translated states))."""
    total = 0.0
    for s in range(0, len(states), ROWS_PER_PRODUCT):
        h = states[s:s + ROWS_PER_PRODUCT]
        if matrix is not None:
            h = h + h @ matrix.T + bias
        total += float(kl_rows(targets[s:s + ROWS_PER_PRODUCT], head.logits(h)).sum())
    return total / max(len(states), 1)


def evaluate(head: Head, states: dict[int, np.ndarray], final: np.ndarray,
             lens: TunedLens | None = None) -> dict[int, tuple[float, float]]:
    """{hidden-state index: (mean KL of the logit lens, mean KL of the tuned lens)} to the final distribution."""
    targets = final_targets(head, final)
    out = {}
    for i, h in sorted(states.items()):
        logit = mean_kl(head, h, targets)
        tuned = logit if lens is None or i not in lens.matrices else \
            mean_kl(head, h, targets, lens.matrices[i], lens.biases[i])
        out[i] = (logit, tuned)
    return out


# ----- fitting ------------------------------------------------------------------------------------------

def _ridge_candidates(h: np.ndarray, target: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A, b) with h + h A^T + b ~ target, ridge on A (toward 0, the logit lens) at each RIDGE_ALPHAS."""
    mean_h, mean_t = h.mean(axis=0), target.mean(axis=0)
    x = (h - mean_h).astype(np.float64)
    residual = (target - h - (mean_t - mean_h)).astype(np.float64)
    gram = x.T @ x
    cross = x.T @ residual
    scale = np.trace(gram) / len(gram)
    eigenvalues, vectors = np.linalg.eigh(gram)
    rotated = vectors.T @ cross
    out = []
    for alpha in RIDGE_ALPHAS:
        a_t = vectors @ (rotated / (eigenvalues + alpha * scale)[:, None])  # (d, d) = A^T
        a = a_t.T.astype(np.float32)
        b = (mean_t - mean_h - mean_h @ a_t).astype(np.float32)
        out.append((a, b))
    return out


def kl_gradients(head: Head, hs: list[np.ndarray], params: list[list[np.ndarray]], p: np.ndarray):
    """[(dA, db)] of mean KL(p || lens(h + h A^T + b)) for each (h, [A, b]) pair, all in one product."""
    n = len(p)
    u = np.concatenate([h + h @ a.T + b for h, (a, b) in zip(hs, params)])
    n_hat, rms = head.normalize(u)
    normed = n_hat * head.norm_weight + (head.norm_bias if head.norm_bias is not None else 0)
    z = normed @ head.lm_head.T
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)  # q
    z -= np.tile(p, (len(hs), 1))
    z /= n  # dL/dz = (q - p) / n
    dn_hat = (z @ head.lm_head) * head.norm_weight
    du = (dn_hat - n_hat * np.mean(dn_hat * n_hat, axis=-1, keepdims=True)) / rms
    if head.norm_bias is not None:
        du -= du.mean(axis=-1, keepdims=True)
    return [(du[k * n:(k + 1) * n].T @ h, du[k * n:(k + 1) * n].sum(axis=0)) for k, h in enumerate(hs)]


class _Adam:
    def __init__(self, shapes: list[tuple], lr: list[float], betas=(0.9, 0.999), eps=1e-8):
        self.m = [np.zeros(s, np.float32) for s in shapes]
        self.v = [np.zeros(s, np.float32) for s in shapes]
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v, lr in zip(params, grads, self.m, self.v, self.lr):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= lr * (m / (1 - b1 ** self.t)) / (np.sqrt(v / (1 - b2 ** self.t)) + self.eps)


def fit(head: Head, states: dict[int, np.ndarray], final: np.ndarray, *, steps: int = 40, batch_tokens: int = 32,
        lr: float = 1e-3, validation: float = 0.1, eval_every: int = 20, seed: int = 0, progress: bool = True,
        model: dict | None = None) -> TunedLens:
    """Fit one translator per hidden state in `states` (see the module docstring). Returns a `TunedLens`."""
    from .progress import progress_bar

    start = time.perf_counter()
    n = len(final)
    if n < 4:
        raise ValueError(f"need at least 4 tokens to fit a tuned lens, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * validation))) if validation > 0 else 0
    val, train = order[:n_val], order[n_val:]
    layers = sorted(states)
    d = final.shape[1]
    targets_val = final_targets(head, final[val]) if n_val else None
    logit_val = {}
    params: dict[int, list[np.ndarray]] = {}
    best: dict[int, tuple[float, list[np.ndarray]]] = {}

    def val_kl(i: int, a: np.ndarray, b: np.ndarray) -> float:
        return mean_kl(head, states[i][val], targets_val, a, b) if n_val else float("nan")

    total = len(layers) + steps
    with progress_bar(total, enabled=progress, desc="tuned lens") as bar:
        for i in layers:  # warm start: pick the identity or a ridge solution by validation KL
            zero = [np.zeros((d, d), np.float32), np.zeros(d, np.float32)]
            logit_val[i] = val_kl(i, *zero)
            candidates = [zero] + [list(c) for c in _ridge_candidates(states[i][train], final[train])]
            scored = [(val_kl(i, *c), c) for c in candidates[1:]] if n_val else [(0.0, candidates[1])]
            scored.append((logit_val[i], zero))
            best[i] = min(scored, key=lambda item: item[0])
            params[i] = [best[i][1][0].copy(), best[i][1][1].copy()]
            bar.update(1)
        warm_val = {i: best[i][0] for i in layers}
        scales = {i: float(np.sqrt(np.mean(states[i][train] ** 2))) for i in layers}
        optimizers = {i: _Adam([(d, d), (d,)], [lr, lr * scales[i]]) for i in layers}
        for step in range(1, steps + 1):
            rows = train[rng.choice(len(train), size=min(batch_tokens, len(train)), replace=False)]
            p = final_targets(head, final[rows]).p
            group_size = max(1, ROWS_PER_PRODUCT // len(rows))
            for group_start in range(0, len(layers), group_size):
                group = layers[group_start:group_start + group_size]
                hs = [states[i][rows] for i in group]
                grads = kl_gradients(head, hs, [params[i] for i in group], p)
                for i, grad in zip(group, grads):
                    optimizers[i].step(params[i], grad)
            if n_val and (step % eval_every == 0 or step == steps):
                for i in layers:
                    score = val_kl(i, *params[i])
                    if score < best[i][0]:
                        best[i] = (score, [params[i][0].copy(), params[i][1].copy()])
            bar.update(1)
    if not n_val:
        best = {i: (float("nan"), params[i]) for i in layers}
    training = {"n_tokens": n, "n_train_tokens": int(len(train)), "n_validation_tokens": int(n_val),
                "steps": steps, "batch_tokens": batch_tokens, "lr": lr, "seed": seed,
                "seconds": time.perf_counter() - start,
                "validation_kl": {str(i): {"logit_lens": logit_val[i], "warm_start": warm_val[i],
                                           "tuned_lens": best[i][0]} for i in layers}}
    return TunedLens(matrices={i: best[i][1][0] for i in layers}, biases={i: best[i][1][1] for i in layers},
                     model=dict(model or {}), training=training)


# ----- the client's part ----------------------------------------------------------------------------------

class TunedLensMixin:
    """`fit_tuned_lens` and `lens_head` (needs `CoreClient` and `StoreMixin`)."""

    def lens_head(self, norm_eps: float = 1e-5, check: np.ndarray | None = None) -> Head:
        """The final norm and LM head as float32 arrays on the client (`Client.weights`), cached.

        check: a few residual vectors whose client-side logits must match the server's `unembed` (a model
        whose head is not norm + matmul, e.g. with logit soft-capping, fails here with a clear error).
        """
        from .core import LmscopeError

        cached = getattr(self, "_lens_head", None)
        if cached is None or cached.eps != norm_eps:
            info = self.model_info()
            weight = self.weights(OUTPUT_NORM)
            try:
                bias = self.weights(OUTPUT_NORM_BIAS)
            except LmscopeError:
                bias = None
            head = self.weights(head_tensor_name(info.tied_embeddings))
            cached = Head(weight.astype(np.float32), None if bias is None else bias.astype(np.float32),
                          np.ascontiguousarray(head, dtype=np.float32), norm_eps)
            self._lens_head = cached
        if check is not None:
            check = np.asarray(check, np.float32)
            ours, theirs = cached.logits(check), self.unembed(check)
            spread = float(theirs.max() - theirs.min())
            if not np.abs(ours - theirs).max() <= 0.02 * spread:
                raise ValueError(f"the client-side final norm + LM head differ from the server's unembedding by "
                                 f"{np.abs(ours - theirs).max():.3g} (logit range {spread:.3g}); this model's head "
                                 f"is not a plain norm + matmul, so a tuned lens cannot be fitted on the client")
        return cached

    def fit_tuned_lens(self, data, *, steps: int = 40, batch_tokens: int = 32, lr: float = 1e-3,
                       validation: float = 0.1, eval_every: int = 20, seed: int = 0, norm_eps: float = 1e-5,
                       positions: Sequence[int] | None = None, batch_size: int | None = None,
                       progress: bool = True) -> TunedLens:
        """Fit a tuned lens (arXiv 2303.08112) on an `ActivationStore` or on prompts.

        data: a store holding blocks.*.resid_post (embed too, for hidden state 0) of this model, or
            prompts: these are collected first (embed + every block output, at `positions`, default every
            position) into a temporary store that is deleted afterwards.
        steps / batch_tokens / lr: Adam on the exact KL gradient after the least-squares warm start.
        validation: the share of tokens held out to choose each translator's parameters.
        See the module docstring for the method and its cost.
        """
        if isinstance(data, ActivationStore):
            return self._fit_tuned_lens_on(data, steps=steps, batch_tokens=batch_tokens, lr=lr,
                                           validation=validation, eval_every=eval_every, seed=seed,
                                           norm_eps=norm_eps, progress=progress)
        with tempfile.TemporaryDirectory(prefix="lmscope-tuned-lens-") as directory:
            store = self.collect(list(data), directory, sites=["embed", "blocks.*.resid_post"], positions=positions,
                                 dtype="float16", batch_size=batch_size, progress=progress)
            return self._fit_tuned_lens_on(store, steps=steps, batch_tokens=batch_tokens, lr=lr,
                                           validation=validation, eval_every=eval_every, seed=seed,
                                           norm_eps=norm_eps, progress=progress)

    def _fit_tuned_lens_on(self, store: ActivationStore, *, norm_eps: float, **options) -> TunedLens:
        info = self.model_info()
        store.check_model(info.fingerprint)
        states, final = store_states(store)
        head = self.lens_head(norm_eps, check=final[:4])
        model = {"fingerprint": info.fingerprint, "name": info.name, "n_layer": info.n_layer, "n_embd": info.n_embd}
        return fit(head, states, final, model=model, **options)
