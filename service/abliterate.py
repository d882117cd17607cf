"""Abliteration: a copy of a GGUF model with one direction projected out of every weight that writes to the
residual stream (`lmscope abliterate`).

Why. Ablating a direction r at run time (`generate(..., ablate=r)`) projects it out of the embeddings and of
every block's ``resid_mid`` and ``resid_post``. The same effect can be built into the weights (arXiv
2406.11717, "weight orthogonalization"): the stream is the embedding plus what each attention and FFN branch
adds, and each branch adds through one matrix, so projecting r out of the *output side* of those matrices
keeps the stream orthogonal to r everywhere, with no intervention and in any llama.cpp runtime. For a
llama-style model the writers are ``token_embd`` (each row is a residual vector: ``E <- E - (E r) r^T``),
``blk.L.attn_output`` and ``blk.L.ffn_down`` (numpy rows are output dimensions: ``W <- W - r (r^T W)``) and
their biases where present (``b <- b - r (r . b)``). The head (``output.weight``) reads the stream and is
left alone; a model whose head is tied to ``token_embd`` also loses r's component of the final normed state
in its logits, which run-time ablation keeps (the final norm's gain can put some of the stream along r).

Families whose branches pass through a norm *after* the output matrix (Gemma's post-norms) or through
experts are refused: there the matrix's output is not what joins the stream, so projecting it does not
remove r.

How. Each edited tensor is dequantized by ggml's own ``to_float`` (`StoredMatrix`), projected in float64,
and quantized back to its own type by ggml's own quantizer (``ggml_quantize_chunk``, no importance matrix),
so the bytes are exactly llama.cpp's format and the file keeps its size. Everything else is copied byte for
byte: the metadata (plus ``lmscope.abliteration.*`` keys saying what was done: the direction, the layer it
came from, the source's sha256), the tensor descriptions (same types and sizes, so same offsets) and every
other tensor.

Re-quantization. The projection moves each weight by far less than a quantization step (a direction
carries ~1/sqrt(n_embd) of a matrix's norm: 2.6 % on Qwen2.5 1.5B), and the original weights sit exactly on
the grid, so quantizing the projected weights once rounds most of the edit away: on Qwen2.5-Coder-1.5B's
Q4_K matrices ~75 % of the direction's write came back (Q6_K: ~12 %). Error feedback fixes it: after each
quantization, what the quantized matrix still writes along r is subtracted from the target and the target
quantized again (`corrections` rounds, default 3), which pushes just enough weights across a rounding
boundary; the write along r falls to ~10 % (Q4_K) and ~1 % (Q6_K) of the original while the error
orthogonal to r grows to about one more rounding of the type (3.4 % vs 1.7 % relative for Q4_K).
`AbliterationReport` gives both per tensor (`scripts/bench_refusal.py` prints them).
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType

from lmscope.proto import gguf_file
from lmscope.proto.gguf_file import GGUFHeader
from lmscope.proto.tensor_names import TOKEN_EMBEDDING

from . import architectures, ggml
from .gguf_index import GGUFIndex
from .stored_matrix import StoredMatrix, dequantize_raw

KEY_PREFIX = "lmscope.abliteration."
_N_KEYS = 7  # the entries `_metadata` writes
# Rows projected and quantized at once: bounds the float64 working copy (the embedding is 151,936 x 1,536).
CHUNK_ROWS = 4096
_COPY_BYTES = 16 << 20

_base = ggml.load_library("ggml-base")
_quantize_chunk = _base.ggml_quantize_chunk
_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_int64, ctypes.c_void_p]
_quantize_chunk.restype = ctypes.c_size_t
_quantize_init = _base.ggml_quantize_init
_quantize_init.argtypes = [ctypes.c_int]
_quantize_init.restype = None
_requires_imatrix = _base.ggml_quantize_requires_imatrix
_requires_imatrix.argtypes = [ctypes.c_int]
_requires_imatrix.restype = ctypes.c_bool
_row_size = _base.ggml_row_size
_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
_row_size.restype = ctypes.c_size_t

_F32, _F16 = int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16)


class AbliterationError(ValueError):
    """The model or the direction cannot be abliterated as asked; the message says what to fix."""


@dataclasses.dataclass
class TensorEdit:
    """One edited tensor. Errors are relative Frobenius norms over the whole tensor."""
    name: str
    type_name: str
    change: float           # |W' - W| / |W|: how much the projection moved the weights
    requantize_error: float  # |Q - W'| / |W'|: what re-quantization adds to the projected weights W'
    surviving_write: float   # |r^T Q| / |r^T W|: the share of r's write that re-quantization leaves (Q: stored)


@dataclasses.dataclass
class AbliterationReport:
    path: Path
    source: Path
    source_sha256: str
    layer: int
    bytes: int
    seconds: float
    edits: list[TensorEdit]

    def summary(self) -> str:
        worst = max(self.edits, key=lambda e: e.requantize_error)
        survive = max(self.edits, key=lambda e: e.surviving_write)
        return (f"wrote {self.path} ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s: {len(self.edits)} tensors "
                f"projected and re-quantized (largest re-quantization error {worst.requantize_error:.2e} in "
                f"{worst.name}; at most {survive.surviving_write:.1%} of the direction's write survives, in "
                f"{survive.name})")


def residual_writers(index: GGUFIndex) -> list[tuple[str, str]]:
    """(tensor name, how r is projected out) for every tensor that writes to the residual stream:
    "rows" (each numpy row is a residual vector), "columns" (numpy rows are the output dimensions) or
    "vector" (a bias). Raises AbliterationError for families where those matrices do not write the stream."""
    architecture = index.fields.get("general.architecture")
    family = architectures.family_for(str(architecture), index.tensors)
    if family.post_norms:
        raise AbliterationError(f"{architecture}: each branch passes through a norm after its output matrix, so "
                                f"projecting the matrices does not remove the direction; ablate it at run time "
                                f"instead (generate(..., ablate=v))")
    if family.moe:
        raise AbliterationError(f"{architecture}: mixture-of-experts FFNs are not supported; ablate the direction "
                                f"at run time instead (generate(..., ablate=v))")
    if architecture != family.architecture:
        known = ", ".join(f.architecture for f in architectures.KNOWN_FAMILIES)
        raise AbliterationError(f"{architecture!r} is not a family lmscope knows ({known}), so which tensors write "
                                f"the residual stream is not known")
    n_layer = int(index.fields[f"{architecture}.block_count"])
    writers = [(TOKEN_EMBEDDING, "rows")]
    for L in range(n_layer):
        for stem in ("attn_output", "ffn_down"):
            if f"blk.{L}.{stem}.weight" not in index.tensors:
                raise AbliterationError(f"the file has no blk.{L}.{stem}.weight: not a llama-style layout")
            writers.append((f"blk.{L}.{stem}.weight", "columns"))
            if f"blk.{L}.{stem}.bias" in index.tensors:
                writers.append((f"blk.{L}.{stem}.bias", "vector"))
    missing = [name for name, _ in writers if name not in index.tensors]
    if missing:
        raise AbliterationError(f"the file lacks {missing[:3]}")
    return writers


def quantize(values: np.ndarray, ggml_type: int, threads: int = 1) -> np.ndarray:
    """values (rows, n) in ggml type `ggml_type`, as raw bytes (rows, row_bytes): llama.cpp's own quantizer
    (`ggml_quantize_chunk`, no importance matrix; rows split over `threads`); F32 and F16 by plain rounding."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == _F32:
        return values.view(np.uint8)
    if ggml_type == _F16:
        return values.astype(np.float16).view(np.uint8)
    if _requires_imatrix(ggml_type):
        raise AbliterationError(f"{GGMLQuantizationType(ggml_type).name} cannot be quantized without an importance "
                                f"matrix")
    rows, n = values.shape
    out = np.empty((rows, _row_size(ggml_type, n)), np.uint8)
    _quantize_init(ggml_type)  # once, before any threads (it fills shared tables for some types)

    def part(first: int, last: int) -> None:
        written = _quantize_chunk(ggml_type, values.ctypes.data, out.ctypes.data, first * n, last - first, n, None)
        if written != out[first:last].nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out[first:last].nbytes}")

    bounds = np.linspace(0, rows, max(1, min(threads, rows)) + 1).astype(int)
    with ThreadPoolExecutor(len(bounds) - 1) as pool:  # ctypes releases the GIL inside ggml
        list(pool.map(part, bounds[:-1], bounds[1:]))
    return out


