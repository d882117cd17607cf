"""The memory benchmark of issue #13: one inspection session, lmscope against transformers fp32, same GGUF.

    .venv/bin/python scripts/bench_session.py --model gemma-3-270m-q4_k_m.gguf --json out.json
    .venv/bin/python scripts/bench_transformers.py --session [--model ...]        (the same, from the main benchmark)

The session: a `run()` of 128 tokens (every hidden state and every position's logits), the logit lens of
that prompt (every layer x position, top-5 + entropy), nearest tokens of a word in the embedding table and
in the LM head, and `unembed` of the last hidden state at every position. lmscope's figure is the sum of
peak resident memory (VmHWM) over the server's processes (front end + workers; the front end's own is also
given, since it holds no model); the peer's is its process's VmHWM, transformers loading the same GGUF in
float32 (scripts/bench_transformers_peer.py does the same load). Speed is client wall time (median of --repeat).

`--workers 2` runs the session from two clients at once on a two-worker server: the second worker's cost.
`--alternate ROUNDS` measures speed only: `run()` and the lens, one at a time on each side in turn (see
`alternate`), for ratios that hold on a machine whose speed drifts.
The server's own estimate of memory by part (`ModelInfo.memory`, where the server has it) is printed too.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
# bench_transformers sets OpenMP's waiting as in lmscope's workers, for the peer too
from bench_transformers import TEXT, load_average, median_ms, memory_mb, process_tree  # noqa: E402

WORD = " Paris"


def status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def pss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def session(client, prompt: list[int], repeat: int) -> dict:
    out = {}
    out["run_all_logits_ms"] = median_ms(lambda: client.run(prompt, logits=True), repeat)
    run = client.run(prompt, logits=True)
    out["lens_ms"] = median_ms(lambda: client.logit_lens(prompt, top_k=5), repeat)
    out["nearest_embedding_ms"] = median_ms(lambda: client.nearest_tokens(WORD, k=10), repeat)
    out["nearest_head_ms"] = median_ms(lambda: client.nearest_tokens(WORD, k=10, table="lm_head"), repeat)
    out["unembed_ms"] = median_ms(lambda: client.unembed(run.hidden_states[-1]), repeat)
    logits = client.unembed(run.hidden_states[-1])
    out["unembed_vs_logits_max_abs"] = float(abs(logits - run.logits).max())
    out["logits_max_abs"] = float(abs(run.logits).max())
    out["unembed_argmax_agrees"] = float((logits.argmax(1) == run.logits.argmax(1)).mean())
    return out


def measure_lmscope(model: str, threads: int, workers: int, repeat: int, prompt: list[int]) -> dict:
    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    args = ("--threads", str(threads), "--workers", str(workers), "--n-ctx", "4096")
    with launch_server(model, args=args) as server, Client(server.address) as client:
        info = client.model_info()
        out = {"n_tokens": len(prompt), "n_vocab": info.n_vocab, "n_layer": info.n_layer, "n_embd": info.n_embd}
        if getattr(info, "memory", None):  # servers before issue #13 have no estimate
            out["estimate"] = info.memory
        results = [None] * workers

        def one(i: int) -> None:
            with Client(server.address) as c:
                results[i] = session(c, prompt, repeat)
        threads_ = [threading.Thread(target=one, args=(i,)) for i in range(workers)]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        out.update(results[0])
        pid = server.process.pid
        out["peak_mb"] = memory_mb(pid, "VmHWM")
        out["front_end_peak_mb"] = status_mb(pid, "VmHWM")
        out["workers_peak_mb"] = [status_mb(p, "VmHWM") for p in process_tree(pid)[1:]]
        out["rss_mb"] = memory_mb(pid, "VmRSS")
        out["pss_mb"] = sum(pss_mb(p) for p in process_tree(pid))  # shared pages split between their users
    return out


def peer_steps(model: str, threads: int, prompt: list[int]):
    """transformers fp32 on the GGUF, in this (fresh) process: (memory after loading, {step: callable}), the
    session's steps as a PyTorch user would write them. Call them inside `torch.inference_mode()`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = Path(model)
    lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    loaded = {"loaded_rss_mb": status_mb(os.getpid(), "VmRSS"), "load_peak_mb": status_mb(os.getpid(), "VmHWM")}
    ids = torch.tensor([prompt])
    norm, head, table = lm.model.norm, lm.get_output_embeddings().weight, lm.get_input_embeddings().weight

    def lens():  # one layer at a time: (n_tokens, n_vocab) blocks, as a user would on a big vocabulary
        states = lm(ids, output_hidden_states=True).hidden_states
        results = []
        for state in states:
            logp = torch.log_softmax(norm(state[0]) @ head.T, dim=-1)
            results.append((logp.topk(5, dim=-1), -(logp.exp() * logp).sum(-1)))
        return results
    query = table[prompt[1]]  # any row: the cost is the table-wide product

    def nearest(matrix):
        scores = (matrix @ query) / (matrix.norm(dim=1) * query.norm() + 1e-30)
        return scores.topk(10)
    with torch.inference_mode():
        last = lm(ids, output_hidden_states=True).hidden_states[-1][0]  # also the warm-up
    steps = {"run_all_logits": lambda: lm(ids, output_hidden_states=True), "lens": lens,
             "nearest_embedding": lambda: nearest(table), "nearest_head": lambda: nearest(head),
             "unembed": lambda: norm(last) @ head.T}
    return loaded, steps


