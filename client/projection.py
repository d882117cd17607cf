"""Representations of many prompts: capture by layer and position, project (PCA, t-SNE), probe.

The server only runs forward passes (`run_batch`: many prompts per request, decoded together, with a
progress bar); the residual vectors come back as raw bytes and scikit-learn does the rest here, because
it is small (prompts x n_embd per layer) and users want to refit at will.

Layers are named as everywhere in lmscope: an int L is block L's output (`blocks.L.resid_post`, hidden
state L + 1; negative L counts from the last block) and "embed" is the token embeddings (hidden state 0).

Every analysis here also takes an `ActivationStore` instead of prompts (`lmscope.client.store`): the
vectors are then read from disk, memory-mapped, and nothing is recomputed.

Probes are linear and cross-validated (k folds, shuffled with a fixed seed, so the curve is
reproducible): ridge regression with the penalty chosen by efficient leave-one-out inside each training
fold (R^2 on the held-out fold, pooled over folds) for continuous targets, logistic regression for
classes (held-out accuracy; chance = the majority class's share). Features are standardized inside each
fold. A probe's score says a linear read-out exists, not that the model uses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .errors import invalid_argument, is_index, out_of_range
from .store import ActivationStore

Layer = Union[int, str]
RIDGE_ALPHAS = np.logspace(-2, 6, 17)


def layer_sites(layers, n_layer: int) -> tuple[list[Layer], list[str]]:
    """Normalized layer keys ("embed" or a block index) and their capture sites, for one layer or a list."""
    items = [layers] if isinstance(layers, (int, str, np.integer)) else list(layers)
    keys, sites = [], []
    for layer in items:
        if layer == "embed":
            keys.append("embed")
            sites.append("embed")
            continue
        if not is_index(layer):
            raise invalid_argument(f"layer {layer!r} is not a block index (an int) or 'embed'")
        if not -n_layer <= layer < n_layer:
            raise out_of_range(f"layer {layer} is out of range: the model has {n_layer} blocks (0..{n_layer - 1}, "
                               f"or -{n_layer}..-1 from the end, or 'embed')")
        keys.append(int(layer) % n_layer)
        sites.append(f"blocks.{keys[-1]}.resid_post")
    if len(set(keys)) != len(keys):
        raise invalid_argument(f"layers repeat: {items}")
    return keys, sites


def layer_name(layer: Layer) -> str:
    return "embed" if layer == "embed" else f"layer {layer}"


@dataclass
class Projection:
    """Low-dimensional coordinates of each prompt's representation, per layer.

    coords[layer]: (n_prompts, n_components); states[layer]: (n_prompts, n_embd), what was projected;
    explained_variance_ratio[layer]: per component (PCA only).
    """

    layers: list[Layer]
    method: str
    coords: dict[Layer, np.ndarray]
    states: dict[Layer, np.ndarray]
    explained_variance_ratio: dict[Layer, np.ndarray] | None

    def plot(self, labels: Sequence[str] | None = None, color=None, *, title: str | None = None,
             colorbar_label: str = "", save=None):
        """Scatter of the first two components, one panel per layer.

        labels: text next to each point. color: numbers (colour scale) or category names (legend).
        """
        from . import plots

        panels = {}
        for layer in self.layers:
            name = layer_name(layer)
            if self.explained_variance_ratio is not None:
                share = self.explained_variance_ratio[layer][:2].sum()
                name += f" ({share:.0%} of variance)"
            panels[name] = self.coords[layer]
        axis = ("PC1", "PC2") if self.method == "pca" else (f"{self.method} 1", f"{self.method} 2")
        return plots.scatter_panels(panels, labels=labels, color=color, axis_names=axis, title=title or "",
                                    colorbar_label=colorbar_label, save=save)

    def __repr__(self) -> str:
        n = next(iter(self.coords.values())).shape
        return f"Projection({self.method}, {n[0]} prompts -> {n[1]} components, layers {self.layers})"


@dataclass
class ProbeResult:
    """Cross-validated linear-probe scores per layer: a "which layer knows X" curve.

    scores: (n_layers, n_outputs): R^2 per target column (regression) or accuracy (classification).
    chance: what a probe that learned nothing scores (0 for R^2, the majority-class share for accuracy).
    """

    layers: list[Layer]
    kind: str
    scores: np.ndarray
    output_names: list[str]
    chance: float
    folds: int
    n_samples: int

    @property
    def metric(self) -> str:
        return "R^2" if self.kind == "regression" else "accuracy"

    @property
    def best_layer(self) -> Layer:
        return self.layers[int(np.argmax(self.scores.mean(axis=1)))]

    def plot(self, *, title: str | None = None, save=None):
        from . import plots

        labels = [("embed" if layer == "embed" else str(layer)) for layer in self.layers]
        curves = {name: self.scores[:, n] for n, name in enumerate(self.output_names)}
        low = min(0.0, float(self.scores.min())) if self.kind == "regression" else 0.0
        return plots.layer_curves(labels, curves, ylabel=f"held-out {self.metric} ({self.folds}-fold)",
                                  ylim=(max(low, -0.5) - 0.02, 1.02), baseline=self.chance,
                                  title=title or f"linear probe ({self.n_samples} prompts)", save=save)

    def __repr__(self) -> str:
        head = f"  {'layer':>6} " + " ".join(f"{name[:12]:>12}" for name in self.output_names)
        rows = "\n".join(f"  {str(layer):>6} " + " ".join(f"{s:12.3f}" for s in row)
                         for layer, row in zip(self.layers, self.scores))
        return (f"ProbeResult({self.kind}, {self.metric}, {self.folds}-fold, chance {self.chance:.3f}, "
                f"best layer {self.best_layer})\n{head}\n{rows}")


def project_states(states: np.ndarray, method: str = "pca", n_components: int = 2, seed: int = 0):
    """(coords, explained_variance_ratio or None) of one (n, d) matrix."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method == "pca":
        pca = PCA(n_components=n_components, random_state=seed)
        return pca.fit_transform(states), pca.explained_variance_ratio_
    if method == "tsne":
        perplexity = min(30.0, (len(states) - 1) / 3)
        return TSNE(n_components=n_components, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            states), None
    raise invalid_argument(f"method must be 'pca' or 'tsne', not {method!r}")


