"""llama.cpp's C API as llama-cpp-python binds it (ctypes), without that package's high-level layer.

`import llama_cpp` runs the package's `__init__`, which also imports its `Llama` class, chat formats
(jinja2), caches (diskcache, sqlite3) and YAML: about 11 MB of every worker's resident memory, for code
lmscope never calls. The bindings are the submodule `llama_cpp.llama_cpp`, which needs only its package's
path: it is imported under a bare package object, removed again at once, so that a later `import llama_cpp`
(a user's, in the same process) runs the real `__init__`, which finds the bindings already loaded.

`from .native import llama as lc` is how the service modules reach llama.cpp; `LIBRARY_DIR` is where the
bindings loaded llama.cpp's libraries from (`LLAMA_CPP_LIB_PATH` overrides the packaged lib/ there too).

The wheel setup builds (docs/building.md) holds ggml's CPU back end several times, once per instruction-set
level (`libggml-cpu-haswell.so`, `libggml-cpu-icelake.so`, ...), as modules loaded at run time. llama.cpp looks
for them only beside the Python executable and in the working directory, so they are loaded here from
`LIBRARY_DIR`, before anything initialises llama.cpp: ggml scores each variant against this CPU and keeps the
best. `CPU_VARIANT` names the one loaded ("built-in" for a build with one CPU back end linked in), and
`CPU_LIBRARY` is its file, the copy of ggml's CPU functions that lmscope's own ggml graphs must call
(service/stored_matrix.py).
"""
from __future__ import annotations

import ctypes
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


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


# Until llama_log.install() replaces it; a module global, so that C never calls a collected function.
_QUIET_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *_: None)


def _load_cpu_backend() -> pathlib.Path | None:
    """The CPU variant ggml loaded from LIBRARY_DIR; None for a build without variants."""
    variants = sorted(p.name for p in LIBRARY_DIR.glob("libggml-cpu-*.so"))
    if not variants:
        return None
    ggml = ctypes.CDLL(str(LIBRARY_DIR / "libggml.so.0"))  # the copy libllama links against: one registry
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    if not ggml.ggml_backend_reg_by_name(b"CPU"):
        if not os.environ.get("LMSCOPE_LLAMA_VERBOSE"):  # ggml logs a line per module it loads, on every import
            ggml.ggml_log_set(_QUIET_LOG, None)
        ggml.ggml_backend_load_all_from_path(os.fsencode(LIBRARY_DIR))
    registry = ggml.ggml_backend_reg_by_name(b"CPU")
    if not registry:
        raise ImportError(f"none of llama.cpp's CPU back ends in {LIBRARY_DIR} ({', '.join(variants)}) runs on this "
                          "CPU: rebuild llama-cpp-python with a variant it supports (docs/building.md)")
    # Which file the registry's code lives in names the variant ggml chose.
    function = ggml.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_get_features")
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not function or not libc.dladdr(function, ctypes.byref(info)) or not info.dli_fname:
        raise ImportError(f"cannot tell which CPU back end of {LIBRARY_DIR} llama.cpp loaded")
    return pathlib.Path(os.fsdecode(info.dli_fname))


CPU_LIBRARY = _load_cpu_backend()
CPU_VARIANT = CPU_LIBRARY.name.removeprefix("libggml-cpu-").removesuffix(".so") if CPU_LIBRARY else "built-in"
