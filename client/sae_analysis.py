"""SAEs against a served model: fit from a store, measure in the forward pass, explain and show features.

`SaeMixin` (mixed into `Client`):

- ``c.fit_sae(store, site, n_features, k)``: a TopK SAE (`lmscope.client.sae`) on a store's rows of `site`,
  after checking the store holds this server's model.
- ``c.sae_loss_recovered(sae, prompts)``: the SAE measured where it matters, in the model. Each prompt runs
  clean (capturing the site and the logits), then with the site replaced inside llama.cpp's forward pass by
  a SET intervention at every position but the first: by the SAE's reconstruction, by zeros, and by the mean
  activation (over the same prompts' tokens). Next-token cross-entropy of each run, over every prediction of
  every prompt, gives ``recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean)`` against each ablation.

The first token of every prompt is left out, of the fit and of the splice. Whether it is a BOS or not (SmolLM2
adds none), the first position is the model's attention sink: its residual norm is orders of magnitude above
the rest (SmolLM2, blocks.15.resid_post: ~25,000 against a median of ~170), so it would dominate the
variance an SAE explains while carrying no text. It is the same in every run of the measurement.
- ``c.sae_features(sae, store, features)``: each feature explained. Its top-activating tokens in the store
  with the text around them (every token of the window with its activation), the tokens its decoder
  direction promotes and suppresses, and a histogram of its non-zero activations; the result renders as the
  offline HTML feature view (`lmscope.client.views.sae_html`).

Promoted tokens: the decoder direction goes through the final norm's gain and the LM head (`unembed` with
the final norm, applied to the direction alone): adding the direction to a residual stream of RMS r moves
the logits by these scores / r, so their order is the order of the direct effect on the next token.
"""
from __future__ import annotations

import contextlib
import pathlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .interventions import Intervention
from .sae import FitSettings, SaeMismatchError, SparseAutoencoder, fit_topk
from .store import ActivationStore
from .token_labels import token_labels


def store_rows(store: ActivationStore, site: str, prompts: slice | None = None, skip_first: bool = True):
    """(rows, index) of `site` in a store: every stored row of the chosen prompts (a contiguous slice), leaving
    out each prompt's first token (see the module docstring). rows: (n, width) as stored (float16/32, a copy);
    index: (n,) the rows' positions in the store's flat row order (`store[site]` for every-position stores)."""
    if site not in store:
        raise KeyError(f"{site!r} is not in the store at {store.path}; it holds {store.sites}")
    if len(store.manifest["row_shapes"][site]) != 1:
        raise ValueError(f"{site} holds {store.manifest['row_shapes'][site]} per token; an SAE reads one vector "
                         f"per token (a residual-stream or MLP-neuron site)")
    chosen = range(len(store))[prompts or slice(None)]
    if chosen.step != 1:
        raise ValueError("prompts must be a contiguous slice")
    if store.ragged:
        offsets = store.token_offsets
        first, last = int(offsets[chosen.start]), int(offsets[chosen.stop])
        index = np.arange(first, last)
        if skip_first:
            index = index[~np.isin(index, offsets[chosen.start:chosen.stop])]
        return np.asarray(store[site][index]), index
    array = store[site][chosen.start:chosen.stop]
    rows = np.asarray(array).reshape(-1, array.shape[-1])
    index = np.arange(len(rows))
    if skip_first:
        keep = store.positions[chosen.start:chosen.stop].reshape(-1) != 0
        rows, index = rows[keep], index[keep]
    return rows, index


