"""How well the fidelity map (`c.run(..., fidelity=True)`) predicts which rows deviate, and what it costs.

For each model: a float32 copy of the same weights (`llama_model_quantize` to ALL_F32, as `--precise` makes it)
is served with the same settings as the file itself (F16 KV cache, same attention kernel), so that the only
difference between the two runs is the activation rounding the map describes. A row (block L's output at one
position) *deviates* when ||h_file - h_f32|| / ||h_f32|| > 5 %; the map *flags* it when its estimate exceeds
`lmscope.client.fidelity.THRESHOLD`. Printed per model: rows, deviating rows, flagged rows, precision and
recall (all rows, and the first position alone, which no earlier row reaches through attention), then the
cost: the median over --repeat rounds of a 128-token run (every hidden state, all logits, and without
logits) with and without the map, side by side, in wall time and in the worker's CPU time, and the first
map's one-off column norms.

    .venv/bin/python scripts/bench_fidelity.py                          # SmolLM2 (the default model)
    .venv/bin/python scripts/bench_fidelity.py --model ~/.cache/lmscope/models/gemma-3-270m-q4_k_m.gguf
    .venv/bin/python scripts/bench_fidelity.py --tiny                   # a tiny q8_0 model of each family
                                                                        # with a planted massive activation
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lmscope.client import Client
from lmscope.client.fidelity import THRESHOLD
from lmscope.service import procinfo
from lmscope.service.launch import launch_server
from lmscope.service.model_files import pull_default_model
from lmscope.service.requantize import requantized
from lmscope.service.testing import FAMILIES, build_tiny_model

DEVIATION = 0.05
PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin.",
           "今天天氣真好！我們去公園散步吧。",
           "def mean(xs):\n    return sum(xs) / len(xs)\n",
           "Question: what is 17 times 3? Answer:"]
LONG = ("The history of the old harbour town begins in Roman times, when a few fishermen settled on the banks "
        "of the river. Over the centuries it grew into a centre of trade, learning and the arts. ") * 4


def deviations(states: np.ndarray, exact: np.ndarray) -> np.ndarray:
    states, exact = states.astype(np.float64), exact.astype(np.float64)
    return np.linalg.norm(states - exact, axis=-1) / np.linalg.norm(exact, axis=-1)


def scores(deviating: np.ndarray, flagged: np.ndarray) -> str:
    hits = int((deviating & flagged).sum())
    precision = f"{hits / flagged.sum():.2f}" if flagged.any() else "-"
    recall = f"{hits / deviating.sum():.2f}" if deviating.any() else "-"
    return f"{int(deviating.sum())} | {int(flagged.sum())} | {precision} | {recall}"


def validate(model: str, prompts: list[str], threads: int) -> tuple[str, float]:
    """One table row: the agreement of flags and deviations over the prompts; and the first map's seconds."""
    copy = requantized(model, "f32")
    with launch_server(model, args=("--threads", str(threads))) as server, Client(server.address) as c:
        ids = [c.tokenize(p).token_ids for p in prompts]
        start = time.perf_counter()
        runs = [c.run(t, logits=False, fidelity=True) for t in ids[:1]]
        first = time.perf_counter() - start
        runs += [c.run(t, logits=False, fidelity=True) for t in ids[1:]]
        name = c.model_info().name
    with launch_server(str(copy), args=("--threads", str(threads))) as server, Client(server.address) as c:
        exact = [c.run(t, logits=False).hidden_states[1:] for t in ids]
    dev = [deviations(r.hidden_states[1:], e) > DEVIATION for r, e in zip(runs, exact)]
    flags = [r.fidelity.flags for r in runs]
    every = scores(np.concatenate([d.ravel() for d in dev]), np.concatenate([f.ravel() for f in flags]))
    first_rows = scores(np.concatenate([d[:, 0] for d in dev]), np.concatenate([f[:, 0] for f in flags]))
    n_rows = sum(d.size for d in dev)
    return f"| {name} | {n_rows} | {every} | {first_rows} |", first


def cost(model: str, repeat: int, threads: int) -> list[str]:
    """Wall time and the worker's CPU time (less sensitive to other processes on a shared machine)."""
    lines = []
    with launch_server(model, args=("--threads", str(threads))) as server, Client(server.address) as c:
        worker = procinfo.worker_pids(server.process.pid)[0]
        ids = c.tokenize(LONG).token_ids[:128]
        c.run(ids, fidelity=True)  # the column norms, once per worker
        for logits in (True, False):
            wall, cpu = {False: [], True: []}, {False: [], True: []}
            for _ in range(repeat):
                for fidelity in (False, True):
                    start, start_cpu = time.perf_counter(), procinfo.cpu_seconds(worker)
                    c.run(ids, logits=logits, fidelity=fidelity)
                    wall[fidelity].append(time.perf_counter() - start)
                    cpu[fidelity].append(procinfo.cpu_seconds(worker) - start_cpu)
            plain, mapped = statistics.median(wall[False]), statistics.median(wall[True])
            plain_cpu, mapped_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
            lines.append(f"128 tokens, every hidden state{', all logits' if logits else ''}: wall "
                         f"{plain * 1e3:,.0f} ms -> {mapped * 1e3:,.0f} ms with the map ({mapped / plain:.2f}x); "
                         f"worker CPU {plain_cpu:.2f} s -> {mapped_cpu:.2f} s ({mapped_cpu / plain_cpu:.2f}x)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="GGUF file (repeatable; default: the default model)")
    parser.add_argument("--tiny", action="store_true", help="tiny q8_0 models of every family, planted activation")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cost", action="store_true")
    args = parser.parse_args()
    print(f"threshold {THRESHOLD:.0%}, deviation > {DEVIATION:.0%} against the float32 copy; load "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| model | rows | deviating | flagged | precision | recall | first position: deviating | flagged | "
          "precision | recall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    prompts = PROMPTS[:args.prompts]
    if args.tiny:
        with tempfile.TemporaryDirectory() as folder:
            os.environ["LMSCOPE_HOME"] = folder  # the float32 copies go there, not into the model cache
            for family in FAMILIES:
                path = build_tiny_model(Path(folder) / f"{family}.gguf", family=family, weight_type="q8_0",
                                        massive_activation=10.0)
                row, _ = validate(str(path), prompts, args.threads)
                print(row.replace("lmscope-tiny", f"tiny {family}"), flush=True)
        return
    for model in args.model or [str(pull_default_model(progress=None))]:
        model = os.path.expanduser(model)
        row, first = validate(model, prompts, args.threads)
        print(row, flush=True)
        if not args.no_cost:
            for line in cost(model, args.repeat, args.threads):
                print(f"  {line}")
            print(f"  first map of a worker (column norms of every matrix): {first:.2f} s", flush=True)


if __name__ == "__main__":
    main()
