"""`SteeringMixin`: the refusal direction of arXiv 2406.11717, computed and chosen over the wire.

Method
------
1. *Difference in means.* Every harmful and every harmless prompt is run once (several per request), keeping
   only the block outputs ``blocks.L.resid_post`` at one position (the last prompt token by default, which
   with ``chat=True`` is the end of the assistant header, where the answer is decided) or averaged over the
   prompt's tokens. ``per_layer[L] = mean(harmful) - mean(harmless)``, accumulated in float64. Layers are
   numbered as in `lmscope.client.control_vector` (layer ``L`` = the output of block ``L``).
2. *Selection.* For each candidate layer (by default those below 80 % of the depth: the paper finds the last
   layers' directions act on the output tokens rather than on the decision to refuse), three steering tests
   on validation prompts, each read from the next-token logits only (no generation, no captures):

   - ``induce``: harmless prompts with ``per_layer[L]`` added to the output of block ``L`` at every
     position; their mean refusal score should rise above 0.
   - ``bypass``: harmful prompts with the unit direction ablated (projected out of the embeddings and every
     block's ``resid_mid`` and ``resid_post``, every position); the lower their refusal score, the better.
   - ``kl``: KL(unablated || ablated) of the harmless prompts' next-token distribution; ablation should
     leave ordinary behaviour alone (below 0.1).

   The chosen layer has the lowest ``bypass`` among the layers with ``induce > 0`` and ``kl < max_kl``.
   The three tests of one layer travel in one request: each intervention is limited to its own prompts
   (`Intervention.sequences`).

The refusal score of one prompt is ``log p - log(1 - p)``, with ``p`` the next-token probability mass of
the tokens refusals start with (`lmscope.client.refusal.refusal_token_ids`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import interventions as iv
from .errors import check_layer, invalid_argument
from .progress import progress_bar
from .refusal import block_output_means, refusal_scores, refusal_token_ids
from .store import ActivationStore


@dataclass
class LayerScore:
    """The steering tests of one candidate layer (mean over the validation prompts)."""
    layer: int
    induce: float    # refusal score of harmless prompts with per_layer[layer] added at that layer
    bypass: float    # refusal score of harmful prompts with the direction ablated everywhere
    kl: float        # KL(unablated || ablated) of harmless prompts' next token
    eligible: bool   # induce > 0 and kl < max_kl


@dataclass
class RefusalDirection:
    """The result of `SteeringMixin.refusal_direction`.

    per_layer: (n_layer, n_embd) float64, mean(harmful) - mean(harmless) at each block's output.
    best_layer: the selected layer (None when selection was skipped).
    scores: {layer: LayerScore} for every candidate layer; baseline_*: the refusal scores without edits.
    """
    per_layer: np.ndarray
    position: int | str
    n_harmful: int
    n_harmless: int
    best_layer: int | None
    scores: dict[int, LayerScore]
    baseline_harmful: float
    baseline_harmless: float
    selection: str
    seconds_means: float
    seconds_selection: float

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            if self.best_layer is None:
                raise invalid_argument("no layer was selected (select=False): pass a layer")
            return self.best_layer
        return check_layer(layer, len(self.per_layer))

    def vector(self, layer: int | None = None) -> np.ndarray:
        """The unit direction (float32) at `layer` (default: the selected one)."""
        d = self.per_layer[self._layer(layer)]
        return (d / np.linalg.norm(d)).astype(np.float32)

    def scale(self, layer: int | None = None) -> float:
        """The natural scale: the norm of the difference in means at `layer` (default: the selected one)."""
        return float(np.linalg.norm(self.per_layer[self._layer(layer)]))

    def __repr__(self) -> str:
        best = "none" if self.best_layer is None else f"{self.best_layer} (scale {self.scale():.3g})"
        return (f"RefusalDirection({self.n_harmful} harmful / {self.n_harmless} harmless, position={self.position!r}, "
                f"per_layer {self.per_layer.shape}, best_layer={best}, {len(self.scores)} layers scored; "
                f"{self.selection})")


class SteeringMixin:
    """Directions that steer behaviour; built on `CoreClient.run_batch` (steer=, ablate= work everywhere)."""

    def refusal_direction(self, harmful: Sequence, harmless: Sequence, *, chat: bool = True,
                          position: int | str = -1, layers: Sequence[int] | None = None, select: bool = True,
                          val_harmful: Sequence | None = None, val_harmless: Sequence | None = None,
                          max_layer_fraction: float = 0.8, max_kl: float = 0.1,
                          refusal_tokens: Sequence[int] | None = None, batch_size: int = 32,
                          progress: bool = True) -> RefusalDirection:
        """Difference-in-means refusal direction per layer, and the layer whose direction steers best.

        harmful / harmless: prompts (text, or token ids with chat=False), e.g. `refusal.load_prompts`, or
            `ActivationStore`s of them (`Client.collect`): the means are then read from disk, and the
            steering tests use the stores' prompts.
        chat: wrap text prompts in the model's chat template.
        position: the token to read (-1 = last, negative from the end) or "mean" over the prompt.
        layers: the candidate layers to score (default: below max_layer_fraction of the depth).
        select: False skips the steering tests (only the means are computed).
        val_harmful / val_harmless: prompts for the steering tests (default: the same prompts).
        refusal_tokens: token ids a refusal starts with (default: `refusal.refusal_token_ids`).
        See the module docstring for the method.
        """
        harmful, harmless = [x if isinstance(x, ActivationStore) else list(x) for x in (harmful, harmless)]
        if not len(harmful) or not len(harmless):
            raise invalid_argument("need at least one harmful and one harmless prompt")
        if position != "mean" and (isinstance(position, bool) or not isinstance(position, (int, np.integer))):
            raise invalid_argument(f"position must be a token index or 'mean', not {position!r}")
        if batch_size < 3:
            raise invalid_argument("batch_size must be at least 3")
        n_layer = self.n_layer
        start = time.perf_counter()
        with progress_bar(len(harmful) + len(harmless), enabled=progress, desc="means") as bar:
            per_layer = (self._mean_block_outputs(harmful, position, chat, batch_size, bar)
                         - self._mean_block_outputs(harmless, position, chat, batch_size, bar))
        seconds_means = time.perf_counter() - start
        result = RefusalDirection(per_layer=per_layer, position=position, n_harmful=len(harmful),
                                  n_harmless=len(harmless), best_layer=None, scores={}, baseline_harmful=np.nan,
                                  baseline_harmless=np.nan, selection="selection skipped (select=False)",
                                  seconds_means=seconds_means, seconds_selection=0.0)
        if not select:
            return result
        if layers is None:
            layers = range(max(1, int(n_layer * max_layer_fraction)))
        layers = sorted({check_layer(L, n_layer, "candidate layer") for L in layers})
        start = time.perf_counter()
        prompts = {id(x): x.prompts if isinstance(x, ActivationStore) else x for x in (harmful, harmless)}
        self._select_layer(result, layers, list(val_harmful if val_harmful is not None else prompts[id(harmful)]),
                           list(val_harmless if val_harmless is not None else prompts[id(harmless)]),
                           list(refusal_tokens) if refusal_tokens is not None else refusal_token_ids(self),
                           max_kl, chat, batch_size, progress)
        result.seconds_selection = time.perf_counter() - start
        return result

    # ----- the two phases --------------------------------------------------------------------------

    def _mean_block_outputs(self, prompts: list, position, chat: bool, batch_size: int, bar) -> np.ndarray:
        """(n_layer, n_embd) float64 mean over prompts of each block's output at `position` (or token mean)."""
        if isinstance(prompts, ActivationStore):
            means = block_output_means(prompts, self.model_info(), position, chat)
            bar.update(len(prompts))
            return means
        sites = [f"blocks.{L}.resid_post" for L in range(self.n_layer)]
        total = np.zeros((self.n_layer, self.model_info().n_embd), np.float64)
        for start in range(0, len(prompts), batch_size):
            part = prompts[start:start + batch_size]
            runs = self.run_batch(part, batch_size=len(part), capture=sites, logits=False, chat=chat,
                                  positions=None if position == "mean" else [int(position)])
            for run in runs:
                states = np.stack([run.captures[s] for s in sites]).astype(np.float64)  # (n_layer, rows, n_embd)
                total += states.mean(axis=1)
            bar.update(len(part))
        return total / len(prompts)

    def _select_layer(self, result: RefusalDirection, layers: list[int], harmful: list, harmless: list,
                      refusal_ids: list[int], max_kl: float, chat: bool, batch_size: int, progress: bool) -> None:
        with progress_bar(len(layers) + 1, enabled=progress, desc="layers") as bar:
            base_harmful, base_harmless = self._last_logits([(harmful, []), (harmless, [])], chat, batch_size)
            bar.update(1)
            result.baseline_harmful = float(refusal_scores(base_harmful, refusal_ids).mean())
            result.baseline_harmless = float(refusal_scores(base_harmless, refusal_ids).mean())
            base_log_probs = _log_softmax(base_harmless)
            for L in layers:
                ablate = iv.ablation(result.vector(L), self.n_layer)
                induced, bypassed, ablated = self._last_logits(
                    [(harmless, iv.steering({L: result.per_layer[L]}, self.n_layer)), (harmful, ablate),
                     (harmless, ablate)], chat, batch_size)
                kl = float((np.exp(base_log_probs) * (base_log_probs - _log_softmax(ablated))).sum(axis=-1).mean())
                induce = float(refusal_scores(induced, refusal_ids).mean())
                result.scores[L] = LayerScore(layer=L, induce=induce,
                                              bypass=float(refusal_scores(bypassed, refusal_ids).mean()),
                                              kl=kl, eligible=induce > 0 and kl < max_kl)
                bar.update(1)
        eligible = [s for s in result.scores.values() if s.eligible]
        if eligible:
            result.best_layer = min(eligible, key=lambda s: s.bypass).layer
            result.selection = (f"lowest bypass score among {len(eligible)} of {len(layers)} candidate layers "
                                f"with induce > 0 and KL < {max_kl}")
        else:
            result.best_layer = min(result.scores.values(), key=lambda s: s.bypass).layer
            result.selection = (f"no candidate layer had induce > 0 and KL < {max_kl}; chose the lowest bypass "
                                f"score of all {len(layers)} candidates")

    def _last_logits(self, groups: list[tuple[list, list]], chat: bool, batch_size: int) -> list[np.ndarray]:
        """Next-token logits (n, n_vocab) per group of (prompts, interventions).

        The groups share requests; each group's interventions are limited to its own prompts."""
        items = [(g, prompt) for g, (prompts, _) in enumerate(groups) for prompt in prompts]
        out: list[list[np.ndarray]] = [[] for _ in groups]
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            edits = []
            for g, (_, interventions) in enumerate(groups):
                rows = [k for k, (h, _) in enumerate(part) if h == g]
                if rows:
                    edits += [replace(edit, sequences=rows) for edit in interventions]
            runs = self.run_batch([prompt for _, prompt in part], batch_size=len(part), capture=[],
                                  logits="last", chat=chat, interventions=edits)
            for (g, _), run in zip(part, runs):
                out[g].append(run.logits[-1])
        return [np.stack(rows) for rows in out]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
