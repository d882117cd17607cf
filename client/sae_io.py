"""SAELens' on-disk layout for sparse autoencoders: ``cfg.json`` + ``sae_weights.safetensors``, in numpy.

A directory SAELens writes (``SAE.save_model``) or loads (``SAE.load_from_disk``) holds:

    cfg.json                  the configuration: ``architecture`` ("standard", "topk", "jumprelu"), ``d_in``,
                              ``d_sae``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``, ``k``
                              (topk), and ``metadata`` {``model_name``, ``hook_name``, ...}. Older SAELens
                              versions kept ``model_name``, ``hook_name``, ``hook_layer`` and
                              ``activation_fn_kwargs`` {"k": ...} at the top level; both are read, both written.
    sae_weights.safetensors   ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec``
                              (d_in,), and for JumpReLU ``threshold`` (d_sae,)

lmscope adds its own record under the ``lmscope`` key (the model's fingerprint, the lmscope site, the
fit's settings and measurements); SAELens ignores keys it does not know (its config loader keeps only the
fields of its dataclass), so the directory stays loadable there.

Why our own safetensors code instead of the `safetensors` package. The format is an 8-byte little-endian
header length, a JSON header ({name: {dtype, shape, data_offsets}}, plus an optional ``__metadata__`` of
strings), then the raw little-endian bytes of each tensor, C order. Reading and writing it is a page of
numpy (below), it memory-maps nothing we need, and it keeps the client's dependencies to numpy; the
package's numpy API would do the same work through a compiled Rust extension. Reading checks what the
format promises (offsets inside the file, contiguous and in order, sizes matching dtype x shape) and says
what is wrong with a file that breaks it.

TransformerLens hook names map onto lmscope sites (`hook_to_site`): ``blocks.L.hook_resid_post`` is
``blocks.L.resid_post``; ``blocks.L.hook_resid_pre`` is the previous block's output (``embed`` for L = 0);
``hook_resid_mid``, ``hook_attn_out``, ``hook_mlp_out`` and ``mlp.hook_post`` are ``resid_mid``, ``attn_out``,
``mlp_out`` and ``mlp.post`` (the n_ff neuron activations).
"""
from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"

# safetensors dtype names <-> numpy. BF16 has no numpy dtype: it is read as the top half of a float32.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (or not one this reader handles)."""


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> array) to `path`, atomically (a temporary file renamed over it)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise SafetensorsError(f"{name}: dtype {array.dtype} has no safetensors name")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    path = pathlib.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for array in arrays:
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (float types as stored; BF16 widened to float32) and the ``__metadata__`` of a file."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise SafetensorsError(f"{path}: {len(data)} bytes, too short for a safetensors file")
    length = int.from_bytes(data[:8], "little")
    if length > _MAX_HEADER or 8 + length > len(data):
        raise SafetensorsError(f"{path}: header length {length} does not fit the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + length:]
    tensors: dict[str, np.ndarray] = {}
    expected_start = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1].get("data_offsets", [0])[0]):
        try:
            dtype_name, shape, (start, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets") from None
        if start != expected_start or end < start or end > len(body):
            raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets [{start}, {end}], not contiguous "
                                   f"from {expected_start} within the {len(body)} data bytes")
        expected_start = end
        count = int(np.prod(shape, dtype=np.int64))
        raw = body[start:end]
        if dtype_name == "BF16":
            if len(raw) != 2 * count:
                raise SafetensorsError(f"{path}: tensor {name!r}: {len(raw)} bytes for {count} BF16 values")
            halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            tensors[name] = halves.view(np.float32).reshape(shape)
            continue
        if dtype_name not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype_name}, which this reader does not "
                                   f"handle (it reads {sorted(_DTYPES) + ['BF16']})")
        dtype = np.dtype(_DTYPES[dtype_name]).newbyteorder("<")
        if len(raw) != count * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r}: {len(raw)} bytes for {count} {dtype_name} values")
        tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if expected_start != len(body):
        raise SafetensorsError(f"{path}: {len(body) - expected_start} data bytes after the last tensor")
    return tensors, dict(metadata)


# ----- hook names -----------------------------------------------------------------------------------------

_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|"
                   r"mlp\.hook_post)$")
# lmscope site kind -> TransformerLens hook (within blocks.L.)
_KINDS = {"resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
          "mlp_out": "hook_mlp_out", "mlp.post": "mlp.hook_post"}


def hook_to_site(hook_name: str) -> str:
    """The lmscope site of a TransformerLens hook name (see the module docstring)."""
    match = _HOOK.match(hook_name or "")
    if not match:
        raise ValueError(f"hook {hook_name!r} has no lmscope site; lmscope reads SAEs on blocks.L.hook_resid_pre, "
                         f"hook_resid_mid, hook_resid_post, hook_attn_out, hook_mlp_out or mlp.hook_post")
    layer, hook = int(match.group(1)), match.group(2)
    if hook == "hook_resid_pre":
        return "embed" if layer == 0 else f"blocks.{layer - 1}.resid_post"
    return f"blocks.{layer}.{next(kind for kind, name in _KINDS.items() if name == hook)}"


def site_to_hook(site: str) -> str:
    """The TransformerLens hook name SAELens records for an lmscope site."""
    if site == "embed":
        return "blocks.0.hook_resid_pre"
    match = re.match(r"^blocks\.(\d+)\.(.+)$", site)
    if not match or match.group(2) not in _KINDS:
        raise ValueError(f"site {site!r} has no TransformerLens hook name; SAEs are saved for embed or a block's "
                         f"{', '.join(_KINDS)}")
    return f"blocks.{match.group(1)}.{_KINDS[match.group(2)]}"


def hook_layer(site: str) -> int:
    return 0 if site == "embed" else int(site.split(".")[1])


def read_config(directory) -> dict:
    path = pathlib.Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an SAE directory in SAELens' layout (no {CONFIG})")
    return json.loads(path.read_text(encoding="utf-8"))


def write_config(directory, config: dict) -> None:
    path = pathlib.Path(directory) / CONFIG
    temporary = path.with_name(CONFIG + ".tmp")
    temporary.write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, path)