def peer(model: str, threads: int, repeat: int, prompt: list[int]) -> dict:
    """The session in transformers: median times of each step, and the process's peak memory."""
    import torch

    out, steps = peer_steps(model, threads, prompt)
    with torch.inference_mode():
        for name, step in steps.items():
            out[f"{name}_ms"] = median_ms(step, repeat)
    out["peak_mb"] = status_mb(os.getpid(), "VmHWM")
    return out


def serve_peer_steps(model: str, threads: int, prompt: list[int]) -> None:
    """For --alternate: run the step named on each line of stdin once, answer its milliseconds on stdout."""
    import torch

    _, steps = peer_steps(model, threads, prompt)
    print("ready", flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            print(median_ms(steps[line.strip()], 1), flush=True)


def run_peer(model: str, threads: int, repeat: int, prompt: list[int], python: str) -> dict:
    command = [python, __file__, "--peer-of", model, "--threads", str(threads), "--repeat", str(repeat),
               "--prompt", json.dumps(prompt)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


ALTERNATED_STEPS = ("run_all_logits", "lens")


def alternate(model: str, threads: int, rounds: int, prompt: list[int], python: str) -> dict:
    """Speed only, robust to a machine whose speed drifts: both sides loaded side by side, then `rounds`
    rounds of each step once on each side (which side goes first alternates), and the ratio peer / lmscope
    per round. A ratio of one run of each side can be off by 1.5x on a shared machine; the median of
    alternated rounds is what the verdicts use."""
    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    lmscope_steps = {"run_all_logits": lambda c: c.run(prompt, logits=True),
                     "lens": lambda c: c.logit_lens(prompt, top_k=5)}
    command = [python, __file__, "--peer-of", model, "--threads", str(threads), "--prompt", json.dumps(prompt),
               "--serve-steps"]
    args = ("--threads", str(threads), "--workers", "1", "--n-ctx", "4096")
    times: dict[str, dict[str, list[float]]] = {step: {"lmscope_ms": [], "peer_ms": []} for step in ALTERNATED_STEPS}
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as peer_process, \
            launch_server(model, args=args) as server, Client(server.address) as client:
        if peer_process.stdout.readline().strip() != "ready":
            raise RuntimeError("the transformers peer did not start")

        def on_peer(step: str) -> float:
            peer_process.stdin.write(step + "\n")
            peer_process.stdin.flush()
            return float(peer_process.stdout.readline())

        for step in ALTERNATED_STEPS:  # warm-up
            lmscope_steps[step](client)
            on_peer(step)
        for i in range(rounds):
            for step in ALTERNATED_STEPS:
                sides = ["lmscope_ms", "peer_ms"] if i % 2 == 0 else ["peer_ms", "lmscope_ms"]
                for side in sides:
                    times[step][side].append(on_peer(step) if side == "peer_ms"
                                             else median_ms(functools.partial(lmscope_steps[step], client), 1))
        peer_process.stdin.close()
    out = {}
    for step, sides in times.items():
        ratios = sorted(p / m for p, m in zip(sides["peer_ms"], sides["lmscope_ms"]))
        out[step] = {**{side: [round(t) for t in ts] for side, ts in sides.items()},
                     "ratios": [round(r, 2) for r in ratios], "median_ratio": round(statistics.median(ratios), 2)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-threads", type=int,
                        help="lmscope serve --threads (default: --threads; 0: the cores shared among the workers)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. '1,2'")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the interpreter for the transformers peer (an environment with torch + transformers)")
    parser.add_argument("--alternate", type=int, metavar="ROUNDS",
                        help="speed only: run() and the lens alternated with the peer for ROUNDS rounds")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--report", nargs="+", metavar="LABEL=JSON", help="print a markdown table from saved runs")
    parser.add_argument("--peer-of", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    parser.add_argument("--serve-steps", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        print(markdown({item.split("=", 1)[0]: json.loads(Path(item.split("=", 1)[1]).read_text())
                        for item in args.report}))
        return 0
    if args.peer_of and args.serve_steps:
        serve_peer_steps(args.peer_of, args.threads, json.loads(args.prompt))
        return 0
    if args.peer_of:
        print(json.dumps(peer(args.peer_of, args.threads, args.repeat, json.loads(args.prompt))))
        return 0
    if not args.model:
        from lmscope.service.model_files import pull_default_model
        args.model = str(pull_default_model(progress=None))
    prompt = _prompt_ids(args.model, args.tokens)
    result = {"model": args.model, "threads": args.threads, "load_before": load_average()}
    if args.alternate:
        result["alternate"] = alternate(args.model, args.threads, args.alternate, prompt, args.peer_python)
    for workers in [] if args.alternate else [int(w) for w in args.workers.split(",") if w]:
        print(f"[session] lmscope, {workers} worker(s), load {load_average()}", flush=True)
        server_threads = args.threads if args.server_threads is None else args.server_threads
        result[f"lmscope_{workers}"] = measure_lmscope(args.model, server_threads, workers, args.repeat, prompt)
    if not args.no_peer and not args.alternate:
        print(f"[session] transformers, load {load_average()}", flush=True)
        result["peer"] = run_peer(args.model, args.threads, args.repeat, prompt, args.peer_python)
    result["load_after"] = load_average()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def markdown(runs: dict[str, dict]) -> str:
    """A table per model from saved --json results: {label ("before", "after"): result}."""
    first = next(iter(runs.values()))
    peer = next((r["peer"] for r in runs.values() if "peer" in r), None)
    rows = ["| | " + " | ".join(runs) + (" | transformers fp32 |" if peer else " |"),
            "| --- |" + " --- |" * (len(runs) + bool(peer))]

    def row(label, key, fmt, peer_key=None, workers=1):
        cells = [fmt(r.get(f"lmscope_{workers}", {}).get(key)) for r in runs.values()]
        if peer:
            cells.append(fmt(peer.get(peer_key)) if peer_key else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    mb = lambda v: "" if v is None else f"{v:,.0f} MB"  # noqa: E731
    ms = lambda v: "" if v is None else f"{v:,.0f} ms"  # noqa: E731
    row("server peak (front end + workers), 1 worker", "peak_mb", mb, "peak_mb")
    row("  front end alone", "front_end_peak_mb", mb)
    row("server peak, 2 workers, 2 clients at once", "peak_mb", mb, workers=2)
    row("server PSS after the session, 1 worker", "pss_mb", mb)
    row("server PSS after the session, 2 workers", "pss_mb", mb, workers=2)
    row("`run()` 128 tokens, every hidden state + all logits", "run_all_logits_ms", ms, "run_all_logits_ms")
    row("logit lens (every layer x position, top-5 + entropy)", "lens_ms", ms, "lens_ms")
    row("nearest tokens (embedding / LM head)", "nearest_embedding_ms", ms, "nearest_embedding_ms")
    row("unembed 128 vectors", "unembed_ms", ms, "unembed_ms")
    for label, r in runs.items():
        one = r.get("lmscope_1", {})
        if peer and one:
            rows.append(f"| ratio {label} (memory; speed = transformers time / lmscope time) | "
                        f"memory {one['peak_mb'] / peer['peak_mb']:.2f}x; run {peer['run_all_logits_ms'] / one['run_all_logits_ms']:.2f}x; "
                        f"lens {peer['lens_ms'] / one['lens_ms']:.2f}x | |" + (" |" * (len(runs) - 1)))
    loads = "; ".join(f"{label}: load {r['load_before']} -> {r['load_after']}" for label, r in runs.items())
    return f"{Path(first['model']).name}, {first['threads']} threads ({loads})\n\n" + "\n".join(rows)


def _prompt_ids(model: str, n_tokens: int) -> list[int]:
    """The session prompt's token ids, from llama.cpp's tokenizer (the peer gets identical inputs)."""
    import llama_cpp

    from lmscope.service import native  # noqa: F401  (loads the wheel's CPU back end variant: docs/building.md)

    llm = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    return llm.tokenize(TEXT.encode(), add_bos=True)[:n_tokens]


if __name__ == "__main__":
    sys.exit(main())
