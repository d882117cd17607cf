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


ARGMAX_TOP_K = 32  # up to this k, k argmax passes beat one argpartition over a vocabulary-wide row


def top_k_columns(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values of each row, largest first (ties: lowest index first).

    For small k, k passes of argmax (each masking the winner, restored afterwards) are an order of magnitude
    faster than argpartition over 50k columns; larger k use argpartition + a sort of the k candidates.
    """
    if k > ARGMAX_TOP_K:
        top = np.argpartition(values, values.shape[1] - k, axis=1)[:, -k:]
        order = np.argsort(-np.take_along_axis(values, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)
    rows = np.arange(values.shape[0])
    top = np.empty((values.shape[0], k), np.int64)
    saved = np.empty((values.shape[0], k), values.dtype)
    for i in range(k):
        top[:, i] = values.argmax(axis=1)
        saved[:, i] = values[rows, top[:, i]]
        values[rows, top[:, i]] = -np.inf
    for i in range(k):
        values[rows, top[:, i]] = saved[:, i]
    return top


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
        self._embedding: np.ndarray | None = None
        self._inverse_norms: dict[str, np.ndarray] = {}
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
            # softmax(z) = e / total with z = logits / T - max, e = exp(z);
            # its entropy is log(total) - sum(e z) / total.
            # Only gathered probabilities are divided, and p log p is never materialized: the passes over the
            # (rows, n_vocab) block, not the LM-head product, were most of the reduction's time.
            scaled = logits / np.float32(temperature)
            scaled -= scaled.max(axis=1, keepdims=True)
            exps = np.exp(scaled)
            total = exps.sum(axis=1)
            out["entropy"][rows] = np.log(total) - np.einsum("ij,ij->i", exps, scaled) / total
            if k:
                top = top_k_columns(logits, k)
                out["top_ids"][rows] = top
                out["top_probs"][rows] = np.take_along_axis(exps, top, axis=1) / total[:, None]
            if len(targets):
                target_logits = logits[:, targets]
                out["target_probs"][rows] = exps[:, targets] / total[:, None]
                for j in range(len(targets)):  # one target at a time: memory (rows, n_vocab), not x n_targets
                    out["target_ranks"][rows, j] = (logits > target_logits[:, j:j + 1]).sum(axis=1)
        return out

    def vocabulary_table(self, table: str) -> np.ndarray:
        """The token-embedding table ("embedding") or the LM head ("lm_head"), (n_vocab, n_embd) float32.

        In a tied model both names are one array (the head is `token_embd.weight`), held once.
        """
        if table == "lm_head" or self.tied:
            return self.lm_head
        if self._embedding is None:
            self._embedding = self.read("token_embd.weight")
        return self._embedding

    def nearest(self, vectors: np.ndarray, k: int, table: str, exclude_ids: list[int] = ()) -> dict[str, np.ndarray]:
        """The k rows of a vocabulary table with the highest cosine similarity to each vector.

        The inverse row norms are computed once per table and kept, rather than a normalized copy of the
        table: cosine = (v / |v|) . row * (1 / |row|) costs one extra multiply per score and no second
        copy of the largest matrix. All-zero rows (unused tokens) score 0; excluded tokens score -inf, so
        they are never among the k.
        """
        matrix = self.vocabulary_table(table)
        key = "lm_head" if table == "lm_head" or self.tied else "embedding"
        if key not in self._inverse_norms:
            norms = np.linalg.norm(matrix, axis=1)
            self._inverse_norms[key] = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0).astype(np.float32)
        inverse_norms = self._inverse_norms[key]
        queries = vectors.astype(np.float64)  # float64: the norm of a large float32 vector overflows
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        n = queries.shape[0]
        exclude = np.asarray(exclude_ids, dtype=np.int64)
        out = {"ids": np.zeros((n, k), np.int32), "scores": np.zeros((n, k), np.float32)}
        for start in range(0, n, LENS_ROWS_PER_CHUNK):
            rows = slice(start, min(n, start + LENS_ROWS_PER_CHUNK))
            scores = (queries[rows] @ matrix.T) * inverse_norms
            scores[:, exclude] = -np.inf
            top = top_k_columns(scores, k)
            out["ids"][rows] = top
            out["scores"][rows] = np.take_along_axis(scores, top, axis=1)
        return out
