"""Which build of llama.cpp's CPU kernels the server loaded (`ModelInfo.cpu_variant`, docs/building.md).

The wheel setup builds holds ggml's CPU back end once per instruction-set level (`libggml-cpu-<variant>.so`);
service/native.py has ggml load the best one for the CPU. The expectation here is worked out independently of
ggml's scoring, from the CPU's flags in /proc/cpuinfo: of the variants the installed build holds, the one
whose instruction sets the CPU has and that needs the most of them must be the one loaded. A build with one
CPU back end linked in reports "built-in".

The Q4_1 kernel of patches/llama-cpp-python-0.3.36/0002 computes a product of several rows with the
arithmetic of ggml's one-row dot product, in its order: a batched product through ggml must therefore equal
the same rows multiplied one at a time, bit for bit (a build without the kernel passes too, both paths being
the dot product; the test is what holds the kernel to its claim).
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from lmscope.service.gguf_index import GGUFIndex
from lmscope.service.native import LIBRARY_DIR
from lmscope.service.stored_matrix import StoredMatrix

GGML_TYPE_Q4_1 = 3

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


@pytest.mark.parametrize("n_rows", [2, 7, 60])  # the smallest batch, odd tile edges, SmolLM2's ubatch
def test_batched_q4_1_products_equal_one_row_at_a_time_bit_for_bit(smol_model, n_rows):
    tensor = GGUFIndex(str(smol_model)).tensors["blk.0.ffn_up.weight"]
    assert int(tensor.tensor_type) == GGML_TYPE_Q4_1, "the default model's FFN weights are Q4_1"
    matrix = StoredMatrix(tensor, n_threads=2)
    rng = np.random.default_rng(n_rows)
    x = (rng.normal(size=(n_rows, matrix.n_cols)) * 2).astype(np.float32)
    batched = matrix.products(x, 0, matrix.n_rows)
    one_at_a_time = np.concatenate([matrix.products(x[i:i + 1], 0, matrix.n_rows) for i in range(n_rows)])
    np.testing.assert_array_equal(batched, one_at_a_time)
