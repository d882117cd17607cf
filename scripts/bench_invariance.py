"""What observing and batching change, and what the two options that remove it cost.

For each server setting (default; --flash-attn off; --batch-invariant; both) on one model, prints:
- observer: the largest difference, relative to each row's largest value, between every hidden state of a
  prompt run alone and the same run with one attention pattern captured beside it;
- batch: the same between short prompts run alone and in one batch (they share ubatches by default);
- the median wall time of a batch of short prompts (every hidden state, no logits) and of one 128-token
  prompt (every hidden state, all logits), over --repeat rounds.

    .venv/bin/python scripts/bench_invariance.py [--model PATH] [--repeat 3]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

from lmscope.client import Client
from lmscope.service.launch import launch_server
from lmscope.service.model_files import pull_default_model

SETTINGS = {"default": (), "--flash-attn off": ("--flash-attn", "off"), "--batch-invariant": ("--batch-invariant",),
            "both": ("--flash-attn", "off", "--batch-invariant")}
SHORT = ["The capital of France is", "Water boils at", "My favourite colour is", "In 1969 the first man on the",
         "The quick brown fox", "Two plus two equals", "She opened the door and", "Cats are known for their"] * 4
LONG = ("The history of the old harbour town begins in Roman times, when a few fishermen settled on the banks "
        "of the river. Over the centuries it grew into a centre of trade, learning and the arts. ") * 4


def worst_row_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)).max())


def median_seconds(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or pull_default_model(progress=None)
    print(f"model {model}\n")
    print("| setting | observer (pattern captured) | batch vs alone | 32 short prompts | 128-token prompt, all logits |")
    print("| --- | --- | --- | --- | --- |")
    for name, flags in SETTINGS.items():
        server_args = ("--threads", str(args.threads), "--n-ctx", "1024") + flags
        with launch_server(model, args=server_args) as server, Client(server.address) as c:
            long_ids = c.tokenize(LONG).token_ids[:128]
            plain = c.run(long_ids, logits=False)
            watched = c.run(long_ids, capture=["embed", "blocks.*.resid_post", "blocks.0.attn.pattern"], logits=False)
            observer = worst_row_difference(watched.hidden_states, plain.hidden_states)
            batch = c.run_batch(SHORT[:8], logits=False)
            shared = max(worst_row_difference(b.hidden_states, c.run(p, logits=False).hidden_states)
                         for p, b in zip(SHORT[:8], batch))
            short_s = median_seconds(lambda: c.run_batch(SHORT, logits=False), args.repeat)
            long_s = median_seconds(functools.partial(c.run, long_ids), args.repeat)
            print(f"| {name} | {observer:.2e} | {shared:.2e} | {short_s * 1e3:,.0f} ms | {long_s * 1e3:,.0f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
