"""Independent numpy forward pass of a GGUF model, the tests' reference for llama.cpp.

:class:`ReferenceModel` reads the weights straight from the file (``gguf.GGUFReader``, quantized types
expanded with ``gguf.quants.dequantize``) and recomputes the graph that llama.cpp builds for the file's
``general.architecture``, keeping every intermediate activation. It shares no code with the service: if
both agree, both are right. Architectures (the graphs of ``vendor/llama.cpp/src/models/<arch>.cpp``,
re-derived here from the papers and llama.cpp's semantics):

* ``llama`` (Llama 2/3, Mistral, SmolLM; with ``ffn_gate_inp`` a Mixtral-style mixture of experts),
* ``qwen2`` (q/k/v biases), ``qwen3`` (QK-norm), ``qwen2moe`` (experts plus a gated shared expert),
  ``qwen3moe`` (QK-norm, experts),
* ``phi3`` (fused ``attn_qkv`` and fused gate+up ``ffn_up``),
* ``gemma2`` / ``gemma3`` (embeddings scaled by sqrt(n_embd), RMSNorm before *and after* both branches,
  GELU-tanh GeGLU, sliding-window layers; gemma2 soft-caps attention and final logits, gemma3 has QK-norm
  and a RoPE base of its own for the local layers).

Precision: weights are dequantized to float32 exactly as stored and every computation runs in float64
(``dtype`` argument; float32 is faster for big models). llama.cpp computes in float32 but also rounds
some inputs, which costs more than float32 arithmetic. Three opt-in switches reproduce that rounding:

* ``kv_cache="f16"``: llama.cpp's default KV cache is F16, so K and V are stored as F16 and, without
  flash attention, q is rounded to F16 for ``K q`` and the attention probabilities for ``V p`` (the
  CPU backend converts a matmul's F32 input to its F16 partner's type). Families that scale q before the
  product (phi3, gemma) round the scaled q. The default ``"f32"`` matches a context created with
  ``type_k = type_v = F32``.
* ``quantize_activations=True``: the CPU backend converts the activations it multiplies with a weight
  (experts included) to the weight type's ``vec_dot_type``: F16 for F16 weights, Q8_0 blocks (32 values,
  F16 scale) for Q4_0/Q5_0/Q8_0, Q8_1 (with an F16 block sum) for Q4_1/Q5_1, Q8_K blocks of 256 for
  k-quants.
* ``gelu_table=True``: the CPU backend's GELU (Gemma's GeGLU) looks ``gelu(x)`` up in an F16 table
  indexed by ``x`` rounded to F16 (for ``|x| < 10``), so the activation carries an F16 rounding (~5e-4
  relative) on both sides.

Measured against llama.cpp (tests/unit/test_reference.py, 4-layer tiny model): F32 weights + F32 cache,
exact math: ~5e-7 relative (max abs error / max abs value). Default F16 cache: ~1e-3 exact, 2e-5 to 4e-4
emulated. Q8_0 weights: ~4e-2 exact, ~1e-7 emulated. F16 weights: ~1e-3 emulated. Emulation cannot undo
roundings that land on the other side of a tie, and those compound with depth: on the 30-layer
SmolLM2 Q4_1 the first layers agree to 1e-7, the last ones to ~1e-2. The other families' tiny models
(tests/integration/test_families.py, 4 layers, prompts of 16-22 tokens, logits and every block output): F32 weights
and cache 5e-7 to 1.5e-6, except Gemma, whose GELU table costs 3e-5 to 1e-4 emulated (an input on the
other side of an F16 rounding boundary) and ~3e-4 without; default F16 cache, emulated, 7e-5 to 4.5e-4.

Conventions, checked against llama.cpp by ``tests/unit/test_reference.py`` and ``tests/integration/test_families.py``:

* Arrays are numpy row-major with tokens first: a ggml tensor with ``ne = [n_embd, n_tokens]`` is an
  ``(n_tokens, n_embd)`` array here. A weight with ggml ``ne = [n_in, n_out]`` is an ``(n_out, n_in)``
  matrix ``W`` applied as ``x @ W.T`` (that is how GGUFReader lays it out); a stack of expert weights is
  ``(n_expert, n_out, n_in)``.
* RMSNorm: ``x / sqrt(mean(x**2) + eps) * weight``; QK-norm is the same over each head's ``head_dim``.
* RoPE, llama.cpp's "normal" mode 0 for llama (the converter permutes Hugging Face's q/k weights into it):
  adjacent pairs ``(2i, 2i+1)`` of each head rotate by ``pos * base**(-2i / n_rot)``; NeoX mode (every
  other family here) rotates the pairs ``(i, i + n_rot/2)`` by the same angles. Positions start at 0.
* Grouped-query attention: query head ``h`` reads key/value head ``h // (n_head // n_head_kv)``. Scores
  are scaled by ``1/sqrt(head_dim)``, soft-capped (``cap * tanh(s / cap)``, gemma2), masked (causal; on a
  sliding-window layer also every key ``window`` or more positions back), then soft-maxed.
* Feed-forward: ``down(act(gate(x)) * up(x))`` with ``act`` SiLU (SwiGLU) or GELU-tanh (GeGLU, gemma);
  phi3's ``ffn_up`` holds ``[gate; up]``. Experts: router ``softmax(x @ W_r.T)``, the ``k`` most probable
  experts, their probabilities as weights (renormalised to sum 1 for llama/qwen3moe, not for qwen2moe),
  ``mlp_out = sum_e w_e ffn_e(x)`` (+ ``sigmoid(x . w_s) ffn_shared(x)`` for qwen2moe).
* Output: final RMSNorm, then ``output.weight`` or, when the file has none, the tied
  ``token_embd.weight``, then (gemma2, or a file with ``final_logit_softcapping``) ``cap * tanh(l / cap)``.

Example::

    ref = ReferenceModel("tiny.gguf")
    acts = ref.forward([0, 300, 301])
    acts["logits"].shape == (3, ref.n_vocab)
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import gguf
import numpy as np

__all__ = ["ReferenceModel", "rms_norm", "rope", "ARCHITECTURES"]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, as ``ggml_rms_norm`` followed by the multiplication with ``weight``."""
    x = np.asarray(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: Sequence[int], n_rot: int, base: float, neox: bool = False) -> np.ndarray:
    """Rotary embedding of ``x`` with shape ``(n_tok, n_heads, head_dim)``: llama.cpp mode 0 (adjacent
    pairs) or, with ``neox=True``, NeoX mode (pairs ``i`` and ``i + n_rot/2``).

    The first ``n_rot`` dimensions of each head rotate; the rest pass through.
    """
    x = np.asarray(x)
    pos = np.asarray(positions, dtype=np.float64)[:, None]  # (n_tok, 1)
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)  # (n_rot/2,)
    angle = pos * inv_freq  # (n_tok, n_rot/2)
    cos = np.cos(angle)[:, None, :].astype(x.dtype)
    sin = np.sin(angle)[:, None, :].astype(x.dtype)
    out = x.copy()
    if neox:
        first, second = slice(0, n_rot // 2), slice(n_rot // 2, n_rot)
    else:
        first, second = slice(0, n_rot, 2), slice(1, n_rot, 2)
    x0 = x[..., first]
    x1 = x[..., second]
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * x * (1.0 + 0.044715 * x * x)))


