"""`ControlVector`: arithmetic, and llama.cpp's control-vector GGUF read and written without `gguf`.

Files we write are checked with two independent readers: the `gguf` Python package and llama.cpp's own C
parser (`gguf_init_from_file` in the libggml-base the server loads, the code llama-server runs for
``--control-vector``). Files written by `gguf.GGUFWriter` the way repeng and llama.cpp's cvector-generator
write them must load in ours; malformed files must raise ValueError and nothing else.
"""
from __future__ import annotations

import ctypes
import struct

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import gamma

from lmscope.client import ControlVector

RNG = np.random.default_rng(0)
A = RNG.standard_normal(16).astype(np.float32)
B = RNG.standard_normal(16).astype(np.float32)
C = RNG.standard_normal(16).astype(np.float32)


# ----- arithmetic ---------------------------------------------------------------------------------

def test_arithmetic_is_per_layer_with_missing_layers_as_zero():
    x = ControlVector({1: A, 3: B}, model_hint="llama")
    y = ControlVector({3: C, 5: A})
    total = x + y
    assert total.layers == [1, 3, 5] and total.model_hint == "llama"
    np.testing.assert_array_equal(total[1], A)
    # Sums of two float32 values are exact in float64, so float64-then-float32 is the float32 sum: equal.
    np.testing.assert_array_equal(total[3], B + C)
    np.testing.assert_array_equal(total[5], A)
    difference = x - y
    np.testing.assert_array_equal(difference[3], B - C)
    np.testing.assert_array_equal(difference[5], -A)
    np.testing.assert_array_equal((-x)[1], -A)
    for scaled in (x * 0.5, 0.5 * x, np.float64(0.5) * x, x * np.float32(0.5)):
        assert isinstance(scaled, ControlVector)
        np.testing.assert_array_equal(scaled[3], B * 0.5)  # a power of two: exact
    assert all(v.dtype == np.float32 for v in total.directions.values())


def test_normalize_gives_unit_directions_and_refuses_zero():
    unit = (ControlVector({2: A, 4: B}) * 7.0).normalize()
    # Normalized in float64, rounded to float32 (u per element); a float32 norm of 16 values costs
    # gamma(16) / 2 + 2u; the test's own float32 normalization as much again: gamma(12) covers either.
    for layer in unit:
        assert np.linalg.norm(unit[layer]) == pytest.approx(1.0, abs=gamma(12))
    np.testing.assert_allclose(unit[2], A / np.linalg.norm(A), rtol=gamma(12))
    with pytest.raises(ValueError, match="zero direction at layer 1"):
        ControlVector({1: np.zeros(4)}).normalize()


def test_from_directions_takes_a_mapping_a_per_layer_matrix_or_one_vector():
    matrix = np.stack([A, B, C])
    np.testing.assert_array_equal(ControlVector.from_directions(matrix)[2], C)
    picked = ControlVector.from_directions(matrix, layers=[1, 2], scale=2.0)
    assert picked.layers == [1, 2]
    np.testing.assert_array_equal(picked[1], 2 * B)  # a power of two: exact
    repeated = ControlVector.from_directions(A, layers=[1, 4])
    np.testing.assert_array_equal(repeated[4], A)
    assert ControlVector.from_directions({3: A}) == ControlVector({3: A})
    with pytest.raises(ValueError, match="needs `layers`"):
        ControlVector.from_directions(A)
    with pytest.raises(ValueError, match="out of range"):
        ControlVector.from_directions(matrix, layers=[3])


@pytest.mark.parametrize("make, words", [
    (lambda: ControlVector({}), "at least one"),
    (lambda: ControlVector({-1: A}), "not a block index"),
    (lambda: ControlVector({1.5: A}), "not a block index"),
    (lambda: ControlVector({1: np.ones((2, 3))}), "non-empty vector"),
    (lambda: ControlVector({1: A, 2: np.ones(3)}), "width 3"),
    (lambda: ControlVector({1: np.array([1.0, np.nan])}), "NaN or infinite"),
    (lambda: ControlVector({1: np.array([1.0, 1e39])}), "overflows float32"),
    (lambda: ControlVector({1: ["a", "b"]}), "not numeric"),
    (lambda: ControlVector({1: A}) * 1e39, "overflows float32"),
    (lambda: ControlVector({1: A}) * float("inf"), "cannot scale"),
    (lambda: ControlVector({1: A}) + ControlVector({1: np.ones(3)}), "widths 16 and 3"),
    (lambda: ControlVector({1: A}, "llama") + ControlVector({1: A}, "qwen2"), "different models"),
])
def test_invalid_vectors_and_overflowing_arithmetic_raise(make, words):
    with pytest.raises(ValueError, match=words):
        make()


