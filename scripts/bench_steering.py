"""Benchmark: what steering costs during generation, and whether llama.cpp's control vectors would be faster.

lmscope applies every intervention in the eval callback (`service/engine.py`). llama.cpp can also add a
per-layer vector itself (`llama_set_adapter_cvec`), which needs no callback round trip but cannot steer
block 0, is one vector per layer for every token and sequence, and re-plans the graph when it changes
(so a per-request vector would be set and cleared around every request). This script times, in one
process (no gRPC), greedy generation of the same chat prompt:

- ``none``: no intervention;
- ``callback``: ADD of one vector at ``blocks.L.resid_post`` through the eval callback (what the server does);
- ``cvec``: the same vector through ``llama_set_adapter_cvec``, set before and cleared after the request;
- ``ablate``: one direction ablated at every residual site (2 n_layer + 1 sites; control vectors cannot do this).

It checks that ``callback`` and ``cvec`` produce the same tokens, and prints the time per generated token
over interleaved repeats in shuffled order: wall-clock (the engine's generation timer, prompt excluded) and
the process's CPU time (prompt included, divided by the tokens generated), which a busy shared machine
disturbs less; the minimum and the median of each.

    .venv/bin/python scripts/bench_steering.py [--model PATH] [--tokens 64] [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time

import llama_cpp as lc
import numpy as np

from lmscope.service.engine import Engine, EngineConfig, Intervention
from lmscope.service.model_files import pull_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", type=int, default=10)
    args = parser.parse_args()
    engine = Engine(EngineConfig(model_path=str(args.model or pull_default_model(progress=None)), n_ctx=2048,
                                 n_threads=args.threads))
    prompt = engine.model.prompt_tokens("Teach me machine learning", chat=True)
    vector = np.random.default_rng(0).standard_normal(engine.n_embd).astype(np.float32)
    steer = [Intervention("add", [f"blocks.{args.layer}.resid_post"], vector)]
    ablate = [Intervention("ablate", ["embed"] + [f"blocks.{L}.{k}" for L in range(engine.n_layer)
                                                  for k in ("resid_mid", "resid_post")], vector)]

    def generate(interventions=()) -> tuple[list[int], float, float]:
        cpu = time.process_time()
        events = list(engine.generate(prompt, args.tokens, interventions=list(interventions)))
        cpu = time.process_time() - cpu
        end = events[-1].end
        n = max(1, end.n_generated)
        return [e.token.id for e in events if e.HasField("token")], end.generate_ms / n, cpu * 1e3 / n

    def generate_cvec() -> tuple[list[int], float, float]:
        ctx = engine.contexts.get(flash_attn=engine.config.flash_attn, n_cells=len(prompt) + args.tokens)
        data = np.zeros((engine.n_layer - 1, engine.n_embd), np.float32)   # data[0] is block 1
        data[args.layer - 1] = vector
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if lc.llama_set_adapter_cvec(ctx, pointer, data.size, engine.n_embd, 1, engine.n_layer - 1) != 0:
            raise RuntimeError("llama_set_adapter_cvec failed")
        try:
            return generate()
        finally:
            lc.llama_set_adapter_cvec(ctx, None, 0, engine.n_embd, 0, 0)

    cases = {"none": generate, "callback": lambda: generate(steer), "cvec": generate_cvec,
             "ablate": lambda: generate(ablate)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    tokens: dict[str, list[int]] = {}
    for name, run in cases.items():  # warm-up
        tokens[name] = run()[0]
    order = list(cases)
    shuffle = np.random.default_rng(1)
    for _ in range(args.repeats):
        shuffle.shuffle(order)  # no case always follows the same one
        for name in order:
            _, wall, cpu_time = cases[name]()
            times[name].append(wall)
            cpu[name].append(cpu_time)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"{args.threads} thread(s); prompt {len(prompt)} tokens, up to {args.tokens} generated, "
          f"steering at layer {args.layer}; ms per generated token over {args.repeats} repeats")
    print(f"  {'':<9} {'wall min':>9} {'median':>8} {'cpu min':>8} {'median':>8}  cpu min vs none")
    for name, values in times.items():
        print(f"  {name:<9} {min(values):9.2f} {statistics.median(values):8.2f} {min(cpu[name]):8.2f} "
              f"{statistics.median(cpu[name]):8.2f}  x{min(cpu[name]) / min(cpu['none']):.3f}  "
              f"({len(tokens[name])} tokens)")
    print(f"callback and cvec give the same tokens: {tokens['callback'] == tokens['cvec']}; "
          f"steering changed the output: {tokens['callback'] != tokens['none']}")
    engine.close()


if __name__ == "__main__":
    main()
