"""The fidelity map of a run: which (block, position) cells llama.cpp's activation rounding moves.

Before every product with a quantized weight matrix, llama.cpp's CPU kernels round each input row to 8-bit
blocks (Q8_0 / Q8_1 / Q8_K, per the weight type). A row holding a few massive values (an attention sink)
loses its small components there, and the block's output at that row can differ from the same weights'
exact product by tens of percent while every other row agrees to a few per cent. ``c.run(...,
fidelity=True)`` asks the server for the map (computed in the worker from rows it captures for the purpose,
`lmscope.service.fidelity` explains how); `Run.fidelity` returns it, and ``c.logit_lens(..., fidelity=True)``
marks the flagged cells in the lens and its view.

Reading it: ``estimate[L, j]`` is the estimated relative deviation of block L's output at the j-th returned
position from a run of the same weights in float32 (where no rounding happens); a cell is flagged when it
exceeds `THRESHOLD` (5 %, the deviation that docs/fidelity.md validates against). ``rounding[L, j, k]`` is
the exact relative rounding error of the input of product k (`PRODUCTS`) and ``effect[L, j, k]`` what it is
estimated to change in block L's output at that row. The map follows each row's own products, the
residual stream, and a row's change that reaches later rows through their attention to it (not the attention
weights' own response to it; docs/fidelity.md has what it leaves out and the validation figures).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The four matrix products of a block, in the order of the map's last axis.
PRODUCTS = ("attn_in", "attn_out", "ffn_in", "ffn_down")
#: A cell is flagged when its estimated relative deviation exceeds this.
THRESHOLD = 0.05


@dataclass
class FidelityMap:
    """rounding / effect: (n_layer, n_positions, 4); estimate: (n_layer, n_positions); positions: the prompt
    positions of the columns."""
    rounding: np.ndarray
    effect: np.ndarray
    estimate: np.ndarray
    positions: list[int]
    threshold: float = THRESHOLD

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], positions: list[int]) -> "FidelityMap":
        """From a run's ``fidelity.*`` tensors (`Run.extra`)."""
        return cls(**{name: np.asarray(arrays[f"fidelity.{name}"], np.float32)
                      for name in ("rounding", "effect", "estimate")}, positions=list(positions))

    @property
    def flags(self) -> np.ndarray:
        """(n_layer, n_positions) bool: the estimate exceeds the threshold."""
        return self.estimate > self.threshold

    def flagged(self) -> list[tuple[int, int]]:
        """(block, prompt position) of every flagged cell."""
        return [(int(L), self.positions[j]) for L, j in zip(*np.nonzero(self.flags))]

    def worst_product(self, layer: int, position: int) -> str:
        """The product whose rounding is estimated to move block `layer`'s output most at `position`."""
        return PRODUCTS[int(np.nanargmax(self.effect[layer, self.positions.index(position)]))]

    def __repr__(self) -> str:
        cells = self.flagged()
        shown = ", ".join(f"block {L} pos {p} ({self.estimate[L, self.positions.index(p)]:.0%}, "
                          f"{self.worst_product(L, p)})" for L, p in cells[:6])
        more = f", ... {len(cells) - 6} more" if len(cells) > 6 else ""
        return (f"FidelityMap({self.estimate.shape[0]} blocks x {len(self.positions)} positions, "
                f"{len(cells)} flagged over {self.threshold:.0%}{': ' + shown + more if cells else ''})")