# ----- files we write ----------------------------------------------------------------------------

def test_saved_file_reloads_identically_and_has_exactly_the_llama_cpp_keys(tmp_path):
    vector = ControlVector({1: A, 3: B, 12: C}, model_hint="llama")
    path = tmp_path / "v.gguf"
    vector.save(path)
    assert ControlVector.load(path) == vector

    reader = gguf.GGUFReader(path)
    keys = {k for k in reader.fields if not k.startswith("GGUF.")}
    assert keys == {"general.architecture", "controlvector.model_hint", "controlvector.layer_count"}
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3", "direction.12"]
    for tensor, expected in zip(reader.tensors, (A, B, C)):
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [16]
        np.testing.assert_array_equal(tensor.data, expected)


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _llama_cpp_gguf():
    from lmscope.service import ggml

    lib = ggml.load_library("ggml-base")
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    for name, restype, extra in [("gguf_get_n_tensors", ctypes.c_int64, []),
                                 ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_int64]),
                                 ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_int64]),
                                 ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_int64]),
                                 ("gguf_get_data_offset", ctypes.c_size_t, []),
                                 ("gguf_find_key", ctypes.c_int64, [ctypes.c_char_p]),
                                 ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_int64]),
                                 ("gguf_get_val_i32", ctypes.c_int32, [ctypes.c_int64]),
                                 ("gguf_free", None, [])]:
        getattr(lib, name).argtypes = [ctypes.c_void_p] + extra
        getattr(lib, name).restype = restype
    return lib


def test_llama_cpp_own_gguf_parser_reads_our_file(tmp_path):
    vector = ControlVector({2: A, 5: B}, model_hint="llama")
    path = tmp_path / "v.gguf"
    vector.save(path)
    lib = _llama_cpp_gguf()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    assert ctx, "llama.cpp rejected the file"
    try:
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.architecture")) == b"controlvector"
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"controlvector.model_hint")) == b"llama"
        assert lib.gguf_get_val_i32(ctx, lib.gguf_find_key(ctx, b"controlvector.layer_count")) == 2
        raw = path.read_bytes()
        names = []
        for i in range(lib.gguf_get_n_tensors(ctx)):
            names.append(lib.gguf_get_tensor_name(ctx, i).decode())
            assert lib.gguf_get_tensor_type(ctx, i) == 0  # GGML_TYPE_F32
            start = lib.gguf_get_data_offset(ctx) + lib.gguf_get_tensor_offset(ctx, i)
            np.testing.assert_array_equal(np.frombuffer(raw[start:start + 64], "<f4"), (A, B)[i])
        assert names == ["direction.2", "direction.5"]
    finally:
        lib.gguf_free(ctx)


