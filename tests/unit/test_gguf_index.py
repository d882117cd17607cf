"""`service/gguf_index.py` reads what `gguf.GGUFReader` reads (scalars and tensors), skipping arrays."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from lmscope.service.gguf_index import GGUFFormatError, GGUFIndex


def _reader_scalars(reader: GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # GGUFReader's own header pseudo-fields
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            out[key] = None
        elif kind == GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[key] = field.parts[field.data[0]][0].item()
    return out


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_index_matches_gguf_reader(which, tiny_model, smol_model):
    path = str(tiny_model if which == "tiny" else smol_model)
    reader, index = GGUFReader(path), GGUFIndex(path)
    assert index.fields == _reader_scalars(reader)
    if which == "smol":
        assert index.fields["tokenizer.ggml.tokens"] is None  # an array of 49,152 strings, stepped over
    assert list(index.tensors) == [t.name for t in reader.tensors]
    for expected in reader.tensors:
        got = index.tensors[expected.name]
        assert got.tensor_type == expected.tensor_type
        assert got.shape.tolist() == expected.shape.tolist()
        assert got.data.dtype == expected.data.dtype and got.data.shape == expected.data.shape
        np.testing.assert_array_equal(got.data, expected.data)


def test_truncated_and_foreign_files_are_refused(tiny_model, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[:-100])
    with pytest.raises(GGUFFormatError, match="truncated"):
        GGUFIndex(str(truncated))
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        GGUFIndex(str(foreign))


def test_nested_metadata_arrays_are_stepped_over_and_bounded(tmp_path):
    # The one GGUF reader (lmscope.proto.gguf_file) behind this index and the control-vector loader:
    # arrays of arrays are skipped, and a nesting deeper than any real file is refused, not recursed into.
    import struct

    from lmscope.proto.gguf_file import ARRAY, INT32, STRING, GGUFHeader

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def nested(depth: int) -> bytes:
        if depth == 0:
            return struct.pack("<IQ", INT32, 2) + struct.pack("<ii", 1, 2)
        return struct.pack("<IQ", ARRAY, 1) + nested(depth - 1)

    def file(depth: int) -> bytes:
        kv = string("a") + struct.pack("<I", ARRAY) + nested(depth)
        kv += string("b") + struct.pack("<I", STRING) + string("after")
        return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv

    header = GGUFHeader(file(3))
    assert header.fields == {"a": None, "b": "after"} and header.tensor_infos() == []
    with pytest.raises(GGUFFormatError, match="nests arrays"):
        GGUFHeader(file(100))