def _gelu_f16_table(x: np.ndarray) -> np.ndarray:
    """GELU as ggml's CPU backend computes it: a float32 GELU of ``x`` rounded to F16, the result rounded
    to F16, except beyond +-10 where it is 0 or ``x``."""
    x16 = x.astype(np.float16).astype(np.float32)
    table = _gelu_tanh(x16.astype(np.float64)).astype(np.float32).astype(np.float16)
    y = table.astype(x.dtype)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, y)).astype(x.dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(x.dtype)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)  # round to nearest even
    return bits.view(np.float32).astype(x.dtype)


def _round_q8(x: np.ndarray, block: int, f16_scale: bool) -> np.ndarray:
    """Symmetric 8-bit block rounding (ggml's Q8_0 / Q8_1 with block 32 and an F16 scale, Q8_K with
    block 256 and an F32 scale), computed in float32 as ggml does."""
    shape = x.shape
    if shape[-1] % block:
        return x
    xb = x.astype(np.float32).reshape(*shape[:-1], shape[-1] // block, block)
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv)
    if f16_scale:
        d = d.astype(np.float16).astype(np.float32)
    return (q * d).reshape(shape).astype(x.dtype)


def _activation_rounding(qtype) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """How llama.cpp's CPU backend rounds the activations multiplied with a weight of type ``qtype``
    (the weight type's ``vec_dot_type`` in ggml-cpu.c), or None when they stay F32."""
    name = gguf.GGMLQuantizationType(qtype).name
    if name == "F16":
        return _round_f16
    if name == "BF16":
        return _round_bf16
    if name in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL"):
        return lambda x: _round_q8(x, 32, True)
    if name.endswith("_K") or name.startswith("IQ") or name.startswith("TQ"):
        return lambda x: _round_q8(x, 256, False)
    return None


