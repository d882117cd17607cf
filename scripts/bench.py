"""Speed and memory over prompt sizes, per model, lmscope against transformers fp32 on the same GGUF file.

    .venv/bin/python scripts/bench.py [--models smollm2,gemma3-270m,qwen2.5-coder-1.5b-instruct]
                                      [--sizes 16,128,512,2000] [--repeat 3] [--no-peer]
                                      [--serve "--n-batch 60"]                    # the measured configuration
                                      [--compare "--n-batch 16 --n-outputs 16"]   # a second configuration
                                      [--no-shared-memory]   # answers on the gRPC stream, as a remote client

For each model (a name `lmscope pull` knows, or a path) and prompt size, through a real `lmscope serve` and
the public client over gRPC (on loopback the client takes a Run's tensors from shared memory, its default
there; `--no-shared-memory` streams them, what a client on another host gets):

- `states`: every block's output at every position, no logits (`run(ids, logits=False)`);
- `states+last`: the same with the last position's logits (`run(ids, logits="last")`), what transformers'
  `states` figure computes (its `logits_to_keep=1`), so both are held against that one;
- `states+logits`: the same with every position's logits (`run(ids)`);
- `lens`: the fused logit lens, top-10 of every block's output at every position (`logit_lens`), for the
  sizes of --lens-sizes (the whole vocabulary for every layer x position: minutes at 2,000 tokens);
- and once per model, greedy generation of 64 tokens (tokens/s) and the peak memory of the server's
  processes after everything (VmHWM summed over the front end and its worker).

The peer, transformers fp32 (`--peer`, this script in its own process; needs `pip install -e ".[bench]"`),
computes the same on the same token ids: `output_hidden_states=True` with `logits_to_keep=1` or all logits,
final norm + LM head + softmax + top-10 over every hidden state (in 256-row pieces, so a 262k vocabulary fits),
greedy decoding with its KV cache. Each figure is the median of --repeat runs; the ratio is transformers'
time over lmscope's (above 1: lmscope is faster) and lmscope's memory over transformers'. The load average
is printed beside every model: on a shared machine it is the first thing that moves the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmscope.service.worker import wait_as_one_worker

ROOT = Path(__file__).resolve().parent.parent
wait_as_one_worker()  # torch too
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
        "faster and more cheaply than ever before. Within decades, presses had spread to hundreds of cities "
        "across Europe, and the number of books in circulation grew from thousands to millions. ")
CHAT = "Tell me a long story about a lighthouse keeper and a storm."
GENERATE_TOKENS = 64
LENS_ROWS = 256


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb(pid: int) -> float:
    """VmHWM of a process and its descendants, summed, in MB."""
    def tree(p: int) -> list[int]:
        out = [p]
        for task in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{task}/children") as f:
                out += [q for child in f.read().split() for q in tree(int(child))]
        return out
    total = 0
    for p in tree(pid):
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return total / 1024


# ----- lmscope ------------------------------------------------------------------------------------------------

def measure_lmscope(model: str, sizes: list[int], lens_sizes: set[int], repeat: int, threads: int,
                    server_args: tuple = (), shared_memory: bool | None = None) -> tuple[dict, dict]:
    """The figures per size, and the workload (token ids) the peer runs."""
    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    out: dict = {"sizes": {}}
    n_ctx = max(4096, 2 * max(sizes))
    with launch_server(model, args=("--threads", str(threads), "--n-ctx", str(n_ctx), *server_args)) as server, \
            Client(server.address, shared_memory=shared_memory) as c:
        info = c.model_info()
        out["model"] = info.name + (f" `{' '.join(server_args)}`" if server_args else "")
        out["ubatch"] = f"{info.memory['n_ubatch']} tokens, {info.memory.get('n_outputs_max', '?')} output rows"
        out["cpu"] = getattr(info, "cpu_variant", "") or "portable"
        c.run([1], logits=False)  # the first Run settles whether the server takes the offer of shared memory
        out["answers"] = "shared memory" if c.answers_in_shared_memory else "gRPC stream"
        base = c.tokenize(TEXT).token_ids
        ids = (base * (max(sizes) // len(base) + 1))[:max(sizes)]
        chat_ids = c.tokenize(CHAT, chat=info.has_chat_template).token_ids
        for n in sizes:
            prompt = ids[:n]
            c.run(prompt, logits=False)  # warm-up: the context grows to this size once
            out["sizes"][n] = {"states": median_ms(lambda p=prompt: c.run(p, logits=False), repeat),
                               "states+last": median_ms(lambda p=prompt: c.run(p, logits="last"), repeat)}
            answer = n * 4 * (info.n_vocab + (info.n_layer + 1) * info.n_embd)
            if answer <= info.limits["max_capture_bytes"]:  # all logits of 2,000 tokens of a 262k vocabulary: not
                out["sizes"][n]["states+logits"] = median_ms(lambda p=prompt: c.run(p), repeat)
            if n in lens_sizes:
                out["sizes"][n]["lens"] = median_ms(lambda p=prompt: c.logit_lens(p, top_k=10), repeat)
            print(f"  lmscope {n} tokens: {out['sizes'][n]}", flush=True)

        def generate():
            c.generate(chat_ids, max_tokens=GENERATE_TOKENS, temperature=0.0)
        out["generate_tok_s"] = GENERATE_TOKENS / (median_ms(generate, repeat) / 1e3)
        out["peak_mb"] = peak_mb(server.process.pid)
    return out, {"model": model, "ids": ids, "chat_ids": chat_ids, "sizes": sizes, "lens_sizes": sorted(lens_sizes),
                 "repeat": repeat, "threads": threads}


# ----- transformers (run with --peer) -------------------------------------------------------------------------

def peer(work_file: str) -> None:
    work = json.loads(Path(work_file).read_text())
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(work["threads"])
    path = Path(work["model"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    repeat, out = work["repeat"], {"sizes": {}}
    norm, head = model.model.norm, model.lm_head
    with torch.inference_mode():
        for n in work["sizes"]:
            prompt = torch.tensor([work["ids"][:n]])
            model(prompt, output_hidden_states=True, logits_to_keep=1)  # warm-up

            def lens(prompt=prompt):
                hidden = torch.stack(model(prompt, output_hidden_states=True, logits_to_keep=1).hidden_states[1:])
                rows = hidden[:, 0].reshape(-1, hidden.shape[-1])
                for start in range(0, rows.shape[0], LENS_ROWS):
                    torch.softmax(head(norm(rows[start:start + LENS_ROWS])), dim=-1).topk(10, dim=-1)
            out["sizes"][n] = {
                "states": median_ms(lambda p=prompt: model(p, output_hidden_states=True, logits_to_keep=1), repeat),
                "states+logits": median_ms(lambda p=prompt: model(p, output_hidden_states=True), repeat)}
            if n in work["lens_sizes"]:
                out["sizes"][n]["lens"] = median_ms(lens, repeat)
            print(json.dumps({"progress": n}), flush=True)

        def generate():
            result = model(torch.tensor([work["chat_ids"]]), use_cache=True)
            cache, token = result.past_key_values, result.logits[0, -1].argmax()
            for _ in range(GENERATE_TOKENS - 1):
                result = model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache, token = result.past_key_values, result.logits[0, -1].argmax()
        out["generate_tok_s"] = GENERATE_TOKENS / (median_ms(generate, repeat) / 1e3)
    with open("/proc/self/status") as f:
        out["peak_mb"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"results": out}), flush=True)


def run_peer(work: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work, f)
    try:
        done = subprocess.run([sys.executable, __file__, "--peer", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    for line in done.stdout.splitlines():
        if line.startswith('{"results"'):
            return json.loads(line)["results"]
    raise RuntimeError(f"the transformers peer failed:\n{done.stderr[-3000:]}")


# ----- the report ---------------------------------------------------------------------------------------------

def report(ours: dict, theirs: dict | None, load: str) -> None:
    print(f"\n### {ours['model']} (ubatch: {ours['ubatch']}; CPU kernels: {ours['cpu']}; answers: {ours['answers']}; "
          f"load {load})\n")
    print("| tokens | states | states+last | states+logits | lens (top-10, every layer x position) |")
    print("| --- | --- | --- | --- | --- |")
    peer_key = {"states": "states", "states+last": "states", "states+logits": "states+logits", "lens": "lens"}
    for n, mine in ours["sizes"].items():
        cells = []
        for key in peer_key:
            if key not in mine:
                cells.append("-")
            elif theirs:
                other = theirs["sizes"][str(n)][peer_key[key]]
                cells.append(f"{mine[key]:,.0f} vs {other:,.0f} ms ({other / mine[key]:.2f}x)")
            else:
                cells.append(f"{mine[key]:,.0f} ms")
        print(f"| {n} | " + " | ".join(cells) + " |")
    gen = f"{ours['generate_tok_s']:.1f} tok/s"
    mem = f"{ours['peak_mb']:,.0f} MB"
    if theirs:
        gen += f" vs {theirs['generate_tok_s']:.1f} ({ours['generate_tok_s'] / theirs['generate_tok_s']:.2f}x)"
        mem += f" vs {theirs['peak_mb']:,.0f} MB ({ours['peak_mb'] / theirs['peak_mb']:.2f}x)"
    print(f"\ngreedy generation, {GENERATE_TOKENS} tokens: {gen}; peak memory: {mem}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3-270m,qwen2.5-coder-1.5b-instruct",
                        help="comma-separated model names or GGUF paths")
    parser.add_argument("--sizes", default="16,128,512,2000")
    parser.add_argument("--lens-sizes", default="16,128,512")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="lmscope only")
    parser.add_argument("--serve", default="",
                        help="server arguments of the measured configuration (default: lmscope serve's defaults), "
                             "e.g. '--n-batch 60'; LLAMA_CPP_LIB_PATH picks another build of llama.cpp")
    parser.add_argument("--compare", default="",
                        help="server arguments of a second lmscope configuration measured in the same run, "
                             "e.g. '--n-batch 16 --n-outputs 16' (the ubatches before issue #24)")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help="the client streams every answer (what a client on another host gets)")
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # a workload file: run transformers on it
    args = parser.parse_args()
    if args.peer:
        peer(args.peer)
        return
    from lmscope.service.model_files import resolve_model_path

    sizes = [int(s) for s in args.sizes.split(",")]
    for name in args.models.split(","):
        model = str(resolve_model_path(name))
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"[{time.strftime('%H:%M:%S')}] {name}: lmscope", flush=True)
        lens_sizes = {int(s) for s in args.lens_sizes.split(",") if s}
        shared = False if args.no_shared_memory else None
        ours, work = measure_lmscope(model, sizes, lens_sizes, args.repeat, args.threads, tuple(args.serve.split()),
                                     shared)
        theirs = None
        if not args.no_peer:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: transformers", flush=True)
            theirs = run_peer(work)
        report(ours, theirs, load + " -> " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
        if args.compare:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: lmscope {args.compare}", flush=True)
            other, _ = measure_lmscope(model, sizes, lens_sizes, args.repeat, args.threads, tuple(args.compare.split()),
                                       shared)
            report(other, theirs, " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
