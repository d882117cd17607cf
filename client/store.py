"""Activation stores: many prompts' captured activations on disk, collected once, read without a server.

    store = c.collect(prompts, "acts/", sites="blocks.*.resid_post", positions=[-1], dtype="float16")
    store = ActivationStore.open("acts/")          # later, anywhere: numpy only
    store["blocks.12.resid_post"]                  # (n_prompts, n_positions, n_embd), memory-mapped

Layout of a store directory (every array a `.npy` file, little-endian, C order):

    manifest.json               what the store holds (below); written last, atomically (write + rename)
    prompts.jsonl               one JSON value per prompt: its text, or its list of token ids
    tokens.npy                  int32 (n_tokens,): every prompt's token ids, concatenated
    token_offsets.npy           int64 (n_prompts + 1,): prompt i's tokens are tokens[offsets[i]:offsets[i + 1]]
    positions.npy               int32 (n_prompts, n_positions): the absolute positions of the stored rows
                                (fixed positions only; negative positions resolve per prompt)
    sites/<site>.npy            fixed positions: (n_prompts, n_positions, *row_shape)
                                every position (positions=None): (n_tokens, *row_shape), rows aligned with
                                tokens.npy, so prompt i's rows are [offsets[i]:offsets[i + 1]] (ragged, CSR)

`manifest.json` holds the format version, the model (fingerprint = the GGUF file's sha256, name, n_layer,
n_embd), the request (sites, positions, dtype, chat flag and the chat template's sha256, batch size) and
`n_prompts`, the number of committed prompts. Rows past it in any file are uncommitted and ignored.

Why `.npy` + JSON. Both open with a standard library alone (`json`; `numpy.load(path, mmap_mode="r")`, or
any language: a .npy file is a short text header and the raw array), the arrays memory-map, so a store
bigger than memory is sliced without being read, and a file can grow by appending rows: the header's
shape is rewritten in place (it is padded to a fixed size for that). safetensors cannot be appended to
(its header lists every tensor's byte range first) and would need one shard per flush and a concatenation
to give one array per site.

Crash safety. Rows are appended in prompt order, whole batches at a time (at the first batch boundary
after `commit_seconds`): the rows are written and fsynced, then each .npy header is updated, then the
manifest is replaced atomically. A collect killed at
any point leaves the manifest of the last commit; the next collect truncates every file to it, so the
rows in flight or received since that commit are lost and nothing committed is touched.

Resuming, and why batches are aligned. With flash attention a row's float rounding depends on which
prompts share its batch (docs/gotchas.md), so a resumed collect sends exactly the batches an uninterrupted
one would have sent: batch k is always prompts [k * batch_size, (k + 1) * batch_size). The batch size is
recorded, a resume reuses it, and the resumed store is byte-identical to an uninterrupted one. A store
grown with more prompts (the old list a prefix of the new) keeps its committed rows untouched; when the old
list ended inside a batch, that batch's first rows were computed in a smaller batch than a one-go collect
would have used, and may differ from it by that rounding.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from lmscope.proto.sites import PATTERN_SITES, site_layer

FORMAT = "lmscope-activation-store"
VERSION = 1
HEADER_BYTES = 128  # fixed .npy header size (magic + version + length + padded dict), so the shape can grow
MANIFEST = "manifest.json"
# Prompts per request. Short prompts (~9 tokens) in batches of 8 collected faster than in batches of 64 on
# SmolLM2 (scripts/bench_store.py; figures in docs/datasets.md).
DEFAULT_BATCH_SIZE = 8
LOCK = ".lock"


class StoreMismatchError(ValueError):
    """A collect asked to add rows to a store that holds another model's or another request's rows."""


# ----- append-only .npy files ---------------------------------------------------------------------------

def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.dtype(dtype).str, tuple(shape))
    prefix = b"\x93NUMPY\x01\x00"
    length = HEADER_BYTES - len(prefix) - 2
    body = text.ljust(length - 1).encode("latin1") + b"\n"
    if len(body) != length:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte .npy header")
    return prefix + length.to_bytes(2, "little") + body


class _AppendArray:
    """A .npy file grown by appending rows along axis 0; the header is rewritten to the committed count."""

    def __init__(self, path: pathlib.Path, dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        if not path.exists():
            with open(path, "wb") as f:
                f.write(_npy_header(self.dtype, (0,) + self.row_shape))
        self.file = open(path, "r+b")

    def truncate(self, rows: int) -> None:
        """Drop anything past `rows` (what a killed collect left uncommitted)."""
        self.file.truncate(HEADER_BYTES + rows * self.row_bytes)
        self.file.seek(0, os.SEEK_END)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {array.shape[1:]}, the store has {self.row_shape}")
        self.file.write(array.tobytes())

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def set_rows(self, rows: int) -> None:
        self.file.seek(0)
        self.file.write(_npy_header(self.dtype, (rows,) + self.row_shape))
        self.file.flush()
        self.file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.file.close()


def _write_json_atomic(path: pathlib.Path, value) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def _exclusive(path: pathlib.Path):
    """One collect per store at a time (an advisory lock; released when the process dies)."""
    import fcntl

    with open(path / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another collect is writing to {path}") from None
        yield


# ----- reading --------------------------------------------------------------------------------------------

def _prompt_json(prompt) -> str:
    return json.dumps(prompt if isinstance(prompt, str) else [int(t) for t in prompt], ensure_ascii=False)


def read_prompts(path) -> list:
    """Prompts from a file: .jsonl (per line a string, a list of token ids, or an object with a "prompt" or
    "text" field), else plain text with one prompt per line (blank lines skipped)."""
    path = pathlib.Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        value = json.loads(line)
        if isinstance(value, dict):
            value = value.get("prompt", value.get("text"))
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, int) for t in value))):
            raise ValueError(f"{path}:{number}: expected a string, a list of token ids or an object with a "
                             f"'prompt' or 'text' field")
        prompts.append(value)
    return prompts


class ActivationStore:
    """A collected store, read-only: ``ActivationStore.open(path)`` (see the module docstring for the layout).

    len(store): committed prompts. store.sites: the captured sites. store.prompts: the prompts (text, or
    token-id lists). store.token_ids(i): prompt i's tokens. store[site]: the memory-mapped array of a
    site, (n_prompts, n_positions, *row) for fixed positions, (n_tokens, *row) for every position
    (`rows(site, i)` gives prompt i's rows then). store.model / store.request: what the manifest records.
    """

    stats: "CollectStats | None" = None  # set on the store a collect returns

    def __init__(self, path: pathlib.Path, manifest: dict):
        self.path = pathlib.Path(path)
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] = {}
        self._prompts: list | None = None

    @classmethod
    def open(cls, path) -> "ActivationStore":
        path = pathlib.Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{path} is not an activation store (no {MANIFEST}); create one with "
                                    f"Client.collect or `lmscope collect`")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"{manifest_path}: not a version-{VERSION} {FORMAT} manifest")
        return cls(path, manifest)

    # what the manifest says
    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def request(self) -> dict:
        return self.manifest["request"]

    @property
    def sites(self) -> list[str]:
        return list(self.request["sites"])

    @property
    def ragged(self) -> bool:
        """True when every position was stored (positions=None): site arrays are (n_tokens, ...)."""
        return self.request["positions"] is None

    @property
    def chat(self) -> bool:
        return bool(self.request["chat"])

    def __len__(self) -> int:
        return int(self.manifest["n_prompts"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    # arrays
    def _array(self, name: str, rows: int) -> np.ndarray:
        if name not in self._arrays:
            if rows == 0:  # an empty file cannot be memory-mapped
                array = np.load(self.path / name)
            else:
                array = np.load(self.path / name, mmap_mode="r")
            self._arrays[name] = array[:rows]
        return self._arrays[name]

    def __getitem__(self, site: str) -> np.ndarray:
        if site not in self.request["sites"]:
            raise KeyError(f"{site!r} is not in this store; it holds {self.sites}")
        if self.manifest["row_shapes"] is None:
            raise ValueError(f"the store at {self.path} holds no prompts yet")
        return self._array(f"sites/{site}.npy", self.n_tokens if self.ragged else len(self))

    def __contains__(self, site: str) -> bool:
        return site in self.request["sites"]

    @property
    def token_offsets(self) -> np.ndarray:
        return self._array("token_offsets.npy", len(self) + 1)

    @property
    def tokens(self) -> np.ndarray:
        return self._array("tokens.npy", self.n_tokens)

    def token_ids(self, i: int) -> list[int]:
        offsets = self.token_offsets
        i = range(len(self))[i]
        return self.tokens[offsets[i]:offsets[i + 1]].tolist()

    @property
    def positions(self) -> np.ndarray | None:
        """(n_prompts, n_positions) absolute positions of the stored rows; None for every position."""
        return None if self.ragged else self._array("positions.npy", len(self))

    def rows(self, site: str, i: int) -> np.ndarray:
        """Prompt i's rows of a site: (n_positions, ...) or, for every position, (its n_tokens, ...)."""
        i = range(len(self))[i]
        if not self.ragged:
            return self[site][i]
        offsets = self.token_offsets
        return self[site][offsets[i]:offsets[i + 1]]

    @property
    def prompts(self) -> list:
        if self._prompts is None:
            with open(self.path / "prompts.jsonl", encoding="utf-8") as f:
                self._prompts = [json.loads(next(f)) for _ in range(len(self))]
        return list(self._prompts)

    # the analyses' view: one vector per prompt
    def position_column(self, position: int) -> int:
        """The column of a requested position (as given at collect time, e.g. -1) in fixed-position arrays."""
        if self.ragged:
            raise ValueError("this store holds every position; pick rows with store.rows(site, i)")
        requested = list(self.request["positions"])
        if position not in requested:
            raise ValueError(f"position {position} was not stored; the store holds positions {requested}")
        return requested.index(position)

    def vectors(self, site: str, position: int | str = -1, bos_token_id: int | None = None) -> np.ndarray:
        """(n_prompts, ...) float32: each prompt's row at `position` (as requested at collect time, or any
        position of an every-position store), or "mean" over its rows (leaving out a leading BOS)."""
        if site not in self:
            raise KeyError(f"{site!r} is not in this store; it holds {self.sites}")
        if position == "mean":
            if not self.ragged:
                raise ValueError("position='mean' needs a store of every position (collect with positions=None); "
                                 f"this one holds positions {self.request['positions']}")
            offsets = self.token_offsets
            tokens = self.tokens
            out = []
            for i in range(len(self)):
                start, end = int(offsets[i]), int(offsets[i + 1])
                if bos_token_id is not None and end - start > 1 and tokens[start] == bos_token_id:
                    start += 1
                out.append(self[site][start:end].astype(np.float32).mean(axis=0))
            return np.stack(out)
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise ValueError(f"position must be an int or 'mean', not {position!r}")
        if not self.ragged:
            return self[site][:, self.position_column(int(position))].astype(np.float32)
        offsets = self.token_offsets
        lengths = np.diff(offsets)
        index = np.where(position < 0, lengths + position, position)
        if (index < 0).any() or (index >= lengths).any():
            raise ValueError(f"position {position} is outside some prompts (shortest: {lengths.min()} tokens)")
        return self[site][offsets[:-1] + index].astype(np.float32)

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.model["fingerprint"]:
            raise StoreMismatchError(f"{self.path} holds activations of model {self.model['fingerprint'][:12]} "
                                     f"({self.model['name']}), but the server holds {fingerprint[:12]}")

    def layer_sites(self) -> dict[int | str, str]:
        """{"embed": "embed", L: "blocks.L.resid_post"} for the hidden states the store holds."""
        out: dict[int | str, str] = {}
        for site in self.sites:
            if site == "embed":
                out["embed"] = site
            elif site.endswith(".resid_post"):
                out[site_layer(site)] = site
        return out

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def __repr__(self) -> str:
        where = "every position" if self.ragged else f"positions {self.request['positions']}"
        return (f"ActivationStore({str(self.path)!r}: {len(self)} prompts, {len(self.sites)} sites, {where}, "
                f"{self.request['dtype']}, model {self.model['name']!r} {self.model['fingerprint'][:12]})")


# ----- writing --------------------------------------------------------------------------------------------

@dataclass
class CollectStats:
    """What one collect call did: prompts computed now, seconds, and the store's size on disk."""

    computed: int
    skipped: int
    seconds: float
    bytes_on_disk: int

    @property
    def prompts_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else float("nan")


class _Writer:
    """Appends committed batches to a store directory (see the module docstring for the protocol)."""

    def __init__(self, path: pathlib.Path, manifest: dict, row_shapes: dict[str, list[int]] | None):
        self.path, self.manifest = path, manifest
        self.prompts = open(path / "prompts.jsonl", "a+b")
        self.tokens = _AppendArray(path / "tokens.npy", np.int32, ())
        self.offsets = _AppendArray(path / "token_offsets.npy", np.int64, ())
        ragged = manifest["request"]["positions"] is None
        self.positions = None if ragged else _AppendArray(path / "positions.npy", np.int32,
                                                          (len(manifest["request"]["positions"]),))
        self.sites: dict[str, _AppendArray] = {}
        self.dtype = np.float16 if manifest["request"]["dtype"] == "float16" else np.float32
        self.row_shapes = row_shapes
        if row_shapes is not None:
            self._open_sites()
        self._rollback()
        if not (path / MANIFEST).exists():  # a new store exists (empty) from the start
            self.offsets.sync()
            self.offsets.set_rows(1)
            self.offsets.sync()
            _write_json_atomic(path / MANIFEST, self.manifest)

    def _open_sites(self) -> None:
        (self.path / "sites").mkdir(exist_ok=True)
        ragged = self.manifest["request"]["positions"] is None
        fixed = () if ragged else (len(self.manifest["request"]["positions"]),)
        for site, shape in self.row_shapes.items():
            self.sites[site] = _AppendArray(self.path / "sites" / f"{site}.npy", self.dtype, fixed + tuple(shape))

    def _rollback(self) -> None:
        """Truncate every file to the committed state (a killed collect may have left rows past it)."""
        n, n_tokens = self.manifest["n_prompts"], self.manifest["n_tokens"]
        self.prompts.truncate(self.manifest["prompts_bytes"])
        self.prompts.seek(0, os.SEEK_END)
        self.tokens.truncate(n_tokens)
        self.offsets.truncate(n + 1 if n else 0)
        if n == 0:
            self.offsets.append(np.zeros(1, np.int64))
        if self.positions is not None:
            self.positions.truncate(n)
        ragged = self.positions is None
        for array in self.sites.values():
            array.truncate(n_tokens if ragged else n)

    def _all(self) -> list[_AppendArray]:
        return [self.tokens, self.offsets] + ([self.positions] if self.positions is not None else []) + \
            list(self.sites.values())

    def commit(self, batch: list) -> None:
        """Append (prompt, run) pairs' rows in order, flush them, then publish them with a new manifest."""
        if not batch:
            return
        sites = self.manifest["request"]["sites"]
        if self.row_shapes is None:
            self.row_shapes = {site: list(batch[0][1].captures[site].shape[1:]) for site in sites}
            self.manifest["row_shapes"] = self.row_shapes
            self._open_sites()
            for array in self.sites.values():  # files a collect killed before its first commit left behind
                array.truncate(0)
        runs = [run for _, run in batch]
        n_tokens = self.manifest["n_tokens"]
        ends = []
        for run in runs:
            n_tokens += len(run.token_ids)
            ends.append(n_tokens)
        self.tokens.append(np.concatenate([np.asarray(r.token_ids, np.int32) for r in runs]))
        self.offsets.append(np.asarray(ends, np.int64))
        if self.positions is not None:
            self.positions.append(np.asarray([r.positions for r in runs], np.int32))
            for site in sites:
                self.sites[site].append(np.stack([r.captures[site] for r in runs]))
        else:
            for site in sites:
                self.sites[site].append(np.concatenate([r.captures[site] for r in runs]))
        lines = b"".join(_prompt_json(prompt).encode("utf-8") + b"\n" for prompt, _ in batch)
        self.prompts.write(lines)
        self.prompts.flush()
        os.fsync(self.prompts.fileno())
        for array in self._all():
            array.sync()
        n = self.manifest["n_prompts"] + len(runs)
        rows = {"tokens": n_tokens, "offsets": n + 1, "positions": n,
                "sites": n_tokens if self.positions is None else n}
        self.tokens.set_rows(rows["tokens"])
        self.offsets.set_rows(rows["offsets"])
        if self.positions is not None:
            self.positions.set_rows(rows["positions"])
        for array in self.sites.values():
            array.set_rows(rows["sites"])
        for array in self._all():
            array.sync()
        self.manifest.update(n_prompts=n, n_tokens=n_tokens, prompts_bytes=self.prompts.tell(),
                             updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json_atomic(self.path / MANIFEST, self.manifest)

    def close(self) -> None:
        self.prompts.close()
        for array in self._all():
            array.close()


def _request_record(client, sites: list[str], positions, dtype: str, chat: bool) -> dict:
    info = client.model_info()
    template = info.chat_template if chat else ""
    return {"sites": sites, "positions": None if positions is None else [int(p) for p in positions],
            "dtype": dtype, "chat": bool(chat),
            "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest() if chat else None}


def _differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{key}: stored {stored.get(key)!r}, asked {wanted.get(key)!r}"
            for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]


class StoreMixin:
    """`collect`: many prompts' activations streamed into an `ActivationStore` (needs `CoreClient`)."""

    def collect(self, prompts: Iterable, path, *, sites="blocks.*.resid_post", positions: Sequence[int] | None = (-1,),
                dtype: str = "float16", chat: bool = False, batch_size: int | None = None,
                commit_seconds: float = 1.0, progress: bool = True) -> ActivationStore:
        """Capture `sites` at `positions` for every prompt into the store at `path`; return it.

        prompts: texts or token-id lists, in the order the store keeps. A store that already holds the
            first prompts of this list (an interrupted collect, or a shorter list) is completed: only the
            prompts not yet stored are computed. A store holding other prompts, another model's rows or
            another request's (sites, positions, dtype, chat template) is refused (`StoreMismatchError`).
        sites: a capture-site filter (name, glob, list), resolved against the served model.
        positions: token positions per prompt (negative from the end), or None for every position (the
            ragged layout). dtype: "float16" (half the disk) or "float32".
        batch_size: prompts per request (default 8, or what the store was started with: batches are
            aligned to it so a resumed store is byte-identical, see the module docstring).
        commit_seconds: rows are flushed and published at the first batch boundary after this many seconds
            (each commit is ~n_sites + 5 fsyncs); a killed collect loses at most the rows received since.
        """
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', not {dtype!r}")
        prompts = list(prompts)
        info = self.model_info()
        chosen = self.sites(sites)
        if not chosen:
            raise ValueError(f"no capture site of this model matches {sites!r}")
        patterns = [s for s in chosen if s.split(".", 2)[-1] in PATTERN_SITES]
        if patterns:
            raise ValueError(f"attention score/pattern sites are (heads, tokens, tokens) per prompt and cannot be "
                             f"stored as rows: {patterns[:3]}")
        request = _request_record(self, chosen, positions, dtype, chat)
        model = {"fingerprint": info.fingerprint, "name": info.name, "architecture": info.architecture,
                 "n_layer": info.n_layer, "n_embd": info.n_embd, "n_vocab": info.n_vocab,
                 "bos_token_id": info.bos_token_id}
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with _exclusive(path):
            if (path / MANIFEST).exists():
                manifest = ActivationStore.open(path).manifest
                if manifest["model"]["fingerprint"] != info.fingerprint:
                    raise StoreMismatchError(
                        f"{path} holds activations of model {manifest['model']['fingerprint'][:12]} "
                        f"({manifest['model']['name']}); the server holds {info.fingerprint[:12]} ({info.name}). "
                        f"Use another path for another model.")
                differences = _differences(manifest["request"], request)
                if differences:
                    raise StoreMismatchError(f"{path} was collected with another request ({'; '.join(differences)}); "
                                             f"use another path")
                stored = ActivationStore(path, manifest).prompts
                if [_prompt_json(p) for p in prompts[:len(stored)]] != [_prompt_json(p) for p in stored]:
                    raise StoreMismatchError(f"{path} holds {len(stored)} prompts that are not the first prompts of "
                                             f"this list; a store grows only by appending prompts (use another path)")
                if batch_size is not None and batch_size != manifest["batch_size"]:
                    raise ValueError(f"{path} was collected in batches of {manifest['batch_size']}; resume with "
                                     f"that batch size (or none) so rows do not depend on where it stopped")
                batch_size = manifest["batch_size"]
            else:
                batch_size = batch_size or DEFAULT_BATCH_SIZE
                manifest = {"format": FORMAT, "version": VERSION, "model": model, "request": request,
                            "batch_size": batch_size, "n_prompts": 0, "n_tokens": 0, "prompts_bytes": 0,
                            "row_shapes": None,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, not {batch_size}")
            done = manifest["n_prompts"]
            writer = _Writer(path, manifest, manifest["row_shapes"])
            try:
                self._collect_into(writer, prompts, done, batch_size, chosen, positions, dtype, chat, progress,
                                   commit_seconds)
            finally:
                writer.close()
        store = ActivationStore.open(path)
        store.stats = CollectStats(computed=len(prompts) - done, skipped=done, seconds=time.perf_counter() - start,
                                   bytes_on_disk=store.nbytes_on_disk())
        return store

    def _collect_into(self, writer: _Writer, prompts: list, done: int, batch_size: int, sites: list[str], positions,
                      dtype: str, chat: bool, progress: bool, commit_seconds: float) -> None:
        from .progress import progress_bar

        # Restart at the batch boundary at or before `done`: its batch is recomputed whole (rows before
        # `done` are not written again) so every row comes from the same batch as in one uninterrupted run.
        first = done - done % batch_size
        todo = prompts[first:]
        runs = self.iter_runs(todo, batch_size=batch_size, capture=sites, logits=False, dtype=dtype, chat=chat,
                              positions=None if positions is None else list(positions))
        pending: list = []
        tokens = 0
        started = last_commit = time.perf_counter()
        desc = f"collect (+{done} stored)" if done else "collect"
        with progress_bar(len(prompts) - done, enabled=progress, desc=desc) as bar:
            for index, run in enumerate(runs, start=first):
                if index < done:
                    continue
                pending.append((prompts[index], run))
                tokens += len(run.token_ids)
                boundary = (index + 1) % batch_size == 0
                due = time.perf_counter() - last_commit >= commit_seconds
                if (boundary and due) or index + 1 == len(prompts):
                    writer.commit(pending)
                    last_commit = time.perf_counter()
                    bar.update(len(pending))
                    pending = []
                    if hasattr(bar, "set_postfix_str"):
                        bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):.0f} tok/s", refresh=False)
