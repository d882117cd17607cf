"""Two llama.cpp builds side by side: the same requests, the same models, alternating, one script run.

What the CPU variant build (docs/building.md: one CPU back end per instruction-set level, chosen at run time)
and the Q4_1 kernel patch gain over the portable AVX2 build, on the machine this runs on. Each build is a
folder of llama.cpp libraries (`llama_cpp/lib` of an installed llama-cpp-python, or a CMake build's `bin/`),
selected with `LLAMA_CPP_LIB_PATH` in a fresh process, which loads an `Engine` (in-process, no server: the decode
loop alone) and times, on one 128-token prompt (or --tokens):

- `states`: every block's output at every position, no logits (the lens and PCA's request);
- `last`: last-token logits only, nothing captured.

Processes alternate between the builds (A, B, A, B, ...; --rounds of them, --repeat timings each), so that
load from elsewhere on a shared machine hits both alike; the medians of all timings are printed with the load
average before and after, and the CPU variant each build loaded. Each request is timed twice: wall clock, and
the CPU time of the process (`time.process_time`, every thread). On a machine busier than its cores, wall
clock mostly measures the scheduler; with `--threads 1` the CPU time is the work the kernels did, and the
ratio to compare.

    python scripts/bench_cpu_variants.py --build portable=PATH --build variants=PATH [--model PATH ...]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

MODELS = ["~/.cache/lmscope/models/gemma-3-270m-q4_k_m.gguf", "~/.cache/lmscope/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
TEXT = ("The history of the old harbour town begins in Roman times, when a few fishermen settled on the banks "
        "of the river. Over the centuries it grew into a centre of trade, learning and the arts. ") * 40


def measure(model: str, n_tokens: int, repeat: int, n_threads: int) -> dict:
    """In this process (LLAMA_CPP_LIB_PATH already set): one warm-up, then `repeat` timings of each shape."""
    from lmscope.service.contracts import EngineConfig
    from lmscope.service.engine import Engine, ForwardRequest
    from lmscope.service.native import CPU_VARIANT

    engine = Engine(EngineConfig(model_path=model, n_threads=n_threads, n_ctx=max(1024, 2 * n_tokens)))
    tokens = engine.model.tokenize(TEXT, add_special=True)[:n_tokens]
    states = [f"blocks.{L}.resid_post" for L in range(engine.n_layer)]
    shapes = {"states": ForwardRequest([tokens], capture=states, logits="none"),
              "last": ForwardRequest([tokens], capture=[], logits="last")}
    times: dict[str, list[float]] = {name: [] for name in shapes}
    times.update({f"{name} cpu": [] for name in shapes})
    for request in shapes.values():  # warm-up: the first decode of each shape reserves buffers
        engine.forward(request)
    for _ in range(repeat):
        for name, request in shapes.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            engine.forward(request)
            times[name].append((time.perf_counter() - start) * 1e3)
            times[f"{name} cpu"].append((time.process_time() - start_cpu) * 1e3)
    return {"variant": CPU_VARIANT, "n_batch": engine.contexts.n_batch, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="append", required=True, metavar="NAME=LIBDIR",
                        help="a llama.cpp library folder to compare (give two or more)")
    parser.add_argument("--model", action="append", help="GGUF file (default: Gemma 3 270M and SmolLM2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a model path, measured in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.repeat, args.threads)))
        return
    builds = dict(b.split("=", 1) for b in args.build)
    models = [os.path.expanduser(m) for m in (args.model or MODELS)]
    load_before = os.getloadavg()
    times = {(m, b): {} for m in models for b in builds}
    variants = {}
    for _ in range(args.rounds):
        for model in models:
            for name, lib_dir in builds.items():
                env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(pathlib.Path(lib_dir).resolve()))
                out = subprocess.run([sys.executable, __file__, "--child", model, "--tokens", str(args.tokens),
                                      "--repeat", str(args.repeat), "--threads", str(args.threads), "--build", "-"],
                                     env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name} on {model} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                variants[name] = result["variant"]
                for shape, t in result["times"].items():
                    times[(model, name)].setdefault(shape, []).extend(t)
                times[(model, name)]["n_batch"] = result["n_batch"]
    load_after = os.getloadavg()
    first = next(iter(builds))
    print(f"{args.tokens} tokens, {args.threads} thread(s), {args.rounds} rounds x {args.repeat} timings per build, "
          f"alternating; "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} before, {load_after[0]:.2f} {load_after[1]:.2f} "
          f"after; {os.cpu_count()} CPUs")
    print("builds: " + ", ".join(f"{n} (CPU variant {variants[n]}: {builds[n]})" for n in builds) + "\n")
    print("| model | shape | " + " | ".join(builds) + " | " +
          " | ".join(f"{first} / {n}" for n in list(builds)[1:]) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in range(2 * len(builds) - 1)) + " |")
    for model in models:
        for shape in ("states", "states cpu", "last", "last cpu"):
            medians = [statistics.median(times[(model, n)][shape]) for n in builds]
            ratios = [medians[0] / m for m in medians[1:]]
            print(f"| {os.path.basename(model)} (n_batch {times[(model, first)]['n_batch']}) | {shape} | " +
                  " | ".join(f"{m:.0f} ms" for m in medians) + " | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
