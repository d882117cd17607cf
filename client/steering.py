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

3. *Evaluation* (`SteeringMixin.evaluate_refusal`, on held-out prompts): harmful prompts as they are and
   with the chosen direction ablated, harmless prompts as they are and with the layer's difference in means
   added (induced), and the harmless prompts' KL under ablation. Each condition is measured twice: the
   share of prompts whose refusal tokens have p > 1/2 at the first generated position (one batched
   forward pass) and the share of greedy completions with a refusal phrase (one generation per prompt,
   the expensive part: generation runs one sequence at a time).

The refusal score of one prompt is ``log p - log(1 - p)``, with ``p`` the next-token probability mass of
the tokens refusals start with (`lmscope.client.refusal.refusal_token_ids`).

`RefusalDirection.save` writes the direction to an .npz file with the model's fingerprint;
`RefusalDirection.abliterate` (and `lmscope abliterate`) writes a copy of the model with the direction
projected out of its weights (`lmscope.service.abliterate`, run in a child process: the client never
imports the service).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from . import interventions as iv
from .errors import LmscopeError, check_layer, invalid_argument
from .progress import progress_bar
from .refusal import block_output_means, next_token_kl, refusal_rate, refusal_scores, refusal_token_ids
from .store import ActivationStore


@dataclass
class LayerScore:
    """The steering tests of one candidate layer (mean over the validation prompts)."""
    layer: int
    induce: float    # refusal score of harmless prompts with per_layer[layer] added at that layer
    bypass: float    # refusal score of harmful prompts with the direction ablated everywhere
    kl: float        # KL(unablated || ablated) of harmless prompts' next token
    eligible: bool   # induce > 0 and kl < max_kl
    induce_rate: float = float("nan")  # share of those harmless prompts whose refusal score is > 0 (p > 1/2)
    bypass_rate: float = float("nan")  # share of those harmful prompts whose refusal score is still > 0


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
    baseline_harmful_rate: float = float("nan")   # share of validation prompts with refusal score > 0
    baseline_harmless_rate: float = float("nan")
    model_fingerprint: str = ""  # sha256 of the model file the means were computed on

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

    def save(self, path: str | os.PathLike) -> Path:
        """Write the direction to an .npz file (`RefusalDirection.load` reads it; `lmscope abliterate
        --direction` takes it): the per-layer means, the chosen layer, the scores and the model's fingerprint."""
        path = Path(path)
        if path.suffix != ".npz":
            raise invalid_argument(f"save to a .npz file, not {path.name!r}")
        scores = np.array([[s.layer, s.induce, s.bypass, s.kl, s.eligible, s.induce_rate, s.bypass_rate]
                           for s in self.scores.values()], np.float64).reshape(-1, 7)
        np.savez(path, per_layer=self.per_layer, scores=scores, best_layer=-1 if self.best_layer is None
                 else self.best_layer, position=str(self.position), counts=[self.n_harmful, self.n_harmless],
                 baselines=[self.baseline_harmful, self.baseline_harmless, self.baseline_harmful_rate,
                            self.baseline_harmless_rate], seconds=[self.seconds_means, self.seconds_selection],
                 selection=self.selection, model_fingerprint=self.model_fingerprint)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RefusalDirection":
        with np.load(path, allow_pickle=False) as data:
            position = str(data["position"])
            best = int(data["best_layer"])
            return cls(per_layer=data["per_layer"], position=position if position == "mean" else int(position),
                       n_harmful=int(data["counts"][0]), n_harmless=int(data["counts"][1]),
                       best_layer=None if best < 0 else best,
                       scores={int(row[0]): LayerScore(int(row[0]), row[1], row[2], row[3], bool(row[4]), row[5],
                                                       row[6]) for row in data["scores"]},
                       baseline_harmful=float(data["baselines"][0]), baseline_harmless=float(data["baselines"][1]),
                       baseline_harmful_rate=float(data["baselines"][2]),
                       baseline_harmless_rate=float(data["baselines"][3]), selection=str(data["selection"]),
                       seconds_means=float(data["seconds"][0]), seconds_selection=float(data["seconds"][1]),
                       model_fingerprint=str(data["model_fingerprint"]))

    def abliterate(self, model: str | os.PathLike, out: str | os.PathLike, layer: int | None = None) -> Path:
        """Write `out`, a copy of the GGUF `model` (a path or a model name, on this machine) with this
        direction (at `layer`, default the chosen one) projected out of its weights: `lmscope abliterate`,
        run in a child process because it reads and writes the model file (it needs the server extra).
        The model must be the one the direction was computed on (its sha256 is checked)."""
        import subprocess
        import sys
        import tempfile

        layer = self._layer(layer)
        with tempfile.TemporaryDirectory(prefix="lmscope-direction-") as folder:
            direction = self.save(Path(folder) / "direction.npz")
            command = [sys.executable, "-m", "lmscope.client.cli", "abliterate", "--model", str(model),
                       "--direction", str(direction), "--layer", str(layer), "--out", str(out)]
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise LmscopeError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"lmscope abliterate failed (exit {done.returncode}):\n{done.stdout.strip()}")
        return Path(out)

    def __repr__(self) -> str:
        best = "none" if self.best_layer is None else f"{self.best_layer} (scale {self.scale():.3g})"
        return (f"RefusalDirection({self.n_harmful} harmful / {self.n_harmless} harmless, position={self.position!r}, "
                f"per_layer {self.per_layer.shape}, best_layer={best}, {len(self.scores)} layers scored; "
                f"{self.selection})")


