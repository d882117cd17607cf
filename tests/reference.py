"""Independent numpy forward pass of a llama-architecture GGUF model, the tests' reference for llama.cpp.

:class:`ReferenceModel` reads the weights straight from the file (``gguf.GGUFReader``, quantized types
expanded with ``gguf.quants.dequantize``) and recomputes the Llama graph that llama.cpp builds, keeping
every intermediate activation. It shares no code with the service: if both agree, both are right.

Precision: weights are dequantized to float32 exactly as stored and every computation runs in float64
(``dtype`` argument; float32 is faster for big models). llama.cpp computes in float32 but also rounds
some inputs, which costs more than float32 arithmetic. Two opt-in switches reproduce that rounding:

* ``kv_cache="f16"``: llama.cpp's default KV cache is F16, so K and V are stored as F16 and, without
  flash attention, q is rounded to F16 for ``K q`` and the attention probabilities for ``V p`` (the
  CPU backend converts a matmul's F32 input to its F16 partner's type). The default ``"f32"`` matches a
  context created with ``type_k = type_v = F32``.
* ``quantize_activations=True``: the CPU backend converts the activations it multiplies with a weight
  to the weight type's ``vec_dot_type``: F16 for F16 weights, Q8_0 blocks (32 values, F16 scale) for
  Q4_0/Q5_0/Q8_0, Q8_1 (with an F16 block sum) for Q4_1/Q5_1, Q8_K blocks of 256 for k-quants.

Measured against llama.cpp (tests/test_reference.py, 4-layer tiny model): F32 weights + F32 cache,
exact math: ~5e-7 relative (max abs error / max abs value). Default F16 cache: ~1e-3 exact, 2e-5 to 4e-4
emulated. Q8_0 weights: ~4e-2 exact, ~1e-7 emulated. F16 weights: ~1e-3 emulated. Emulation cannot undo
roundings that land on the other side of a tie, and those compound with depth: on the 30-layer
SmolLM2 Q4_1 the first layers agree to 1e-7, the last ones to ~1e-2.

Conventions, checked against llama.cpp by ``tests/test_reference.py``:

* Arrays are numpy row-major with tokens first: a ggml tensor with ``ne = [n_embd, n_tokens]`` is an
  ``(n_tokens, n_embd)`` array here. A weight with ggml ``ne = [n_in, n_out]`` is an ``(n_out, n_in)``
  matrix ``W`` applied as ``x @ W.T`` (that is how GGUFReader lays it out).
* RMSNorm: ``x / sqrt(mean(x**2) + eps) * weight``.
* RoPE, llama.cpp's "normal" mode 0 (the converter permutes Hugging Face's q/k weights into it):
  adjacent pairs ``(2i, 2i+1)`` of each head rotate by ``pos * base**(-2i / n_rot)``; positions start
  at 0.
* Grouped-query attention: query head ``h`` reads key/value head ``h // (n_head // n_head_kv)``. Scores
  are scaled by ``1/sqrt(head_dim)``, causally masked, then soft-maxed.
* SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``.
* Output: final RMSNorm, then ``output.weight`` or, when the file has none, the tied
  ``token_embd.weight``.

Example::

    ref = ReferenceModel("tiny.gguf")
    acts = ref.forward([0, 300, 301])
    acts["logits"].shape == (3, ref.n_vocab)
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import gguf
import numpy as np

__all__ = ["ReferenceModel", "rms_norm", "rope"]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, as ``ggml_rms_norm`` followed by the multiplication with ``weight``."""
    x = np.asarray(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: Sequence[int], n_rot: int, base: float) -> np.ndarray:
    """Rotary embedding, llama.cpp mode 0, of ``x`` with shape ``(n_tok, n_heads, head_dim)``.

    The first ``n_rot`` dimensions of each head rotate in adjacent pairs; the rest pass through.
    """
    x = np.asarray(x)
    pos = np.asarray(positions, dtype=np.float64)[:, None]  # (n_tok, 1)
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)  # (n_rot/2,)
    angle = pos * inv_freq  # (n_tok, n_rot/2)
    cos = np.cos(angle)[:, None, :].astype(x.dtype)
    sin = np.sin(angle)[:, None, :].astype(x.dtype)
    out = x.copy()
    x0 = x[..., 0:n_rot:2]
    x1 = x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


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


