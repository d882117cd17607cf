"""Sparse autoencoders (SAEs): features of one site, fitted on CPU from an activation store, in numpy.

An SAE rewrites a site's activation x (d_in wide) as a sparse, non-negative combination of many more
directions (d_sae "features"): ``z = encode(x)``, ``x_hat = b_dec + z @ W_dec``, with each row of ``W_dec``
a unit vector, so ``z[f]`` is how much of feature f's direction the model wrote there.

Architecture: TopK (Gao et al., "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).
``z = TopK_k(relu((x - b_dec) @ W_enc + b_enc))``: only the k largest pre-activations survive. Against the
ReLU SAE with an L1 penalty (Anthropic's "Towards Monosemanticity", the SAELens "standard" architecture):
- the sparsity is set directly (L0 = k, at most), instead of tuned through an L1 coefficient whose L0 is
  known only after the fit;
- no L1 term pulls the surviving activations towards zero, so there is no shrinkage to correct afterwards;
- dead features are revived by the auxiliary loss (AuxK below) rather than by resampling heuristics.
JumpReLU (Gemma Scope) also avoids shrinkage, but fits its thresholds with straight-through estimators and an
L0 penalty to tune; TopK has one knob, k. Loading (`load`) accepts all three, so SAEs trained elsewhere run.

Fitting (`fit_topk`): the rows of one site from an `ActivationStore` (each prompt's first token left out: it
is the attention sink, its norm an outlier by orders of magnitude; `lmscope.client.sae_analysis`), scaled so
their mean norm is sqrt(d_in) (the "expected_average_only_in" normalization of SAELens; the scale is folded
back into the weights when the fit ends, so the saved SAE reads raw activations and its feature activations
are in the site's own units). Mean squared error plus AuxK (alpha = 1/32, k_aux = d_in / 2 of the features
dead for `dead_after` tokens, fitted to the residual error), Adam (eps 6.25e-10 as in the paper), a linear
warm-up and a linear decay over the last fifth, decoder rows kept at unit norm with the gradient's component
along them removed, the encoder initialised as the decoder's transpose and b_dec as the data mean. The
backward pass is sparse (scipy.sparse): only the k selected features of each row get gradients, so a step
costs about one dense product of the batch with W_enc.

Determinism and resuming. The initial weights come from `seed`; epoch e visits the rows in the order of
``default_rng([seed, e])``, so the order never depends on where a fit started. Every `checkpoint_every` steps
the whole state (weights, Adam moments, step, the dead-feature counters) goes to one ``.npz`` file, written
atomically; a fit with the same settings on the same data resumes from it and ends with the same bytes as an
uninterrupted fit (tests/unit/test_sae_offline.py). A checkpoint of other settings or data is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import sae_io

ARCHITECTURES = ("topk", "standard", "jumprelu")


class SaeMismatchError(ValueError):
    """An SAE used with a model or site it was not fitted for."""


def _same_model_name(trained_on: str, served: str) -> bool:
    """Does a model name from elsewhere ("google/gemma-2-2b", "HuggingFaceTB/SmolLM2-135M-Instruct") name the
    served GGUF ("Gemma 2 2b", "Smollm2 135M 8k Lc100K Mix1 Ep2")? Its family (first word, after any
    organization) and its sizes ("2b", "135m") must all be words of the served name; GGUF names drop or add
    other words (Instruct, training tags) too freely to ask for more."""
    words = re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", trained_on.lower().rsplit("/", 1)[-1])
    served_words = set(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", served.lower()))
    served_words |= {w for word in served_words for w in word.split(".")}
    if not words:
        return False
    sizes = [w for w in words if re.fullmatch(r"[0-9]+(\.[0-9]+)?[bm]", w)]
    return words[0] in served_words and all(size in served_words for size in sizes)


@dataclass
class SparseAutoencoder:
    """One SAE of one site: weights in SAELens' shapes, and where it belongs.

    W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,); `architecture` "topk" (k),
    "standard" (ReLU) or "jumprelu" (threshold (d_sae,)). `site`: the lmscope site it reads. `model`: what is
    known of the model ({"name", "n_embd"} and, for SAEs fitted here, "fingerprint"). `info`: the fit's
    settings and measurements (saved with it).
    """
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    site: str
    architecture: str = "topk"
    k: int | None = None
    threshold: np.ndarray | None = None
    apply_b_dec_to_input: bool = True
    model: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAE architecture {self.architecture!r}; lmscope runs {ARCHITECTURES}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32))
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}; with W_enc {self.W_enc.shape} it "
                                 f"must be {shape}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise ValueError(f"a topk SAE needs 0 < k <= d_sae ({d_sae}), got k={self.k}")
        if self.architecture == "jumprelu":
            if self.threshold is None or np.shape(self.threshold) != (d_sae,):
                raise ValueError(f"a jumprelu SAE needs a threshold of shape ({d_sae},)")
            self.threshold = np.asarray(self.threshold, dtype=np.float32)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    # ----- the map ------------------------------------------------------------------------------------

    def _rows(self, x) -> tuple[np.ndarray, tuple[int, ...]]:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.d_in:
            raise SaeMismatchError(f"activations of width {x.shape[-1]}; this SAE of {self.site} reads width "
                                   f"{self.d_in}")
        return x.reshape(-1, self.d_in), x.shape[:-1]

    def pre_activations(self, x) -> np.ndarray:
        rows, lead = self._rows(x)
        centred = rows - self.b_dec if self.apply_b_dec_to_input else rows
        return (centred @ self.W_enc + self.b_enc).reshape(lead + (self.d_sae,))

    def encode_sparse(self, x, chunk: int = 4096):
        """Feature activations of rows x (..., d_in) as a scipy CSR matrix (n_rows, d_sae), in chunks."""
        from scipy import sparse

        rows, _ = self._rows(x)
        parts = []
        for start in range(0, len(rows), chunk):
            pre = self.pre_activations(rows[start:start + chunk])
            parts.append(self._activate_sparse(pre))
        if not parts:
            return sparse.csr_matrix((0, self.d_sae), dtype=np.float32)
        return sparse.vstack(parts, format="csr")

    def _activate_sparse(self, pre: np.ndarray):
        from scipy import sparse

        n = len(pre)
        if self.architecture == "topk":
            top = np.argpartition(-pre, self.k - 1, axis=1)[:, :self.k]
            values = np.maximum(np.take_along_axis(pre, top, axis=1), 0)
            keep = values > 0
            return sparse.csr_matrix((values[keep], (np.nonzero(keep)[0], top[keep])), shape=(n, self.d_sae))
        if self.architecture == "standard":
            dense = np.maximum(pre, 0)
        else:
            dense = np.where(pre > self.threshold, pre, 0).astype(np.float32)
        return sparse.csr_matrix(dense)

    def encode(self, x) -> np.ndarray:
        """Feature activations (..., d_sae) of activations (..., d_in), e.g. ``sae.encode(run.captures[site])``."""
        rows, lead = self._rows(x)
        return self.encode_sparse(rows).toarray().reshape(lead + (self.d_sae,))

    def decode(self, z) -> np.ndarray:
        """The reconstruction b_dec + z @ W_dec of feature activations z (..., d_sae) (dense or sparse)."""
        if hasattr(z, "tocsr"):
            return np.asarray(z @ self.W_dec, dtype=np.float32) + self.b_dec
        z = np.asarray(z, dtype=np.float32)
        return z @ self.W_dec + self.b_dec

    def reconstruct(self, x) -> np.ndarray:
        rows, lead = self._rows(x)
        return self.decode(self.encode_sparse(rows)).reshape(lead + (self.d_in,))

    def direction(self, feature: int) -> np.ndarray:
        """Feature `feature`'s decoder direction (d_in,): what one unit of its activation adds."""
        return self.W_dec[self._feature(feature)].copy()

    def _feature(self, feature) -> int:
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < self.d_sae:
            raise IndexError(f"feature {feature!r} is outside this SAE's {self.d_sae} features")
        return int(feature)

    def steering(self, feature: int, scale: float):
        """An ADD intervention of ``scale`` x the feature's decoder direction at this SAE's site, every position
        (generated tokens included): ``c.generate(prompt, interventions=[sae.steering(f, 8.0)])``.
        `scale` is in the feature's activation units (see its activation histogram for typical values)."""
        from .interventions import Intervention

        return Intervention("add", [self.site], float(scale) * self.W_dec[self._feature(feature)])

    # ----- measurements -------------------------------------------------------------------------------

    def evaluate(self, x, chunk: int = 4096) -> "SaeScores":
        """Fraction of variance explained, mean L0 and dead features of this SAE on rows x (n, d_in)."""
        rows, _ = self._rows(x)
        if len(rows) == 0:
            raise ValueError("no rows to evaluate on")
        mean = rows.mean(axis=0, dtype=np.float64)
        error = total = 0.0
        l0 = 0
        fired = np.zeros(self.d_sae, dtype=bool)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            codes = self.encode_sparse(part)
            recon = self.decode(codes)
            error += float(np.square(recon - part, dtype=np.float64).sum())
            total += float(np.square(part - mean).sum())
            l0 += codes.nnz
            fired[np.unique(codes.indices)] = True
        return SaeScores(fve=1.0 - error / total, l0=l0 / len(rows), dead_fraction=float(1 - fired.mean()),
                         n_rows=len(rows))

    # ----- models and sites ---------------------------------------------------------------------------

    def check_model(self, info, site: str | None = None) -> None:
        """Refuse (`SaeMismatchError`) a server model this SAE was not fitted for, or another site.

        With a fingerprint (SAEs fitted by lmscope) the GGUF file must be the same; without one (SAEs trained
        elsewhere: SAELens records a model name such as "gemma-2-2b") the name must match (`_same_model_name`).
        Either way the width (n_embd, or n_ff for mlp.post) and the block must exist in the served model."""
        if site is not None and site != self.site:
            raise SaeMismatchError(f"this SAE reads {self.site}, not {site}")
        fingerprint = self.model.get("fingerprint")
        if fingerprint:
            if fingerprint != info.fingerprint:
                raise SaeMismatchError(f"this SAE was fitted on model {fingerprint[:12]} ({self.model.get('name')}); "
                                       f"the server holds {info.fingerprint[:12]} ({info.name})")
        else:
            if not _same_model_name(self.model.get("name", ""), info.name):
                raise SaeMismatchError(f"this SAE was trained on {self.model.get('name')!r}; the server holds "
                                       f"{info.name!r}. Serve that model's GGUF (or, if it is the same model under "
                                       f"another name, set sae.model['name'] = {info.name!r})")
        width, dimension = (info.n_ff, "n_ff") if self.site.endswith("mlp.post") else (info.n_embd, "n_embd")
        if self.d_in != width:
            raise SaeMismatchError(f"this SAE reads width {self.d_in}; {info.name} has {dimension} {width}")
        if self.site != "embed" and int(self.site.split(".")[1]) >= info.n_layer:
            raise SaeMismatchError(f"this SAE reads {self.site}; {info.name} has {info.n_layer} blocks")

    # ----- SAELens layout -----------------------------------------------------------------------------

    def save(self, directory) -> pathlib.Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens' layout; see `lmscope.client.sae_io`)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        sae_io.write_safetensors(directory / sae_io.WEIGHTS, tensors)
        hook = sae_io.site_to_hook(self.site)
        metadata = {"model_name": self.model.get("name", ""), "hook_name": hook, "hook_head_index": None,
                    "dataset_path": self.info.get("store", "")}
        config = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
                  "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
                  "normalize_activations": "none", "metadata": metadata,
                  # the fields older SAELens versions read at the top level
                  "model_name": metadata["model_name"], "hook_name": hook, "hook_layer": sae_io.hook_layer(self.site),
                  "activation_fn_str": "topk" if self.architecture == "topk" else "relu",
                  "lmscope": {"site": self.site, "model": self.model, "info": self.info}}
        if self.architecture == "topk":
            config["k"] = self.k
            config["activation_fn_kwargs"] = {"k": self.k}
        sae_io.write_config(directory, config)
        return directory

    @classmethod
    def load(cls, directory) -> "SparseAutoencoder":
        """An SAE from a directory in SAELens' layout (written by `save`, by SAELens, or converted from
        Gemma Scope / Llama Scope by SAELens' loaders)."""
        directory = pathlib.Path(directory)
        config = sae_io.read_config(directory)
        if not (directory / sae_io.WEIGHTS).exists():
            raise FileNotFoundError(f"{directory} has {sae_io.CONFIG} but no {sae_io.WEIGHTS}")
        tensors, _ = sae_io.read_safetensors(directory / sae_io.WEIGHTS)
        missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
        if missing:
            raise ValueError(f"{directory / sae_io.WEIGHTS} lacks {missing}; it holds {sorted(tensors)}")
        if config.get("normalize_activations", "none") not in ("none", None):
            raise ValueError(f"{directory}: normalize_activations={config['normalize_activations']!r} needs a "
                             f"scale that is not in the file; fold it into the weights first")
        architecture = config.get("architecture", "standard")
        activation = config.get("activation_fn_str")
        if architecture == "standard" and activation == "topk":  # older SAELens: topk as an activation
            architecture = "topk"
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{directory}: architecture {architecture!r}; lmscope runs {ARCHITECTURES}")
        k = config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k")
        metadata = config.get("metadata") or {}
        ours = config.get("lmscope") or {}
        hook = metadata.get("hook_name") or config.get("hook_name")
        site = ours.get("site") or sae_io.hook_to_site(hook)
        model = ours.get("model") or {"name": metadata.get("model_name") or config.get("model_name", "")}
        return cls(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
                   site=site, architecture=architecture, k=int(k) if k else None,
                   threshold=tensors.get("threshold"),
                   apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)), model=model,
                   info=ours.get("info", {}))

    def __repr__(self) -> str:
        sparsity = f"k={self.k}" if self.architecture == "topk" else self.architecture
        return (f"SparseAutoencoder({self.site}: {self.d_in} -> {self.d_sae} features, {sparsity}, "
                f"model {self.model.get('name')!r})")


