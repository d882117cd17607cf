"""`ControlVector`: per-layer steering directions, their arithmetic, and llama.cpp's control-vector file.

Layer convention (the one place it is written down; every other API refers here)
--------------------------------------------------------------------------------
A direction stored for layer ``L`` is added to the output of 0-based transformer block ``L``: the site
``blocks.L.resid_post``, which is Hugging Face's ``hidden_states[L + 1]`` (``hidden_states[0]`` is the
embeddings). llama.cpp's control-vector file uses the same numbering: its tensor ``direction.N`` is added
to the output of block ``N``, so ``direction.N`` <-> our layer ``N``. The file cannot hold a direction for
block 0 (llama.cpp rejects ``direction.0``), although lmscope's server can steer block 0 in a request.

Beware of where a file's vectors were *measured*. llama.cpp's ``cvector-generator`` takes the difference
at the output of block ``N - 1`` (``l_out-(N-1)``) and stores it as ``direction.N``, one block later
(``tools/cvector-generator/{mean,pca}.hpp`` name it ``direction.{il+1}``; checked in the llama.cpp that
llama-cpp-python 0.3.36 vendors). repeng measures where it steers: since 0.2.0 (commit 6a5e9ec, "GGUF
export (#5)", Feb 2024) it reads Hugging Face's ``hidden_states[L + 1]``, the output of block ``L``, and
writes it as ``direction.L``, the block its ``ControlModel`` adds it to, so its files match this numbering
exactly (checked in repeng 0.5.0, commit 0ba7196, Sep 2025; repeng 0.1.0 read ``hidden_states[L]``, the
output of block ``L - 1``). Loading keeps the file's numbering: the vector is applied where llama.cpp
would apply it. Directions computed by lmscope (e.g. `Client.refusal_direction`) are measured at
``blocks.L.resid_post`` and stored at ``L``.

The file format
---------------
A GGUF file (version 2 or 3, little-endian) with the metadata ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the architecture it was made for, free text) and ``controlvector.layer_count``
(the number of direction tensors), and one F32 1-D tensor ``direction.N`` (length ``n_embd``) per layer.
The client must stay installable without the server's ``gguf`` package, so files are read with the
project's own GGUF reader (`lmscope.proto.gguf_file`, which the service's model index uses too) and this
small subset is written here. Nothing in a file is trusted: every count, length and offset is checked
against the size of the file before anything is read or allocated, so a malformed or hostile file raises
`LmscopeError` INVALID_ARGUMENT, a ``ValueError`` (never a crash, a hang or a huge allocation).
"""
from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO, Iterable, Iterator, Mapping

import numpy as np

from lmscope.proto.gguf_file import DEFAULT_ALIGNMENT, INT32, MAGIC, STRING, GGUFFormatError, GGUFHeader

from .errors import invalid_argument, out_of_range

ARCHITECTURE = "controlvector"
_VERSION = 3
_GGML_TYPE_F32 = 0
_DIRECTION_NAME = re.compile(r"direction\.(\d+)")


