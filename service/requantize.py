"""Derived copies of a model in another weight format (`lmscope serve --requantize q8_0`, `--precise`).

Which format decodes fastest depends on the CPU's kernels for it: with AVX512-VNNI (the `icelake` variant,
patches/0008) the shipped Q4_1 and a Q8_0 copy take the same time for a 128-token prompt and a Q4_0 copy
(ggml's repacked layout) 1.5x longer; on AVX2 machines each format has another kernel
(`scripts/diag_ops.py --requantize q4_0,q8_0,f32` measures them; docs/performance.md). `llama_model_quantize`
(llama.cpp's C API) converts a file once; the copy is kept beside the model cache and reused while the source
file is unchanged.

Accuracy is a choice, so it is never made silently: the server serves the derived file only when asked,
and ModelInfo then describes that file (its own file type and fingerprint). Q8_0 re-rounds each Q4_1
weight to an 8-bit grid whose step is about 1/17 of Q4_1's, so next-token distributions barely move; Q4_0
rounds the weights a second time at 4 bits and costs visibly more (KL and top-1 agreement measured by
scripts/bench_transformers.py, reported in docs/performance.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from .model_files import _cache_lock, model_cache_dir

# "f32" is the precise mode's copy (`lmscope serve --precise`): every weight dequantized exactly to float32, so
# that no matrix product rounds its input rows to 8 bits (llama.cpp does that for quantized weights only).
TARGETS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "f32": "LLAMA_FTYPE_ALL_F32"}


class RequantizeError(RuntimeError):
    pass


def derived_path(source: Path, target: str) -> Path:
    return model_cache_dir() / "derived" / f"{source.stem}.requantized-{target.upper()}.gguf"


def _source_key(source: Path) -> str:
    stat = source.stat()
    return f"{source.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}\n"


def requantized(source: str | os.PathLike, target: str) -> Path:
    """The source model converted to `target` ("q8_0", "q4_0" or "f32"), converting it first if needed."""
    if target not in TARGETS:
        raise RequantizeError(f"cannot requantize to {target!r}; choose one of {', '.join(TARGETS)}")
    source = Path(source)
    out = derived_path(source, target)
    stamp = out.with_name(out.name + ".source")
    key = _source_key(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(out.parent):
        if out.exists() and stamp.exists() and stamp.read_text() == key:
            return out
        from .native import llama as lc

        params = lc.llama_model_quantize_default_params()
        params.ftype = getattr(lc, TARGETS[target])
        params.allow_requantize = True   # the source is already quantized
        params.nthread = os.cpu_count() or 1
        partial = out.with_name(out.name + ".partial")
        status = lc.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0:
            partial.unlink(missing_ok=True)
            raise RequantizeError(f"llama.cpp could not requantize {source} to {target} (status {status})")
        os.replace(partial, out)
        stamp.write_text(key)
    return out