@dataclass
class SaeScores:
    """fve: fraction of variance explained, 1 - sum |x - x_hat|^2 / sum |x - mean x|^2. l0: mean number of
    active features per row. dead_fraction: features that fired on none of the rows."""
    fve: float
    l0: float
    dead_fraction: float
    n_rows: int


# ----- fitting --------------------------------------------------------------------------------------------

@dataclass
class FitSettings:
    """What a TopK fit does. n_features: d_sae. k: active features per row. epochs: passes over the rows.
    batch_size: rows per step. lr: Adam's learning rate (for inputs scaled to norm sqrt(d_in)). aux_alpha and
    dead_after (tokens without firing before a feature counts as dead): AuxK. warmup_steps; the last
    `decay_fraction` of the steps decay the rate linearly to 0. seed: initial weights and data order."""
    n_features: int
    k: int
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    aux_alpha: float = 1 / 32
    dead_after: int = 20_000
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    seed: int = 0

    def check(self, d_in: int) -> None:
        if not 0 < self.k <= self.n_features:
            raise ValueError(f"k must be in 1..n_features ({self.n_features}), not {self.k}")
        if self.n_features < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"n_features, epochs and batch_size must be >= 1 and lr > 0: {self}")


def _data_fingerprint(rows: np.ndarray) -> str:
    """A cheap identity of the training rows (shape, and a strided sample of them), to refuse resuming a
    checkpoint on other data."""
    digest = hashlib.sha256(str(rows.shape).encode())
    step = max(1, len(rows) // 257)
    digest.update(np.ascontiguousarray(rows[::step]).tobytes())
    return digest.hexdigest()[:16]


class _Adam:
    def __init__(self, shapes: dict[str, tuple], lr: float):
        self.lr, self.b1, self.b2, self.eps = lr, 0.9, 0.999, 6.25e-10
        self.m = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        self.v = {n: np.zeros(s, np.float32) for n, s in shapes.items()}

    def update(self, params: dict, grads: dict, step: int, lr: float) -> None:
        c1, c2 = 1 - self.b1 ** step, 1 - self.b2 ** step
        for name, g in grads.items():
            m, v = self.m[name], self.v[name]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            np.square(g, out=g)
            v += (1 - self.b2) * g
            np.sqrt(v / c2, out=g)
            g += self.eps
            np.divide(m, g, out=g)
            g *= lr / c1
            params[name] -= g


class _TopKFit:
    """The training state of one fit (weights in normalized units, Adam, counters); see the module docstring."""

    def __init__(self, settings: FitSettings, d_in: int, scale: float, mean: np.ndarray):
        self.settings, self.scale = settings, scale
        rng = np.random.default_rng(settings.seed)
        w_dec = rng.standard_normal((settings.n_features, d_in)).astype(np.float32)
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        self.params = {"W_enc_T": w_dec.copy(), "b_enc": np.zeros(settings.n_features, np.float32),
                       "W_dec": w_dec, "b_dec": (mean * scale).astype(np.float32)}
        self.adam = _Adam({n: p.shape for n, p in self.params.items()}, settings.lr)
        self.since_fired = np.zeros(settings.n_features, np.int64)
        self.step = 0

    def lr_at(self, step: int, total: int) -> float:
        s = self.settings
        rate = s.lr * min(1.0, step / max(1, s.warmup_steps))
        decay_start = int(total * (1 - s.decay_fraction))
        if step > decay_start and total > decay_start:
            rate *= max(0.0, (total - step) / (total - decay_start))
        return rate

    def train_step(self, x: np.ndarray, total_steps: int) -> dict:
        from scipy import sparse

        p, s = self.params, self.settings
        n, d_in = x.shape
        n_features, k = s.n_features, s.k
        centred = x - p["b_dec"]
        pre = centred @ p["W_enc_T"].T + p["b_enc"]
        top = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(pre, top, axis=1)
        acts = np.maximum(values, 0)
        rows = np.repeat(np.arange(n), k)
        codes = sparse.csr_matrix((acts.ravel(), (rows, top.ravel())), shape=(n, n_features))
        recon = np.asarray(codes @ p["W_dec"]) + p["b_dec"]
        error = recon - x
        mse = float(np.square(error).sum() / n)

        fired = np.zeros(n_features, dtype=bool)
        fired[top[acts > 0]] = True
        self.since_fired += n
        self.since_fired[fired] = 0

        grad_recon = (2.0 / n) * error                                   # d loss / d recon, (n, d_in)
        grad_rows, grad_cols, grad_vals = [rows], [top.ravel()], []
        grad_acts = np.einsum("nd,nkd->nk", grad_recon, p["W_dec"][top])
        grad_vals.append((grad_acts * (values > 0)).ravel())
        grad_w_dec = np.asarray(codes.T @ grad_recon)
        grad_b_dec = grad_recon.sum(axis=0)

        dead = np.flatnonzero(self.since_fired > s.dead_after)
        aux = 0.0
        if len(dead) and s.aux_alpha > 0:
            k_aux = min(d_in // 2, len(dead))
            pre_dead = pre[:, dead]
            pick = np.argpartition(-pre_dead, k_aux - 1, axis=1)[:, :k_aux]
            aux_values = np.take_along_axis(pre_dead, pick, axis=1)
            aux_acts = np.maximum(aux_values, 0)
            aux_rows = np.repeat(np.arange(n), k_aux)
            aux_codes = sparse.csr_matrix((aux_acts.ravel(), (aux_rows, pick.ravel())), shape=(n, len(dead)))
            w_dead = p["W_dec"][dead]
            aux_error = np.asarray(aux_codes @ w_dead) + error   # predicted residual - (x - recon), residual fixed
            aux = float(np.square(aux_error).sum() / n)
            grad_aux = (2.0 * s.aux_alpha / n) * aux_error
            grad_w_dec[dead] += np.asarray(aux_codes.T @ grad_aux)
            # dense here: k_aux (up to d_in / 2) rows per token would gather a (batch, k_aux, d_in) block
            aux_grad_acts = np.take_along_axis(grad_aux @ w_dead.T, pick, axis=1)
            grad_rows.append(aux_rows)
            grad_cols.append(dead[pick.ravel()])
            grad_vals.append((aux_grad_acts * (aux_values > 0)).ravel())

        # d loss / d pre: nonzero only at the selected features (duplicates, main and aux, are summed)
        grad_pre = sparse.csr_matrix((np.concatenate(grad_vals), (np.concatenate(grad_rows),
                                                                  np.concatenate(grad_cols))),
                                     shape=(n, n_features))
        grad_w_enc_t = np.asarray(grad_pre.T @ centred)
        grad_b_enc = np.asarray(grad_pre.sum(axis=0)).ravel()
        grad_b_dec -= grad_b_enc @ p["W_enc_T"]
        # keep decoder rows on the unit sphere: drop the gradient's radial part, renormalize after the step
        grad_w_dec -= np.einsum("fd,fd->f", grad_w_dec, p["W_dec"])[:, None] * p["W_dec"]

        self.step += 1
        grads = {"W_enc_T": grad_w_enc_t.astype(np.float32), "b_enc": grad_b_enc.astype(np.float32),
                 "W_dec": grad_w_dec.astype(np.float32), "b_dec": grad_b_dec.astype(np.float32)}
        self.adam.update(p, grads, self.step, self.lr_at(self.step, total_steps))
        p["W_dec"] /= np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
        variance = float(np.square(x - x.mean(axis=0)).sum() / n)
        return {"mse": mse, "aux": aux, "fve": 1 - mse / variance if variance else float("nan"),
                "dead": len(dead) / n_features}

    # checkpoints
    def state(self) -> dict:
        out = {f"param.{n}": a for n, a in self.params.items()}
        out.update({f"adam_m.{n}": a for n, a in self.adam.m.items()})
        out.update({f"adam_v.{n}": a for n, a in self.adam.v.items()})
        out.update(since_fired=self.since_fired, step=np.int64(self.step))
        return out

    def restore(self, state) -> None:
        for name in self.params:
            self.params[name] = np.array(state[f"param.{name}"])
            self.adam.m[name] = np.array(state[f"adam_m.{name}"])
            self.adam.v[name] = np.array(state[f"adam_v.{name}"])
        self.since_fired = np.array(state["since_fired"])
        self.step = int(state["step"])


def _save_checkpoint(path: pathlib.Path, fit: _TopKFit, identity: dict) -> None:
    temporary = path.with_name(path.name + ".tmp.npz")
    with open(temporary, "wb") as f:
        np.savez(f, identity=np.array(json.dumps(identity, sort_keys=True)), **fit.state())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def fit_topk(rows: np.ndarray, settings: FitSettings, *, site: str, model: dict | None = None,
             checkpoint=None, checkpoint_every: int = 200, progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None, info: dict | None = None) -> SparseAutoencoder:
    """Fit a TopK SAE on `rows` (n, d_in) (any float dtype; a memory-mapped store array is read a batch at a
    time). `checkpoint`: a file path (.npz) to save to every `checkpoint_every` steps and resume from.
    `on_step(step, metrics)` is called after every step (metrics: mse, aux, fve of the batch, dead fraction).
    """
    from .progress import progress_bar

    n, d_in = rows.shape
    settings.check(d_in)
    steps_per_epoch = n // settings.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} rows are fewer than one batch of {settings.batch_size}")
    total = steps_per_epoch * settings.epochs
    sample = np.asarray(rows[np.random.default_rng(settings.seed).choice(n, min(n, 8192), replace=False)],
                        dtype=np.float32)
    mean = sample.mean(axis=0)
    scale = float(math.sqrt(d_in) / np.linalg.norm(sample, axis=1).mean())
    fit = _TopKFit(settings, d_in, scale, mean)
    identity = {"settings": vars(settings), "data": _data_fingerprint(rows), "d_in": d_in}
    path = pathlib.Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        with np.load(path) as state:
            stored = json.loads(str(state["identity"]))
            if stored != json.loads(json.dumps(identity, sort_keys=True)):
                raise ValueError(f"checkpoint {path} belongs to another fit ({stored}); this one is {identity}. "
                                 f"Remove it or use another path")
            fit.restore(state)
    started = time.perf_counter()
    with progress_bar(total, enabled=progress, desc=f"fit SAE {site}") as bar:
        bar.update(fit.step)
        while fit.step < total:
            epoch, offset = divmod(fit.step, steps_per_epoch)
            order = np.random.default_rng([settings.seed, epoch]).permutation(n)
            chosen = np.sort(order[offset * settings.batch_size:(offset + 1) * settings.batch_size])
            batch = np.asarray(rows[chosen], dtype=np.float32) * np.float32(scale)
            metrics = fit.train_step(batch, total)
            bar.update(1)
            if hasattr(bar, "set_postfix_str") and fit.step % 10 == 0:
                bar.set_postfix_str(f"fve {metrics['fve']:.3f} dead {metrics['dead']:.1%}", refresh=False)
            if path is not None and (fit.step % checkpoint_every == 0 or fit.step == total):
                _save_checkpoint(path, fit, identity)
            if on_step is not None:
                on_step(fit.step, metrics)
    p = fit.params
    # fold the input scale back in (see the module docstring): activations in the site's own units
    record = dict(info or {}, settings=vars(settings), n_rows=int(n), steps=total, scale=scale,
                  fit_seconds_this_run=round(time.perf_counter() - started, 3))
    return SparseAutoencoder(W_enc=p["W_enc_T"].T, b_enc=p["b_enc"] / scale, W_dec=p["W_dec"], b_dec=p["b_dec"] / scale,
                             site=site, architecture="topk", k=settings.k, model=dict(model or {}), info=record)
