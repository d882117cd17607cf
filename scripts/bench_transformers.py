"""lmscope's benchmark: the default model through the public client and a real server, against transformers.

    .venv/bin/python scripts/bench_transformers.py                 # writes docs/performance.md
    .venv/bin/python scripts/bench_transformers.py --repeat 3 --no-peer --variants ""   # quicker, lmscope only

Everything lmscope does here goes through `launch_server` (a real `lmscope serve` process) and `Client`
over gRPC, so the figures include the worker pipe, serialization and transfer; server-side times come
from the RunHeader (`decode_ms`: llama_decode with capture; `total_ms`: the whole request in the worker).
The peer, transformers fp32 with `output_hidden_states=True` on the same GGUF file, runs in its own
process (scripts/bench_transformers_peer.py, needs the `bench` extra: torch + transformers) on the same token ids.
Each figure is the median of --repeat runs; the machine is described in the output, and the load average
before and after is recorded because on a shared machine it is the first thing that moves the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmscope.service.worker import wait_as_one_worker

ROOT = Path(__file__).resolve().parent.parent
# "llama.cpp alone" here and the peer (torch also runs on OpenMP) wait between OpenMP regions as lmscope's
# workers do, so that every tool is measured alike.
wait_as_one_worker()
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
        "faster and more cheaply than ever before. Within decades, presses had spread to hundreds of cities "
        "across Europe, and the number of books in circulation grew from thousands to millions. Scholars "
        "argue about how much the press changed the way people thought, but few doubt that it changed what "
        "they could read: pamphlets, maps, calendars, scientific treatises and religious tracts all reached "
        "readers who had never owned a manuscript. The same pattern repeated with every later medium, from "
        "newspapers to radio, television and finally the networked computers that carry this sentence.")
SUBJECTS = ["a cat", "the river", "my neighbour", "an old map", "the committee", "a violin", "the harbour",
            "this recipe", "a comet", "the library", "our train", "a glacier", "the market", "a lighthouse",
            "the orchestra", "a robot"]
VERBS = ["surprised everyone when it", "was described as something that", "is said to have", "quietly",
         "never once", "suddenly", "according to the report,", "for many years"]
ENDS = ["changed direction in the middle of the night.", "held the attention of the whole town for a week.",
        "turned out to be far older than anyone had guessed.", "became the subject of a long argument.",
        "was moved to a new home near the coast.", "needed repairs after the storm.",
        "appeared in a newspaper story about forgotten places.", "was finally explained by a visiting expert."]


# ----- measuring ------------------------------------------------------------------------------------------

def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                pids += process_tree(int(child))
    return pids


def memory_mb(pid: int, key: str) -> float:
    """VmHWM (peak) or VmRSS of a process and all its descendants, summed, in MB."""
    total = 0
    for p in process_tree(pid):
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    return total / 1024


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----- the machine -----------------------------------------------------------------------------------------

def describe_machine() -> dict:
    lscpu = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                 .stdout.splitlines() if ":" in line)
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    import importlib.metadata as md

    import llama_cpp

    from lmscope.service import native  # noqa: F401  (loads the wheel's CPU back end variant: docs/building.md)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                           text=True).stdout.strip()
    return {
        "cpu": lscpu.get("Model name", "?").strip(),
        "cores": f"{lscpu.get('CPU(s)', '?').strip()} CPUs ({lscpu.get('Core(s) per socket', '?').strip()} cores "
                 f"x {lscpu.get('Socket(s)', '?').strip()} socket, {lscpu.get('Thread(s) per core', '?').strip()} "
                 f"thread(s) per core)",
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "llama_cpp_python": md.version("llama-cpp-python"),
        "llama_build": llama_cpp.llama_print_system_info().decode().strip(),
        "lmscope": commit + (" (with uncommitted changes)" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----- lmscope ---------------------------------------------------------------------------------------------

def server_args(threads: int, extra: tuple = ()) -> tuple:
    return ("--threads", str(threads), "--n-ctx", "4096", *extra)


def cold_start(model, threads: int, extra: tuple, prompt_ids: list[int]) -> tuple[float, float]:
    """Seconds from launching `lmscope serve` to the first hidden states in the client, and the peak memory
    (front end + workers) after a standard workload: the 128-token all-layer run and a generation."""
    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    start = time.perf_counter()
    with launch_server(model, args=server_args(threads, extra)) as server:
        with Client(server.address) as client:
            client.run(prompt_ids[:8])
            seconds = time.perf_counter() - start
            client.run(prompt_ids)
            client.generate("Tell me a story about a lighthouse.", chat=True, max_tokens=32)
            peak = memory_mb(server.process.pid, "VmHWM")
    return seconds, peak


def lens_request(prompt_ids: list[int], layers: list[int]):
    from lmscope.proto.wire import lmscope_pb2 as pb

    return pb.RunRequest(prompts=[pb.Prompt(token_ids=prompt_ids)],
                         capture=[f"blocks.{L}.resid_post" if L >= 0 else "embed" for L in layers],
                         logits=pb.LOGITS_NONE, lens=pb.LensSpec(enabled=True, top_k=10))


def time_lens(client, prompt_ids: list[int], layers: list[int], repeat: int) -> float:
    """The fused server-side lens (Run with a LensSpec): top-10 per layer and position, client wall time."""
    from lmscope.proto import tensors
    from lmscope.proto.wire import lmscope_pb2_grpc as pb_grpc

    stub = pb_grpc.InspectorStub(client._channel)
    request = lens_request(prompt_ids, layers)

    def once():
        assembler = tensors.Assembler()
        for chunk in stub.Run(request):
            if chunk.HasField("tensor"):
                assembler.add(chunk.tensor)
        return assembler.arrays()
    return median_ms(once, repeat)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} load {load_average()}] {message}", flush=True)


def measure_lmscope(model, threads: int, extra: tuple, work: dict, repeat: int, full: bool) -> dict:
    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    out: dict = {}
    prompt = work["prompt_ids"]
    with launch_server(model, args=server_args(threads, extra)) as server, Client(server.address) as client:
        n_layer = client.n_layer
        client.run(prompt)  # warm-up: first decodes re-reserve llama.cpp's scheduler

        def server_ms(key: str, **options) -> float:
            return statistics.median(getattr(client.run(prompt, **options), key) for _ in range(repeat))

        out["prompt_plain_ms"] = server_ms("decode_ms", capture=[], logits="last")
        out["prompt_plain_all_logits_ms"] = server_ms("decode_ms", capture=[], logits="all")
        out["prompt_capture_ms"] = server_ms("decode_ms", logits=False)
        out["prompt_capture_last_ms"] = server_ms("decode_ms", logits="last")
        out["prompt_capture_all_logits_ms"] = server_ms("decode_ms", logits="all")
        for dtype in ("float32", "float16"):
            walls, totals = [], []
            for _ in range(repeat):
                start = time.perf_counter()
                run = client.run(prompt, logits=False, dtype=dtype)
                walls.append((time.perf_counter() - start) * 1e3)
                totals.append(run.total_ms)
            out[f"roundtrip_{dtype}_ms"] = statistics.median(walls)
            out[f"roundtrip_{dtype}_server_ms"] = statistics.median(totals)
        if full:
            run = client.run(prompt, capture=["embed", "blocks.*.resid_post", "ln_final"], logits=True)
            # transformers' last hidden state is after the final norm: compare like with like.
            out["hidden_last_row"] = np.concatenate([run.hidden_states[:n_layer, -1],
                                                     run.captures["ln_final"][-1:]]).tolist()
            out["logits_argmax"] = run.logits.argmax(axis=1).tolist()

        say("  generation")
        # Generation: greedy, plain / steered at one layer / one direction ablated everywhere.
        def tokens_per_s(**options) -> float:
            rates = []
            for _ in range(repeat):
                generation = client.generate(work["chat_prompt_ids"], max_tokens=work["generate_tokens"], **options)
                rates.append(generation.tokens_per_second)
            return statistics.median(rates)
        out["generate_tok_s"] = tokens_per_s()
        out["generate_steered_tok_s"] = tokens_per_s(steer={work["steer_layer"]: np.array(work["steer_vector"])})
        out["generate_ablated_tok_s"] = tokens_per_s(ablate=np.array(work["ablate_direction"]))

        say("  batch")
        # Batch work: every layer's hidden state at the last position of 256 short prompts.
        batch = work["batch_ids"]
        options = dict(positions=[-1], logits=False)
        batched = client.run_batch(batch, batch_size=work["batch_size"], **options)
        out["batch_batched_ms"] = median_ms(lambda: client.run_batch(batch, batch_size=work["batch_size"], **options),
                                            max(1, repeat // 2))
        if full:
            sequential = [client.run(p, **options) for p in batch]
            out["batch_sequential_ms"] = median_ms(lambda: [client.run(p, **options) for p in batch], 1)
            out["batch_max_difference"] = max(float((np.abs(a.hidden_states - b.hidden_states).max(-1)
                                                     / np.abs(b.hidden_states).max(-1)).max())
                                              for a, b in zip(batched, sequential))

        if full:
            say("  lens")
            all_layers = list(range(-1, n_layer))
            out["lens_ms"] = time_lens(client, prompt, all_layers, repeat)
            out["lens_by_tokens"] = {n: time_lens(client, prompt[:n], all_layers, repeat)
                                     for n in (16, 32, 64, 128) if n <= len(prompt)}
            out["lens_by_layers"] = {len(ls): time_lens(client, prompt, ls, repeat)
                                     for ls in ([n_layer - 1], all_layers[::4], all_layers[::2], all_layers)}
        out["peak_memory_mb"] = memory_mb(server.process.pid, "VmHWM")
        out["memory_mb"] = memory_mb(server.process.pid, "VmRSS")
    return out


def raw_llama_decode_ms(model: str, threads: int, prompt_ids: list[int], repeat: int) -> float:
    """llama.cpp alone: the same 128-token decode (last logits) without lmscope's eval callback or server."""
    import llama_cpp as lc
    from llama_cpp._logger import set_verbose

    from lmscope.service import native  # noqa: F401  (loads the wheel's CPU back end variant: docs/building.md)

    set_verbose(False)
    lc.llama_backend_init()
    handle = lc.llama_model_load_from_file(model.encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 4096, 512, 512
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = lc.llama_init_from_model(handle, params)
    batch = lc.llama_batch_init(len(prompt_ids), 0, 1)
    batch.n_tokens = len(prompt_ids)
    for i, token in enumerate(prompt_ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, i == len(prompt_ids) - 1
        batch.seq_id[i][0] = 0

    def decode():
        lc.llama_memory_clear(lc.llama_get_memory(ctx), False)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
    decode()
    try:
        return median_ms(decode, repeat)
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(handle)


def accuracy_against(source_client, variant_client, prompts: list[list[int]]) -> dict:
    """Next-token agreement of a derived model with the shipped one over every position of some prompts."""
    kls, agree = [], []
    for ids in prompts:
        p = source_client.run(ids, capture=[], logits=True).logits.astype(np.float64)
        q = variant_client.run(ids, capture=[], logits=True).logits.astype(np.float64)
        log_p = p - p.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        log_q = q - q.max(1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
        kls += list((np.exp(log_p) * (log_p - log_q)).sum(1))
        agree += list(p.argmax(1) == q.argmax(1))
    return {"kl_mean": float(np.mean(kls)), "kl_p99": float(np.percentile(kls, 99)),
            "top1_agreement": float(np.mean(agree)), "positions": len(kls)}


# ----- the peer ----------------------------------------------------------------------------------------

def run_peer(work: dict, cold_only: bool = False) -> tuple[float, dict]:
    """Seconds from starting the peer's process to its first hidden states, and its results."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**work, "cold_only": cold_only}, f)
    try:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_transformers_peer.py"), f.name],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, results = None, {}
        for line in process.stdout:
            message = json.loads(line)
            if "ready" in message:
                ready = time.perf_counter() - start
            results = message.get("results", results)
        error = process.stderr.read()
        if process.wait() != 0 or ready is None:
            raise RuntimeError(f"the transformers peer failed:\n{error[-3000:]}")
        return ready, results
    finally:
        os.unlink(f.name)


# ----- the workload ------------------------------------------------------------------------------------

def build_workload(model, threads: int, args) -> dict:
    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    rng = np.random.default_rng(0)
    with launch_server(model, args=server_args(threads)) as server, Client(server.address) as client:
        prompt_ids = client.tokenize(TEXT * 2).token_ids[:args.tokens]
        chat_ids = client.tokenize("Tell me a long story about a lighthouse keeper and a storm.", chat=True,
                                   parse_special=True).token_ids
        texts = [f"{SUBJECTS[i % 16]} {VERBS[(i // 16) % 8]} {ENDS[(i // 128 + i) % 8]} "
                 f"(note {i}: {ENDS[(i * 7) % 8]})" for i in range(args.batch_prompts)]
        batch_ids = [client.tokenize(t).token_ids for t in texts]
        info = client.model_info()
        # A steering vector of the size of a typical residual row, and a random unit direction.
        scale = float(np.linalg.norm(client.run(prompt_ids[:16], layers=[info.n_layer // 2], logits=False)
                                     .captures[f"blocks.{info.n_layer // 2}.resid_post"], axis=1).mean())
        vector = rng.standard_normal(info.n_embd)
        vector *= 0.5 * scale / np.linalg.norm(vector)
        direction = rng.standard_normal(info.n_embd)
    if len(prompt_ids) != args.tokens:
        raise SystemExit(f"the benchmark text gives only {len(prompt_ids)} tokens")
    return {"model": str(model), "threads": threads, "repeat": args.repeat, "prompt_ids": prompt_ids,
            "chat_prompt_ids": chat_ids, "generate_tokens": args.generate_tokens, "batch_ids": batch_ids,
            "batch_size": args.batch_size, "steer_layer": info.n_layer // 2, "steer_vector": vector.tolist(),
            "ablate_direction": direction.tolist(), "model_name": info.name, "model_description": info.description,
            "n_layer": info.n_layer}


# ----- the report -------------------------------------------------------------------------------------

def fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def ratio(ours, theirs, better_if_lower: bool = True) -> str:
    if ours is None or theirs is None:
        return "n/a"
    return f"{theirs / ours:.2f}x" if better_if_lower else f"{ours / theirs:.2f}x"


BEGIN = "<!-- scripts/bench_transformers.py writes from here -->"
END = "<!-- to here -->"


def write_report(path: Path, machine: dict, work: dict, ours: dict, peer: dict | None, peer_error: str | None,
                 variants: dict, command: str) -> None:
    """The results, written between the BEGIN/END markers of `path` (the analysis around them is kept)."""
    p = peer or {}
    lines = [
        BEGIN, "",
        f"Generated by `{command}` on {machine['date']}; rerun it to regenerate this file. Every figure is the "
        f"median of {work['repeat']} runs in one run of the script, lmscope through `launch_server` + `Client` "
        f"(a real server, gRPC on localhost), the peer in its own process on the same token ids.", "",
        "## Machine", "",
        f"- CPU: {machine['cpu']}, {machine['cores']}; memory {machine['memory']}; {machine['os']}",
        f"- Python {machine['python']}; llama-cpp-python {machine['llama_cpp_python']}, build: "
        f"`{machine['llama_build']}`; lmscope {machine['lmscope']}",
        f"- Peer: transformers {p.get('transformers', 'n/a')}, torch {p.get('torch', 'n/a')}, fp32, "
        f"`output_hidden_states=True`, the same GGUF file dequantized by transformers",
        f"- OpenMP wait for every tool: `{' '.join(f'{k}={os.environ[k]}' for k in OPENMP_WAIT_VARIABLES if k in os.environ)}`",
        f"- Model: {work['model_name']} ({work['model_description']}), {work['threads']} threads for both tools",
        f"- Load average (1, 5, 15 min) before: {machine['load_before']}; after: {machine['load_after']}", "",
    ]
    if peer_error:
        lines += [f"**The peer did not run**: {peer_error}", ""]
    lines += [
        "## lmscope vs transformers", "",
        "| measurement | lmscope | transformers | lmscope advantage | target |",
        "| --- | --- | --- | --- | --- |",
        f"| cold start to first hidden states | {fmt(ours['cold_start_s'], ' s', 2)} | "
        f"{fmt(p.get('cold_start_s'), ' s', 1)} | {ratio(ours['cold_start_s'], p.get('cold_start_s'))} | >= 5x |",
        f"| peak memory, load + 128-token run + generation (server + workers / peer process) | "
        f"{fmt(ours['cold_peak_memory_mb'], ' MB')} | {fmt(p.get('peak_rss_mb'), ' MB')} | "
        f"{ratio(ours['cold_peak_memory_mb'], p.get('peak_rss_mb'))} | >= 4x (<= 0.25x memory) |",
        f"| greedy generation | {fmt(ours['generate_tok_s'], ' tok/s', 1)} | {fmt(p.get('generate_tok_s'), ' tok/s', 1)} | "
        f"{ratio(ours['generate_tok_s'], p.get('generate_tok_s'), False)} | >= 2x |",
        f"| greedy generation, steered (one layer) | {fmt(ours['generate_steered_tok_s'], ' tok/s', 1)} | "
        f"{fmt(p.get('generate_steered_tok_s'), ' tok/s', 1)} | "
        f"{ratio(ours['generate_steered_tok_s'], p.get('generate_steered_tok_s'), False)} | >= 2x |",
        f"| greedy generation, direction ablated everywhere | {fmt(ours['generate_ablated_tok_s'], ' tok/s', 1)} | "
        f"{fmt(p.get('generate_ablated_tok_s'), ' tok/s', 1)} | "
        f"{ratio(ours['generate_ablated_tok_s'], p.get('generate_ablated_tok_s'), False)} | >= 2x |",
        f"| {len(work['prompt_ids'])}-token prompt, every hidden state (lmscope: server decode, no logits; "
        f"peer: forward with all logits) | {fmt(ours['prompt_capture_ms'], ' ms')} | "
        f"{fmt(p.get('prompt_hidden_ms'), ' ms')} | {ratio(ours['prompt_capture_ms'], p.get('prompt_hidden_ms'))} | >= 1.0x |",
        f"| the same, round trip to the client in float16 | {fmt(ours['roundtrip_float16_ms'], ' ms')} | "
        f"{fmt(p.get('prompt_hidden_ms'), ' ms')} | {ratio(ours['roundtrip_float16_ms'], p.get('prompt_hidden_ms'))} | |",
        f"| hidden states at the last position of every layer, {len(work['batch_ids'])} prompts of "
        f"~{np.mean([len(b) for b in work['batch_ids']]):.0f} tokens, batched | {fmt(ours['batch_batched_ms'], ' ms')} | "
        f"{fmt(p.get('batch_batched_ms'), ' ms')} | {ratio(ours['batch_batched_ms'], p.get('batch_batched_ms'))} | |",
        f"| logit lens (top-10) over all {work['n_layer'] + 1} hidden states x {len(work['prompt_ids'])} positions | "
        f"{fmt(ours.get('lens_ms'), ' ms')} | {fmt(p.get('lens_ms'), ' ms')} | "
        f"{ratio(ours.get('lens_ms'), p.get('lens_ms'))} | |",
        "",
        "## lmscope internal ratios", "",
        "| measurement | value | target |", "| --- | --- | --- |",
        f"| llama.cpp alone, {len(work['prompt_ids'])}-token decode, last logits (no server, no eval callback) | "
        f"{fmt(ours['raw_decode_ms'], ' ms')} | |",
        f"| plain decode through the server (decode_ms), last logits | {fmt(ours['prompt_plain_ms'], ' ms')} | |",
        f"| every hidden state, no logits (decode_ms) | {fmt(ours['prompt_capture_ms'], ' ms')} = "
        f"{ours['prompt_capture_ms'] / ours['prompt_plain_ms']:.2f}x plain | <= 1.10x |",
        f"| every hidden state + last logits | {fmt(ours['prompt_capture_last_ms'], ' ms')} = "
        f"{ours['prompt_capture_last_ms'] / ours['prompt_plain_ms']:.2f}x plain | |",
        f"| every hidden state + all logits (the default `client.run`) | {fmt(ours['prompt_capture_all_logits_ms'], ' ms')}"
        f" = {ours['prompt_capture_all_logits_ms'] / ours['prompt_plain_all_logits_ms']:.2f}x plain decode with all "
        f"logits ({fmt(ours['prompt_plain_all_logits_ms'], ' ms')}) | |",
    ]
    for dtype in ("float32", "float16"):
        wall, server = ours[f"roundtrip_{dtype}_ms"], ours[f"roundtrip_{dtype}_server_ms"]
        lines.append(f"| every hidden state, client round trip in {dtype} | {fmt(wall, ' ms')} = {wall / server:.2f}x "
                     f"server time ({fmt(server, ' ms')}) | {'<= 1.3x' if dtype == 'float16' else ''} |")
    lines += [
        f"| batch: `run_batch` ({work['batch_size']} prompts per request) vs {len(work['batch_ids'])} `run` calls | "
        f"{fmt(ours['batch_batched_ms'], ' ms')} vs {fmt(ours['batch_sequential_ms'], ' ms')} = "
        f"{ours['batch_sequential_ms'] / ours['batch_batched_ms']:.2f}x (largest difference between the two: "
        f"{ours['batch_max_difference']:.1e} of a row's largest value) | >= 2x |",
        f"| peak memory over this whole benchmark (server + worker) | {fmt(ours['peak_memory_mb'], ' MB')} | |",
        "",
    ]
    if "lens_by_tokens" in ours:
        by_tokens, by_layers = ours["lens_by_tokens"], ours["lens_by_layers"]
        lines += [
            "## Logit lens scaling (server-side lens: final norm + LM head + softmax + top-10, client wall time)", "",
            f"| tokens ({work['n_layer'] + 1} hidden states) | " + " | ".join(str(n) for n in by_tokens) + " |",
            "| --- | " + " | ".join("---" for _ in by_tokens) + " |",
            "| ms | " + " | ".join(fmt(v) for v in by_tokens.values()) + " |",
            "| us per vector | " + " | ".join(fmt(v * 1e3 / (n * (work['n_layer'] + 1))) for n, v in by_tokens.items()) + " |",
            "",
            f"| hidden states ({len(work['prompt_ids'])} tokens) | " + " | ".join(str(n) for n in by_layers) + " |",
            "| --- | " + " | ".join("---" for _ in by_layers) + " |",
            "| ms | " + " | ".join(fmt(v) for v in by_layers.values()) + " |",
            "| us per vector | " + " | ".join(fmt(v * 1e3 / (n * len(work['prompt_ids']))) for n, v in by_layers.items()) + " |",
            "",
        ]
    if peer:
        ours_rows, theirs_rows = np.array(ours["hidden_last_row"]), np.array(peer["hidden_last_row"])
        error = np.abs(ours_rows - theirs_rows).max(axis=1) / np.abs(theirs_rows).max(axis=1)
        agree = np.mean(np.array(ours["logits_argmax"]) == np.array(peer["logits_argmax"]))
        lines += [
            "Same model check: at the last prompt position, lmscope's hidden states (embeddings, every block, "
            f"final norm) differ from transformers' by at most {error.max():.1e} of each row's largest value "
            f"(median {np.median(error):.1e}; llama.cpp multiplies with 8-bit-rounded activations), and the "
            f"next-token argmax agrees at {agree:.0%} of the positions.", "",
        ]
    if variants:
        lines += [
            "## Derived weight formats (`lmscope serve --requantize FORMAT`)", "",
            "| format | plain decode | every hidden state | vs transformers | round trip f16 | generation | "
            "batched 256 | KL(shipped \\|\\| derived), mean / p99 | top-1 agreement |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| shipped ({work['model_description']}) | {fmt(ours['prompt_plain_ms'], ' ms')} | "
            f"{fmt(ours['prompt_capture_ms'], ' ms')} | {ratio(ours['prompt_capture_ms'], p.get('prompt_hidden_ms'))} | "
            f"{fmt(ours['roundtrip_float16_ms'], ' ms')} | {fmt(ours['generate_tok_s'], ' tok/s', 1)} | "
            f"{fmt(ours['batch_batched_ms'], ' ms')} | 0 | 100% |",
        ]
        for name, v in variants.items():
            acc = v["accuracy"]
            lines.append(
                f"| {name} | {fmt(v['prompt_plain_ms'], ' ms')} | {fmt(v['prompt_capture_ms'], ' ms')} | "
                f"{ratio(v['prompt_capture_ms'], p.get('prompt_hidden_ms'))} | {fmt(v['roundtrip_float16_ms'], ' ms')} | "
                f"{fmt(v['generate_tok_s'], ' tok/s', 1)} | {fmt(v['batch_batched_ms'], ' ms')} | "
                f"{acc['kl_mean']:.4f} / {acc['kl_p99']:.4f} | {acc['top1_agreement']:.1%} ({acc['positions']} positions) |")
        lines.append("")
    lines.append(END)
    generated = "\n".join(lines)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        text = "# Performance\n\n" + generated + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--generate-tokens", type=int, default=64)
    parser.add_argument("--batch-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default="q8_0,q4_0", help="--requantize formats to measure too ('' for none)")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--from-json", help="only rewrite the report from a JSON file an earlier run wrote")
    parser.add_argument("--session", action="store_true",
                        help="only the issue #13 memory session against transformers (scripts/bench_session.py)")
    args = parser.parse_args(argv)
    if args.session:
        import bench_session
        return bench_session.main((["--model", args.model] if args.model else [])
                                  + ["--threads", str(args.threads)] + (["--json", args.json] if args.json else [])
                                  + (["--no-peer"] if args.no_peer else []))
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key in ("lens_by_tokens", "lens_by_layers"):  # JSON turned their int keys into strings
            if key in saved["lmscope"]:
                saved["lmscope"][key] = {int(n): ms for n, ms in saved["lmscope"][key].items()}
        write_report(Path(args.out), saved["machine"], saved["work"], saved["lmscope"], saved["peer"],
                     saved["peer_error"], saved["variants"], saved["command"])
        return 0

    from lmscope.service.model_files import resolve_model_path

    model = str(resolve_model_path(args.model))
    machine = describe_machine()
    machine["load_before"] = load_average()
    say("workload")
    work = build_workload(model, args.threads, args)

    say("lmscope: cold start")
    colds = [cold_start(model, args.threads, (), work["prompt_ids"]) for _ in range(min(args.repeat, 3))]
    ours = {"cold_start_s": statistics.median(c[0] for c in colds),
            "cold_peak_memory_mb": statistics.median(c[1] for c in colds)}
    say("lmscope: llama.cpp alone")
    ours["raw_decode_ms"] = raw_llama_decode_ms(model, args.threads, work["prompt_ids"], args.repeat)
    say("lmscope: server workloads")
    ours.update(measure_lmscope(model, args.threads, (), work, args.repeat, full=True))

    variants = {}
    for name in filter(None, args.variants.split(",")):
        say(f"lmscope --requantize {name}")
        from lmscope.client import Client
        from lmscope.service.launch import launch_server
        from lmscope.service.requantize import requantized

        requantized(model, name)  # made (or found) before anything is timed
        variant = measure_lmscope(model, args.threads, ("--requantize", name), work, args.repeat, full=False)
        with launch_server(model, args=server_args(args.threads)) as a, \
                launch_server(model, args=server_args(args.threads, ("--requantize", name))) as b, \
                Client(a.address) as source, Client(b.address) as derived:
            variant["accuracy"] = accuracy_against(source, derived, [work["prompt_ids"]] + work["batch_ids"][:32:4])
        variants[name] = variant

    peer, peer_error = None, None
    if not args.no_peer:
        try:
            say("transformers: cold start")
            peer_colds = [run_peer(work, cold_only=True)[0] for _ in range(min(args.repeat, 3) - 1)]
            say("transformers: workloads")
            ready, peer = run_peer(work)
            peer["cold_start_s"] = statistics.median(peer_colds + [ready])
        except (RuntimeError, OSError) as exc:
            peer_error = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
            say(f"peer failed: {exc}")
    else:
        peer_error = "skipped (--no-peer)"
    machine["load_after"] = load_average()
    command = "python scripts/bench_transformers.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "work": work, "lmscope": ours, "peer": peer,
                                               "peer_error": peer_error, "variants": variants, "command": command},
                                              indent=1, default=str))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, machine, work, ours, peer, peer_error, variants, command)
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
