"""Results of activation patching and Patchscopes, and the metrics a patching sweep scores.

Activation patching (causal tracing): run a *corrupted* prompt, but overwrite one residual-stream row
(layer L, position p) with the state the *clean* prompt had there, and measure how much of the clean
behaviour comes back. A sweep over layers x positions shows where the information that separates the two
prompts lives. The score of a patched run is `metric(last-position logits)`; the default metric is the
logit difference between the clean run's answer and the corrupted run's answer (`logit_difference`).
`PatchSweep.normalized()` rescales it so that 0 is the corrupted run and 1 the clean run.

Patchscopes (Ghandeharioun et al., arXiv 2401.06102): take a hidden state from a *source* prompt and
patch it into a *target* prompt built to make the model verbalise what the state encodes, then let the
model generate. `IDENTITY_PROMPT` is the paper's few-shot token-identity target: the patched "?" at the
end is read as "some token", and the examples before it ask the model to repeat that token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import invalid_argument
from .heatmap import heatmap

IDENTITY_PROMPT = "cat->cat; 1135->1135; hello->hello; ?"

Metric = Callable[[np.ndarray], float]


def logit_difference(good_id: int, bad_id: int) -> Metric:
    """A metric: logit of `good_id` minus logit of `bad_id` in a logits row."""
    def metric(logits: np.ndarray) -> float:
        return float(logits[good_id]) - float(logits[bad_id])
    metric.__name__ = f"logit[{good_id}] - logit[{bad_id}]"
    return metric


@dataclass
class Patchscope:
    """What the model generated from the target prompt with the source's hidden state patched in."""
    text: str
    token_ids: list[int]
    source_layer: int
    source_position: int     # absolute position in the source prompt
    source_token: str        # the source token whose state was read
    target: str
    target_layer: int
    target_position: int     # absolute position in the target prompt
    vector: np.ndarray       # the patched hidden state (blocks.{source_layer}.resid_post)

    def __repr__(self) -> str:
        return (f"Patchscope({self.text!r}; source token {self.source_token!r} at position {self.source_position}, "
                f"layer {self.source_layer} -> target layer {self.target_layer} position {self.target_position})")


@dataclass
class PatchSweep:
    """values[i, j]: the metric with the clean state patched at (layers[i], positions[j])."""
    values: np.ndarray
    layers: list[int]
    positions: list[int]
    tokens: list[str]            # a label per position: the clean token, "clean/corrupted" where they differ
    clean_value: float           # the metric on the clean run
    corrupted_value: float       # the metric on the unpatched corrupted run
    site: str                    # the patched site kind, e.g. "resid_post"
    metric_name: str

    def normalized(self) -> np.ndarray:
        """(values - corrupted) / (clean - corrupted): 0 = no effect, 1 = fully restored."""
        span = self.clean_value - self.corrupted_value
        if span == 0:
            raise invalid_argument("the metric is equal on the clean and the corrupted run: nothing to normalize by")
        return (self.values - self.corrupted_value) / span

    def plot(self, *, normalized: bool = False, ax=None, save: str | None = None):
        """Heatmap of the sweep (positions down, layers across, as in causal tracing); returns the figure."""
        values = self.normalized() if normalized else self.values
        limit = float(np.nanmax(np.abs(values))) or 1.0
        return heatmap(values.T, row_labels=[f"{p}: {t}" for p, t in zip(self.positions, self.tokens)],
                       col_labels=[str(L) for L in self.layers],
                       title=f"activation patching of {self.site} (clean into corrupted)",
                       xlabel="layer", ylabel="position: token (clean/corrupted)",
                       colorbar_label="restored fraction" if normalized else self.metric_name,
                       cmap="RdBu", vmin=-limit, vmax=limit, ax=ax, save=save)

    def to_html(self, path=None, *, normalized: bool = False) -> str:
        """The patching view (`lmscope.client.views`): the layer x position grid with values on hover; a
        self-contained page, written to `path` if given."""
        from .views import patch_html, write

        return write(patch_html(self, normalized=normalized), f"activation patching of {self.site}", path)

    def _repr_html_(self) -> str:
        from .views import patch_html

        return patch_html(self)

    def __repr__(self) -> str:
        return (f"PatchSweep({self.site}, {len(self.layers)} layers x {len(self.positions)} positions, "
                f"{self.metric_name}: clean {self.clean_value:.3f}, corrupted {self.corrupted_value:.3f})")
