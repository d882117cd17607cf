"""Load test: many concurrent clients sending mixed requests to one lmscope server, on this machine only.

    .venv/bin/python scripts/bench_load.py                       # tiny model, 16 clients x 500 requests, 2 workers
    .venv/bin/python scripts/bench_load.py --model default --clients 4 --requests 50
    .venv/bin/python scripts/bench_load.py --server 127.0.0.1:50051 --server-pid 1234

Each client thread has its own connection and sends, in a random order, four kinds of request:

- run:      a forward pass capturing two layers' residual stream and the last logits;
- generate: 8 greedy tokens;
- lens:     a Run with a LensSpec (top-5 and a target token at every layer and position, server-side);
- steer:    a forward pass with a steering vector added at one layer.

Before the load starts, every distinct request is answered once, alone; under load every answer must be
identical to that one (a different answer counts as an error: cross-talk between concurrent requests would
show up here). The report gives errors (must be 0), latency percentiles per kind, throughput, and the
resident memory of the server's processes before and after. Bounded in count (--requests) and in time
(--time-limit: no new request starts after it).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import pathlib
import random
import socket
import statistics
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from lmscope.client import Client, LmscopeError, tensors
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.proto.wire import lmscope_pb2_grpc as pb_grpc

PROMPTS = ["The capital of France is", "Hello world, this is a test of", "In 1905 Einstein published",
           "The quick brown fox jumps over"]
KINDS = ("run", "generate", "lens", "steer")


def _lens(stub, prompt: str, target: int, timeout: float) -> dict:
    request = pb.RunRequest(prompts=[pb.Prompt(text=prompt)], capture=["blocks.*.resid_post"],
                            logits=pb.LOGITS_NONE, lens=pb.LensSpec(enabled=True, top_k=5, target_ids=[target]))
    chunks = stub.Run(request, timeout=timeout)
    return {name: a for (name, _), a in tensors.assemble(c.tensor for c in chunks if c.HasField("tensor")).items()}


class Connection:
    """One client's connection: the client library, and a raw stub for the lens Run."""

    def __init__(self, address: str, timeout: float):
        self.client = Client(address, timeout=timeout)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.InspectorStub(self.channel)

    def close(self) -> None:
        self.client.close()
        self.channel.close()


