"""The logit lens's reduction of many rows of logits, seen chunk by chunk over the vocabulary, in one pass.

Per row: top-k ids and probabilities, entropy, target probabilities and ranks of softmax(logits / T), and
optionally KL(reference row's distribution || the row's). The softmax is never formed: a running maximum M,
the running sum S = sum exp(z - M) and B = sum exp(z - M) (z - M) are rescaled when M grows (z = logits / T),
so entropy = log S - B / S and p_i = exp(z_i - M) / S at the end; top-k candidates merge chunk by chunk.
Target ranks count logits above the target's logit, which the caller computes first in the same arithmetic
(the target's own column is never counted).

With m reference rows (the last m rows, a model's final layer), KL(P_ref || P_i) with P_ref the distribution
of reference row i mod m accumulates in the same pass: sum_j P_ref,j (z_ref,j - z_i,j) - lse(z_ref) + lse(z_i).

`Weights.lens` (service/weights.py) computes the logits chunk by chunk and feeds them here; this module does
the arithmetic on them and nothing else.
"""
from __future__ import annotations

import numpy as np

LENS_ROWS_PER_CHUNK = 256  # rows of logits a chunk holds at once (with the vocabulary chunk: the memory bound)
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



class LensReduction:
    """The running statistics of n rows (`add_chunk`, in any order of row blocks, vocabulary chunks in
    order) and of the m reference rows (`add_reference_chunk`, once per vocabulary chunk, before that
    chunk's rows); `result()` turns them into the lens's arrays."""

    def __init__(self, n: int, *, top_k: int, temperature: float, targets: np.ndarray, target_logits: np.ndarray,
                 reference_rows: int = 0):
        self.n, self.k, self.m = n, top_k, reference_rows
        self.inverse_t = np.float32(1.0 / temperature)
        self.targets = targets
        self.target_logits = target_logits  # (n, n_targets), in the arithmetic of the chunks' logits
        self.top_values = np.full((n, top_k), -np.inf, np.float32)
        self.top_ids = np.zeros((n, top_k), np.int64)
        self.maximum = np.full(n, -np.inf)
        self.total = np.zeros(n)
        self.weighted = np.zeros(n)  # B: sum exp(z - M) (z - M)
        self.ranks = np.zeros((n, len(targets)), np.int64)
        m = reference_rows
        self.reference_of = np.arange(n) % m if m else None
        self.reference_max, self.reference_total = np.full(m, -np.inf), np.zeros(m)
        self.kl_sum = np.zeros(n)  # sum_j exp(z_ref,j - M_ref) (z_ref,j - z_i,j), rescaled as M_ref grows
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None  # shifted and exps, reused over the blocks

    def add_reference_chunk(self, logits: np.ndarray) -> None:
        """The reference rows' logits over one vocabulary chunk: their own running softmax statistics, kept
        apart from the rows' ones, and what this chunk's KL terms read."""
        inverse_t = self.inverse_t
        new_max = np.maximum(self.reference_max, logits.max(axis=1) * inverse_t)
        self.reference_rescale = np.exp(self.reference_max - new_max)
        shifted = logits * inverse_t - new_max[:, None].astype(np.float32)
        self.reference_exps = np.exp(shifted)
        self.reference_chunk_total = np.einsum("ij->i", self.reference_exps).astype(np.float64)
        self.reference_total = self.reference_rescale * self.reference_total + self.reference_chunk_total
        self.reference_self = np.einsum("ij,ij->i", self.reference_exps, shifted).astype(np.float64)
        self.reference_max = new_max

    def add_chunk(self, rows: slice, start: int, logits: np.ndarray) -> None:
        """Rows `rows`' logits over the vocabulary columns start .. start + logits.shape[1]."""
        inverse_t, k = self.inverse_t, self.k
        stop = start + logits.shape[1]
        maximum = self.maximum
        chunk_max = logits.max(axis=1)
        new_max = np.maximum(maximum[rows], chunk_max * inverse_t)
        # shifted = z - M and exps = exp(z - M) in two buffers reused over the blocks; sums by einsum, which adds
        # in one sweep where ndarray.sum's pairwise reduction takes three times as long.
        if self._buffers is None or self._buffers[0].size < logits.size:
            self._buffers = (np.empty(logits.size, np.float32), np.empty(logits.size, np.float32))
        shifted = self._buffers[0][:logits.size].reshape(logits.shape)
        if inverse_t != 1:
            np.multiply(logits, inverse_t, out=shifted)
            np.subtract(shifted, new_max[:, None].astype(np.float32), out=shifted)
        else:
            np.subtract(logits, new_max[:, None].astype(np.float32), out=shifted)
        exps = np.exp(shifted, out=self._buffers[1][:logits.size].reshape(logits.shape))
        scale = np.exp(maximum[rows] - new_max)  # 0 before the first chunk (M = -inf, S = B = 0)
        old_total = self.total[rows]
        gap = np.where(old_total > 0, maximum[rows] - new_max, 0.0)
        self.weighted[rows] = scale * (self.weighted[rows] + gap * old_total)
        self.weighted[rows] += np.einsum("ij,ij->i", exps, shifted)  # float32 within a chunk, float64 across
        self.total[rows] = scale * old_total + np.einsum("ij->i", exps)
        maximum[rows] = new_max
        # Only rows whose chunk maximum beats their k-th best so far can change their top k (an equal value
        # would rank after the one already there): after the first chunks, a fraction of them.
        entering = np.flatnonzero(chunk_max > self.top_values[rows, k - 1]) if k else ()
        if len(entering):
            chunk_k = min(k, stop - start)
            candidates = logits if len(entering) == logits.shape[0] else logits[entering]
            chunk_top = top_k_columns(candidates, chunk_k)
            changed = entering + rows.start
            values = np.concatenate([self.top_values[changed], np.take_along_axis(candidates, chunk_top, axis=1)],
                                    axis=1)
            ids = np.concatenate([self.top_ids[changed], chunk_top + start], axis=1)
            order = np.argsort(-values, axis=1, kind="stable")[:, :k]
            self.top_values[changed] = np.take_along_axis(values, order, axis=1)
            self.top_ids[changed] = np.take_along_axis(ids, order, axis=1)
        for j, target in enumerate(self.targets):  # one target at a time: memory (rows, chunk), not x n_targets
            above = (logits > self.target_logits[rows, j:j + 1]).sum(axis=1)
            if start <= target < stop:
                above -= logits[:, target - start] > self.target_logits[rows, j]
            self.ranks[rows, j] += above
        if self.m:
            self._add_kl(rows, shifted, new_max)

    def _add_kl(self, rows: slice, shifted: np.ndarray, new_max: np.ndarray) -> None:
        """sum_j e_ref,j (z_ref,j - z_i,j) with e_ref = exp(s_ref), s = z - M (scaled by 1 / T):
        sum_j e_ref,j s_ref,j - sum_j e_ref,j s_i,j + (M_ref - M_i) sum_j e_ref,j. Every term of the two sums
        is <= 0, and for a row equal to its reference they cancel to rounding."""
        m = self.m
        reference = self.reference_of[rows]
        if rows.start % m == 0 and (rows.stop - rows.start) % m == 0:
            # Whole periods of the references (a lens: every layer's block of positions): broadcast them over
            # the block instead of gathering a copy per row.
            cross = np.einsum("kpw,pw->kp", shifted.reshape(-1, m, shifted.shape[1]), self.reference_exps).reshape(-1)
        else:
            cross = np.einsum("ij,ij->i", self.reference_exps[reference], shifted)
        dots = (self.reference_self[reference] - cross
                + (self.reference_max[reference] - new_max) * self.reference_chunk_total[reference])
        self.kl_sum[rows] = self.reference_rescale[reference] * self.kl_sum[rows] + dots

    def result(self) -> dict[str, np.ndarray]:
        inverse_t = np.float64(self.inverse_t)
        log_normalizer = self.maximum + np.log(self.total)  # log sum exp(z)
        out = {
            "top_ids": self.top_ids.astype(np.int32),
            "top_probs": np.exp(self.top_values * inverse_t - log_normalizer[:, None]).astype(np.float32),
            "target_probs": np.exp(self.target_logits * inverse_t - log_normalizer[:, None]).astype(np.float32),
            "target_ranks": self.ranks.astype(np.int32),
            "entropy": (np.log(self.total) - self.weighted / self.total).astype(np.float32),
        }
        if self.m:
            reference_of = self.reference_of
            reference_normalizer = self.reference_max + np.log(self.reference_total)
            kl = self.kl_sum / self.reference_total[reference_of] - reference_normalizer[reference_of] + log_normalizer
            out["kl_to_final"] = np.maximum(kl, 0.0).astype(np.float32)
        return out
