"""`lmscope serve`: the gRPC server process.

The front end (this process) holds no model and loads no native library of llama.cpp: it validates requests,
queues them, and supervises worker processes that run llama.cpp (`service/worker.py`); what it knows of the
model, the workers tell it. The two start-up steps that need llama.cpp (`--requantize`, checking an `--rpc`
build) run in a short-lived child process. It also serves the standard gRPC health service
(SERVING once the workers are up; usable as a Kubernetes gRPC probe) and server reflection, so `grpcurl`
can list and call the API.

Security defaults: binds 127.0.0.1; binding any other address requires TLS (`--tls-cert/--tls-key`) or an
explicit `--insecure`. With `--token-file`, every call except health checks must carry
`authorization: Bearer <token>` (compared in constant time). Clients never name files: the model is
chosen when the server starts.
"""
from __future__ import annotations

import argparse
import hmac
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmscope.proto.addresses import is_loopback_host, join_host_port
from lmscope.proto.wire import lmscope_pb2 as pb

from . import heap, llama_rpc
from .contracts import EngineConfig
from .errors import Code, RequestError
from .model_files import ModelPathError, resolve_model_path, sha256_file
from .requantize import RequantizeError, requantized
from .wire_guard import add_inspector_service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inspector"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
_THREAD_HEADROOM = 8
T = TypeVar("T")