def project_out(w: np.ndarray, r: np.ndarray, how: str, ggml_type: int, corrections: int, threads: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project the unit r out of w (rows, n) float64 and quantize the result to `ggml_type`, with
    `corrections` rounds of error feedback (the module docstring): (raw bytes, the stored values read back
    as float64, the exact projection). how="rows": each row is a residual vector (r has n entries);
    "columns": rows are output dimensions (r has one entry per row, w is the whole matrix)."""
    def along_r(x: np.ndarray) -> np.ndarray:
        return np.outer(x @ r, r) if how == "rows" else np.outer(r, r @ x)

    projected = w - along_r(w)
    # A float type is rounded once to nearest: feedback would only add rounding-sized shifts along r.
    rounds = 1 if ggml_type in (_F32, _F16) else corrections + 1
    target = projected
    for _ in range(rounds):
        raw = quantize(target, ggml_type, threads)
        back = dequantize_raw(raw, ggml_type, w.shape[1]).astype(np.float64)
        target = target - along_r(back)
    return raw, back, projected


class _Projector:
    """Projects r out of one tensor and quantizes the result back; gathers the error norms."""

    def __init__(self, index: GGUFIndex, name: str, how: str, r: np.ndarray, threads: int, corrections: int):
        self.tensor = index.tensors[name]
        self.name, self.how, self.r = name, how, r
        self.ggml_type = int(self.tensor.tensor_type)
        self.threads, self.corrections = threads, corrections

    def run(self) -> tuple[np.ndarray, TensorEdit]:
        """(the tensor's new bytes, flat; its TensorEdit)."""
        if self.how == "vector":
            w = np.asarray(self.tensor.read(), np.float64)
            raw, back, projected = project_out(w[None, :], self.r, "rows", self.ggml_type, 0)
            sums = np.array([np.sum(w ** 2), np.sum((projected[0] - w) ** 2), np.sum((back - projected) ** 2)])
            return raw.reshape(-1), self._edit(sums, abs(self.r @ w), abs(back[0] @ self.r))
        matrix = StoredMatrix(self.tensor, 1)
        if self.how == "columns":
            # r^T W sums over every row (the output dimensions, n_embd of them): the matrix is one piece, and
            # the quantizer's rows are split over the threads instead.
            w = matrix.dequantize(0, matrix.n_rows).astype(np.float64)
            raw, back, projected = project_out(w, self.r, "columns", self.ggml_type, self.corrections, self.threads)
            matrix.release()
            sums = np.array([np.sum(w ** 2), np.sum((projected - w) ** 2), np.sum((back - projected) ** 2)])
            return raw.reshape(-1), self._edit(sums, np.linalg.norm(self.r @ w), np.linalg.norm(self.r @ back))
        # "rows" (the embedding table, vocabulary-sized): rows are independent, so chunks of rows run in parallel.
        out = np.empty((matrix.n_rows, matrix.row_bytes), np.uint8)
        sums, before, after = np.zeros(3), 0.0, 0.0
        starts = range(0, matrix.n_rows, CHUNK_ROWS)
        with ThreadPoolExecutor(self.threads) as pool:
            for start, (raw, chunk_sums, chunk_before, chunk_after) in zip(
                    starts, pool.map(lambda s: self._rows(matrix, s), starts)):
                out[start:start + len(raw)] = raw
                sums += chunk_sums
                before += chunk_before
                after += chunk_after
        matrix.release()
        return out.reshape(-1), self._edit(sums, np.sqrt(before), np.sqrt(after))

    def _rows(self, matrix: StoredMatrix, start: int):
        w = matrix.dequantize(start, min(matrix.n_rows, start + CHUNK_ROWS)).astype(np.float64)
        raw, back, projected = project_out(w, self.r, "rows", self.ggml_type, self.corrections)
        sums = np.array([np.sum(w ** 2), np.sum((projected - w) ** 2), np.sum((back - projected) ** 2)])
        return raw, sums, np.sum((w @ self.r) ** 2), np.sum((back @ self.r) ** 2)

    def _edit(self, sums: np.ndarray, before: float, after: float) -> TensorEdit:
        total, change, error = sums
        projected_norm = np.sqrt(max(total - change, 0.0))  # W' = W minus a part orthogonal to W'
        return TensorEdit(name=self.name, type_name=GGMLQuantizationType(self.ggml_type).name,
                          change=float(np.sqrt(change / total)) if total else 0.0,
                          requantize_error=float(np.sqrt(error) / projected_norm) if projected_norm else 0.0,
                          surviving_write=float(after / before) if before else 0.0)


def _kv_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _metadata(direction: np.ndarray, layer: int, source: Path, sha256: str, n_tensors: int,
              corrections: int) -> bytes:
    """The `lmscope.abliteration.*` entries, encoded as GGUF metadata (version 2 and 3 share the encoding)."""
    def entry(key: str, kind: int, payload: bytes) -> bytes:
        return _kv_string(KEY_PREFIX + key) + struct.pack("<I", kind) + payload

    vector = np.ascontiguousarray(direction, dtype="<f4")
    return b"".join([
        entry("direction", gguf_file.ARRAY, struct.pack("<IQ", gguf_file.FLOAT32, len(vector)) + vector.tobytes()),
        entry("layer", gguf_file.INT32, struct.pack("<i", layer)),
        entry("source_file", gguf_file.STRING, _kv_string(source.name)),
        entry("source_sha256", gguf_file.STRING, _kv_string(sha256)),
        entry("tensors", gguf_file.UINT32, struct.pack("<I", n_tensors)),
        entry("corrections", gguf_file.UINT32, struct.pack("<I", corrections)),
        entry("method", gguf_file.STRING, _kv_string(
            "the unit direction projected out of the output side of token_embd, blk.*.attn_output and "
            "blk.*.ffn_down (and their biases), re-quantized to each tensor's type by ggml_quantize_chunk")),
    ])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_direction(direction, n_embd: int) -> np.ndarray:
    r = np.asarray(direction, dtype=np.float64)
    if r.shape != (n_embd,):
        raise AbliterationError(f"the direction has shape {r.shape}, the model's residual stream is ({n_embd},)")
    norm = np.linalg.norm(r)
    if not np.isfinite(norm) or norm == 0:
        raise AbliterationError("the direction must be finite and nonzero")
    return r / norm


def abliterate(source: str | os.PathLike, direction, out: str | os.PathLike, *, layer: int = -1,
               threads: Optional[int] = None, corrections: int = 3, expected_sha256: str = "",
               progress: Optional[Callable[[str], object]] = None) -> AbliterationReport:
    """Write to `out` a copy of the GGUF model `source` with the unit `direction` (n_embd,) projected out of
    every residual-writing tensor (see the module docstring). `layer`: the layer the direction was taken
    from, recorded in the metadata (-1: not given). `corrections`: error-feedback rounds after the first
    quantization (0: quantize the projected weights once). `expected_sha256`: refuse a source with another hash
    (the model the direction was computed on). The file is written beside `out` and moved in place when
    complete."""
    say = progress or (lambda _message: None)
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    if out.exists() and out.resolve() == source.resolve():
        raise AbliterationError("the output path is the source model: choose another file name")
    if isinstance(corrections, bool) or not isinstance(corrections, int) or not 0 <= corrections <= 16:
        raise AbliterationError(f"corrections must be an integer from 0 to 16, not {corrections!r}")
    index = GGUFIndex(str(source))
    buffer = np.memmap(source, mode="r", dtype=np.uint8)
    header = GGUFHeader(buffer, str(source))
    infos = header.tensor_infos()
    if any(key.startswith(KEY_PREFIX) for key in header.fields):
        raise AbliterationError(f"{source.name} is already abliterated (it has {KEY_PREFIX}* metadata); start from "
                                f"the original model")
    architecture = index.fields.get("general.architecture")
    n_embd = int(index.fields[f"{architecture}.embedding_length"])
    r = _check_direction(direction, n_embd)
    writers = dict(residual_writers(index))
    threads = max(1, threads or os.cpu_count() or 1)
    say(f"hashing {source.name} ...")
    sha256 = _sha256(source)
    if expected_sha256 and expected_sha256 != sha256:
        raise AbliterationError(f"the direction was computed on another model (sha256 {expected_sha256[:12]}...), "
                                f"not on {source.name} ({sha256[:12]}...): abliterate the model it belongs to")

    # The header: the source's, with the new metadata appended (same tensor descriptions: same types, sizes
    # and offsets), then each tensor in file order, edited ones as they are computed.
    n_fields = struct.unpack_from("<Q", buffer, 16)[0]
    head = bytes(buffer[:16]) + struct.pack("<Q", n_fields + _N_KEYS) + bytes(buffer[24:header.metadata_end]) \
        + _metadata(r.astype(np.float32), layer, source, sha256, len(writers), corrections) \
        + bytes(buffer[header.metadata_end:header.tensor_infos_end])
    data_start = -(-len(head) // header.alignment) * header.alignment
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    edits = []
    try:
        with open(partial, "wb") as f:
            f.write(head + b"\0" * (data_start - len(head)))
            position = header.data_start  # in the source
            for info in sorted(infos, key=lambda info: info.offset):
                begin = header.data_start + info.offset
                f.write(buffer[position:begin])  # alignment padding between tensors
                size = index.tensors[info.name].data.nbytes
                if info.name in writers:
                    raw, edit = _Projector(index, info.name, writers[info.name], r, threads, corrections).run()
                    if raw.nbytes != size:
                        raise RuntimeError(f"{info.name}: re-quantized to {raw.nbytes} bytes, stored {size}")
                    f.write(raw.tobytes())
                    edits.append(edit)
                    if len(edits) % 8 == 1 or len(edits) == len(writers):
                        say(f"projected {len(edits)}/{len(writers)} tensors ({info.name}: {edit.type_name}, "
                            f"re-quantization error {edit.requantize_error:.2e})")
                else:
                    for chunk in range(begin, begin + size, _COPY_BYTES):
                        f.write(buffer[chunk:min(begin + size, chunk + _COPY_BYTES)])
                position = begin + size
            f.write(buffer[position:])
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        index.release()
        del buffer
    report = AbliterationReport(path=out, source=source, source_sha256=sha256, layer=layer,
                                bytes=out.stat().st_size, seconds=time.perf_counter() - start, edits=edits)
    say(report.summary())
    return report


def read_abliteration(path: str | os.PathLike) -> dict:
    """The `lmscope.abliteration.*` metadata of a file (empty for a file that is not abliterated); the
    direction comes back as a float32 array."""
    index = GGUFIndex(str(path))
    fields = {key[len(KEY_PREFIX):]: value for key, value in index.fields.items() if key.startswith(KEY_PREFIX)}
    if "direction" in fields:
        fields["direction"] = _read_direction(Path(path))
    return fields


def _read_direction(path: Path) -> np.ndarray:
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields[KEY_PREFIX + "direction"]
    return np.array([field.parts[i][0] for i in field.data], dtype=np.float32)
