"""Cost of splitting a model over llama.cpp RPC workers, against the same model on one server.

Usage: python scripts/bench_rpc_split.py [--model PATH] [--workers 1] [--n-gpu-layers 99] [--threads 1]
       [--repeats 5]

Needs a llama.cpp built with GGML_RPC=ON (docs/deployment.md). Starts `--workers` `lmscope rpc-worker`
processes on loopback and one `lmscope serve --rpc ...` that places `--n-gpu-layers` layers on them (the
output layer counts as one), then times `run()` of one prompt capturing every hidden state, and the same on
a plain local server; it also checks the two agree. Loopback hides the network: on real hosts add the
round trips (one per graph split and per captured tensor) and the transfer of activations.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from lmscope.client import Client
from lmscope.service import llama_rpc
from lmscope.service.launch import launch_server

PROMPT = "The history of the river begins in the mountains, where snow melts every spring and"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmscope.client.cli", "rpc-worker", "--port", str(port),
                                "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the rpc-worker did not start")


def timed_runs(address: str, repeats: int):
    with Client(address) as client:
        client.run(PROMPT)  # warm-up (first decode reserves the scheduler)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run = client.run(PROMPT)
            times.append((time.perf_counter() - t0) * 1e3)
        return run, statistics.median(times), client.model_info()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--workers", type=int, default=1, help="rpc-worker processes")
    parser.add_argument("--n-gpu-layers", type=int, default=99, help="layers placed on the workers (99 = all)")
    parser.add_argument("--threads", type=int, default=1, help="threads per rpc-worker and for the servers")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not llama_rpc.supported():
        sys.exit(f"this llama.cpp build has no RPC backend; {llama_rpc.BUILD_HINT}")

    server_args = ("--threads", str(args.threads), "--n-ctx", "1024")
    with launch_server(args.model, args=server_args) as local:
        local_run, local_ms, info = timed_runs(local.address, args.repeats)
    workers = [start_worker(args.threads) for _ in range(args.workers)]
    try:
        endpoints = ",".join(address for _, address in workers)
        with launch_server(args.model, args=(*server_args, "--rpc", endpoints,
                                             "--n-gpu-layers", str(args.n_gpu_layers))) as split:
            split_run, split_ms, _ = timed_runs(split.address, args.repeats)
    finally:
        for process, _ in workers:
            process.kill()
            process.wait()
    difference = float(np.abs(split_run.hidden_states - local_run.hidden_states).max())
    print(f"{info.name}: {len(local_run.token_ids)} tokens, every hidden state + logits, {args.threads} thread(s)")
    print(f"  local server                                  {local_ms:8.1f} ms")
    print(f"  split: {args.n_gpu_layers} layer(s) on {args.workers} rpc-worker(s)  {split_ms:8.1f} ms "
          f"(x{split_ms / local_ms:.2f}); largest hidden-state difference {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