class _Arch:
    """What one architecture's llama.cpp graph does beyond the tensors the file has (QK-norm weights,
    biases, post-norms, experts are used whenever present)."""

    def __init__(self, *, neox=True, embed_scale=False, gelu=False, prescale_q=False, swa_pattern=None,
                 swa_default_window=0, swa_base_follows_global=False, attn_softcap=None, final_softcap=0.0,
                 moe_renormalise=True):
        self.neox = neox                      # RoPE mode: NeoX pairs (i, i + n/2) or adjacent pairs
        self.embed_scale = embed_scale        # token embeddings x sqrt(n_embd)
        self.gelu = gelu                      # GeGLU instead of SwiGLU
        self.prescale_q = prescale_q          # q x 1/sqrt(head_dim) before K q (matters for F16 rounding)
        self.swa_pattern = swa_pattern        # default period of the sliding-window layer pattern
        self.swa_default_window = swa_default_window  # window when the file names none
        self.swa_base_follows_global = swa_base_follows_global  # local RoPE base defaults to the global one
        self.attn_softcap = attn_softcap      # default attention soft-cap (None: never soft-capped)
        self.final_softcap = final_softcap    # default final logit soft-cap (0: none)
        self.moe_renormalise = moe_renormalise  # routed weights renormalised to sum 1


ARCHITECTURES = {
    "llama": _Arch(neox=False),
    "qwen2": _Arch(),
    "qwen3": _Arch(),
    "qwen2moe": _Arch(moe_renormalise=False),
    "qwen3moe": _Arch(),
    "phi3": _Arch(prescale_q=True),  # llama.cpp ignores phi3's sliding window
    "gemma2": _Arch(embed_scale=True, gelu=True, prescale_q=True, swa_pattern=2, swa_default_window=4096,
                    swa_base_follows_global=True, attn_softcap=50.0, final_softcap=30.0),
    "gemma3": _Arch(embed_scale=True, gelu=True, prescale_q=True, swa_pattern=6),
}