class _TokenAuth(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token: pass token=... to Client or set LMSCOPE_TOKEN")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


class Server:
    """A running lmscope server: gRPC front end + worker pool."""

    def __init__(self, args: argparse.Namespace):
        from .servicer import InspectorServicer
        from .worker import WorkerPool

        # Everything that can be wrong with the arguments, or the address, is found before the model loads.
        credentials = _tls_credentials(args.tls_cert, args.tls_key)
        interceptors = [_TokenAuth(_read_token(args.token_file))] if args.token_file else []
        model_path = resolve_model_path(args.model)
        if args.requantize or args.precise:
            model_path = _in_child(requantized, model_path, "f32" if args.precise else args.requantize)
        rpc_servers = (_in_child(llama_rpc.server_endpoints, args.rpc, args.workers, args.n_gpu_layers)
                       if args.rpc else ())
        self.started = time.perf_counter()
        message_bytes = args.max_message_mb << 20
        options = [("grpc.max_send_message_length", message_bytes),
                   ("grpc.max_receive_message_length", message_bytes),
                   ("grpc.so_reuseport", 0),
                   # The client pings every 20 s (client/core.py); grpc's default server policy (one ping per 5
                   # min without data, 2 strikes) answered a request running past ~1 min with GOAWAY "Too many
                   # pings" (a Gemma 3 lens on a busy machine).
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                   ("grpc.http2.max_ping_strikes", 0)]
        # Threads: one per running and per queued request, plus headroom for calls that need no worker
        # (health checks, model info) and for answers still streaming out after their worker was released.
        # Past that many calls grpc answers RESOURCE_EXHAUSTED itself instead of parking calls unseen.
        threads = args.workers + args.max_queue + _THREAD_HEADROOM
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options,
                                interceptors=interceptors, maximum_concurrent_rpcs=threads)
        address = join_host_port(args.host.strip("[]"), args.port)
        try:
            self.port = (self.grpc.add_secure_port(address, credentials) if credentials is not None
                         else self.grpc.add_insecure_port(address))
        except RuntimeError:  # grpc's "Failed to bind to address"
            self.port = 0
        if not self.port:
            raise RequestError(Code.UNAVAILABLE, f"cannot listen on {address}: the port is in use, or the host is "
                                              f"not an address of this machine")
        config = EngineConfig(model_path=str(model_path), n_ctx=args.n_ctx, n_threads=worker_threads(args),
                              n_gpu_layers=args.n_gpu_layers, n_batch=args.n_batch, n_outputs=args.n_outputs,
                              flash_attn=args.flash_attn == "on" and not args.precise,
                              batch_invariant=args.batch_invariant, kv_cache_f32=args.precise,
                              max_capture_bytes=args.max_capture_mb << 20,
                              max_generated_tokens=args.max_generated_tokens,
                              max_prompt_tokens=args.max_prompt_tokens, max_batch_prompts=args.max_batch_prompts,
                              rpc_servers=rpc_servers)
        self.health = health.HealthServicer()
        self.pool = WorkerPool(config, n_workers=args.workers, max_queue=args.max_queue, test_hooks=args.test_hooks,
                               on_health=self._set_health)
        # Hashed here, once, not by each worker: a worker that hashes loads OpenSSL (3 MB resident each).
        self.pool.info.model.fingerprint = sha256_file(model_path)
        add_inspector_service(InspectorServicer(self.pool, message_bytes, test_hooks=args.test_hooks), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.host = args.host.strip("[]")
        self.model_path = model_path
        self.grpc.start()
        self._set_health(True)

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def _set_health(self, serving: bool) -> None:
        """SERVING while at least one model worker is alive and the server is not stopping."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        self._set_health(False)
        self.grpc.stop(grace).wait()
        self.pool.close()


def _in_child(function: Callable[..., T], *args) -> T:
    """`function(*args)` run in a spawned process (its exceptions re-raised here), for start-up steps that
    call into llama.cpp: the front end itself never loads it."""
    with futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _tls_credentials(cert_path: str | None, key_path: str | None) -> grpc.ServerCredentials | None:
    if not (cert_path or key_path):
        return None
    if not (cert_path and key_path):
        raise RequestError(Code.INVALID_ARGUMENT, "TLS needs both --tls-cert and --tls-key")
    pem = {}
    for flag, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        try:
            with open(path, "rb") as f:
                pem[flag] = f.read()
        except OSError as exc:
            raise RequestError(Code.INVALID_ARGUMENT, f"cannot read {flag} {path}: {exc.strerror}") from None
        if b"-----BEGIN " not in pem[flag]:
            raise RequestError(Code.INVALID_ARGUMENT, f"{flag} {path} is not a PEM file")
    return grpc.ssl_server_credentials([(pem["--tls-key"], pem["--tls-cert"])])


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise RequestError(Code.INVALID_ARGUMENT, f"cannot read --token-file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise RequestError(Code.INVALID_ARGUMENT, f"the token in {path} is shorter than 16 characters")
    return token


def worker_threads(args: argparse.Namespace) -> int:
    """Threads per worker: --threads, or the machine's cores shared among the workers. More threads than
    cores makes every worker wait on the others' (two workers of two threads each on two cores: a lens took
    4x as long as with the cores shared; docs/gotchas.md)."""
    return args.threads or max(1, (os.cpu_count() or 1) // args.workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="path to a GGUF file (default: the default model, fetched once)")
    parser.add_argument("--requantize", choices=["q8_0", "q4_0"],
                        help="serve a copy of the model converted to this weight type (made once, cached): "
                             "faster on CPUs, at an accuracy cost; see docs/performance.md")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=50051, help="port (0 = any free port)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens per worker")
    parser.add_argument("--n-batch", type=int, default=512,
                        help="tokens per llama.cpp ubatch, for requests that want few output rows; longer is faster, "
                             "and a row's numbers do not depend on it (docs/performance.md)")
    parser.add_argument("--n-outputs", type=int, default=0,
                        help="output rows (logits, the last block's sites) per ubatch; 0 = as many as 32 MiB of "
                             "logits hold, a multiple of 4, at least 16 (docs/performance.md)")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on",
                        help="off: every request runs the plain attention kernel (the one an attention capture "
                             "needs), so a result never depends on what else is captured; slower "
                             "(docs/gotchas.md)")
    parser.add_argument("--precise", action="store_true",
                        help="serve a float32 copy of the model (made once, cached) with a float32 KV cache and the "
                             "plain attention kernel: numbers as far from exact math as float32 rounding, at 4 bytes "
                             "per weight and a slower pass (docs/fidelity.md)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="decode each prompt of a batch in ubatches of its own, as if it came alone, so its "
                             "numbers never depend on the prompts beside it; slower for batches of short prompts "
                             "(docs/gotchas.md)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per worker (0 = the cores shared among the workers)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (CUDA/Metal builds)")
    parser.add_argument("--workers", type=int, default=1, help="model worker processes (requests in parallel)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="requests waiting for a worker before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-capture-mb", type=int, default=2048, help="largest answer one request may produce")
    parser.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message either way")
    parser.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt (0 = n_ctx)")
    parser.add_argument("--max-generated-tokens", type=int, default=4096)
    parser.add_argument("--max-batch-prompts", type=int, default=1024)
    parser.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key enables TLS")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--token-file", help="file holding a bearer token every client must present")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without TLS (anyone who can reach it can use it)")
    parser.add_argument("--rpc", metavar="HOST:PORT,...",
                        help="ggml-rpc workers (`lmscope rpc-worker`) to place --n-gpu-layers layers on (needs a "
                             "llama.cpp built with GGML_RPC, see docs/deployment.md)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to finish requests on SIGTERM")
    # Lets a client crash or hang a worker on purpose, for the crash tests (docs/reliability.md, "Test hooks").
    # Only this flag turns it on, never the environment, and only with a loopback --host.
    parser.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)


def _argument_error(args: argparse.Namespace) -> str | None:
    if args.test_hooks and not is_loopback_host(args.host):
        return (f"--test-hooks let any client crash the server's workers: they are for the test suite, on a "
                f"loopback --host only, not {args.host}")
    if not is_loopback_host(args.host) and not (args.tls_cert or args.insecure):
        return (f"--host {args.host} exposes the server beyond this machine; add --tls-cert/--tls-key, "
                f"or --insecure if the network is trusted")
    if args.precise and args.requantize:
        return "--precise serves a float32 copy; it cannot be combined with --requantize"
    minimums = (("--workers", args.workers, 1), ("--max-queue", args.max_queue, 0), ("--n-ctx", args.n_ctx, 1),
                ("--n-batch", args.n_batch, 2), ("--n-outputs", args.n_outputs or 2, 2), ("--threads", args.threads, 0),
                ("--port", args.port, 0),
                ("--max-capture-mb", args.max_capture_mb, 1), ("--max-prompt-tokens", args.max_prompt_tokens, 0),
                ("--max-generated-tokens", args.max_generated_tokens, 1),
                ("--max-batch-prompts", args.max_batch_prompts, 1),
                # A tensor chunk is up to 1 MiB of data plus its header: smaller messages could not carry it.
                ("--max-message-mb", args.max_message_mb, 2))
    for flag, value, least in minimums:
        if value < least:
            return f"{flag} must be at least {least}, got {value}"
    if not (math.isfinite(args.grace) and args.grace >= 0):
        return f"--grace must be a number of seconds >= 0, got {args.grace}"
    return None


def serve(args: argparse.Namespace) -> int:
    problem = _argument_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    heap.settle_front_end()
    try:
        server = Server(args)
    except (ModelPathError, RequestError, RequantizeError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.test_hooks:
        print("lmscope: test hooks are on: any client can crash or hang a worker (--test-hooks)", flush=True)
    info = server.pool.info.model
    print(f"lmscope serving {info.name} ({info.description}, {info.n_layer} layers) from "
          f"{server.model_path} on {server.address} [{server.pool.size} worker(s), ready in "
          f"{time.perf_counter() - server.started:.1f} s]", flush=True)
    # What the start-up verification refused (service/verification.py), so that nobody has to guess.
    print(f"lmscope: sites placed by the {info.site_rules or '?'} rules; "
          f"{len(info.capture_sites)} offered, verified at start-up", flush=True)
    for site, reason in sorted(info.unavailable_sites.items()):
        print(f"lmscope: not offered: {site}: {reason}", flush=True)
    if info.unembed_error:
        print(f"lmscope: lens disabled: {info.unembed_error}", flush=True)
    # A server started by launch_server() stops when the process that started it is gone, however it went.
    parent = os.environ.get("LMSCOPE_EXIT_WITH_PARENT")
    while not stop.wait(1.0):
        if parent and os.getppid() != int(parent):
            break
    print("lmscope: stopping", flush=True)
    server.stop(args.grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmscope serve", description="Serve a GGUF model for inspection")
    add_arguments(parser)
    return serve(parser.parse_args(argv))
