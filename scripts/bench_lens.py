"""How the logit lens over every layer and position scales with the prompt length.

    python scripts/bench_lens.py [--server HOST:PORT] [--tokens 16 64 256 1024] [--repeats 3]

For each prompt length it times, on the default model unless --server is given (medians of --repeats):
- forward: one forward pass, last-token logits only, nothing captured (the floor);
- capture: the forward pass returning every hidden state raw (what a client-side lens would download);
- lens: `Client.logit_lens(top_k=5)`, ONE request: capture + server-side final norm, LM head, softmax,
  top-k and entropy for every (hidden state, position) row; split into the server's decode time and the
  reduction (server total - decode);
- per-layer: the alternative of one `lens_vectors` (Unembed) request per hidden state over the captured
  rows, which is what the single request saves.
Wall times are measured on the client and include gRPC transfer. The machine's load average is printed:
on a shared machine, compare the rows with each other rather than with another run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from _server import connect

TEXT = ("The history of the city goes back more than two thousand years, to a settlement on an island in the "
        "river. Over the centuries it grew into a centre of trade, learning and government, and its streets, "
        "bridges and markets were rebuilt many times after fires, floods and wars. ")


def timed(call, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="use a running server instead of starting one")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="server threads when starting one")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with connect(args.server, threads=args.threads, n_ctx=max(2048, max(args.tokens))) as client:
        info = client.model_info()
        ids = client.tokenize(TEXT * (1 + max(args.tokens) // 40), add_special=False).token_ids
        print(f"{info.name} ({info.description}), {info.n_layer + 1} hidden states, vocabulary {info.n_vocab}, "
              f"backend {info.backend}")
        print("| tokens | lensed rows | forward ms | capture ms (MB) | lens ms (server decode + reduce) "
              "| per-layer requests ms |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for n in args.tokens:
            prompt = ids[:n]
            client.run(prompt, layers=[], logits="last")  # warm-up at this length
            forward, _ = timed(lambda: client.run(prompt, layers=[], logits="last"), args.repeats)
            capture, run = timed(lambda: client.run(prompt, logits=False), args.repeats)
            lens_ms, lens = timed(lambda: client.logit_lens(prompt, top_k=5), args.repeats)
            states = run.hidden_states
            per_layer, _ = timed(lambda: [client.lens_vectors(states[i], top_k=5) for i in range(len(states))],
                                 args.repeats)
            megabytes = states.nbytes / 2 ** 20
            print(f"| {n} | {states.shape[0] * states.shape[1]} | {forward:.0f} | {capture:.0f} ({megabytes:.1f}) "
                  f"| {lens_ms:.0f} ({lens.decode_ms:.0f} + {lens.total_ms - lens.decode_ms:.0f}) "
                  f"| {capture + per_layer:.0f} ({capture:.0f} + {per_layer:.0f}) |", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