class ReferenceModel:
    """The forward pass of a GGUF file of one of :data:`ARCHITECTURES` in numpy.

    Attributes: ``architecture``, ``n_layer``, ``n_embd``, ``n_head``, ``n_head_kv``, ``head_dim``,
    ``n_rot``, ``n_ff``, ``n_vocab``, ``rms_eps``, ``rope_base``, ``tied`` (no ``output.weight`` in the
    file), ``embed_scale`` (1 or sqrt(n_embd)), ``sliding_window`` (0: none) and ``swa_layers`` (the
    layers that use it), ``attn_softcap`` / ``final_softcap`` (0: none), ``n_expert`` /
    ``n_expert_used`` (0: dense), ``dtype``, ``kv_cache``, ``quantize_activations`` and ``gelu_table``
    (see the module docstring). Weights are read lazily and cached (as float32) on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype=np.float64,
        kv_cache: str = "f32",
        quantize_activations: bool = False,
        gelu_table: bool = False,
    ):
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if kv_cache not in ("f32", "f16"):
            raise ValueError("kv_cache must be 'f32' or 'f16'")
        self.kv_cache = kv_cache
        self.quantize_activations = bool(quantize_activations)
        self.gelu_table = bool(gelu_table)
        reader = gguf.GGUFReader(self.path)
        fields = reader.fields
        arch = fields["general.architecture"].contents()
        if arch not in ARCHITECTURES:
            raise ValueError(f"{self.path}: architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
        self.architecture = arch
        self._arch = a = ARCHITECTURES[arch]

        def get(key, default=None):
            field = fields.get(f"{arch}.{key}")
            return default if field is None else field.contents()

        if get("rope.scaling.type", "none") not in ("none", "linear") or \
                get("rope.scaling.factor", 1.0) not in (0.0, 1.0):
            raise NotImplementedError("RoPE scaling is not implemented in the reference")

        self._tensors = {t.name: t for t in reader.tensors}
        self._cache: dict[str, np.ndarray] = {}

        self.n_layer = int(get("block_count"))
        self.n_embd = int(get("embedding_length"))
        self.n_head = int(get("attention.head_count"))
        self.n_head_kv = int(get("attention.head_count_kv", self.n_head))
        self.n_ff = int(get("feed_forward_length", 0))
        self.head_dim = int(get("attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(get("rope.dimension_count", self.head_dim))
        self.rms_eps = float(get("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(get("rope.freq_base", 10000.0))
        self.tied = "output.weight" not in self._tensors
        self.n_vocab = int(self._tensors["token_embd.weight"].shape[1])
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head is not a multiple of n_head_kv")
        self.embed_scale = math.sqrt(self.n_embd) if a.embed_scale else 1.0

        self.n_expert = int(get("expert_count", 0))
        self.n_expert_used = int(get("expert_used_count", 0))
        if self.n_expert:
            self.n_ff = int(self._tensors["blk.0.ffn_down_exps.weight"].shape[0])

        # Sliding-window layers: gemma2 always (window 4096 unless the file says), gemma3 when the file
        # names a window. Pattern: a per-layer bool array, or a period n (layer L is local unless
        # L % n == n - 1).
        window = int(get("attention.sliding_window", a.swa_default_window) or 0)
        self.sliding_window = 0 if a.swa_pattern is None else window
        self.swa_layers: list[int] = []
        if self.sliding_window:
            pattern = get("attention.sliding_window_pattern", a.swa_pattern)
            if isinstance(pattern, list):
                self.swa_layers = [L for L in range(self.n_layer) if pattern[L]]
            else:
                n = int(pattern)
                self.swa_layers = [L for L in range(self.n_layer) if n == 0 or L % n < n - 1]
        self.rope_base_swa = float(get("rope.freq_base_swa",
                                       self.rope_base if a.swa_base_follows_global else 10000.0))
        self.attn_softcap = 0.0 if a.attn_softcap is None else float(get("attn_logit_softcapping",
                                                                           a.attn_softcap))
        self.final_softcap = float(get("final_logit_softcapping", a.final_softcap) or 0.0)

    # -- weights ---------------------------------------------------------------------------------

    def weight(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 numpy, shape reversed from ggml's ``ne`` (``(n_out, n_in)``)."""
        w = self._cache.get(name)
        if w is None:
            t = self._tensors[name]
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            shape = tuple(int(n) for n in reversed(list(t.shape)))
            w = w.reshape(shape)
            self._cache[name] = w
        return w

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _w(self, name: str) -> np.ndarray:
        return self.weight(name).astype(self.dtype, copy=False)

    def _round_input(self, x: np.ndarray, name: str) -> np.ndarray:
        if self.quantize_activations:
            rounding = _activation_rounding(gguf.GGMLQuantizationType(self._tensors[name].tensor_type))
            if rounding is not None:
                return rounding(x)
        return x

    def _mm(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x @ W.T`` for weight ``name``, rounding ``x`` first like llama.cpp when asked to."""
        if self.quantize_activations:
            qtype = gguf.GGMLQuantizationType(self._tensors[name].tensor_type)
            if qtype.name in ("Q4_1", "Q5_1"):
                return self._mm_q8_1(x, name)
        return self._round_input(x, name) @ self._w(name).T

    def _mm_q8_1(self, x: np.ndarray, name: str) -> np.ndarray:
        """Product with a Q4_1 / Q5_1 weight as ggml computes it against Q8_1 activations.

        A weight block is ``d_w * q_w + m_w``; an activation block is ``d_x * q_x`` (``d_x`` rounded to
        F16) plus its sum ``s_x = d_x * sum(q_x)``, rounded to F16 separately. The block dot product is
        ``d_w d_x sum(q_w q_x) + m_w s_x``.
        """
        t = self._tensors[name]
        n_out, n_in = int(t.shape[1]), int(t.shape[0])
        nb = n_in // 32
        mins = self._cache.get(name + ":mins")
        if mins is None:  # each block starts with d (f16) and m (f16)
            raw = np.ascontiguousarray(t.data).reshape(n_out, nb, -1)
            mins = raw[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
            self._cache[name + ":mins"] = mins
        xb = x.astype(np.float32).reshape(*x.shape[:-1], nb, 32)
        amax = np.max(np.abs(xb), axis=-1, keepdims=True)
        d = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(xb * inv)
        xq = (q * d.astype(np.float16).astype(np.float32)).astype(self.dtype)  # (..., nb, 32)
        sums = (d[..., 0] * q.sum(axis=-1)).astype(np.float16).astype(self.dtype)  # (..., nb)
        # xq . (d_w q_w + m_w) would use sum(xq) per block for the m_w term; ggml uses the F16 sums.
        correction = (sums - xq.sum(axis=-1)) @ mins.T.astype(self.dtype)
        return xq.reshape(x.shape) @ self._w(name).T + correction

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x @ W.T`` plus the bias ``<name>.bias`` when the file has one."""
        y = self._mm(x, f"{name}.weight")
        if self.has(f"{name}.bias"):
            y = y + self._w(f"{name}.bias")
        return y

    @property
    def output_weight(self) -> np.ndarray:
        """The ``(n_vocab, n_embd)`` unembedding matrix (``output.weight`` or the tied embeddings)."""
        return self.weight("token_embd.weight" if self.tied else "output.weight")

    # -- pieces ----------------------------------------------------------------------------------

    def embedding_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of ``token_embd`` for ``ids``: ``(n, n_embd)`` (unscaled, as stored)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise IndexError("token id out of range")
        return self.weight("token_embd.weight")[ids].astype(self.dtype)

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The final RMSNorm (``output_norm``) over the last axis."""
        return rms_norm(np.asarray(x, dtype=self.dtype), self._w("output_norm.weight"), self.rms_eps)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """Logits of already normalised states ``(..., n_embd)``: ``x @ W_out.T`` (+ ``output.bias``),
        then the final soft-capping when the model has one."""
        name = "token_embd.weight" if self.tied else "output.weight"
        logits = self._mm(np.asarray(x, dtype=self.dtype), name)
        if self.has("output.bias"):
            logits = logits + self._w("output.bias")
        if self.final_softcap:
            logits = self.final_softcap * np.tanh(logits / self.final_softcap)
        return logits

    def unembed(self, x: np.ndarray) -> np.ndarray:
        """``lm_head(final_norm(x))``: the logit lens of residual states."""
        return self.lm_head(self.final_norm(x))

    def attention_mask(self, layer: int, n_tokens: int) -> np.ndarray:
        """``(T, T)`` bool, True where query ``i`` may not see key ``j``: the future and, on a
        sliding-window layer, keys ``window`` or more positions back."""
        i = np.arange(n_tokens)[:, None]
        j = np.arange(n_tokens)[None, :]
        masked = j > i
        if layer in self.swa_layers:
            masked |= (i - j) >= self.sliding_window
        return masked

    def _activation(self, x: np.ndarray) -> np.ndarray:
        if not self._arch.gelu:
            return _silu(x)
        return _gelu_f16_table(x) if self.gelu_table else _gelu_tanh(x)

    def _dense_ffn(self, h: np.ndarray, prefix: str, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(neuron activations, output) of a gated FFN ``{prefix}.ffn_{gate,up,down}{suffix}``; phi3's
        fused ``ffn_up`` holds the gate rows first."""
        if self.has(f"{prefix}.ffn_gate{suffix}.weight"):
            gate = self._mm(h, f"{prefix}.ffn_gate{suffix}.weight")
            up = self._mm(h, f"{prefix}.ffn_up{suffix}.weight")
        else:
            fused = self._mm(h, f"{prefix}.ffn_up{suffix}.weight")
            gate, up = np.split(fused, 2, axis=-1)
        post = self._activation(gate) * up
        return post, self._mm(post, f"{prefix}.ffn_down{suffix}.weight")

    def _expert_mm(self, x: np.ndarray, name: str, expert: int) -> np.ndarray:
        return self._round_input(x, name) @ self._w(name)[expert].T

    def _moe_ffn(self, h: np.ndarray, prefix: str, routes: dict[int, Sequence[int]]) -> dict[str, np.ndarray]:
        """Routed experts (+ shared expert) of one block; see the module docstring. ``routes`` forces
        the experts of some tokens (token -> expert ids)."""
        T, k = h.shape[0], self.n_expert_used
        router_logits = self._mm(h, f"{prefix}.ffn_gate_inp.weight")  # (T, n_expert)
        probs = _softmax(router_logits)
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (T, k), most probable first
        for t, experts in routes.items():
            chosen[t] = experts
        weights = np.take_along_axis(probs, chosen, axis=-1)
        if self._arch.moe_renormalise:
            weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), 6.103515625e-5)
        out = np.zeros((T, self.n_embd), self.dtype)
        expert_post = None
        for t in range(T):
            for slot in range(k):
                e = int(chosen[t, slot])
                x = h[t:t + 1]
                gate = self._expert_mm(x, f"{prefix}.ffn_gate_exps.weight", e)
                up = self._expert_mm(x, f"{prefix}.ffn_up_exps.weight", e)
                post = self._activation(gate) * up
                if expert_post is None:
                    expert_post, expert_gate, expert_up = (np.zeros((T, k, post.shape[1]), self.dtype)
                                                           for _ in range(3))
                expert_post[t, slot], expert_gate[t, slot], expert_up[t, slot] = post[0], gate[0], up[0]
                y = self._expert_mm(post, f"{prefix}.ffn_down_exps.weight", e)
                out[t] += weights[t, slot] * y[0]
        result = {"router_logits": router_logits, "router_probs": probs, "experts": chosen,
                  "expert_weights": weights, "expert_post": expert_post, "expert_gate": expert_gate,
                  "expert_up": expert_up, "routed_out": out.copy()}
        if self.has(f"{prefix}.ffn_gate_inp_shexp.weight"):
            gate_logit = self._mm(h, f"{prefix}.ffn_gate_inp_shexp.weight")  # (T,)
            _, shared = self._dense_ffn(h, prefix, "_shexp")
            shared = shared / (1.0 + np.exp(-gate_logit))[:, None]
            result["shared_out"] = shared
            out = out + shared
        result["mlp_out"] = out
        return result

    def near_ties(self, acts: dict[str, np.ndarray], margin: float) -> list[tuple[int, int, tuple[int, ...]]]:
        """Routing decisions of a mixture-of-experts pass that float32 arithmetic could take the other way:
        ``(layer, token, experts)`` wherever the router logits of the k-th and (k+1)-th most probable
        experts are within ``margin``, with ``experts`` the choice that swaps those two."""
        ties = []
        k = self.n_expert_used
        for layer in range(self.n_layer) if self.n_expert else ():
            order = np.argsort(-acts["router_logits"][layer], axis=-1, kind="stable")
            for t, row in enumerate(order):
                logits = acts["router_logits"][layer, t]
                if logits[row[k - 1]] - logits[row[k]] < margin:
                    ties.append((layer, t, tuple(int(e) for e in row[:k - 1]) + (int(row[k]),)))
        return ties

    # -- the whole model -------------------------------------------------------------------------

    def forward(
        self,
        token_ids: Sequence[int],
        *,
        resid_post_hook: Optional[Callable[[int, np.ndarray], Optional[np.ndarray]]] = None,
        site_hook: Optional[Callable[[str, int, np.ndarray], Optional[np.ndarray]]] = None,
        routes: Optional[dict[tuple[int, int], Sequence[int]]] = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on ``token_ids`` (positions 0..n-1) and return every activation.

        Keys and shapes (``T`` tokens, ``L`` layers, ``H`` heads, ``Hkv`` KV heads, ``D`` head size,
        ``E`` experts, ``k`` experts per token):

        * ``embed`` (T, n_embd): what enters block 0: token embeddings, times sqrt(n_embd) for gemma
          (llama.cpp ``embd`` / ``inp_scaled``)
        * ``q_normed`` (L, T, H, D) and ``k_normed`` (L, T, Hkv, D): after QK-norm, before RoPE (only
          for models with QK-norm)
        * ``q`` (L, T, H, D) and ``k`` (L, T, Hkv, D): after RoPE (and QK-norm), before any scaling;
          ``v`` (L, T, Hkv, D)
        * ``pattern`` (L, H, T, T): attention probabilities, query x key (``kq_soft_max-l``)
        * ``z`` (L, T, H, D): attention-weighted values per head, before ``attn_output``
        * ``attn_out_pre_norm`` (L, T, n_embd): the output projection (before the post-norm; the same
          as ``attn_out`` without one)
        * ``attn_out`` (L, T, n_embd): what attention adds to the stream (after any post-norm)
        * ``resid_mid`` (L, T, n_embd): residual after attention
        * ``mlp_post`` (L, T, n_ff): ``act(gate) * up`` (dense models only)
        * ``mlp_out_pre_norm`` (L, T, n_embd): the FFN's down projection (or weighted sum of experts)
          before the post-norm
        * ``mlp_out`` (L, T, n_embd): what the FFN adds to the stream (after any post-norm)
        * ``resid_post`` (L, T, n_embd): residual after the block (``l_out-l``)
        * ``router_logits`` / ``router_probs`` (L, T, E), ``experts`` (L, T, k) ids most probable
          first, ``expert_weights`` (L, T, k), ``expert_gate`` / ``expert_up`` / ``expert_post``
          (L, T, k, n_ff_exp) their gate and up projections and activations,
          ``routed_out`` (L, T, n_embd), and ``shared_out``
          (L, T, n_embd) with a shared expert: mixture-of-experts models only
        * ``ln_final`` (T, n_embd): after the final norm (``result_norm``)
        * ``logits`` (T, n_vocab) (``result_output``, after any soft-capping)

        ``resid_post_hook(layer, x)``, if given, is called with each block's output and may return a
        replacement (as writing into ``l_out-l`` in llama.cpp's eval callback does): later blocks and
        the logits see the returned array; ``resid_post`` records it. ``site_hook(site, layer, x)`` does
        the same at every residual-width site: ``"embed"`` (layer -1), then per block ``"attn_out"``,
        ``"resid_mid"``, ``"mlp_out"`` and ``"resid_post"`` (before ``resid_post_hook``); what it returns
        replaces the activation everywhere it is used afterwards. ``routes`` forces the experts of
        some ``(layer, token)`` pairs (see :meth:`near_ties`).
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        T = ids.size
        if T == 0:
            raise ValueError("no tokens")
        L, H, Hkv, D, E = self.n_layer, self.n_head, self.n_head_kv, self.head_dim, self.n_embd
        group = H // Hkv
        dt = self.dtype
        a = self._arch
        pos = np.arange(T)
        scale = 1.0 / np.sqrt(D)
        f16 = self.kv_cache == "f16"
        qk_norm = self.has("blk.0.attn_q_norm.weight")
        post_norms = self.has("blk.0.post_attention_norm.weight")

        per_layer = {
            "q": (T, H, D), "k": (T, Hkv, D), "v": (T, Hkv, D), "pattern": (H, T, T), "z": (T, H, D),
            "attn_out_pre_norm": (T, E), "attn_out": (T, E), "resid_mid": (T, E),
            "mlp_out_pre_norm": (T, E), "mlp_out": (T, E), "resid_post": (T, E),
        }
        if qk_norm:
            per_layer.update(q_normed=(T, H, D), k_normed=(T, Hkv, D))
        if self.n_expert:
            k = self.n_expert_used
            per_layer.update(router_logits=(T, self.n_expert), router_probs=(T, self.n_expert),
                             experts=(T, k), expert_weights=(T, k), routed_out=(T, E),
                             **{f"expert_{part}": (T, k, self.weight("blk.0.ffn_gate_exps.weight").shape[1])
                                for part in ("gate", "up", "post")})
            if self.has("blk.0.ffn_gate_inp_shexp.weight"):
                per_layer["shared_out"] = (T, E)
        else:
            per_layer["mlp_post"] = (T, self.n_ff)
        out = {name: np.empty((L,) + shape, np.int64 if name == "experts" else dt)
               for name, shape in per_layer.items()}

        def edit(site: str, layer: int, value: np.ndarray) -> np.ndarray:
            if site_hook is None:
                return value
            replaced = site_hook(site, layer, value.copy())
            if replaced is None:
                return value
            replaced = np.asarray(replaced, dtype=dt)
            if replaced.shape != value.shape:
                raise ValueError(f"hook returned shape {replaced.shape} at {site}, expected {value.shape}")
            return replaced

        x = edit("embed", -1, self.embedding_rows(ids) * self.embed_scale)
        out["embed"] = x.copy()
        for il in range(L):
            blk = f"blk.{il}"
            h = rms_norm(x, self._w(f"{blk}.attn_norm.weight"), self.rms_eps)
            if self.has(f"{blk}.attn_qkv.weight"):
                q, k, v = np.split(self._linear(h, f"{blk}.attn_qkv"), [H * D, H * D + Hkv * D], axis=-1)
            else:
                q = self._linear(h, f"{blk}.attn_q")
                k = self._linear(h, f"{blk}.attn_k")
                v = self._linear(h, f"{blk}.attn_v")
            q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
            if qk_norm:
                q = rms_norm(q, self._w(f"{blk}.attn_q_norm.weight"), self.rms_eps)
                k = rms_norm(k, self._w(f"{blk}.attn_k_norm.weight"), self.rms_eps)
                out["q_normed"][il], out["k_normed"][il] = q, k
            base = self.rope_base_swa if il in self.swa_layers else self.rope_base
            q = rope(q, pos, self.n_rot, base, neox=a.neox)
            k = rope(k, pos, self.n_rot, base, neox=a.neox)

            # K q with llama.cpp's roundings: an F16 cache holds K and V as F16 and q enters the product
            # as F16 (scaled first by the families that scale q in the graph).
            qa = q * scale if a.prescale_q else q
            ka, va = k, v
            if f16:
                qa, ka, va = _round_f16(qa), _round_f16(k), _round_f16(v)
            kh = np.repeat(ka, group, axis=1)  # (T, H, D): query head h reads kv head h // group
            vh = np.repeat(va, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", qa, kh)
            if not a.prescale_q:
                scores = scores * scale
            if self.attn_softcap:
                scores = self.attn_softcap * np.tanh(scores / self.attn_softcap)
            scores = np.where(self.attention_mask(il, T)[None], -np.inf, scores)
            probs = _softmax(scores)
            z = np.einsum("hqk,khd->qhd", _round_f16(probs) if f16 else probs, vh)
            attn = self._mm(z.reshape(T, H * D), f"{blk}.attn_output.weight")
            out["attn_out_pre_norm"][il] = attn
            if post_norms:
                attn = rms_norm(attn, self._w(f"{blk}.post_attention_norm.weight"), self.rms_eps)
            attn = edit("attn_out", il, attn)
            resid_mid = edit("resid_mid", il, x + attn)

            h2 = rms_norm(resid_mid, self._w(f"{blk}.ffn_norm.weight"), self.rms_eps)
            if self.n_expert:
                moe = self._moe_ffn(h2, blk, {t: e for (layer, t), e in (routes or {}).items() if layer == il})
                mlp = moe.pop("mlp_out")
                for name, value in moe.items():
                    out[name][il] = value
            else:
                out["mlp_post"][il], mlp = self._dense_ffn(h2, blk)
            out["mlp_out_pre_norm"][il] = mlp
            if post_norms:
                mlp = rms_norm(mlp, self._w(f"{blk}.post_ffw_norm.weight"), self.rms_eps)
            mlp = edit("mlp_out", il, mlp)
            x = edit("resid_post", il, resid_mid + mlp)
            if resid_post_hook is not None:
                replaced = resid_post_hook(il, x.copy())
                if replaced is not None:
                    replaced = np.asarray(replaced, dtype=dt)
                    if replaced.shape != x.shape:
                        raise ValueError(f"hook returned shape {replaced.shape}, expected {x.shape}")
                    x = replaced

            out["q"][il], out["k"][il], out["v"][il] = q, k, v
            out["pattern"][il] = probs
            out["z"][il] = z
            out["attn_out"][il] = attn
            out["resid_mid"][il] = resid_mid
            out["mlp_out"][il] = mlp
            out["resid_post"][il] = x

        out["ln_final"] = self.final_norm(x)
        out["logits"] = self.lm_head(out["ln_final"])
        return out