@dataclass
class SaeEvaluation:
    """An SAE in the model: next-token cross-entropy (nats per prediction) of the clean run, of the run with
    the site replaced by the SAE's reconstruction, and by zeros / the mean activation; the fraction of the
    loss recovered against each ablation; and the SAE's reconstruction scores on the same tokens."""
    site: str
    n_prompts: int
    n_predictions: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    fve: float
    l0: float
    dead_fraction: float

    @property
    def recovered_zero(self) -> float:
        return (self.ce_zero - self.ce_sae) / (self.ce_zero - self.ce_clean)

    @property
    def recovered_mean(self) -> float:
        return (self.ce_mean - self.ce_sae) / (self.ce_mean - self.ce_clean)

    def __repr__(self) -> str:
        return (f"SaeEvaluation({self.site}, {self.n_prompts} prompts, {self.n_predictions} predictions)\n"
                f"  cross-entropy: clean {self.ce_clean:.4f}  SAE {self.ce_sae:.4f}  zero {self.ce_zero:.4f}  "
                f"mean {self.ce_mean:.4f} nats\n"
                f"  loss recovered: {self.recovered_zero:.1%} vs zero ablation, {self.recovered_mean:.1%} vs mean "
                f"ablation\n  FVE {self.fve:.4f}  L0 {self.l0:.2f}  dead on these tokens {self.dead_fraction:.1%}")


@dataclass
class FeatureContext:
    """One top-activating token: its prompt and position in the store, and a window of tokens around it with
    each token's activation of the feature (`center` is the token's index in the window)."""
    prompt: int
    position: int
    activation: float
    tokens: list[str]
    activations: np.ndarray
    center: int

    @property
    def text(self) -> str:
        return "".join(self.tokens[:self.center]) + f"[[{self.tokens[self.center]}]]" + \
            "".join(self.tokens[self.center + 1:])


@dataclass
class Feature:
    """One feature explained: where it fires most, how often, what its direction does to the next token."""
    index: int
    frequency: float                     # fraction of the store's tokens (first tokens left out) where active
    max_activation: float
    mean_activation: float               # over the tokens where it is active
    contexts: list[FeatureContext]
    promoted: list[tuple[str, float]]    # (token, score) the decoder direction raises most
    suppressed: list[tuple[str, float]]
    histogram: np.ndarray                # counts of non-zero activations per bin
    bin_edges: np.ndarray

    def __repr__(self) -> str:
        lines = [f"feature {self.index}: active on {self.frequency:.3%} of tokens, max {self.max_activation:.3g}, "
                 f"mean when active {self.mean_activation:.3g}",
                 "  promotes:   " + "  ".join(repr(t) for t, _ in self.promoted),
                 "  suppresses: " + "  ".join(repr(t) for t, _ in self.suppressed)]
        lines += [f"  {c.activation:>8.3g}  {c.text!r}" for c in self.contexts]
        return "\n".join(lines)


@dataclass
class SaeFeatures:
    """Several features of one SAE, explained from one store; renders as the feature view."""
    site: str
    d_sae: int
    n_tokens: int
    features: list[Feature] = field(default_factory=list)

    def __getitem__(self, feature: int) -> Feature:
        for f in self.features:
            if f.index == feature:
                return f
        raise KeyError(f"feature {feature} is not in this result; it holds {[f.index for f in self.features]}")

    def to_html(self, path=None, *, feature: int | None = None) -> str:
        """The feature view (`lmscope.client.views`) as a self-contained page, written to `path` if given."""
        from .views import sae_html, write

        return write(sae_html(self, feature=feature), f"SAE features of {self.site}", path)

    def _repr_html_(self) -> str:
        from .views import sae_html

        return sae_html(self)

    def __repr__(self) -> str:
        return "\n\n".join(repr(f) for f in self.features)


