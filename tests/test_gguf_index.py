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
