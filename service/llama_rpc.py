"""One model split across hosts with llama.cpp's own RPC backend (ggml-rpc).

ggml-rpc turns a remote machine into a ggml *device*: an RPC worker process (`ggml_backend_rpc_start_server`,
what llama.cpp's `rpc-server` tool runs) holds weight and KV buffers in its memory and computes the graph
nodes placed on it; the process that loads the model adds the workers' endpoints as devices, and llama.cpp
places layers on them as it would on GPUs (`--n-gpu-layers` counts the layers that leave the local CPU,
split over the devices in proportion to their free memory). Nothing here is a cluster of our own: lmscope
only registers the devices before the model is loaded and, for `lmscope rpc-worker`, starts llama.cpp's
server loop in a process.

The eval callback still sees every node: the scheduler computes up to a node on whatever device holds it,
and `ggml_backend_tensor_get/set` fetch or write the tensor over the RPC connection, so capture and
interventions work unchanged (each captured tensor costs a network round trip).

Limits of ggml-rpc (llama.cpp, RPC protocol 7): IPv4 only; a worker serves one client connection at a
time, so a server using RPC workers runs one model worker (`--workers 1`); the connection has no
authentication or
encryption and lets its client read and write the worker's memory, so bind workers to loopback or
a private network only. A failed connection aborts the process that holds it, so endpoints are checked
with a plain TCP connection before anything native runs.

The RPC backend exists only in a llama.cpp built with `-DGGML_RPC=ON`; the llama-cpp-python wheel that
`scripts/setup.sh` builds by default has none (see docs/deployment.md for the build).
"""
from __future__ import annotations

import argparse
import ctypes
import socket
import sys

from .errors import Code, RequestError

BUILD_HINT = ('rebuild llama-cpp-python with the RPC backend: LMSCOPE_CMAKE_ARGS="-DGGML_NATIVE=OFF '
              '-DLLAVA_BUILD=OFF -DGGML_RPC=ON" bash scripts/setup.sh (see docs/deployment.md)')
_GGML_BACKEND_DEVICE_TYPE_CPU = 0


def _library() -> ctypes.CDLL:
    """The `libggml.so.0` libllama links against (the backend registry lives there)."""
    from .native import LIBRARY_DIR as lib_dir

    for name in ("libggml.so.0", "libggml.so", "libggml.dylib", "ggml.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise OSError(f"libggml not found in {lib_dir}")
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    return lib


def _rpc_registry(lib: ctypes.CDLL) -> int | None:
    return lib.ggml_backend_reg_by_name(b"RPC")


def supported() -> bool:
    """Whether the installed llama.cpp has the RPC backend (what `llama_supports_rpc()` answers)."""
    return bool(_rpc_registry(_library()))


def parse_endpoints(text: str) -> list[str]:
    """'host:port,host:port' -> endpoints, each checked for a host and a numeric port."""
    endpoints = [e.strip() for e in text.split(",") if e.strip()]
    if not endpoints:
        raise RequestError(Code.INVALID_ARGUMENT, "--rpc needs at least one HOST:PORT")
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise RequestError(Code.INVALID_ARGUMENT, f"--rpc endpoint {endpoint!r} is not HOST:PORT")
        if ":" in host:
            raise RequestError(Code.INVALID_ARGUMENT, f"--rpc endpoint {endpoint!r}: ggml-rpc speaks IPv4 only")
    return endpoints


def check_reachable(endpoints: list[str], timeout: float = 5.0) -> None:
    """A TCP connection to every endpoint, so an absent worker is an error message, not a native abort."""
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # ggml-rpc connects over IPv4
                probe.settimeout(timeout)
                probe.connect((host, int(port)))
        except OSError as exc:
            raise RequestError(Code.FAILED_PRECONDITION,
                               f"cannot reach the RPC worker at {endpoint} ({exc.strerror or exc}); start it "
                               f"with `lmscope rpc-worker --port {port}` on that host") from None


def server_endpoints(rpc: str | None, workers: int, n_gpu_layers: int) -> tuple[str, ...]:
    """Check `lmscope serve --rpc ...` before any worker starts: build, options, reachable workers."""
    if not rpc:
        return ()
    endpoints = parse_endpoints(rpc)
    if workers != 1:
        raise RequestError(Code.INVALID_ARGUMENT, "--rpc needs --workers 1: an RPC worker serves one connection "
                                               "at a time")
    if n_gpu_layers <= 0:
        raise RequestError(Code.INVALID_ARGUMENT, "--rpc needs --n-gpu-layers N: the number of layers placed on the "
                                               "RPC workers (99 = all; the rest stay on this machine's CPU)")
    if not supported():
        raise RequestError(Code.FAILED_PRECONDITION, f"--rpc: this llama.cpp build has no RPC backend; {BUILD_HINT}")
    check_reachable(endpoints)
    return tuple(endpoints)


def add_devices(endpoints: list[str]) -> None:
    """Register each worker's devices with ggml; the next model load places layers on them.

    Runs in the model worker process, also when it is restarted after a crash: the workers are checked
    again first, so one that is gone is an error message rather than an abort inside ggml-rpc.
    """
    check_reachable(endpoints)
    lib = _library()
    registry = _rpc_registry(lib)
    if not registry:
        raise RequestError(Code.FAILED_PRECONDITION, f"this llama.cpp build has no RPC backend; {BUILD_HINT}")
    address = lib.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
    for endpoint in endpoints:
        server_registry = add_server(endpoint.encode())
        if not server_registry:
            raise RequestError(Code.FAILED_PRECONDITION, f"the RPC worker at {endpoint} offers no device")
        lib.ggml_backend_register(server_registry)


def serve_worker(endpoint: str, threads: int) -> None:
    """Run llama.cpp's RPC server loop on the local CPU device; returns only if it cannot listen."""
    lib = _library()
    registry = _rpc_registry(lib)
    if not registry:
        raise RequestError(Code.FAILED_PRECONDITION, f"this llama.cpp build has no RPC backend; {BUILD_HINT}")
    cpu = lib.ggml_backend_dev_by_type(_GGML_BACKEND_DEVICE_TYPE_CPU)
    address = lib.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_rpc_start_server")
    start_server = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                    ctypes.POINTER(ctypes.c_void_p))(address)
    devices = (ctypes.c_void_p * 1)(cpu)
    start_server(endpoint.encode(), None, threads, 1, devices)


def main(argv: list[str] | None = None) -> int:
    """`lmscope rpc-worker`: lend this machine's CPU and memory to a server that loads a model with --rpc."""
    import ipaddress
    import os

    parser = argparse.ArgumentParser(prog="lmscope rpc-worker", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host (ggml-rpc has no authentication: private networks only)")
    args = parser.parse_args(argv)
    try:
        host = ipaddress.IPv4Address(args.host)
    except ValueError:
        print(f"error: --host {args.host}: ggml-rpc binds an IPv4 address (e.g. 127.0.0.1 or 10.0.0.5)",
              file=sys.stderr)
        return 2
    if not host.is_loopback and not args.insecure:
        print(f"error: --host {host}: an RPC worker lets any client that reaches it read and write its "
              f"memory; add --insecure if the network is private", file=sys.stderr)
        return 2
    print(f"lmscope rpc-worker on {host}:{args.port}", flush=True)
    try:
        serve_worker(f"{host}:{args.port}", args.threads or os.cpu_count() or 1)
    except RequestError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"error: the RPC worker could not listen on {host}:{args.port}", file=sys.stderr)
    return 1
