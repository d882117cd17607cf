"""Test tolerances, derived from the arithmetic of the shapes and dtypes involved (never from one run).

A test compares two computations of one quantity; the tolerance is a bound on how far they can differ on
ANY machine, whatever its BLAS, its SIMD width or its thread count. The bounds used in tests/:

* **Float32 sums in any order** (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1): a sum
  or dot product of ``n`` float32 terms, evaluated in any order or blocking, is within
  ``gamma(n) * sum(|terms|)`` of the exact value, ``gamma(n) = n u / (1 - n u)``, ``u = 2**-24`` (half of
  float32's machine epsilon 1.19e-7). Two such evaluations (numpy vs llama.cpp, a (2, K) vs a (6, K)
  matrix product, which BLAS blocks differently) differ by at most twice that. This is what
  `tests/integration/test_lens.py::test_lensing_some_positions_gives_those_columns` once missed with ``rtol=1e-6``.
* **A single IEEE operation** (add, multiply by a power of two, a copy) is correctly rounded: the same
  operation in numpy and in the code under test gives the same bits, so the test asserts equality.
* **The F16 KV cache** (llama.cpp's default): K, V, and without flash attention q and the attention
  probabilities, are rounded to float16 (unit roundoff ``2**-11``). The reference emulates those roundings
  (``tests/reference.py``, ``kv_cache="f16"``); what it cannot reproduce is a rounding that a float32
  difference of ~1e-7 pushes to the neighbouring float16 value: one float16 step (``2**-10`` relative) of
  one element. Such a flip moves one term of the dot products that read the element, and the rest of the
  forward pass carries it on: through at most 4 layers, each able to double it (a residual add plus the
  branch that reads it), 4 x 2**-10 = 2**-8 of the largest value. :data:`F16_CACHE` is that budget,
  applied by :func:`assert_close_to_scale` to the max error over an array relative to its largest
  magnitude (a flip is not an error relative to each element: a small element next to a flipped one
  can be off by many times its own size). Without the emulation every rounding counts, not just flips:
  `tests/unit/test_reference.py` (CASES) allows 2e-2 there.
* **Flash attention** (the default pass) accumulates ``softmax(QK) V`` in float16 in the one-chunk CPU
  kernel, which runs ubatches of one query row (generation, a one-token prompt; patches/0004 gives every
  longer ubatch the tiled kernel, float32 throughout and within the same bound): each of the n_kv
  additions rounds the accumulator, 2**-11 of at most ``max |v|``.
  The worst case, ``n_kv 2**-11 max|v|``, is 2e-2 for the tests' longest prompts (40 keys, |v| of order
  one); the roundings are independent, so their sum grows like ``sqrt(n_kv) 2**-11`` (3e-3) per layer,
  and the later layers pass it on. :data:`FLASH_F16` = 2e-2 absolute, on order-one states.
* **Two llama.cpp passes over the same rows in different batches** (a prompt alone or with others): the
  CPU kernels compute each output row with an order set by that row's own lengths (a matmul element by
  element over the reduction; attention cell by cell, masked cells skipped), so the rows come out the
  same, as long as neither pass decodes the row in a one-row ubatch (flash attention's one-chunk kernel,
  see above: the two passes then differ by up to 2 * :data:`FLASH_F16`). :data:`SAME_KERNELS` keeps a
  float32 reordering margin, 2 gamma(n_ff) with the tiny model's n_ff = 128, relative and absolute
  (order-one values).
* **The GELU table** (gemma's GeGLU): ggml's CPU GELU reads a table indexed by the float16 rounding of its
  input, so a float32 difference of one unit in the input can move it across a float16 rounding boundary:
  one float16 step (2**-10 relative) of that activation, which the product reading it (the FFN down
  projection) can double. :data:`GELU_TABLE` = 2**-9 of the largest value, applied by
  :func:`assert_close_to_scale` (the same budget tests/integration/test_families.py allows as GELU_TOL).
* **Float16 transfer** (``dtype="float16"``): round to nearest, so at most half a float16 step,
  ``2**-11`` relative to the value (normal range), ``2**-25`` absolute in the subnormal range.
"""
from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff (machine epsilon 1.19e-7 is 2u)
U16 = 2.0 ** -11  # float16 unit roundoff
F16_CACHE = 2.0 ** -8  # a float16 flip (2**-10) carried through 4 layers, of the largest value: see above
FLASH_F16 = 2e-2  # float16 accumulation of softmax(QK) V over <= 40 keys: see the module docstring
SAME_KERNELS = 2 * 128 * U32 / (1 - 128 * U32)  # 1.5e-5: reordered(n_ff) of the tiny model
GELU_TABLE = 2.0 ** -9  # one float16 step of a GELU input (2**-10), doubled by the product that reads it


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: relative error bound of an n-term float sum in any order (relative to sum |terms|)."""
    return n * u / (1 - n * u)


def reordered(n: int) -> float:
    """How far two float32 evaluations of the same n-term sums (in different orders) can be apart,
    relative to the sum of the terms' magnitudes."""
    return 2 * gamma(n)


