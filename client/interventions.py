"""Interventions as a client builds them: steering, ablation, patching, and the raw form behind them.

Every intervention is an `Intervention(op, sites, vector, positions)` applied by the server inside the
forward pass (see `proto/lmscope.proto`). The helpers below build the common ones:

- ``steer={layer: vector}`` (or a `ControlVector`): ADD the vector to the output of block ``layer``
  (``blocks.{layer}.resid_post``; the layer convention is in `lmscope.client.control_vector`) at every
  position, generated tokens included. Block 0 can be steered.
- ``ablate=direction``: ABLATE (project out) the direction from the residual stream everywhere: the
  embeddings and every block's ``resid_mid`` and ``resid_post``, at every position (arXiv 2406.11717).
- ``patch=[Patch(layer, position, vector)]``: SET (or ADD) one residual row, prompt positions only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from lmscope.proto import tensors
from lmscope.proto.wire import lmscope_pb2 as pb

from .errors import check_layer, invalid_argument

_OPS = {"add": pb.Intervention.ADD, "set": pb.Intervention.SET, "ablate": pb.Intervention.ABLATE}


@dataclass
class Intervention:
    """A raw intervention: `op` ("add", "set", "ablate") at `sites` (names or globs).

    `vector` is (width,) for every selected position, or (len(positions), width) with one row per position.
    `positions` None means every position, generated tokens included; `sequences` limits a batched run to
    some prompts.
    """
    op: str
    sites: Sequence[str] | str
    vector: np.ndarray
    positions: Sequence[int] | None = None
    sequences: Sequence[int] | None = None

    def to_proto(self) -> pb.Intervention:
        if self.op not in _OPS:
            raise invalid_argument(f"unknown intervention op {self.op!r}; use 'add', 'set' or 'ablate'")
        sites = [self.sites] if isinstance(self.sites, str) else list(self.sites)
        return pb.Intervention(op=_OPS[self.op], sites=sites,
                               vector=tensors.to_tensor(np.asarray(self.vector, dtype=np.float32)),
                               positions=list(self.positions or []), sequences=list(self.sequences or []))


@dataclass
class Patch:
    """Overwrite (mode="set") or shift (mode="add") the residual stream after block `layer` at `position`.

    `site` may name another residual-width site kind of the block, e.g. "resid_mid" or "attn_out".
    """
    layer: int
    position: int
    vector: np.ndarray
    mode: str = "set"
    site: str = "resid_post"

    def to_intervention(self) -> Intervention:
        site = "embed" if self.site == "embed" else f"blocks.{self.layer}.{self.site}"
        return Intervention(self.mode, [site], np.asarray(self.vector, dtype=np.float32), positions=[self.position])


def steering(steer, n_layer: int) -> list[Intervention]:
    """{layer: vector} or a `ControlVector` (anything with a `.directions` mapping) -> ADD interventions."""
    directions: Mapping[int, np.ndarray] = getattr(steer, "directions", steer)
    if not isinstance(directions, Mapping):
        raise invalid_argument("steer must be {layer: vector} or a ControlVector")
    for layer in directions:
        check_layer(layer, n_layer, "steering layer")
    return [Intervention("add", [f"blocks.{int(layer)}.resid_post"], np.asarray(v, dtype=np.float32))
            for layer, v in sorted(directions.items())]


def ablation(directions, n_layer: int) -> list[Intervention]:
    """Project each direction out of the residual stream at every site and position."""
    array = np.asarray(directions, dtype=np.float32)
    rows = array[None, :] if array.ndim == 1 else array
    sites = ["embed"] + [f"blocks.{L}.{k}" for L in range(n_layer) for k in ("resid_mid", "resid_post")]
    return [Intervention("ablate", sites, row) for row in rows]


def build(n_layer: int, steer=None, ablate=None, patch: Iterable[Patch] | None = None,
          interventions: Iterable[Intervention] | None = None) -> list[pb.Intervention]:
    out: list[Intervention] = []
    if steer is not None:
        out += steering(steer, n_layer)
    if ablate is not None:
        out += ablation(ablate, n_layer)
    if patch is not None:
        out += [p.to_intervention() for p in patch]
    if interventions is not None:
        out += list(interventions)
    return [iv.to_proto() for iv in out]
