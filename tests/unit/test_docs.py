"""The docs name only what exists: README.md and every docs/*.md page.

Checked without a server, in a second or two:

- every repository path they write (in backticks, in code blocks, in links, or in running text when it ends
  in a file extension), such as `service/engine.py`, `scripts/bench_transformers.py`, `docs/lenses.md`, exists;
- every relative link (`[text](docs/lenses.md#the-logit-lens)`) reaches a file, and its `#anchor` a heading;
- every `path.py::name` (a test, a function, a class, `Class.method`) is defined in that file;
- every pair written as `` `path.py` (`Name`) ``, `` `Name` (`path.py`) `` or `` `Name` in `path.py` `` names
  something that file defines (Python files through their syntax tree, other files by the word);
- every backticked `test_...` name is a test in tests/;
- every dotted `lmscope.*` name in backticks (and in `from lmscope... import ...` lines of code blocks)
  imports, attributes included (`lmscope.client.tuned_lens`, `lmscope.service.engine.LOGITS_RESERVE_BYTES`).

CHANGELOG.md is history and may name what is gone; it is not checked.
"""
from __future__ import annotations

import ast
import functools
import importlib
import pathlib
import re

import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("service", "client", "proto", "scripts", "tests", "docs", "examples", ".ci")
TOP_FILES = ("README.md", "CHANGELOG.md", "Makefile", "Dockerfile", "pyproject.toml")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
# A path starts at a top-level folder of the repository, not inside a longer path (`lmscope/proto/x.py`,
# `~/.cache/...`, `$LMSCOPE_HOME/...`).
PATH = re.compile(r"(?<![\w/.~$<>@-])((?:%s)/[\w./*<>{}:-]*)" % "|".join(re.escape(d) for d in TOP_DIRS))
IDENT = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
DOTTED = re.compile(r"(?<![\w.])lmscope\.(?:proto|client|service)\b(?:\.[A-Za-z_]\w*)*")
FROM_IMPORT = re.compile(r"^\s*from\s+(lmscope(?:\.\w+)*)\s+import\s+\(?([\w\s,]+)", re.M)
TEST_NAME = re.compile(r"^(test_\w+)$")
PAIR_PATH_NAME = re.compile(r"`([^`\s]+)`,? \(?`(%s)(?:\(\))?`" % IDENT)
PAIR_NAME_PATH = re.compile(r"`(%s)(?:\(\))?` (?:\(|in )`([^`\s]+)`" % IDENT)


def _prose_and_code(text: str) -> tuple[str, list[str]]:
    """The page without its fenced blocks, and the fenced blocks."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    return FENCE.sub("\n", text), blocks


def _clean(candidate: str) -> str | None:
    """A written path as a path of the repository, or None when it is a pattern or a placeholder."""
    candidate = candidate.split("::")[0].split("#")[0].rstrip(".,;:)")
    if any(c in candidate for c in "*<>{}") or candidate.endswith("..."):
        return None
    return candidate


def _exists(path: str, page: pathlib.Path) -> bool:
    return (ROOT / path).exists() or (page.parent / path).exists()


def _is_file_like(path: str) -> bool:
    return path.endswith("/") or re.search(r"\.\w+$", path) is not None


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    heading = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    heading = heading.strip().lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(page: pathlib.Path) -> frozenset[str]:
    prose, _ = _prose_and_code(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


@functools.lru_cache(maxsize=None)
def _python_names(path: pathlib.Path) -> frozenset[str]:
    """What a module defines: top-level functions, classes and assignments, and `Class.member` for methods,
    class-level assignments and fields, and `self.x = ...` in methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()

    def targets(node) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return list(node.targets)
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            return [node.target]
        return []

    def flat(target) -> list[ast.expr]:
        return [e for t in target.elts for e in flat(t)] if isinstance(target, (ast.Tuple, ast.List)) else [target]

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
                elif prefix:  # a method: its self.x assignments are members of the class
                    for sub in ast.walk(node):
                        for t in (e for tt in targets(sub) for e in flat(tt)):
                            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                                names.add(prefix + t.attr)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", []), prefix)
            else:
                for t in (e for tt in targets(node) for e in flat(tt)):
                    if isinstance(t, ast.Name):
                        names.add(prefix + t.id)
    visit(tree.body, "")
    return frozenset(names)


