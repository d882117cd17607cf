"""What alternating requests with and without logits cost: a worker holds one llama.cpp context, and a request
for every hidden state without logits goes through a context without the LM head (patches/0006,
`Contexts.get` in service/batching.py), so each switch between the two kinds creates a context again.

Times, through a real server and client, every hidden state without logits and last-token logits alone, each
repeated, then the two alternating; the difference is the switch.

    .venv/bin/python scripts/bench_context_switch.py [--model PATH] [--tokens 128] [--repeat 6]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from lmscope.client import Client
from lmscope.service.launch import launch_server

TEXT = "The history of the old harbour town begins in Roman times, when a few fishermen settled on the banks. " * 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="~/.cache/lmscope/models/gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with launch_server(os.path.expanduser(args.model), args=("--threads", str(args.threads))) as server, \
            Client(server.address) as c:
        ids = c.tokenize(TEXT).token_ids[:args.tokens]

        def states():
            return c.run(ids, logits=False)

        def last():
            return c.run(ids, capture=[], logits="last")

        def ms(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        states(), last()  # warm-up: both kinds of context created once
        repeated = {name: [ms(fn) for _ in range(args.repeat)] for name, fn in (("states", states), ("last", last))}
        alternating = {"states": [], "last": []}
        for _ in range(args.repeat):
            alternating["states"].append(ms(states))
            alternating["last"].append(ms(last))
        print(f"{os.path.basename(args.model)}, {len(ids)} tokens, medians of {args.repeat}, "
              f"load {os.getloadavg()[0]:.1f}:")
        for name, what in (("states", "every hidden state, no logits"), ("last", "last-token logits")):
            print(f"  {what}: {statistics.median(repeated[name]):.0f} ms repeated, "
                  f"{statistics.median(alternating[name]):.0f} ms alternating")


if __name__ == "__main__":
    main()
