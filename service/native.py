"""llama.cpp's C API as llama-cpp-python binds it (ctypes), without that package's high-level layer.

`import llama_cpp` runs the package's `__init__`, which also imports its `Llama` class, chat formats
(jinja2), caches (diskcache, sqlite3) and YAML: about 11 MB of every worker's resident memory, for code
lmscope never calls. The bindings are the submodule `llama_cpp.llama_cpp`, which needs only its package's
path: it is imported under a bare package object, removed again at once, so that a later `import llama_cpp`
(a user's, in the same process) runs the real `__init__`, which finds the bindings already loaded.

`from .native import llama as lc` is how the service modules reach llama.cpp; `LIBRARY_DIR` is where the
bindings loaded llama.cpp's libraries from (`LLAMA_CPP_LIB_PATH` overrides the packaged lib/ there too).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
import types


def _bindings() -> types.ModuleType:
    if "llama_cpp" in sys.modules:
        return importlib.import_module("llama_cpp.llama_cpp")
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed: the server needs it (pip install 'lmscope[server]')")
    bare = types.ModuleType("llama_cpp")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["llama_cpp"] = bare
    try:
        return importlib.import_module("llama_cpp.llama_cpp")
    finally:
        del sys.modules["llama_cpp"]


llama = _bindings()
LIBRARY_DIR = (pathlib.Path(os.environ["LLAMA_CPP_LIB_PATH"]) if os.environ.get("LLAMA_CPP_LIB_PATH")
               else pathlib.Path(llama.__file__).parent / "lib")
