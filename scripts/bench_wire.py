"""What a big answer costs on its way from a worker to the client: time and peak memory of each process.

The answer measured is `run()` with every position's logits and nothing captured (for SmolLM2 and 128
tokens: 128 x 49,152 float32 = 24 MiB). Each repetition starts a fresh server and a fresh client process
(a process that has held a big block once may keep it: glibc's heaps do), warms both up with a small
request, resets the peak resident memory (VmHWM) of client, front end and worker (`/proc/PID/clear_refs` 5,
Linux), sends the big request, and reads each peak: "added" is the peak over the request minus what the
process held before it. "wire_ms" is the client's time for the request minus the worker's own (the
header's total_ms): the pipe, the front end, gRPC and the client's assembly. "CPU" is each process's CPU time
over the request (user + system, `/proc/PID/stat`): on a machine with few cores, what the front end and the
client spend is taken from llama.cpp's threads. The answer is streamed (what a client on another host gets);
`--shared-memory` takes it from a file shared with the worker instead, a local client's default
(`lmscope.proto.shared_memory`).

    python scripts/bench_wire.py [--model PATH] [--tokens 128] [--repeat 3] [--dtype float16] [--shared-memory]
                                 [--json out.json]

Report the machine load (`uptime`) with the figures: the times move with it, the memory does not.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import time

from lmscope.service import procinfo
from lmscope.service.launch import launch_server

PROCESSES = ("client", "front_end", "worker")


def _status_kib(pid: int | str, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(pid: int | str) -> None:
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")


def measure_once(address: str, server_pid: int, tokens: int, dtype: str, shared_memory: bool) -> dict:
    """One big request from this (fresh) process, with every process's peak memory over it."""
    from lmscope.client import Client

    with Client(address, timeout=600, shared_memory=shared_memory) as client:
        text = " ".join(f"word{i}" for i in range(4 * tokens))
        ids = client.tokenize(text).token_ids[:tokens]
        assert len(ids) == tokens, f"the prompt has only {len(ids)} tokens"
        client.run(ids, capture=[], logits="last")  # warm-up: contexts, buffers, gRPC, a small answer
        pids = {"client": os.getpid(), "front_end": server_pid, "worker": procinfo.worker_pids(server_pid)[0]}
        before = {name: _status_kib(pid, "VmRSS") for name, pid in pids.items()}
        for pid in pids.values():
            _reset_peak(pid)
        cpu_before = {name: procinfo.cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        run = client.run(ids, capture=[], logits="all", dtype=dtype)
        seconds = time.perf_counter() - started
        cpu_ms = {name: (procinfo.cpu_seconds(pid) - cpu_before[name]) * 1e3 for name, pid in pids.items()}
        peaks = {name: _status_kib(pid, "VmHWM") for name, pid in pids.items()}
        answer_mib = run.logits.nbytes / 2**20
        wire_ms = seconds * 1e3 - run.total_ms  # all but the worker's own time: pipe, front end, gRPC, client
        assert client.answers_in_shared_memory == shared_memory, "the server refused the shared memory offered"
        del run
        time.sleep(0.5)
        after = {name: _status_kib(pid, "VmRSS") for name, pid in pids.items()}
    return {"seconds": seconds, "wire_ms": wire_ms, "answer_mib": answer_mib,
            **{f"{name}_cpu_ms": cpu_ms[name] for name in PROCESSES},
            **{f"{name}_before_mib": before[name] / 1024 for name in PROCESSES},
            **{f"{name}_peak_mib": peaks[name] / 1024 for name in PROCESSES},
            **{f"{name}_added_mib": (peaks[name] - before[name]) / 1024 for name in PROCESSES},
            **{f"{name}_after_mib": after[name] / 1024 for name in PROCESSES}}


def _child(address: str, server_pid: int, tokens: int, dtype: str, shared_memory: bool, out) -> None:
    out.send(measure_once(address, server_pid, tokens, dtype, shared_memory))


def measure(model, tokens: int, repeat: int, dtype: str = "float32", shared_memory: bool = False) -> dict:
    rows = []
    context = mp.get_context("spawn")
    for _ in range(repeat):
        with launch_server(model, args=("--workers", "1")) as server:
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=_child, args=(server.address, server.process.pid, tokens, dtype,
                                                         shared_memory, sender))
            child.start()
            rows.append(receiver.recv())
            child.join()
    summary = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return {"tokens": tokens, "dtype": dtype, "shared_memory": shared_memory, "repeat": repeat, "median": summary,
            "runs": rows, "load": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="the answer's dtype")
    parser.add_argument("--shared-memory", action="store_true", help="the answer through shared memory, not the stream")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from lmscope.service.model_files import pull_default_model
        model = pull_default_model(progress=None)
    result = measure(model, args.tokens, args.repeat, args.dtype, args.shared_memory)
    result["model"] = str(model)
    m = result["median"]
    way = "shared memory" if args.shared_memory else "the stream"
    print(f"run() with all logits as {args.dtype}, {args.tokens} tokens ({m['answer_mib']:.1f} MiB answer, through {way}), "
          f"median of {args.repeat} fresh servers and clients, load {result['load'][0]:.2f}:")
    print(f"  time {m['seconds'] * 1e3:.0f} ms, of which {m['wire_ms']:.0f} ms outside the worker's own time")
    for name in PROCESSES:
        print(f"  {name:9s} before {m[name + '_before_mib']:6.1f}  peak {m[name + '_peak_mib']:6.1f}  "
              f"added {m[name + '_added_mib']:5.1f}  after {m[name + '_after_mib']:6.1f} MiB  "
              f"CPU {m[name + '_cpu_ms']:5.0f} ms")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
