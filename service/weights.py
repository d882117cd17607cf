"""Model weights read from the GGUF file: embedding rows, final norm, and the vocabulary-wide math.

llama.cpp keeps weights in its own (possibly quantized, possibly GPU-resident) buffers and exposes none of
them; reading the file is simpler and works for every backend. The file is memory-mapped (`gguf_index`, which
skips the tokenizer arrays that `gguf.GGUFReader` would expand into ~160 MB of objects).

The vocabulary-wide math (logit lens, `Unembed`, nearest tokens) runs on the LM head and embedding table
as stored (`stored_matrix`: ggml_mul_mat for a few rows, and for many where ggml's kernel for the type is
the faster; otherwise BLAS on chunks dequantized by ggml with the rows rounded as ggml rounds them): no
float32 copy of a vocabulary-sized matrix is ever made, and every reduction (top-k, entropy, target
probabilities and ranks, KL to the final layer) runs over vocabulary chunks within `REDUCTION_BUDGET_BYTES`
per request, whatever the vocabulary size. The head's arithmetic is the model's own (activations rounded to
the weight type's vec_dot_type, float32 accumulation), so the lens's last layer repeats llama.cpp's logits.
Small pieces (norm weights, a few rows) are dequantized with the `gguf` package. `final_norm` and
`logit_transform` (head bias, final soft-capping) follow the model's family in the architecture registry
(`service/architectures.py`).

The engine checks at start-up that final norm + head reproduce llama.cpp's own logits
(`service/verification.py`), so a model whose unembedding differs from what the registry says is reported
instead of lensed wrongly.
"""
from __future__ import annotations

import collections
import functools
import os

import numpy as np
from gguf import LlamaFileType
from gguf.quants import dequantize

from lmscope.proto import tensor_names

from . import architectures
from .contracts import VocabularyTable
from .errors import Code, RequestError
from .gguf_index import GGUFIndex
from .lens_reduction import LENS_ROWS_PER_CHUNK, LensReduction, top_k_columns
from .stored_matrix import StoredMatrix

# Per request, the float32 (rows x vocabulary chunk) blocks of the lens and nearest-token passes stay within
# this many bytes whatever the vocabulary size (`Weights._vocabulary_chunks`).
REDUCTION_BUDGET_BYTES = 16 << 20
BYTES_PER_CELL = 20
MIN_CHUNK = 256


