"""Model weights read from the GGUF file with the `gguf` package: embedding rows, final norm, LM head.

llama.cpp keeps weights in its own (possibly quantized, possibly GPU-resident) buffers and exposes none of
them; reading the file is simpler and works for every backend. The file is memory-mapped (`gguf_index`, which
skips the tokenizer arrays that `gguf.GGUFReader` would expand into ~160 MB of objects); a tensor is
dequantized to float32 only when first needed, and the LM head (the largest matrix) is kept once
dequantized, because the logit lens multiplies by it for every layer and position.

The unembedding here (final norm + LM head in numpy) is what the lens and `Unembed` use. The engine checks
at start-up that it reproduces llama.cpp's own logits on a probe token (`Engine._probe_sites`), so a model
whose final norm differs from RMSNorm/LayerNorm is reported instead of lensed wrongly.
"""
from __future__ import annotations

import collections

import numpy as np
from gguf import LlamaFileType
from gguf.quants import dequantize

from .errors import RequestError
from .gguf_index import GGUFIndex

LENS_ROWS_PER_CHUNK = 256


class Weights:
    def __init__(self, path: str):
        self.index = GGUFIndex(path)
        self.tensors = self.index.tensors
        self.architecture = self.field("general.architecture") or "llama"
        self.tied = "output.weight" not in self.tensors
        self.rms_eps = float(self.field(f"{self.architecture}.attention.layer_norm_rms_epsilon") or
                             self.field(f"{self.architecture}.attention.layer_norm_epsilon") or 1e-5)
        self.n_ff = self._n_ff()
        self._lm_head: np.ndarray | None = None
        self._norm: tuple[np.ndarray, np.ndarray | None] | None = None

    def field(self, key: str):
        """A scalar or string metadata value; None for absent keys and arrays."""
        return self.index.fields.get(key)

    def _n_ff(self) -> int:
        value = self.field(f"{self.architecture}.feed_forward_length")
        if value:
            return int(value)
        up = self.tensors.get("blk.0.ffn_up.weight")
        return int(up.shape[-1]) if up is not None else 0

    def tensor_types(self) -> dict[str, int]:
        return dict(collections.Counter(t.tensor_type.name for t in self.tensors.values()))

    def file_type_name(self) -> str:
        value = self.field("general.file_type")
        try:
            return LlamaFileType(value).name if value is not None else ""
        except ValueError:
            return str(value)

    def read(self, name: str) -> np.ndarray:
        """A whole tensor, dequantized to float32, in numpy order (ggml's `ne` reversed)."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise RequestError("NOT_FOUND", f"the model has no tensor {name!r}")
        data = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return np.asarray(data, dtype=np.float32).reshape(shape)

    def rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows of a 2-D tensor (numpy axis 0), dequantizing only those rows."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise RequestError("NOT_FOUND", f"the model has no tensor {name!r}")
        raw = tensor.data  # one raw row per numpy row for 2-D tensors, quantized blocks included
        data = dequantize(np.asarray(raw[indices]), tensor.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape(len(indices), -1)

    def embedding_rows(self, token_ids: np.ndarray) -> np.ndarray:
        return self.rows("token_embd.weight", token_ids)

    @property
    def lm_head(self) -> np.ndarray:
        if self._lm_head is None:
            self._lm_head = self.read("token_embd.weight" if self.tied else "output.weight")
        return self._lm_head

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        if self._norm is None:
            bias = self.tensors.get("output_norm.bias")
            self._norm = (self.read("output_norm.weight"), self.read("output_norm.bias") if bias is not None else None)
        weight, bias = self._norm
        x = x.astype(np.float32)
        if bias is None:
            return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.rms_eps) * weight
        centered = x - x.mean(axis=-1, keepdims=True)
        return centered / np.sqrt(np.mean(centered ** 2, axis=-1, keepdims=True) + self.rms_eps) * weight + bias

    def unembed(self, x: np.ndarray, final_norm: bool = True) -> np.ndarray:
        """Logits (n, n_vocab) for residual vectors x (n, n_embd)."""
        if final_norm:
            x = self.final_norm(x)
        return x.astype(np.float32) @ self.lm_head.T

    def lens(self, x: np.ndarray, *, top_k: int, temperature: float, target_ids: list[int],
             final_norm: bool = True, keep_logits: bool = False) -> dict[str, np.ndarray]:
        """The logit-lens reduction of many vectors, computed in chunks to bound memory."""
        n = x.shape[0]
        k = min(top_k, self.lm_head.shape[0])
        targets = np.asarray(target_ids, dtype=np.int64)
        out = {
            "top_ids": np.zeros((n, k), np.int32), "top_probs": np.zeros((n, k), np.float32),
            "target_probs": np.zeros((n, len(targets)), np.float32),
            "target_ranks": np.zeros((n, len(targets)), np.int32),
            "entropy": np.zeros((n,), np.float32),
        }
        if keep_logits:
            out["logits"] = np.zeros((n, self.lm_head.shape[0]), np.float32)
        for start in range(0, n, LENS_ROWS_PER_CHUNK):
            rows = slice(start, min(n, start + LENS_ROWS_PER_CHUNK))
            logits = self.unembed(x[rows], final_norm)
            if keep_logits:
                out["logits"][rows] = logits
            scaled = logits / np.float32(temperature)
            scaled -= scaled.max(axis=1, keepdims=True)
            probs = np.exp(scaled)
            probs /= probs.sum(axis=1, keepdims=True)
            out["entropy"][rows] = -(probs * np.log(np.maximum(probs, 1e-30))).sum(axis=1)
            if k:
                top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
                order = np.argsort(-np.take_along_axis(probs, top, axis=1), axis=1, kind="stable")
                top = np.take_along_axis(top, order, axis=1)
                out["top_ids"][rows] = top
                out["top_probs"][rows] = np.take_along_axis(probs, top, axis=1)
            if len(targets):
                target_logits = logits[:, targets]
                out["target_probs"][rows] = probs[:, targets]
                out["target_ranks"][rows] = (logits[:, None, :] > target_logits[:, :, None]).sum(axis=2)
        return out
