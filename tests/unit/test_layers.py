"""Dependencies go one way: `lmscope.proto` (the shared contract) imports neither side, `lmscope.service` and
`lmscope.client` import `lmscope.proto` and never each other. The one exception is the command line: `lmscope`
(`client/cli.py`) and the server launcher it uses (`client/serving.py`) sit above both, since they start
servers as well as talk to them, and they import the service only inside the commands that need it.

Checked twice: statically, every import statement of every module (also those inside functions), and at run
time, what importing every service module actually loads.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"proto": "lmscope.proto", "service": "lmscope.service", "client": "lmscope.client"}
FORBIDDEN = {"proto": ("lmscope.client", "lmscope.service"), "service": ("lmscope.client",),
             "client": ("lmscope.service",)}
ABOVE_BOTH = {"client/cli.py", "client/serving.py"}


def _modules(folder: str) -> list[pathlib.Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "wire" not in p.parts)


def _imports(path: pathlib.Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    parts = package.split(".") + list(path.relative_to(ROOT).parts[1:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{alias.name}" if not node.module else module) for alias in node.names]
    return found


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_package_imports_the_side_it_must_not(folder):
    wrong = []
    for path in _modules(folder):
        name = str(path.relative_to(ROOT))
        if name in ABOVE_BOTH:
            continue
        for line, module in _imports(path, PACKAGES[folder]):
            if module.startswith(FORBIDDEN[folder]):
                wrong.append(f"{name}:{line} imports {module}")
    assert not wrong, f"{PACKAGES[folder]} must not import {' or '.join(FORBIDDEN[folder])}:\n" + "\n".join(wrong)


def test_the_checker_resolves_relative_imports():
    """The static check would pass vacuously if it misread `from ..x import y`: it must see these."""
    sample = ROOT / "client" / "inside.py"
    modules = {module for _, module in _imports(sample, "lmscope.client")}
    assert "lmscope.client.errors" in modules and "lmscope.proto.tensor_names" in modules
    views = {module for _, module in _imports(ROOT / "client" / "views" / "__init__.py", "lmscope.client")}
    assert {"lmscope.client.token_labels", "lmscope.client.views.page"} <= views


def test_the_service_loads_no_client_module():
    service = [f"lmscope.service.{p.stem}" for p in _modules("service") if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {service!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('lmscope.client')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]", loaded.stdout