def _releasing(method):
    """A Weights method after which our mapping of the file holds no pages (`GGUFIndex.release`): what it read
    stays in the page cache, shared with llama.cpp's mapping, instead of counting twice in the worker's RSS.
    `StoredMatrix` releases its own rows after each chunk, but a touch maps the whole folio around it, which
    can reach past the matrix into its neighbours in the file (measured: 1.3 MB after a SmolLM2 lens)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self.index.release()
    return wrapper


class Weights:
    def __init__(self, path: str, n_threads: int = 0):
        self.index = GGUFIndex(path)
        self.tensors = self.index.tensors
        self.architecture = self.field("general.architecture") or "llama"
        self.family = architectures.family_for(self.architecture, self.tensors)
        self.head_name = architectures.head_tensor(self.tensors)
        self.tied = self.head_name == tensor_names.TOKEN_EMBEDDING
        softcap_key = self.family.softcap_key
        softcap = self.field(softcap_key.format(arch=self.architecture)) if softcap_key else None
        self.final_logit_softcapping = float(softcap or 0.0)  # 0: none
        self._head_bias: np.ndarray | None = (self.read(tensor_names.OUTPUT_BIAS)
                                              if tensor_names.OUTPUT_BIAS in self.tensors else None)
        self.rms_eps = float(self.field(f"{self.architecture}.attention.layer_norm_rms_epsilon") or
                             self.field(f"{self.architecture}.attention.layer_norm_epsilon") or 1e-5)
        self.n_ff = self._n_ff()
        self.n_threads = n_threads or os.cpu_count() or 1
        self.reduction_budget = REDUCTION_BUDGET_BYTES
        self.head = StoredMatrix(self.tensors[self.head_name], self.n_threads)
        self.n_vocab = self.head.n_rows
        self._embedding: StoredMatrix | None = None
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
        """A whole tensor, dequantized to float32, in numpy order (ggml's `ne` reversed), read from the file."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise RequestError(Code.NOT_FOUND, f"the model has no tensor {name!r}")
        data = dequantize(tensor.read(), tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return np.asarray(data, dtype=np.float32).reshape(shape)

    def rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows of a 2-D tensor (numpy axis 0), reading and dequantizing only those rows."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise RequestError(Code.NOT_FOUND, f"the model has no tensor {name!r}")
        # one raw row per numpy row for 2-D tensors, quantized blocks included
        data = dequantize(tensor.read_rows(indices), tensor.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape(len(indices), -1)

    def embedding_rows(self, token_ids: np.ndarray) -> np.ndarray:
        return self.rows("token_embd.weight", token_ids)

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The model's final norm of residual vectors x (n, n_embd), as llama.cpp computes it (float32).

        Every family in the registry uses RMSNorm with the weight as stored (Gemma's files store 1 + w)
        and an optional bias; a family whose entry says "layer" centres first (LayerNorm)."""
        if self._norm is None:
            bias = self.tensors.get(tensor_names.OUTPUT_NORM_BIAS)
            self._norm = (self.read(tensor_names.OUTPUT_NORM),
                          self.read(tensor_names.OUTPUT_NORM_BIAS) if bias is not None else None)
        weight, bias = self._norm
        x = x.astype(np.float32)
        if self.family.final_norm == "layer":
            x = x - x.mean(axis=-1, keepdims=True)
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.rms_eps)) * weight
        return x if bias is None else x + bias

    def logit_transform(self, logits: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """What llama.cpp does to `x @ head.T` to make its logits: the head's bias (phi3 and qwen2 files may
        have `output.bias`) and the final soft-capping cap * tanh(logits / cap) (gemma2). Identity for most
        models. `ids`: the vocabulary columns `logits` holds, when not all of them."""
        if self._head_bias is not None:
            logits = logits + (self._head_bias if ids is None else self._head_bias[ids])
        cap = self.final_logit_softcapping
        if cap:
            logits = np.tanh(logits / np.float32(cap)) * np.float32(cap)
        return logits

    def _transformed(self, logits: np.ndarray, columns, final_norm: bool) -> np.ndarray:
        """`logit_transform` of the head's products for vocabulary `columns` (a slice or ids); raw vectors
        (no final norm, e.g. FFN value vectors) get the bare products."""
        return self.logit_transform(logits, ids=columns) if final_norm else logits

    def _vocabulary_chunks(self, n_rows: int, extra_rows: int = 0):
        """[start, stop) vocabulary ranges whose (rows x chunk) float32 blocks fit the reduction budget.

        A chunk's blocks (for a block of up to LENS_ROWS_PER_CHUNK rows plus `extra_rows` reference rows kept
        through the chunk) cost at most BYTES_PER_CELL per cell: logits, shifted logits and exponentials
        (float32 each), then one more float32 copy at a time (reference rows gathered for a block that cuts
        their periods, or top-k candidates) and a comparison mask (one byte).
        """
        rows = min(n_rows, LENS_ROWS_PER_CHUNK) + extra_rows
        per_column = BYTES_PER_CELL * max(rows, 1) + 4 * self.head.n_cols  # + the chunk's float32 weights
        width = max(MIN_CHUNK, self.reduction_budget // per_column)
        for start in range(0, self.n_vocab, width):
            yield start, min(self.n_vocab, start + width)

    @_releasing
    def lens(self, x: np.ndarray | list[np.ndarray], *, top_k: int, temperature: float, target_ids: list[int],
             final_norm: bool = True, keep_logits: bool = False,
             reference_rows: int = 0) -> dict[str, np.ndarray]:
        """The logit-lens reduction of many vectors, over vocabulary chunks within `reduction_budget` bytes:
        per row top-k ids and probabilities, entropy, target probabilities and ranks of softmax(logits /
        temperature), and with reference_rows = m > 0 (the last m rows, a final layer) `kl_to_final[i]` =
        KL(P_ref || P_i), P_ref the distribution of reference row i mod m. This computes the logits chunk by
        chunk; `service/lens_reduction.py` reduces them in one pass.

        x: (n, n_embd), or a list of consecutive row blocks (a lens's captured sites), which the lens empties
        as it copies them into the rows it multiplies.
        """
        n = sum(block.shape[0] for block in x) if isinstance(x, list) else x.shape[0]
        m = reference_rows
        targets = np.asarray(target_ids, dtype=np.int64)
        head = self.head.multiplier(x, transform=self.final_norm if final_norm else None)
        target_logits = np.zeros((n, len(targets)), np.float32)
        if len(targets):
            for start in range(0, n, LENS_ROWS_PER_CHUNK):
                rows = slice(start, min(n, start + LENS_ROWS_PER_CHUNK))
                target_logits[rows] = self._transformed(head.products_of_rows(rows, targets), targets, final_norm)
        reduction = LensReduction(n, top_k=min(top_k, self.n_vocab), temperature=temperature, targets=targets,
                                  target_logits=target_logits, reference_rows=m)
        logits_out = np.zeros((n, self.n_vocab), np.float32) if keep_logits else None
        for start, stop in self._vocabulary_chunks(n, extra_rows=m):
            if m:  # the reference rows first: every row's KL term in this chunk reads their statistics
                reference_logits = self._transformed(head.products(slice(n - m, n), start, stop), slice(start, stop),
                                                     final_norm)
                reduction.add_reference_chunk(reference_logits)
            for row_start in range(0, n, LENS_ROWS_PER_CHUNK):
                rows = slice(row_start, min(n, row_start + LENS_ROWS_PER_CHUNK))
                if m and rows.start >= n - m:  # the reference rows themselves: their products are at hand
                    logits = reference_logits[rows.start - (n - m):rows.stop - (n - m)]
                else:
                    logits = self._transformed(head.products(rows, start, stop), slice(start, stop), final_norm)
                if keep_logits:
                    logits_out[rows, start:stop] = logits
                reduction.add_chunk(rows, start, logits)
        out = reduction.result()
        if keep_logits:
            out["logits"] = logits_out
        return out

    def vocabulary_matrix(self, table: VocabularyTable) -> StoredMatrix:
        """The token-embedding table ("embedding") or the LM head ("lm_head") as stored.

        In a tied model both names are one tensor (the head is `token_embd.weight`).
        """
        if table == "lm_head" or self.tied:
            return self.head
        if self._embedding is None:
            self._embedding = StoredMatrix(self.tensors["token_embd.weight"], self.n_threads)
        return self._embedding

    @_releasing
    def inverse_row_norms(self, table: VocabularyTable) -> np.ndarray:
        """1 / |row| for every row of a vocabulary table, (n_vocab,) float32, computed once in chunks; 0 for
        all-zero rows (unused tokens)."""
        matrix = self.vocabulary_matrix(table)
        if matrix.name not in self._inverse_norms:
            norms = np.empty(matrix.n_rows)
            step = max(1, self.reduction_budget // (4 * matrix.n_cols))
            for start in range(0, matrix.n_rows, step):
                rows = matrix.dequantize(start, min(matrix.n_rows, start + step))
                norms[start:start + len(rows)] = np.sqrt(np.einsum("ij,ij->i", rows, rows))  # no float64 copy
                del rows  # before the next chunk is made: one chunk in memory, not two
            inverse = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0)
            self._inverse_norms[matrix.name] = inverse.astype(np.float32)
        return self._inverse_norms[matrix.name]

    @_releasing
    def nearest(self, vectors: np.ndarray, k: int, table: VocabularyTable,
                exclude_ids: list[int] = ()) -> dict[str, np.ndarray]:
        """The k rows of a vocabulary table with the highest cosine similarity to each vector.

        cosine = (v / |v|) . row * (1 / |row|): the product runs on the table as stored (the query rounded to
        the weight type's vec_dot_type, as in `lens`), a vocabulary chunk at a time, with top-k candidates
        merged across chunks. All-zero rows score 0; excluded tokens score -inf, so they are never among the k.
        """
        matrix = self.vocabulary_matrix(table)
        inverse_norms = self.inverse_row_norms(table)
        queries = vectors.astype(np.float64)  # float64: the norm of a large float32 vector overflows
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        n = queries.shape[0]
        exclude = np.asarray(exclude_ids, dtype=np.int64)
        top_values = np.full((n, k), -np.inf, np.float32)
        top_ids = np.zeros((n, k), np.int64)
        products = matrix.multiplier(queries)
        for start, stop in self._vocabulary_chunks(n):
            excluded = exclude[(exclude >= start) & (exclude < stop)] - start
            for row_start in range(0, n, LENS_ROWS_PER_CHUNK):
                rows = slice(row_start, min(n, row_start + LENS_ROWS_PER_CHUNK))
                scores = products.products(rows, start, stop)
                scores *= inverse_norms[start:stop]
                scores[:, excluded] = -np.inf
                chunk_top = top_k_columns(scores, min(k, stop - start))
                values = np.concatenate([top_values[rows], np.take_along_axis(scores, chunk_top, axis=1)], axis=1)
                ids = np.concatenate([top_ids[rows], chunk_top + start], axis=1)
                order = np.argsort(-values, axis=1, kind="stable")[:, :k]
                top_values[rows] = np.take_along_axis(values, order, axis=1)
                top_ids[rows] = np.take_along_axis(ids, order, axis=1)
        return {"ids": top_ids.astype(np.int32), "scores": top_values}