def unembedding_error(reference, states: np.ndarray, state_error: np.ndarray | float = 0.0) -> np.ndarray:
    """Per row of ``states`` (..., n_embd): a bound on |float32 logit - exact logit| over the vocabulary for
    the final norm + LM head evaluated in float32 on those states (the server's lens or llama.cpp).

    The RMS norm costs (n_embd / 2 + 4) u relative per element (a sum of n_embd squares, a square root, a
    division, a product with the weight); the product with the head gamma(n_embd) relative to
    sum_k |x_k W_jk|, which is bounded here by its value from the reference's own weights.
    ``state_error`` (per row, absolute per element) is an error already in the states: RMSNorm(x + e)
    differs from RMSNorm(x) by at most 2 |e| / rms(x) per element (times the norm weight), which the head
    multiplies by at most max_j sum_k |W_jk w_k|.
    """
    x = np.asarray(states, dtype=np.float64)
    head = np.abs(reference.output_weight.astype(np.float64))
    normed = np.abs(reference.final_norm(x))
    magnitude = (normed @ head.T).max(axis=-1)
    n = reference.n_embd
    bound = (gamma(n) + (n / 2 + 4) * U32) * magnitude
    if np.any(np.asarray(state_error) > 0):
        norm_weight = np.abs(reference.weight("output_norm.weight").astype(np.float64))
        rms = np.sqrt(np.mean(x * x, axis=-1) + reference.rms_eps)
        bound = bound + 2 * np.asarray(state_error) / rms * (head @ norm_weight).max()
    return bound


def probability_rtol(logit_error: np.ndarray, n_vocab: int) -> np.ndarray:
    """Relative bound on softmax probabilities when every logit is off by at most ``logit_error``:
    d log p_i = dz_i - sum_j p_j dz_j, so at most 2 * logit_error; plus the float32 evaluation of the
    softmax itself (exp of a shifted logit and a sum of n_vocab terms, about n_vocab + 4 roundings)."""
    return 2 * np.asarray(logit_error) + gamma(n_vocab + 4)


def entropy_atol(logit_error: np.ndarray, entropy: np.ndarray, n_vocab: int, logit_range: float) -> np.ndarray:
    """Absolute bound on the entropy H of a softmax when every logit is off by at most ``logit_error``.

    dH = -Cov_p(dz, log p), so |dH| <= 2 logit_error * E_p|log p - E_p log p| <= 4 logit_error * H. The
    float32 evaluation as ``log(sum e) - sum(e z) / sum e`` (``service/weights.py``) adds gamma(n_vocab) of
    sum |e z| / sum e <= logit_range (the spread of the shifted logits), and a few roundings of log.
    """
    h = np.asarray(entropy)
    return 4 * np.asarray(logit_error) * h + gamma(n_vocab + 4) * logit_range + 4 * U32 * np.abs(h)


def assert_within(actual, expected, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise (bound broadcasts), with the worst offender in the message."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    excess = np.abs(actual - expected) - np.broadcast_to(bound, actual.shape)
    if excess.size and excess.max() > 0:
        i = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(f"{what}: |{actual[i]!r} - {expected[i]!r}| exceeds its bound "
                             f"{np.broadcast_to(bound, actual.shape)[i]!r} at {i} "
                             f"({int((excess > 0).sum())} of {excess.size} elements)")


def assert_close_to_scale(actual, expected, budget: float, what: str = "") -> None:
    """max |actual - expected| <= budget * max |expected|: an error budget relative to the array's scale."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    error, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert error <= budget * scale, (f"{what}: max error {error:.3g} exceeds {budget:.3g} x the largest value "
                                     f"{scale:.3g}")


def assert_same_as_alone(batched, alone) -> None:
    """A short prompt's Run from a batch against the same prompt run alone: the same kernels row by row, but
    its cache cells fall elsewhere among flash attention's key tiles, so float32 sums round otherwise and can
    flip an F16 cache entry (F16_CACHE of the scale, see above)."""
    assert batched.token_ids == alone.token_ids
    assert_close_to_scale(batched.hidden_states, alone.hidden_states, F16_CACHE, "hidden states, batched against alone")
    assert_close_to_scale(batched.logits, alone.logits, F16_CACHE, "logits, batched against alone")