def probe_scores(features: np.ndarray, targets: np.ndarray, kind: str, folds: int = 5,
                 seed: int = 0) -> np.ndarray:
    """Held-out scores of a linear probe from features (n, d) to targets: (n_outputs,)."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = features.astype(np.float64)
    if kind == "regression":
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=targets.ndim > 1))
        predicted = cross_val_predict(model, features, targets, cv=KFold(folds, shuffle=True, random_state=seed))
        return np.atleast_1d(r2_score(targets, predicted, multioutput="raw_values"))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    predicted = cross_val_predict(model, features, targets,
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return np.array([accuracy_score(targets, predicted)])


def _n_layer(client, prompts) -> int:
    return prompts.model["n_layer"] if isinstance(prompts, ActivationStore) else client.model_info().n_layer


def store_residual_states(store: ActivationStore, layers, position: int | str = -1) -> dict[Layer, np.ndarray]:
    """`residual_states` read from an activation store (no server, nothing recomputed)."""
    keys, sites = layer_sites(layers, store.model["n_layer"])
    missing = [site for site in sites if site not in store]
    if missing:
        raise ValueError(f"the store at {store.path} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                         f"it holds {store.sites[:3]}{'...' if len(store.sites) > 3 else ''}")
    return {key: store.vectors(site, position, bos_token_id=store.model.get("bos_token_id"))
            for key, site in zip(keys, sites)}


class ProjectionMixin:
    """PCA / t-SNE projections and linear probes over many prompts (needs `CoreClient`'s methods)."""

    def residual_states(self, prompts: Sequence, layers, *, position: int | str = -1, batch_size: int = 64,
                        progress: bool = True, chat: bool = False) -> dict[Layer, np.ndarray]:
        """One residual vector per prompt and layer: {layer: (n_prompts, n_embd)}.

        position: a prompt position (default -1, the last token) or "mean" (the average over the
        prompt's tokens, leaving out a leading BOS, whose state is an outlier of huge norm).
        prompts may be an `ActivationStore` (`Client.collect`): the states are read from it, nothing is
        recomputed and no server is asked (position: one the store holds, or any for an every-position store).
        """
        if isinstance(prompts, ActivationStore):
            return store_residual_states(prompts, layers, position)
        keys, sites = layer_sites(layers, self.model_info().n_layer)
        if position != "mean" and not isinstance(position, (int, np.integer)):
            raise invalid_argument(f"position must be an int or 'mean', not {position!r}")
        runs = self.run_batch(list(prompts), batch_size=batch_size, progress=progress, capture=sites, logits=False,
                              positions=None if position == "mean" else [int(position)], chat=chat)
        bos = self.model_info().bos_token_id
        out = {}
        for key, site in zip(keys, sites):
            rows = []
            for run in runs:
                states = run.captures[site].astype(np.float32)
                if position == "mean":
                    skip = 1 if run.token_ids[0] == bos and len(run.token_ids) > 1 else 0
                    rows.append(states[skip:].mean(axis=0))
                else:
                    rows.append(states[0])
            out[key] = np.stack(rows)
        return out

    def project(self, prompts: Sequence, layer=None, *, position: int | str = -1, method: str = "pca",
                n_components: int = 2, batch_size: int = 64, progress: bool = True, chat: bool = False,
                seed: int = 0) -> Projection:
        """Project each prompt's representation at `layer` (an int, "embed", or a list: one panel each).

        layer: default the middle block. method: "pca" or "tsne" (scikit-learn), fitted per layer.
        prompts: texts / token ids, or an `ActivationStore` (read from disk, see `residual_states`).
        """
        if layer is None:
            layer = _n_layer(self, prompts) // 2
        if len(prompts) < max(2, n_components):
            raise invalid_argument(f"{len(prompts)} prompts cannot give {n_components} components")
        states = self.residual_states(prompts, layer, position=position, batch_size=batch_size, progress=progress,
                                      chat=chat)
        coords, ratios = {}, {}
        for key, matrix in states.items():
            coords[key], ratios[key] = project_states(matrix, method, n_components, seed)
        return Projection(layers=list(states), method=method, coords=coords, states=states,
                          explained_variance_ratio=ratios if method == "pca" else None)

    def probe(self, prompts: Sequence, targets, layer=None, *, kind: str = "auto",
              output_names: Sequence[str] | None = None, position: int | str = -1, folds: int = 5, seed: int = 0,
              batch_size: int = 64, progress: bool = True, chat: bool = False) -> ProbeResult:
        """Cross-validated linear probes from each layer's representation to `targets`.

        targets: (n,) or (n, m) numbers (ridge regression, R^2 per column) or (n,) class labels
        (logistic regression, accuracy). kind: "auto" (floats -> regression, anything else ->
        classification), "regression" or "classification". layer: an int, "embed" or a list; default
        every hidden state (embed and every block), which draws the whole curve.
        prompts: texts / token ids, or an `ActivationStore` (read from disk, see `residual_states`).
        """
        targets = np.asarray(targets)
        if len(targets) != len(prompts):
            raise invalid_argument(f"{len(prompts)} prompts but {len(targets)} targets")
        if kind == "auto":
            kind = "regression" if np.issubdtype(targets.dtype, np.floating) else "classification"
        if kind not in ("regression", "classification"):
            raise invalid_argument(f"kind must be 'auto', 'regression' or 'classification', not {kind!r}")
        if kind == "classification" and targets.ndim != 1:
            raise invalid_argument("class labels must be one per prompt: shape (n,)")
        if not 2 <= folds <= len(prompts):
            raise invalid_argument(f"folds must be between 2 and the number of prompts ({len(prompts)}), not {folds}")
        if layer is None:
            layer = (["embed"] if not isinstance(prompts, ActivationStore) or "embed" in prompts else []) + \
                list(range(_n_layer(self, prompts)))
        states = self.residual_states(prompts, layer, position=position, batch_size=batch_size, progress=progress,
                                      chat=chat)
        values = targets.astype(np.float64) if kind == "regression" else targets
        scores = np.stack([probe_scores(matrix, values, kind, folds, seed) for matrix in states.values()])
        n_outputs = scores.shape[1]
        names = list(output_names) if output_names is not None else (
            [f"target {n}" for n in range(n_outputs)] if n_outputs > 1 else ["target"])
        if len(names) != n_outputs:
            raise invalid_argument(f"{len(names)} output names for {n_outputs} target columns")
        if kind == "regression":
            chance = 0.0
        else:
            _, counts = np.unique(targets, return_counts=True)
            chance = float(counts.max() / counts.sum())
        return ProbeResult(layers=list(states), kind=kind, scores=scores, output_names=names, chance=chance,
                           folds=folds, n_samples=len(prompts))

