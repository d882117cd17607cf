"""Which build of llama.cpp's CPU kernels the server loaded (`ModelInfo.cpu_variant`, docs/building.md).

The wheel setup builds holds ggml's CPU back end once per instruction-set level (`libggml-cpu-<variant>.so`);
service/native.py has ggml load the best one for the CPU. The expectation here is worked out independently of
ggml's scoring, from the CPU's flags in /proc/cpuinfo: of the variants the installed build holds, the one
whose instruction sets the CPU has and that needs the most of them must be the one loaded. A build with one
CPU back end linked in reports "built-in".

The matrix kernels of the patches compute each output element the same way whatever the number of rows
multiplied with it: patch 0002's Q4_1 kernel (AVX2) with the arithmetic of ggml's one-row dot product, in
its order; patch 0008's VNNI kernel (the `icelake` variant: Q4_1, Q5_0 and Q8_0 weights) with its own,
for a single row too. A batched product through ggml must therefore equal the same rows multiplied one at a
time, bit for bit, for each weight type the default model and Gemma 3 use (a build without the kernels
passes too, both paths being ggml's dot products; the test is what holds the kernels to their claim). And
it must be the product of the weights and the rows as ggml rounds them, within what float32 accumulation
over the blocks and Q8_1's float16 block sums allow.
"""
from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from lmscope.service.gguf_index import GGUFIndex
from lmscope.service.native import LIBRARY_DIR
from lmscope.service.stored_matrix import StoredMatrix, rounded_as_vec_dot

KERNEL_TYPES = [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0]
N_COLS = 576   # SmolLM2's width: 18 blocks of 32
N_ROWS = 44    # not a multiple of the kernels' row panels (8) or tiles (4)
UNIT = 2.0 ** -24  # float32's unit roundoff

_HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
_SKYLAKEX = _HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
# ggml's x86 variants (ggml/src/CMakeLists.txt) -> the /proc/cpuinfo flags of the instruction sets each is built for
VARIANT_FLAGS = {
    "x64": set(),
    "sse42": {"sse4_2"},
    "sandybridge": {"sse4_2", "avx"},
    "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"},
    "haswell": _HASWELL,
    "alderlake": _HASWELL | {"avx_vnni"},
    "skylakex": _SKYLAKEX,
    "cannonlake": _SKYLAKEX | {"avx512vbmi"},
    "cascadelake": _SKYLAKEX | {"avx512_vnni"},
    "icelake": _SKYLAKEX | {"avx512vbmi", "avx512_vnni"},
    "cooperlake": _SKYLAKEX | {"avx512_vnni", "avx512_bf16"},
    "zen4": _SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
    "sapphirerapids": _SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
}


def _cpu_flags() -> set[str]:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's instruction sets from")
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), None)
    if line is None:
        pytest.skip("/proc/cpuinfo lists no x86 flags")
    return set(line.split(":", 1)[1].split())


def expected_variant(built: list[str], flags: set[str]) -> str | None:
    """The built variant this CPU runs that needs the most; None when the runnable ones are not ordered by
    inclusion (ggml's weights would decide) or none runs."""
    runnable = [v for v in built if VARIANT_FLAGS[v] <= flags]
    best = max(runnable, key=lambda v: len(VARIANT_FLAGS[v]), default=None)
    if best is None or any(not VARIANT_FLAGS[v] <= VARIANT_FLAGS[best] for v in runnable):
        return None
    return best


def test_expected_variant_picks_the_widest_runnable():
    avx512 = _SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"}
    assert expected_variant(["haswell", "icelake"], avx512) == "icelake"
    assert expected_variant(["haswell", "icelake"], _HASWELL | {"avx512f"}) == "haswell"
    assert expected_variant(["haswell", "icelake"], {"sse4_2", "avx"}) is None
    assert expected_variant(["alderlake", "skylakex"], _SKYLAKEX | {"avx_vnni"}) is None