class ControlVector:
    """Steering directions by layer: ``{layer: (n_embd,) float32}`` (layers as in the module docstring).

    ``ControlVector({12: v})`` steers the output of block 12 by ``v``. Arithmetic works layer by layer
    (a layer missing on one side counts as zero): ``a + b``, ``a - b``, ``-a``, ``a * 0.5``, ``2 * a``;
    `normalize` gives unit directions. Values are float32 (the file's type) and always finite: an operation
    whose result overflows float32 raises ``ValueError``.

    Pass it anywhere a request takes ``steer=`` (`Client.run`, `Client.generate`): the server adds each
    direction to ``blocks.L.resid_post`` at every position, generated tokens included.
    """

    __array_ufunc__ = None  # so that ``numpy_scalar * vector`` comes to __rmul__ instead of numpy

    def __init__(self, directions: Mapping[int, np.ndarray], model_hint: str = ""):
        if not isinstance(directions, Mapping) or not directions:
            raise invalid_argument("a control vector needs at least one {layer: vector} entry")
        checked: dict[int, np.ndarray] = {}
        width = None
        for layer, vector in directions.items():
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
                raise invalid_argument(f"layer {layer!r} is not a block index (an int >= 0)")
            array = _as_float32(vector, f"the direction for layer {layer}")
            if array.ndim != 1 or array.size == 0:
                raise invalid_argument(f"the direction for layer {layer} must be a non-empty vector (n_embd,), "
                                       f"got shape {list(array.shape)}")
            if width is not None and array.size != width:
                raise invalid_argument(f"the direction for layer {layer} has width {array.size}, the others {width}")
            width = array.size
            checked[int(layer)] = array
        if not isinstance(model_hint, str):
            raise invalid_argument("model_hint must be a string")
        self.directions: dict[int, np.ndarray] = dict(sorted(checked.items()))
        self.model_hint = model_hint

    @classmethod
    def from_directions(cls, directions, layers: Iterable[int] | None = None, scale: float = 1.0,
                        model_hint: str = "") -> "ControlVector":
        """Build from arrays: ``{layer: vector}``, a per-layer matrix (row ``L`` = layer ``L``, e.g.
        `RefusalDirection.per_layer`), or one vector repeated at every layer of ``layers``.

        ``layers`` picks the layers to keep (required for a single vector); ``scale`` multiplies every
        direction.
        """
        if isinstance(directions, Mapping):
            chosen = dict(directions) if layers is None else {int(L): directions[L] for L in layers}
        else:
            array = np.asarray(directions)
            if array.ndim == 1:
                if layers is None:
                    raise invalid_argument("a single vector needs `layers`: the blocks to add it to")
                chosen = {int(L): array for L in layers}
            elif array.ndim == 2:
                picked = range(array.shape[0]) if layers is None else [int(L) for L in layers]
                bad = [L for L in picked if not 0 <= L < array.shape[0]]
                if bad:
                    raise out_of_range(f"layer {bad[0]} is out of range: the matrix has {array.shape[0]} layers "
                                       f"(0..{array.shape[0] - 1})")
                chosen = {L: array[L] for L in picked}
            else:
                raise invalid_argument(f"expected a mapping, a (n_layer, n_embd) matrix or a vector, got shape "
                                       f"{list(array.shape)}")
        vector = cls(chosen, model_hint)
        return vector if scale == 1.0 else vector * scale

    # ----- inspection ------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def width(self) -> int:
        return next(iter(self.directions.values())).size

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.directions[layer]

    def __contains__(self, layer) -> bool:
        return layer in self.directions

    def __len__(self) -> int:
        return len(self.directions)

    def __iter__(self) -> Iterator[int]:
        return iter(self.directions)

    def __eq__(self, other) -> bool:
        if not isinstance(other, ControlVector):
            return NotImplemented
        return (self.model_hint == other.model_hint and self.layers == other.layers
                and all(np.array_equal(self[L], other[L]) for L in self.layers))

    __hash__ = None  # mutable arrays inside

    def __repr__(self) -> str:
        norms = ", ".join(f"{L}: {np.linalg.norm(v):.3g}" for L, v in list(self.directions.items())[:8])
        more = ", ..." if len(self) > 8 else ""
        hint = f", model_hint={self.model_hint!r}" if self.model_hint else ""
        return f"ControlVector(width={self.width}, layers/norms {{{norms}{more}}}{hint})"

    # ----- arithmetic ------------------------------------------------------------------------------

    def _combine(self, other: "ControlVector", sign: float) -> "ControlVector":
        if not isinstance(other, ControlVector):
            return NotImplemented
        if other.width != self.width:
            raise invalid_argument(f"cannot combine control vectors of widths {self.width} and {other.width}")
        if self.model_hint and other.model_hint and self.model_hint != other.model_hint:
            raise invalid_argument(f"cannot combine control vectors for different models "
                                   f"({self.model_hint!r} and {other.model_hint!r})")
        out = {L: v.astype(np.float64) for L, v in self.directions.items()}
        for L, v in other.directions.items():
            out[L] = out.get(L, 0.0) + sign * v.astype(np.float64)
        return ControlVector({L: _checked(v, "the sum") for L, v in out.items()},
                             self.model_hint or other.model_hint)

    def __add__(self, other: "ControlVector") -> "ControlVector":
        return self._combine(other, 1.0)

    def __sub__(self, other: "ControlVector") -> "ControlVector":
        return self._combine(other, -1.0)

    def __mul__(self, scale) -> "ControlVector":
        if isinstance(scale, (bool, ControlVector)) or not np.isscalar(scale) or not np.isreal(scale):
            return NotImplemented
        if not np.isfinite(scale):
            raise invalid_argument(f"cannot scale a control vector by {scale}")
        return ControlVector({L: _checked(v.astype(np.float64) * float(scale), f"scaling by {scale}")
                              for L, v in self.directions.items()}, self.model_hint)

    __rmul__ = __mul__

    def __neg__(self) -> "ControlVector":
        return ControlVector({L: -v for L, v in self.directions.items()}, self.model_hint)

    def normalize(self) -> "ControlVector":
        """Every layer's direction scaled to unit L2 norm."""
        out = {}
        for L, v in self.directions.items():
            norm = float(np.linalg.norm(v.astype(np.float64)))
            if norm == 0:
                raise invalid_argument(f"cannot normalize the zero direction at layer {L}")
            out[L] = v.astype(np.float64) / norm
        return ControlVector(out, self.model_hint)

    # ----- files -----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write llama.cpp's control-vector GGUF (loadable by ``llama-server --control-vector``)."""
        if 0 in self.directions:
            raise invalid_argument("llama.cpp control-vector files cannot hold layer 0 (direction.0 is rejected by "
                                   "llama.cpp); drop it or steer block 0 per request with steer={0: vector}")
        with open(path, "wb") as f:
            _write_gguf(f, self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ControlVector":
        """Read a control-vector GGUF (ours, llama.cpp's cvector-generator, repeng). ``ValueError`` if it is
        not one or is malformed; layer numbers are the file's (see the module docstring)."""
        with open(path, "rb") as f:
            return _read_gguf(f.read(), os.fspath(path))


def _as_float32(vector, what: str) -> np.ndarray:
    try:
        array = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise invalid_argument(f"{what} is not numeric: {exc}") from None
    return _checked(array, what)


def _checked(array: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise invalid_argument(f"{what} has NaN or infinite values")
    with np.errstate(over="ignore"):
        single = array.astype(np.float32)
    if not np.all(np.isfinite(single)):
        raise invalid_argument(f"{what} overflows float32 (largest magnitude {np.max(np.abs(array)):.3g}); "
                               f"scale it down")
    return single


# ----- writer ---------------------------------------------------------------------------

def _gguf_string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _write_gguf(f: BinaryIO, vector: ControlVector) -> None:
    metadata = [
        ("general.architecture", STRING, _gguf_string(ARCHITECTURE)),
        (f"{ARCHITECTURE}.model_hint", STRING, _gguf_string(vector.model_hint)),
        # int32 as llama.cpp's cvector-generator writes it; llama.cpp itself never reads this key.
        (f"{ARCHITECTURE}.layer_count", INT32, struct.pack("<i", len(vector))),
    ]
    header = bytearray(MAGIC + struct.pack("<IQQ", _VERSION, len(vector), len(metadata)))
    for key, kind, value in metadata:
        header += _gguf_string(key) + struct.pack("<I", kind) + value
    nbytes = vector.width * 4
    stride = _align(nbytes, DEFAULT_ALIGNMENT)
    for k, layer in enumerate(vector.layers):
        header += _gguf_string(f"direction.{layer}")
        header += struct.pack("<IQIQ", 1, vector.width, _GGML_TYPE_F32, k * stride)
    header += bytes(_align(len(header), DEFAULT_ALIGNMENT) - len(header))
    f.write(header)
    for layer in vector.layers:
        f.write(vector[layer].astype("<f4").tobytes())
        f.write(bytes(stride - nbytes))


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ----- reader (the GGUF parsing is `gguf_file`'s) -----------------------------------------------------

def _read_gguf(raw: bytes, name: str) -> ControlVector:
    def fail(message: str):
        raise invalid_argument(f"{name} is not a valid control-vector GGUF file: {message}")

    try:
        header = GGUFHeader(raw, name)
        architecture = header.fields.get("general.architecture")
        if architecture != ARCHITECTURE:
            raise invalid_argument(f"{name} is not a control vector: general.architecture is {architecture!r}, "
                                   f"not {ARCHITECTURE!r}")
        infos = header.tensor_infos()
    except GGUFFormatError as exc:
        fail(str(exc).removeprefix(f"{name}: "))
    model_hint = header.fields.get(f"{ARCHITECTURE}.model_hint", "")
    if not isinstance(model_hint, str):
        fail(f"{ARCHITECTURE}.model_hint is not a string")
    directions: dict[int, np.ndarray] = {}
    size, data_start = len(raw), header.data_start
    for info in infos:
        match = _DIRECTION_NAME.fullmatch(info.name)
        if match is None:
            fail(f"tensor {info.name!r} is not named direction.<layer>")
        layer = int(match.group(1))
        if layer == 0:
            fail("it has direction.0; llama.cpp numbers control-vector layers from 1")
        if layer in directions:
            fail(f"{info.name} appears twice")
        if info.ggml_type != _GGML_TYPE_F32:
            fail(f"{info.name} has ggml type {info.ggml_type}; control vectors are F32 (type 0)")
        if any(d > 1 for d in info.dims[1:]):
            fail(f"{info.name} has shape {list(info.dims)}; a direction is 1-D")
        width, offset = info.dims[0], info.offset
        if offset % header.alignment:
            fail(f"{info.name} starts at offset {offset}, not a multiple of the alignment {header.alignment}")
        if width == 0:
            fail(f"{info.name} has no elements")
        if width > (size - data_start) // 4 or offset > size - data_start - 4 * width:
            fail(f"{info.name} ({width} floats at data offset {offset}) lies outside the file")
        start = data_start + offset
        vector = np.frombuffer(raw[start:start + 4 * width], dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(vector)):
            fail(f"{info.name} has NaN or infinite values")
        directions[layer] = vector
    if not directions:
        fail("it holds no direction tensors")
    widths = {v.size for v in directions.values()}
    if len(widths) > 1:
        fail(f"its directions have different widths {sorted(widths)}")
    return ControlVector(directions, model_hint)