class ReferenceModel:
    """The forward pass of a llama-architecture GGUF file in numpy.

    Attributes: ``n_layer``, ``n_embd``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_rot``, ``n_ff``,
    ``n_vocab``, ``rms_eps``, ``rope_base``, ``tied`` (no ``output.weight`` in the file), ``dtype``,
    ``kv_cache`` and ``quantize_activations`` (see the module docstring). Weights are read lazily and
    cached (as float32) on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype=np.float64,
        kv_cache: str = "f32",
        quantize_activations: bool = False,
    ):
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if kv_cache not in ("f32", "f16"):
            raise ValueError("kv_cache must be 'f32' or 'f16'")
        self.kv_cache = kv_cache
        self.quantize_activations = bool(quantize_activations)
        reader = gguf.GGUFReader(self.path)
        fields = reader.fields

        def get(key, default=None):
            field = fields.get(key)
            return default if field is None else field.contents()

        arch = get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: architecture {arch!r} is not 'llama'")
        if get("llama.rope.scaling.type", "none") not in ("none", "linear") or \
                get("llama.rope.scaling.factor", 1.0) not in (0.0, 1.0):
            raise NotImplementedError("RoPE scaling is not implemented in the reference")

        self._tensors = {t.name: t for t in reader.tensors}
        self._cache: dict[str, np.ndarray] = {}

        self.n_layer = int(get("llama.block_count"))
        self.n_embd = int(get("llama.embedding_length"))
        self.n_head = int(get("llama.attention.head_count"))
        self.n_head_kv = int(get("llama.attention.head_count_kv", self.n_head))
        self.n_ff = int(get("llama.feed_forward_length"))
        self.head_dim = int(get("llama.attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(get("llama.rope.dimension_count", self.head_dim))
        self.rms_eps = float(get("llama.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(get("llama.rope.freq_base", 10000.0))
        self.tied = "output.weight" not in self._tensors
        self.n_vocab = int(self._tensors["token_embd.weight"].shape[1])
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head is not a multiple of n_head_kv")

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

    def _w(self, name: str) -> np.ndarray:
        return self.weight(name).astype(self.dtype, copy=False)

    def _mm(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x @ W.T`` for weight ``name``, rounding ``x`` first like llama.cpp when asked to."""
        if self.quantize_activations:
            qtype = gguf.GGMLQuantizationType(self._tensors[name].tensor_type)
            if qtype.name in ("Q4_1", "Q5_1"):
                return self._mm_q8_1(x, name)
            rounding = _activation_rounding(qtype)
            if rounding is not None:
                x = rounding(x)
        return x @ self._w(name).T

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

    @property
    def output_weight(self) -> np.ndarray:
        """The ``(n_vocab, n_embd)`` unembedding matrix (``output.weight`` or the tied embeddings)."""
        return self.weight("token_embd.weight" if self.tied else "output.weight")

    # -- pieces ----------------------------------------------------------------------------------

    def embedding_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of ``token_embd`` for ``ids``: ``(n, n_embd)``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise IndexError("token id out of range")
        return self.weight("token_embd.weight")[ids].astype(self.dtype)

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The final RMSNorm (``output_norm``) over the last axis."""
        return rms_norm(np.asarray(x, dtype=self.dtype), self._w("output_norm.weight"), self.rms_eps)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """Logits ``x @ W_out.T`` of already normalised states ``(..., n_embd)``."""
        name = "token_embd.weight" if self.tied else "output.weight"
        return self._mm(np.asarray(x, dtype=self.dtype), name)

    def unembed(self, x: np.ndarray) -> np.ndarray:
        """``lm_head(final_norm(x))``: the logit lens of residual states."""
        return self.lm_head(self.final_norm(x))

    # -- the whole model -------------------------------------------------------------------------

    def forward(
        self,
        token_ids: Sequence[int],
        *,
        resid_post_hook: Optional[Callable[[int, np.ndarray], Optional[np.ndarray]]] = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on ``token_ids`` (positions 0..n-1) and return every activation.

        Keys and shapes (``T`` tokens, ``L`` layers, ``H`` heads, ``Hkv`` KV heads, ``D`` head size):

        * ``embed`` (T, n_embd): token embeddings (llama.cpp ``embd``)
        * ``q`` (L, T, H, D) and ``k`` (L, T, Hkv, D): after RoPE; ``v`` (L, T, Hkv, D)
        * ``pattern`` (L, H, T, T): attention probabilities, query x key (``kq_soft_max-l``)
        * ``z`` (L, T, H, D): attention-weighted values per head, before ``attn_output``
        * ``attn_out`` (L, T, n_embd): after the output projection (``attn_out-l``)
        * ``resid_mid`` (L, T, n_embd): residual after attention (``ffn_inp-l``)
        * ``mlp_post`` (L, T, n_ff): ``silu(gate) * up`` (``ffn_swiglu-l``)
        * ``mlp_out`` (L, T, n_embd): down projection output
        * ``resid_post`` (L, T, n_embd): residual after the block (``l_out-l``)
        * ``ln_final`` (T, n_embd): after the final norm (``result_norm``)
        * ``logits`` (T, n_vocab) (``result_output``)

        ``resid_post_hook(layer, x)``, if given, is called with each block's output and may return a
        replacement (as writing into ``l_out-l`` in llama.cpp's eval callback does): later blocks and
        the logits see the returned array; ``resid_post`` records it.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        T = ids.size
        if T == 0:
            raise ValueError("no tokens")
        L, H, Hkv, D = self.n_layer, self.n_head, self.n_head_kv, self.head_dim
        group = H // Hkv
        dt = self.dtype
        pos = np.arange(T)
        mask = np.triu(np.ones((T, T), dtype=bool), k=1)  # True where key is in the future
        scale = 1.0 / np.sqrt(D)

        out = {
            "q": np.empty((L, T, H, D), dt),
            "k": np.empty((L, T, Hkv, D), dt),
            "v": np.empty((L, T, Hkv, D), dt),
            "pattern": np.empty((L, H, T, T), dt),
            "z": np.empty((L, T, H, D), dt),
            "attn_out": np.empty((L, T, self.n_embd), dt),
            "resid_mid": np.empty((L, T, self.n_embd), dt),
            "mlp_post": np.empty((L, T, self.n_ff), dt),
            "mlp_out": np.empty((L, T, self.n_embd), dt),
            "resid_post": np.empty((L, T, self.n_embd), dt),
        }

        x = self.embedding_rows(ids)
        out["embed"] = x.copy()
        for il in range(L):
            blk = f"blk.{il}"
            h = rms_norm(x, self._w(f"{blk}.attn_norm.weight"), self.rms_eps)
            q = self._mm(h, f"{blk}.attn_q.weight").reshape(T, H, D)
            k = self._mm(h, f"{blk}.attn_k.weight").reshape(T, Hkv, D)
            v = self._mm(h, f"{blk}.attn_v.weight").reshape(T, Hkv, D)
            q = rope(q, pos, self.n_rot, self.rope_base)
            k = rope(k, pos, self.n_rot, self.rope_base)

            qa, ka, va = q, k, v
            if self.kv_cache == "f16":  # F16 cache: K and V are stored, q is multiplied, as F16
                qa, ka, va = _round_f16(q), _round_f16(k), _round_f16(v)
            kh = np.repeat(ka, group, axis=1)  # (T, H, D): query head h reads kv head h // group
            vh = np.repeat(va, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", qa, kh) * scale
            scores = np.where(mask[None], -np.inf, scores)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            z = np.einsum("hqk,khd->qhd", _round_f16(probs) if self.kv_cache == "f16" else probs, vh)
            attn_out = self._mm(z.reshape(T, H * D), f"{blk}.attn_output.weight")
            resid_mid = x + attn_out

            h2 = rms_norm(resid_mid, self._w(f"{blk}.ffn_norm.weight"), self.rms_eps)
            gate = self._mm(h2, f"{blk}.ffn_gate.weight")
            up = self._mm(h2, f"{blk}.ffn_up.weight")
            mlp_post = _silu(gate) * up
            mlp_out = self._mm(mlp_post, f"{blk}.ffn_down.weight")
            x = resid_mid + mlp_out
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
            out["attn_out"][il] = attn_out
            out["resid_mid"][il] = resid_mid
            out["mlp_post"][il] = mlp_post
            out["mlp_out"][il] = mlp_out
            out["resid_post"][il] = x

        out["ln_final"] = self.final_norm(x)
        out["logits"] = self.lm_head(out["ln_final"])
        return out