def test_server_reports_the_variant_it_loaded(client):
    reported = client.model_info().cpu_variant
    built = sorted(path.name.removeprefix("libggml-cpu-").removesuffix(".so")
                   for path in LIBRARY_DIR.glob("libggml-cpu-*.so"))
    if not built:
        assert reported == "built-in"
        return
    assert reported in built, f"the server reports {reported!r}; {LIBRARY_DIR} holds {built}"
    unknown = [v for v in built if v not in VARIANT_FLAGS]
    assert not unknown, f"variants this test does not know the instruction sets of: {unknown}"
    expected = expected_variant(built, _cpu_flags())
    if expected is None:
        pytest.skip(f"no single widest variant among {built} for this CPU")
    assert reported == expected


@pytest.fixture(scope="module")
def kernel_matrices(tmp_path_factory) -> dict[GGMLQuantizationType, StoredMatrix]:
    """A weight matrix of each kernel type, quantized from the same random values, in a GGUF file of its own."""
    path = tmp_path_factory.mktemp("kernels") / "matrices.gguf"
    weights = np.random.default_rng(0).normal(size=(N_ROWS, N_COLS)).astype(np.float32) * 0.05
    weights[:, :32] += 0.2  # blocks whose values are not centred (Q4_1's minimum matters)
    writer = gguf.GGUFWriter(str(path), "llama")
    for kind in KERNEL_TYPES:
        writer.add_tensor(kind.name, quants.quantize(weights, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = GGUFIndex(str(path)).tensors
    return {kind: StoredMatrix(tensors[kind.name], n_threads=2) for kind in KERNEL_TYPES}


@pytest.mark.parametrize("kind", KERNEL_TYPES, ids=lambda kind: kind.name)
@pytest.mark.parametrize("n_rows", [2, 7, 60])  # the smallest batch, odd tile edges, a ubatch
def test_batched_products_equal_one_row_at_a_time_bit_for_bit(kernel_matrices, kind, n_rows):
    matrix = kernel_matrices[kind]
    rng = np.random.default_rng(n_rows)
    x = (rng.normal(size=(n_rows, N_COLS)) * 2).astype(np.float32)
    batched = matrix.products(x, 0, matrix.n_rows)
    one_at_a_time = np.concatenate([matrix.products(x[i:i + 1], 0, matrix.n_rows) for i in range(n_rows)])
    np.testing.assert_array_equal(batched, one_at_a_time)


@pytest.mark.parametrize("kind", KERNEL_TYPES, ids=lambda kind: kind.name)
def test_products_are_the_rounded_operands_product_within_float32_accumulation(kernel_matrices, kind):
    """|ggml - W x~| (float64, x~ the rows as ggml rounds them to 8 bits) is at most gamma(blocks + 2) times the
    sum of the blocks' |terms|: each block's scale product is rounded once and accumulated with one fused
    multiply-add. Q4_1's minimums multiply Q8_1's block sums, which ggml stores in float16 from an unrounded
    scale: at most 2^-10 of the block's sum of |x~|, each."""
    matrix = kernel_matrices[kind]
    x = (np.random.default_rng(1).normal(size=(9, N_COLS)) * 2).astype(np.float32)
    rounded = rounded_as_vec_dot(x, matrix.vec_dot_type).astype(np.float64)
    weights = matrix.dequantize(0, matrix.n_rows).astype(np.float64)
    exact = rounded @ weights.T
    n_blocks = N_COLS // 32
    gamma = (n_blocks + 2) * UNIT / (1 - (n_blocks + 2) * UNIT)
    if kind == GGMLQuantizationType.Q4_1:  # w = d q + m: the kernel's terms are d q x~ and m s
        blocks = matrix.raw.reshape(matrix.n_rows, n_blocks, -1)  # block_q4_1: d, m (float16), 16 bytes
        minimums = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        block_sums = np.abs(rounded).reshape(len(x), n_blocks, 32).sum(axis=2)
        bound = gamma * (np.abs(rounded) @ np.abs(weights - np.repeat(minimums, 32, axis=1)).T)
        bound += (2.0 ** -10 * (1 + 2.0 ** -10) + gamma * (1 + 2.0 ** -9)) * (block_sums @ np.abs(minimums).T)
    else:
        bound = gamma * (np.abs(rounded) @ np.abs(weights).T)
    error = np.abs(matrix.products(x, 0, matrix.n_rows) - exact)
    assert (error <= bound).all(), f"largest error / bound {np.max(error / bound):.3g}"
    assert np.max(error / bound) > 0, "the products are exact: the test would not see a wrong accumulation"