def _cross_entropy(logits: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    """Per-prediction cross-entropy (nats) of rows 0..n-2 predicting tokens 1..n-1."""
    z = np.asarray(logits[:-1], dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    targets = np.asarray(token_ids[1:])
    return log_norm - z[np.arange(len(targets)), targets]


class SaeMixin:
    """SAE fitting, measurement in the model and feature explanation; mixed into `Client`."""

    def fit_sae(self, data, site: str, n_features: int, k: int, *, epochs: int = 10, batch_size: int = 1024,
                lr: float = 1e-3, seed: int = 0, prompts: slice | None = None, store_path=None,
                checkpoint=None, checkpoint_every: int = 200, threads: int | None = None, progress: bool = True,
                on_step=None) -> SparseAutoencoder:
        """A TopK SAE of `site` with `n_features` features, `k` active per token, fitted on CPU.

        data: an `ActivationStore` (or its path) holding `site` (collect with ``positions=None`` for every
            token), or a list of prompts, collected first into `store_path`.
        prompts: which of the store's prompts to train on (a slice; the rest can be held out).
        checkpoint: an .npz path saved every `checkpoint_every` steps; a fit with the same settings on the
            same rows resumes from it (see `lmscope.client.sae`). threads: BLAS threads while fitting (None:
            the library's default; 1 is faster on a busy machine). Other settings: `FitSettings`.
        """
        if isinstance(data, (str, pathlib.Path)):
            store = ActivationStore.open(data)
        elif isinstance(data, ActivationStore):
            store = data
        else:
            if store_path is None:
                raise ValueError("fitting on prompts needs store_path= (where their activations are collected)")
            store = self.collect(list(data), store_path, sites=[site], positions=None, dtype="float16",
                                 progress=progress)
        store.check_model(self.model_info().fingerprint)
        rows, _ = store_rows(store, site, prompts)
        settings = FitSettings(n_features=n_features, k=k, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        info = self.model_info()
        model = {"name": info.name, "fingerprint": info.fingerprint, "n_embd": info.n_embd}
        record = {"store": str(store.path), "prompts": [p for p in (prompts or slice(None)).indices(len(store))]}
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads, user_api="blas") if threads else contextlib.nullcontext():
            return fit_topk(rows, settings, site=site, model=model, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every, progress=progress, on_step=on_step, info=record)

    def sae_loss_recovered(self, sae: SparseAutoencoder, prompts: Sequence, *, batch_size: int = 4,
                           progress: bool = True) -> SaeEvaluation:
        """Next-token loss with the site replaced by the SAE's reconstruction, against the clean run and zero /
        mean ablations of the site, all through the server's SET interventions (see the module docstring)."""
        from .progress import progress_bar

        info = self.model_info()
        sae.check_model(info)
        site = sae.site
        if site not in info.capture_sites:
            raise SaeMismatchError(f"{info.name} offers no site {site}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to measure on")
        clean = []
        with progress_bar(4 * len(prompts), enabled=progress, desc=f"loss recovered at {site}") as bar:
            for run in self.iter_runs(prompts, batch_size=batch_size, capture=[site], logits=True):
                if len(run.token_ids) < 3:
                    raise ValueError("every prompt needs at least 3 tokens")
                clean.append((run.token_ids, np.asarray(run.captures[site], np.float32)[1:],
                              _cross_entropy(run.logits, run.token_ids)))
                bar.update(1)
            body = np.concatenate([x for _, x, _ in clean])
            mean = body.mean(axis=0)
            replacements = {"sae": [sae.reconstruct(x) for _, x, _ in clean],
                            "zero": [np.zeros_like(x) for _, x, _ in clean],
                            "mean": [np.broadcast_to(mean, x.shape) for _, x, _ in clean]}
            losses = {"clean": np.concatenate([ce for _, _, ce in clean])}
            for name, rows in replacements.items():
                requests = []
                for start in range(0, len(prompts), batch_size):
                    part = range(start, min(start + batch_size, len(prompts)))
                    edits = [Intervention("set", [site], rows[i], positions=list(range(1, len(clean[i][0]))),
                                          sequences=[i - start]) for i in part]
                    requests.append(self.run_request([clean[i][0] for i in part], capture=[], logits=True,
                                                     interventions=edits))
                ces = []
                for i, run in enumerate(self.send_runs(requests)):
                    ces.append(_cross_entropy(run.logits, clean[i][0]))
                    bar.update(1)
                losses[name] = np.concatenate(ces)
        scores = sae.evaluate(body)
        return SaeEvaluation(site=site, n_prompts=len(prompts), n_predictions=len(losses["clean"]),
                             ce_clean=float(losses["clean"].mean()), ce_sae=float(losses["sae"].mean()),
                             ce_zero=float(losses["zero"].mean()), ce_mean=float(losses["mean"].mean()),
                             fve=scores.fve, l0=scores.l0, dead_fraction=scores.dead_fraction)

    def direction_tokens(self, direction: np.ndarray, k: int = 10) -> tuple[list[tuple[str, float]],
                                                                               list[tuple[str, float]]]:
        """The `k` tokens a residual-stream direction promotes most and suppresses most (final norm's gain and
        LM head applied to the direction alone; see the module docstring): ([(token, score)], [...])."""
        logits = np.asarray(self.unembed(np.asarray(direction, np.float32)[None], final_norm=True)[0], np.float64)
        order = np.argsort(-logits, kind="stable")
        top, bottom = order[:k], order[::-1][:k]
        labels = token_labels(self.token_pieces([int(t) for t in np.concatenate([top, bottom])]))
        return ([(labels[i], float(logits[t])) for i, t in enumerate(top)],
                [(labels[k + i], float(logits[t])) for i, t in enumerate(bottom)])

    def sae_features(self, sae: SparseAutoencoder, store, features: Sequence[int], *, contexts: int = 8,
                     window: int = 8, top_tokens: int = 10, bins: int = 24, codes=None) -> SaeFeatures:
        """Explain `features` of `sae` from the tokens of an every-position `store` (a path or the store).

        contexts: top-activating tokens shown per feature, each with `window` tokens either side.
        codes: the store's feature activations from an earlier call (`encode_store`), to skip encoding again.
        """
        store = ActivationStore.open(store) if isinstance(store, (str, pathlib.Path)) else store
        if not store.ragged:
            raise ValueError("explaining features needs a store of every token (collect with positions=None)")
        info = self.model_info()
        sae.check_model(info)
        store.check_model(info.fingerprint)
        features = [sae._feature(f) for f in features]
        if codes is None:
            codes = encode_store(sae, store)
        index, matrix = codes
        columns = matrix[:, features].tocsc()
        offsets = store.token_offsets
        tokens = store.tokens
        out = SaeFeatures(site=sae.site, d_sae=sae.d_sae, n_tokens=len(index))
        for j, feature in enumerate(features):
            column = columns[:, j]
            rows, values = column.indices, column.data
            order = np.argsort(-values, kind="stable")[:contexts]
            picked = []
            for r in order:
                flat = int(index[rows[r]])
                prompt = int(np.searchsorted(offsets, flat, side="right") - 1)
                start, end = int(offsets[prompt]), int(offsets[prompt + 1])
                lo, hi = max(start, flat - window), min(end, flat + window + 1)
                picked.append((prompt, flat, lo, hi))
            pieces = self.token_pieces([int(t) for _, _, lo, hi in picked for t in tokens[lo:hi]])
            dense = np.zeros(len(tokens), np.float32) if picked else None
            if picked:
                dense[index[rows]] = values
            cursor, found = 0, []
            for prompt, flat, lo, hi in picked:
                labels = token_labels(pieces[cursor:cursor + hi - lo])
                cursor += hi - lo
                found.append(FeatureContext(prompt=prompt, position=flat - int(offsets[prompt]),
                                            activation=float(dense[flat]), tokens=labels,
                                            activations=dense[lo:hi].copy(), center=flat - lo))
            promoted, suppressed = self.direction_tokens(sae.W_dec[feature], k=top_tokens)
            top = float(values.max()) if len(values) else 0.0
            histogram, edges = np.histogram(values, bins=bins, range=(0.0, top if top > 0 else 1.0))
            out.features.append(Feature(index=feature, frequency=len(values) / max(1, len(index)),
                                        max_activation=top,
                                        mean_activation=float(values.mean()) if len(values) else 0.0,
                                        contexts=found, promoted=promoted, suppressed=suppressed,
                                        histogram=histogram, bin_edges=edges))
        return out


def encode_store(sae: SparseAutoencoder, store: ActivationStore, chunk: int = 8192):
    """(index, codes): the feature activations of every row of `sae.site` in `store` but the prompts' first, as a CSR
    matrix (n_rows, d_sae), with each row's position in the store's flat row order."""
    rows, index = store_rows(store, sae.site)
    return index, sae.encode_sparse(rows, chunk=chunk)
