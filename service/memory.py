"""What a worker is expected to hold in memory, by part, from the model's shapes and the server's settings.

Reported in `ModelInfo.memory` (`lmscope info`) so that a user can tell before loading a big model whether
it fits, and checked against measured peaks in docs/performance.md. The parts, as llama.cpp 0.3.36 sizes
them on the CPU backend (its log lines "KV buffer size", "compute buffer size", "output buffer size"):

- mapped weights: the GGUF tensor data. llama.cpp maps the file (its CPU_Mapped buffer) and the vocabulary
  math reads the same pages through a mapping of its own (`stored_matrix`), released after each use
  (`gguf_index`), so a worker's RSS counts the file about once; every worker maps the same file, so the
  page cache holds it once (proportional set size), though each process's RSS counts the pages it touched.
- KV cache: n_ctx cells x every layer's K and V rows, F16 (a unified cache; Gemma 3's sliding-window layers
  get full-size caches here too). llama.cpp clears it when it creates the context, so all of it is resident.
  The worker holds one context at a time, sized to the requests so far (`service/batching.py`): 256 cells at
  start (SmolLM2 5.6 MiB, Gemma 3 270M 4.5 MiB), doubling up to n_ctx as longer requests come; the estimate
  is the cache at n_ctx, the most it grows to.
- compute buffer: grown to the worst ubatch: n_ubatch tokens, and in a call with the LM head at most
  n_outputs_max output rows (`Contexts.ubatches`), so n_outputs_max x n_vocab float32 logits and the
  activations of n_ubatch tokens, estimated as n_ubatch x n_ff floats, and without flash attention the
  attention scores, n_ubatch x n_head x n_ctx floats (an upper bound: llama.cpp reuses memory between them).
  Resident as far as requests use it: an all-logits ubatch touches the logits part. A call whose rows' logits
  are not wanted runs without the head (patches/0006-0007): more output rows, no logits part, the same
  activations.
- output buffer: the logits rows llama.cpp hands back, growing to the most output rows of one call with the
  head, n_outputs_max at most (never shrinking); nothing before the first such call.
- reduction budget, per request: `weights.REDUCTION_BUDGET_BYTES`.

Not counted: llama.cpp's repacked copies of some weight types for faster CPU kernels (its log's "CPU_REPACK
model buffer": Gemma 3 270M 12.7 MiB, SmolLM2 none), and each process's runtime.
"""
from __future__ import annotations

from lmscope.proto.wire import lmscope_pb2 as pb

from .weights import REDUCTION_BUDGET_BYTES, Weights

CONTEXTS_PER_WORKER = 1
_CONTEXT_PADDING = 256  # llama.cpp rounds n_ctx up to a multiple of this
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
                    n_ctx: int, n_ubatch: int, n_outputs_max: int, n_seq_max: int) -> pb.MemoryEstimate:
    mapped = sum(int(t.data.nbytes) for t in weights.tensors.values())
    n_ctx = -(-n_ctx // _CONTEXT_PADDING) * _CONTEXT_PADDING
    kv = n_ctx * _kv_rows_per_token(weights, n_layer, n_head_kv, n_head, n_embd) * _F16_BYTES
    compute = (n_outputs_max * n_vocab + n_ubatch * (weights.n_ff + n_head * n_ctx)) * _F32_BYTES
    output = max(n_seq_max, n_outputs_max) * n_vocab * _F32_BYTES
    return pb.MemoryEstimate(mapped_weights=mapped, kv_cache=kv, compute_buffer=compute, output_buffer=output,
                             reduction_budget=REDUCTION_BUDGET_BYTES, contexts=CONTEXTS_PER_WORKER,
                             n_ubatch=n_ubatch, n_outputs_max=n_outputs_max,
                             per_worker=CONTEXTS_PER_WORKER * (kv + compute + output) + REDUCTION_BUDGET_BYTES)