class Workload:
    """The requests, and the answer each must get (taken from a request sent alone)."""

    def __init__(self, address: str, timeout: float):
        self.address, self.timeout = address, timeout
        connection = Connection(address, timeout)
        try:
            client = connection.client
            info = client.model_info()
            self.n_layer, width = info.n_layer, info.n_embd
            self.layers = [info.n_layer // 2, info.n_layer - 1]
            self.steer_layer = info.n_layer // 2
            self.direction = np.random.default_rng(0).standard_normal(width).astype(np.float32) * 2
            self.target = client.tokenize(" Paris", add_special=False).token_ids[0]
            self.expected = {(kind, i): self._answer(connection, kind, i)
                             for kind in KINDS for i in range(len(PROMPTS))}
        finally:
            connection.close()

    def _answer(self, connection: Connection, kind: str, i: int) -> dict:
        client, prompt = connection.client, PROMPTS[i]
        if kind == "run":
            run = client.run(prompt, layers=self.layers, logits="last")
            return {"logits": run.logits, **run.captures}
        if kind == "generate":
            return {"tokens": np.array(client.generate(prompt, max_tokens=8).token_ids)}
        if kind == "lens":
            return _lens(connection.stub, prompt, self.target, self.timeout)
        run = client.run(prompt, layers=[self.n_layer - 1], logits="last", steer={self.steer_layer: self.direction})
        return {"logits": run.logits, **run.captures}

    def check(self, connection: Connection, kind: str, i: int) -> None:
        answer = self._answer(connection, kind, i)
        expected = self.expected[(kind, i)]
        if answer.keys() != expected.keys() or not all(np.array_equal(answer[k], expected[k]) for k in answer):
            raise AssertionError(f"{kind} of prompt {i} differs from the same request sent alone")


def _client_thread(workload: Workload, n_requests: int, seed: int, stop_at: float, records: list, lock):
    rng = random.Random(seed)
    connection = Connection(workload.address, workload.timeout)
    try:
        for _ in range(n_requests):
            if time.monotonic() > stop_at:
                return
            kind, i = rng.choice(KINDS), rng.randrange(len(PROMPTS))
            started = time.perf_counter()
            error = None
            try:
                workload.check(connection, kind, i)
            except (LmscopeError, grpc.RpcError, AssertionError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with lock:
                records.append((kind, time.perf_counter() - started, error))
    finally:
        connection.close()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _require_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0].strip("[]")
    resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not all(ipaddress.ip_address(a).is_loopback for a in resolved):
        sys.exit(f"error: {address} is not a loopback address; this load test only runs against this machine")


def _rss_mib(server_pid: int | None) -> dict | None:
    if server_pid is None:
        return None
    from lmscope.service import procinfo

    return {name: round(value / 2 ** 20, 1) for name, value in procinfo.server_rss_bytes(server_pid).items()}


def _model_path(name: str, folder: pathlib.Path) -> pathlib.Path:
    if name == "tiny":
        from lmscope.service.testing import build_tiny_model

        return build_tiny_model(folder / "tiny.gguf", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)
    if name == "default":
        from lmscope.service.model_files import pull_default_model

        return pull_default_model(progress=None)
    return pathlib.Path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built here), 'default' (SmolLM2) or a GGUF path")
    parser.add_argument("--server", help="use this running server (loopback only) instead of starting one")
    parser.add_argument("--server-pid", type=int, help="its process id, to report its memory")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="requests per client")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the server started here")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds after which no request starts")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each request")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        server = None
        if args.server:
            _require_loopback(args.server)
            address, server_pid = args.server, args.server_pid
        else:
            from lmscope.service.launch import launch_server

            model = _model_path(args.model, pathlib.Path(folder))
            server = launch_server(model, args=("--workers", str(args.workers), "--threads", str(args.threads),
                                                "--max-queue", str(args.clients + 4)))
            address, server_pid = server.address, server.process.pid
        try:
            report = _load(args, address, server_pid)
        finally:
            if server is not None:
                server.stop()
    _print(report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 else 1


def _load(args, address: str, server_pid: int | None) -> dict:
    print(f"preparing: answering each of the {len(KINDS) * len(PROMPTS)} distinct requests alone ...", flush=True)
    workload = Workload(address, args.timeout)
    rss_start = _rss_mib(server_pid)
    records: list = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.time_limit
    print(f"load: {args.clients} clients x {args.requests} requests against {address} ...", flush=True)
    started = time.perf_counter()
    threads = [threading.Thread(target=_client_thread, args=(workload, args.requests, seed, stop_at, records, lock))
               for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    rss_end = _rss_mib(server_pid)
    errors = [e for _, _, e in records if e]
    by_kind = {}
    for kind in KINDS:
        latencies = [t * 1e3 for k, t, e in records if k == kind and not e]
        by_kind[kind] = {"count": sum(1 for k, _, _ in records if k == kind),
                         "errors": sum(1 for k, _, e in records if k == kind and e),
                         "p50_ms": round(_percentile(latencies, 50), 1), "p99_ms": round(_percentile(latencies, 99), 1)}
    all_latencies = [t * 1e3 for _, t, e in records if not e]
    return {
        "address": address, "clients": args.clients, "requests_per_client": args.requests,
        "completed": len(records), "planned": args.clients * args.requests, "errors": len(errors),
        "first_errors": sorted(set(errors))[:5], "wall_s": round(wall, 1),
        "throughput_rps": round(len(records) / wall, 1) if wall else 0.0,
        "p50_ms": round(_percentile(all_latencies, 50), 1), "p99_ms": round(_percentile(all_latencies, 99), 1),
        "mean_ms": round(statistics.fmean(all_latencies), 1) if all_latencies else float("nan"),
        "by_kind": by_kind, "rss_mib_start": rss_start, "rss_mib_end": rss_end,
    }


def _print(report: dict) -> None:
    print(f"\n{report['completed']} of {report['planned']} requests in {report['wall_s']} s "
          f"({report['throughput_rps']} requests/s), errors: {report['errors']}")
    print(f"latency p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms, mean {report['mean_ms']} ms")
    print(f"{'kind':<10}{'count':>7}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for kind, row in report["by_kind"].items():
        print(f"{kind:<10}{row['count']:>7}{row['errors']:>8}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    if report["rss_mib_start"]:
        print(f"server resident memory (MiB): start {report['rss_mib_start']}, end {report['rss_mib_end']}")
    for error in report["first_errors"]:
        print(f"error: {error}")


if __name__ == "__main__":
    sys.exit(main())