def test_layer_0_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="layer 0"):
        ControlVector({0: A, 1: B}).save(tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()


# ----- files others write ------------------------------------------------------------------------

def _write_with_gguf(path, directions: dict[int, np.ndarray], layer_count_type: str, hint: str = "mistral"):
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    getattr(writer, f"add_{layer_count_type}")("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("layer_count_type", ["uint32", "int32"])  # repeng; llama.cpp's cvector-generator
def test_files_written_by_gguf_writer_load(tmp_path, layer_count_type):
    directions = {1: A, 2: B, 31: C}
    path = tmp_path / "theirs.gguf"
    _write_with_gguf(path, directions, layer_count_type)
    assert ControlVector.load(path) == ControlVector(directions, model_hint="mistral")


# ----- malformed files ---------------------------------------------------------------------------

def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _handmade(tensors=(("direction.1", 1, [4], 0, 0),), arch="controlvector", version=3, data=None,
              extra_kv=b"", n_kv=None, n_tensors=None) -> bytes:
    """A control-vector file with hand-chosen header fields: tensors are (name, n_dims, dims, type, offset)."""
    kv = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(arch) + extra_kv
    n_kv = (2 if extra_kv else 1) if n_kv is None else n_kv
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, n_kv) + kv
    for name, n_dims, dims, ggml_type, offset in tensors:
        out += _gguf_string(name) + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += bytes(-len(out) % 32)
    return out + (np.arange(8, dtype="<f4").tobytes() if data is None else data)


def test_handmade_file_is_valid_so_the_variants_below_test_one_thing_each(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_handmade())
    np.testing.assert_array_equal(ControlVector.load(path)[1], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("content, words", [
    (b"", "GGUF magic"),
    (b"GGML" + bytes(60), "GGUF magic"),
    (_handmade(version=1), "version 1"),
    (_handmade(version=3 << 24), "not supported"),
    (_handmade(arch="llama"), "is not a control vector"),
    (_handmade(n_kv=0), "is not a control vector"),
    (_handmade(tensors=()), "no direction tensors"),
    (_handmade(n_tensors=1 << 62), "more than the file holds"),
    (_handmade(n_kv=1 << 40), "more than the file holds"),
    (_handmade(tensors=(("direction.1", 1, [4], 1, 0),)), "F32"),
    (_handmade(tensors=(("direction.1", 2, [2, 2], 0, 0),)), "1-D"),
    (_handmade(tensors=(("direction.1", 9, [4] * 9, 0, 0),)), "9 dimensions"),
    (_handmade(tensors=(("direction.0", 1, [4], 0, 0),)), "direction.0"),
    (_handmade(tensors=(("token_embd.weight", 1, [4], 0, 0),)), "not named direction"),
    (_handmade(tensors=(("direction.x", 1, [4], 0, 0),)), "not named direction"),
    (_handmade(tensors=(("direction.1", 1, [4], 0, 0), ("direction.1", 1, [4], 0, 0))), "appears twice"),
    (_handmade(tensors=(("direction.1", 1, [4], 0, 0), ("direction.2", 1, [3], 0, 0))), "different widths"),
    (_handmade(tensors=(("direction.1", 1, [4], 0, 4),)), "alignment"),
    (_handmade(tensors=(("direction.1", 1, [4], 0, 1 << 60),)), "outside the file"),
    (_handmade(tensors=(("direction.1", 1, [1 << 61], 0, 0),)), "outside the file"),
    (_handmade(tensors=(("direction.1", 1, [0], 0, 0),)), "no elements"),
    (_handmade(data=np.array([1, np.nan, 0, 0, 0, 0, 0, 0], "<f4").tobytes()), "NaN"),
    (_handmade(extra_kv=_gguf_string("x") + struct.pack("<I", 99)), "unknown value type"),
    (_handmade(extra_kv=_gguf_string("x") + struct.pack("<IIQ", 9, 6, 1 << 60)), "more than the file holds"),
    (_handmade(extra_kv=_gguf_string("x") + struct.pack("<IIQ", 9, 8, 1 << 60)), "more than the file holds"),
    (_handmade(extra_kv=_gguf_string("general.alignment") + struct.pack("<II", 4, 3)), "power of two"),
    (_handmade(extra_kv=_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("x")),
     "appears twice"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62), "claims"),
])
def test_malformed_files_raise_a_clear_value_error(tmp_path, content, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words):
        ControlVector.load(path)


def test_every_truncation_of_a_valid_file_raises_value_error(tmp_path):
    good = tmp_path / "good.gguf"
    ControlVector({1: A, 2: B}, model_hint="llama").save(good)
    raw = good.read_bytes()
    path = tmp_path / "cut.gguf"
    assert len(raw) % 32 == 0  # 16 floats fill the alignment exactly: no padding that could be cut
    for n in range(len(raw)):
        path.write_bytes(raw[:n])
        with pytest.raises(ValueError):
            ControlVector.load(path)


def test_a_model_file_is_not_a_control_vector(tiny_model):
    with pytest.raises(ValueError, match="general.architecture is 'llama'"):
        ControlVector.load(tiny_model)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_bytes_give_a_control_vector_or_value_error(tmp_path_factory, data):
    raw = bytearray(_handmade(tensors=(("direction.1", 1, [4], 0, 0), ("direction.2", 1, [4], 0, 32)),
                              data=np.arange(16, dtype="<f4").tobytes() + bytes(16),
                              extra_kv=_gguf_string("controlvector.model_hint") + struct.pack("<I", 8)
                              + _gguf_string("llama")))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(bytes(raw))
    try:
        loaded = ControlVector.load(path)
    except ValueError:
        return
    assert isinstance(loaded, ControlVector) and all(np.isfinite(v).all() for v in loaded.directions.values())


def test_the_client_reads_control_vectors_without_the_server_extra(tmp_path):
    # The client is installable without `gguf` and llama.cpp: load and save with both made unimportable.
    import subprocess
    import sys

    path = tmp_path / "v.gguf"
    ControlVector({1: A, 2: B}, model_hint="llama").save(path)
    code = ("import sys; sys.modules['gguf'] = sys.modules['llama_cpp'] = None\n"
            "from lmscope.client import ControlVector\n"
            f"v = ControlVector.load({str(path)!r}); assert v.layers == [1, 2], v.layers\n"
            f"v.save({str(tmp_path / 'w.gguf')!r})\n"
            # The client reads weight-tensor names from the architecture registry, a module that imports
            # nothing native (service/architectures.py); no other part of the service may come along.
            "service = sorted(m for m in sys.modules if m.startswith('lmscope.service'))\n"
            "assert service in ([], ['lmscope.service', 'lmscope.service.architectures']), service")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