def _defines(path: pathlib.Path, name: str) -> bool:
    name = name.split("(")[0]
    if re.search(r"\.(py|md|sh|proto|toml|txt|json|png)$", name):  # a file name, not a symbol
        return True
    if path.suffix != ".py":
        return re.search(r"\b%s\b" % re.escape(name.split(".")[-1]), path.read_text(encoding="utf-8")) is not None
    defined = _python_names(path)
    if name.startswith(path.stem + "."):  # `heap.FRONT_END_MMAP_THRESHOLD` next to `service/heap.py`
        name = name[len(path.stem) + 1:]
    return name in defined or any(d.endswith("." + name) for d in defined)  # a method named alone


@functools.lru_cache(maxsize=None)
def _tests_defined() -> frozenset[str]:
    out: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        out.update(re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)", path.read_text(encoding="utf-8"), re.M))
    return frozenset(out)


def _importable(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def problems(page: pathlib.Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    prose, blocks = _prose_and_code(text)
    spans = CODE_SPAN.findall(prose)
    found: list[str] = []

    # Paths: in code spans and code blocks anything that starts at a top-level folder; in running text only
    # what looks like a file or a folder (so that "client/server" in a sentence is not a path).
    written: set[str] = set()
    for chunk in spans + blocks:
        written.update(PATH.findall(chunk))
    bare_prose = CODE_SPAN.sub(" ", LINK.sub(" ", prose))
    written.update(p for p in PATH.findall(bare_prose) if _is_file_like(p.rstrip(".,;:)")))
    for span in spans:
        if span.strip() in TOP_FILES or re.fullmatch(r"[\w-]+\.md", span.strip()):
            written.add(span.strip())
    for raw in sorted(written):
        path = _clean(raw)
        if path and not _exists(path, page):
            found.append(f"path {raw!r} does not exist")

    # `path.py::name`
    for chunk in spans + blocks:
        for path, name in re.findall(r"([\w./-]+\.py)::(%s)" % IDENT, chunk):
            if (ROOT / path).is_file() and not _defines(ROOT / path, name):
                found.append(f"{path}::{name} is not defined there")

    # Links: files relative to the page, anchors among the target's headings.
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            found.append(f"link {target!r} reaches no file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            found.append(f"link {target!r}: no heading with anchor #{anchor} in {dest.name}")

    # `path` (`Name`) and `Name` (`path`) / `Name` in `path`
    for path, name in PAIR_PATH_NAME.findall(prose):
        target = ROOT / path
        if _clean(path) == path and target.is_file() and not _defines(target, name):
            found.append(f"`{name}` is not defined in {path}")
    for name, path in PAIR_NAME_PATH.findall(prose):
        target = ROOT / path
        if _clean(path) == path and target.is_file() and not _defines(target, name):
            found.append(f"`{name}` is not defined in {path}")

    # Tests named alone.
    for span in spans:
        m = TEST_NAME.match(span.strip())
        if m and m.group(1) not in _tests_defined():
            found.append(f"test {m.group(1)} is not in tests/")

    # lmscope.* names.
    dotted = {d for span in spans for d in DOTTED.findall(span)}
    for block in blocks:
        for module, imported in FROM_IMPORT.findall(block):
            dotted.add(module)
            dotted.update(f"{module}.{n.strip()}" for n in imported.split(",") if n.strip().isidentifier())
    for name in sorted(dotted):
        if not _importable(name):
            found.append(f"{name} does not import")
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_the_docs_name_only_what_exists(page):
    assert not problems(page), f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems(page))


def test_the_checks_catch_a_wrong_name(tmp_path):
    """The checker itself: a page naming a missing file, symbol, test, module and anchor fails on each."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee `service/no_such_module.py`, `tests/unit/test_docs.py::no_such_test`, "
                    "`test_no_such_test_anywhere`, `lmscope.client.no_such_module`, `NoSuchClass` "
                    "(`service/engine.py`), [a link](#no-such-heading) and [another](#title).\n",
                    encoding="utf-8")
    found = problems(page)
    assert len(found) == 6, found
