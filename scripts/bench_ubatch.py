"""The speed/memory curve the engine's ubatch and output-row limits are chosen from.

For each (n_batch, logits reserve) pair, a fresh process loads the model into an `Engine` (in-process, no
server: the decode loop alone) and times four request shapes on one 128-token prompt (or --tokens):

- `states`: every block's output at every position, no logits (the lens and PCA's request);
- `states+logits`: the same with every position's logits;
- `last`: last-token logits only, nothing captured (selection passes of steering, scoring);
- `mid`: one middle block's output at the last position (probes, means).

It prints the median wall time of each and the process's peak resident memory (VmHWM) after all of them,
the figure a worker is budgeted by. The reserve bounds output rows per llama_decode call
(`service/engine.output_rows_per_ubatch`), n_batch the tokens per call.

    .venv/bin/python scripts/bench_ubatch.py --model PATH [--tokens 128] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TEXT = ("The history of the old harbour town begins in Roman times, when a few fishermen settled on the banks "
        "of the river. Over the centuries it grew into a centre of trade, learning and the arts. ") * 40
SETTINGS = [(16, 16), (64, 16), (128, 16), (256, 16), (512, 16), (128, 128), (256, 64), (512, 64)]


def _engine(model: str, n_batch: int, reserve_mib: int):
    from lmscope.service import engine as eng
    from lmscope.service.contracts import EngineConfig

    eng.LOGITS_RESERVE_BYTES = reserve_mib << 20  # read once, when the engine creates its contexts
    return eng.Engine(EngineConfig(model_path=model, n_threads=2, n_batch=n_batch, n_ctx=4096))


def _requests(engine, n_tokens: int) -> dict:
    from lmscope.service.engine import ForwardRequest

    tokens = engine.model.tokenize(TEXT, add_special=True)[:n_tokens]
    states = [f"blocks.{L}.resid_post" for L in range(engine.n_layer)]
    return {"states": ForwardRequest([tokens], capture=states, logits="none"),
            "states+logits": ForwardRequest([tokens], capture=states, logits="all"),
            "last": ForwardRequest([tokens], capture=[], logits="last"),
            "mid": ForwardRequest([tokens], capture=[states[engine.n_layer // 2]], positions=[-1], logits="none")}


def peak_memory(model: str, n_batch: int, reserve_mib: int, n_tokens: int) -> dict:
    """Every request shape once in a fresh engine; the process's peak RSS after them."""
    engine = _engine(model, n_batch, reserve_mib)
    for request in _requests(engine, n_tokens).values():
        engine.forward(request)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"output_rows": engine.contexts.n_outputs_max, "peak_mib": hwm / 1024}


def timings(model: str, settings: list[tuple[int, int]], n_tokens: int, repeat: int) -> list[dict]:
    """Median ms per (setting, shape), every setting's engine in this process and the runs interleaved, so
    that a burst of load from elsewhere hits every setting alike."""
    engines = [_engine(model, n_batch, reserve) for n_batch, reserve in settings]
    requests = [_requests(engine, n_tokens) for engine in engines]
    times = [{name: [] for name in r} for r in requests]
    for _ in range(repeat):
        for engine, shapes, out in zip(engines, requests, times):
            for name, request in shapes.items():
                start = time.perf_counter()
                engine.forward(request)
                out[name].append((time.perf_counter() - start) * 1e3)
    return [{name: statistics.median(t) for name, t in out.items()} for out in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--settings", help="n_batch:reserve_mib,... (default: a built-in sweep)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # n_batch:reserve_mib, in a fresh process
    args = parser.parse_args()
    if args.memory_of:
        n_batch, reserve = map(int, args.memory_of.split(":"))
        print(json.dumps(peak_memory(args.model, n_batch, reserve, args.tokens)))
        return
    settings = ([tuple(map(int, s.split(":"))) for s in args.settings.split(",")] if args.settings else SETTINGS)
    load = os.getloadavg()[0]
    memory = []
    for n_batch, reserve in settings:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                              "--memory-of", f"{n_batch}:{reserve}"], capture_output=True, text=True, check=True)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ms = timings(args.model, settings, args.tokens, args.repeat)
    print(f"model {os.path.basename(args.model)}, {args.tokens} tokens, median of {args.repeat} interleaved, "
          f"load {load:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| n_batch | output rows / call | states | states+logits | last | mid | peak RSS (alone) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (n_batch, _), mem, t in zip(settings, memory, ms):
        print(f"| {n_batch} | {mem['output_rows']} | {t['states']:.0f} ms | {t['states+logits']:.0f} ms | "
              f"{t['last']:.0f} ms | {t['mid']:.0f} ms | {mem['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
