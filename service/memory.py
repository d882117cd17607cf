"""What a worker is expected to hold in memory, by part, from the model's shapes and the server's settings.

Reported in `ModelInfo.memory` (`lmscope info`) so that a user can tell before loading a big model whether
it fits, and checked against measured peaks in docs/performance.md. The parts, as llama.cpp 0.3.36 sizes
them on the CPU backend (its log lines "KV buffer size", "compute buffer size", "output buffer size"):

- mapped weights: the GGUF tensor data. llama.cpp maps the file (its CPU_Mapped buffer) and the vocabulary
  math reads the same pages (`stored_matrix`); every worker maps the same file, so the page cache holds it
  once (proportional set size), though each process's RSS counts the pages it touched.
- KV cache, per context: n_ctx cells x every layer's K and V rows, F16 (a unified cache; Gemma 3's
  sliding-window layers get full-size caches here too, as llama.cpp allocates them with 64 sequences).
- compute buffer, per context: reserved for the worst ubatch, every token an output, so n_ubatch x n_vocab
  float32 logits dominate it (measured: SmolLM2 98.25 MiB at n_ubatch 512, of which 96 MiB logits; Gemma
  3 270M 514.5 MiB at 512, 128.6 MiB at 128); the rest is activations, estimated as n_ubatch x n_ff floats.
- output buffer, per context: the logits rows llama.cpp hands back, n_seq_max rows at first, growing to
  the most output rows of one ubatch (never shrinking).
- reduction budget, per request: `weights.REDUCTION_BUDGET_BYTES`.

A worker has at most two contexts (with flash attention; without, once attention is captured). Buffers
are reserved, not touched: resident memory grows into them as requests use them.
"""
from __future__ import annotations

from .weights import REDUCTION_BUDGET_BYTES, Weights

CONTEXTS_PER_WORKER = 2
_F16_BYTES = 2
_F32_BYTES = 4


def _kv_rows_per_token(weights: Weights, n_layer: int, n_head_kv: int, n_head: int, n_embd: int) -> int:
    """Sum over layers of the K and V row lengths (n_head_kv x head_dim each) one cache cell holds."""
    total = 0
    for layer in range(n_layer):
        k, v = (weights.tensors.get(f"blk.{layer}.attn_{x}.weight") for x in ("k", "v"))
        if k is not None and v is not None:
            total += int(k.shape[1]) + int(v.shape[1])  # ggml ne[1]: output rows
        else:  # fused QKV and friends: the metadata's head sizes
            arch = weights.architecture
            key = int(weights.field(f"{arch}.attention.key_length") or n_embd // max(n_head, 1))
            value = int(weights.field(f"{arch}.attention.value_length") or key)
            total += n_head_kv * (key + value)
    return total


def expected_memory(weights: Weights, *, n_layer: int, n_head: int, n_head_kv: int, n_embd: int, n_vocab: int,
                    n_ctx: int, n_ubatch: int, n_seq_max: int) -> dict:
    mapped = sum(int(t.data.nbytes) for t in weights.tensors.values())
    kv = n_ctx * _kv_rows_per_token(weights, n_layer, n_head_kv, n_head, n_embd) * _F16_BYTES
    compute = n_ubatch * (n_vocab + weights.n_ff) * _F32_BYTES
    output = max(n_seq_max, n_ubatch) * n_vocab * _F32_BYTES
    return dict(mapped_weights=mapped, kv_cache=kv, compute_buffer=compute, output_buffer=output,
                reduction_budget=REDUCTION_BUDGET_BYTES, contexts=CONTEXTS_PER_WORKER, n_ubatch=n_ubatch,
                per_worker=CONTEXTS_PER_WORKER * (kv + compute + output) + REDUCTION_BUDGET_BYTES)