@dataclass
class RefusalMeasure:
    """How often one prompt set is refused under one condition, measured both ways (`lmscope.client.refusal`).

    scores: per prompt, the refusal score (log-odds of the refusal tokens) at the first generated position;
    logits: (n, n_vocab) float32, those next-token logits (KL between conditions);
    generations: the greedy completions (None when not generated).
    """
    condition: str
    prompts: list
    scores: np.ndarray
    logits: np.ndarray
    generations: list[str] | None

    @property
    def token_rate(self) -> float:
        """The share of prompts whose refusal tokens have probability > 1/2 at the first generated position."""
        return float((self.scores > 0).mean())

    @property
    def generation_rate(self) -> float:
        """The share of greedy completions that contain a refusal phrase (`refusal.is_refusal`); NaN if none."""
        return refusal_rate(self.generations) if self.generations is not None else float("nan")

    def __repr__(self) -> str:
        generated = "" if self.generations is None else f", generations {self.generation_rate:.0%}"
        return (f"RefusalMeasure({self.condition!r}: {len(self.prompts)} prompts, refusal tokens "
                f"{self.token_rate:.0%}{generated})")


@dataclass
class RefusalEvaluation:
    """The result of `SteeringMixin.evaluate_refusal`: refusal rates of held-out prompts without and with the
    direction of one layer, and what ablation does to harmless prompts.

    measures: "harmful", "harmful ablated", "harmless", "harmless induced" (the layer's difference in means
        added at its output) and "harmless ablated" (logits only), each a `RefusalMeasure`.
    kl: per harmless prompt, KL(unablated || ablated) of the next-token distribution (nats).
    """
    layer: int
    scale: float
    measures: dict[str, RefusalMeasure]
    kl: np.ndarray
    max_tokens: int
    seconds: float

    CONDITIONS = ("harmful", "harmful ablated", "harmless", "harmless induced", "harmless ablated")

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean())

    def rate(self, condition: str, by: str = "generation") -> float:
        """The refusal rate of `condition` measured "by" "generation" (refusal phrases in the greedy
        completions) or "token" (refusal-token probability > 1/2 at the first generated position)."""
        if condition not in self.measures:
            raise invalid_argument(f"condition must be one of {list(self.measures)}, not {condition!r}")
        if by not in ("generation", "token"):
            raise invalid_argument(f"by must be 'generation' or 'token', not {by!r}")
        measure = self.measures[condition]
        return measure.generation_rate if by == "generation" else measure.token_rate

    def table(self) -> str:
        """A markdown table: the refusal rate of each condition, both ways, and the mean KL."""
        lines = [f"| prompts (layer {self.layer}) | n | refusal tokens p > 1/2 | refusal phrase in {self.max_tokens} "
                 f"greedy tokens |", "|---|---|---|---|"]
        for name, measure in self.measures.items():
            generated = "-" if measure.generations is None else f"{measure.generation_rate:.0%}"
            lines.append(f"| {name} | {len(measure.prompts)} | {measure.token_rate:.0%} | {generated} |")
        lines.append(f"\nKL(harmless || harmless ablated), next token, mean over {len(self.kl)} prompts: "
                     f"{self.mean_kl:.3f} nats (max {self.kl.max():.3f})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        rates = ", ".join(f"{name} {m.token_rate:.0%}" + ("" if m.generations is None else f"/{m.generation_rate:.0%}")
                          for name, m in self.measures.items())
        return (f"RefusalEvaluation(layer {self.layer}: refusal tokens/generations {rates}; "
                f"KL {self.mean_kl:.3f}; {self.seconds:.0f} s)")


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
                                  seconds_means=seconds_means, seconds_selection=0.0,
                                  model_fingerprint=self.model_info().fingerprint)
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

    def measure_refusal(self, prompts: Sequence, *, condition: str = "", chat: bool = True, steer=None,
                        ablate=None, generate: bool = True, max_tokens: int = 16,
                        refusal_tokens: Sequence[int] | None = None, batch_size: int = 16,
                        progress: bool = False) -> RefusalMeasure:
        """How often `prompts` are refused, with optional `steer=` / `ablate=` edits (as for `run`): the
        refusal score at the first generated position of each prompt (batched forward passes), and, with
        generate=True, the greedy completion of `max_tokens` tokens checked for refusal phrases."""
        prompts = list(prompts)
        if not prompts:
            raise invalid_argument("measure_refusal needs at least one prompt")
        if max_tokens < 1:
            raise invalid_argument("max_tokens must be at least 1")
        refusal_ids = list(refusal_tokens) if refusal_tokens is not None else refusal_token_ids(self)
        with progress_bar(len(prompts) * (2 if generate else 1), enabled=progress,
                          desc=condition or "prompts") as bar:
            return self._measure(prompts, condition, chat, steer, ablate, generate, max_tokens, refusal_ids,
                                 batch_size, bar)

    def _measure(self, prompts: list, condition: str, chat: bool, steer, ablate, generate: bool, max_tokens: int,
                 refusal_ids: list[int], batch_size: int, bar) -> RefusalMeasure:
        logits = []
        for start in range(0, len(prompts), batch_size):
            part = prompts[start:start + batch_size]
            runs = self.run_batch(part, batch_size=len(part), capture=[], logits="last", chat=chat, steer=steer,
                                  ablate=ablate)
            logits += [run.logits[-1] for run in runs]
            bar.update(len(part))
        generations = None
        if generate:
            generations = []
            for prompt in prompts:
                generations.append(self.generate(prompt, chat=chat, max_tokens=max_tokens, steer=steer,
                                                 ablate=ablate).text)
                bar.update(1)
        logits = np.stack(logits).astype(np.float32)
        return RefusalMeasure(condition=condition, prompts=prompts, scores=refusal_scores(logits, refusal_ids),
                              logits=logits, generations=generations)

    def evaluate_refusal(self, direction: RefusalDirection, harmful: Sequence, harmless: Sequence, *,
                         layer: int | None = None, chat: bool = True, generate: bool = True, max_tokens: int = 16,
                         refusal_tokens: Sequence[int] | None = None, batch_size: int = 16,
                         progress: bool = True) -> RefusalEvaluation:
        """Refusal rates of held-out prompts (e.g. `refusal.load_prompts(kind, split="held_out")`): harmful
        ones as they are and with the direction of `layer` (default: the chosen one) ablated everywhere,
        harmless ones as they are and with that layer's difference in means added at its output (induced),
        plus KL(unablated || ablated) of the harmless next-token distributions. Each condition is measured by
        the refusal-token probability and, with generate=True, by `max_tokens` greedy tokens."""
        if not isinstance(direction, RefusalDirection):
            raise invalid_argument("direction must be a RefusalDirection (Client.refusal_direction)")
        if direction.per_layer.shape != (self.n_layer, self.model_info().n_embd):
            raise invalid_argument(f"the direction has per_layer {direction.per_layer.shape}, the model needs "
                                   f"({self.n_layer}, {self.model_info().n_embd}): it was computed on another model")
        layer = direction._layer(layer)
        harmful, harmless = list(harmful), list(harmless)
        if not harmful or not harmless:
            raise invalid_argument("evaluate_refusal needs at least one harmful and one harmless prompt")
        if max_tokens < 1:
            raise invalid_argument("max_tokens must be at least 1")
        refusal_ids = list(refusal_tokens) if refusal_tokens is not None else refusal_token_ids(self)
        vector, steer = direction.vector(layer), {layer: direction.per_layer[layer]}
        plan = [("harmful", harmful, {}), ("harmful ablated", harmful, {"ablate": vector}),
                ("harmless", harmless, {}), ("harmless induced", harmless, {"steer": steer}),
                ("harmless ablated", harmless, {"ablate": vector})]
        start = time.perf_counter()
        units = sum(len(p) * (2 if generate and name != "harmless ablated" else 1) for name, p, _ in plan)
        measures = {}
        with progress_bar(units, enabled=progress, desc="evaluation") as bar:
            for name, prompts, edits in plan:
                measures[name] = self._measure(prompts, name, chat, edits.get("steer"), edits.get("ablate"),
                                               generate and name != "harmless ablated", max_tokens, refusal_ids,
                                               batch_size, bar)
        kl = next_token_kl(measures["harmless"].logits, measures["harmless ablated"].logits)
        return RefusalEvaluation(layer=layer, scale=direction.scale(layer), measures=measures, kl=kl,
                                 max_tokens=max_tokens, seconds=time.perf_counter() - start)

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
            harmful_scores, harmless_scores = (refusal_scores(x, refusal_ids) for x in (base_harmful, base_harmless))
            result.baseline_harmful = float(harmful_scores.mean())
            result.baseline_harmless = float(harmless_scores.mean())
            result.baseline_harmful_rate = float((harmful_scores > 0).mean())
            result.baseline_harmless_rate = float((harmless_scores > 0).mean())
            for L in layers:
                ablate = iv.ablation(result.vector(L), self.n_layer)
                induced, bypassed, ablated = self._last_logits(
                    [(harmless, iv.steering({L: result.per_layer[L]}, self.n_layer)), (harmful, ablate),
                     (harmless, ablate)], chat, batch_size)
                kl = float(next_token_kl(base_harmless, ablated).mean())
                induced, bypassed = refusal_scores(induced, refusal_ids), refusal_scores(bypassed, refusal_ids)
                induce = float(induced.mean())
                result.scores[L] = LayerScore(layer=L, induce=induce, bypass=float(bypassed.mean()), kl=kl,
                                              eligible=induce > 0 and kl < max_kl,
                                              induce_rate=float((induced > 0).mean()),
                                              bypass_rate=float((bypassed > 0).mean()))
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
