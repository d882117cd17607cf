"""How the logit lens over every layer and position scales with the prompt length.

    python scripts/bench_lens.py [--server HOST:PORT] [--tokens 16 64 256 1024] [--repeats 3]

For each prompt length it times, on the default model unless --server is given (fastest of --repeats):
- forward: one forward pass, last-token logits only, nothing captured (the floor);
- capture: the forward pass returning every hidden state raw (what a client-side lens would download);
- lens: `Client.logit_lens(top_k=5)`, ONE request: capture + server-side final norm, LM head, softmax,
  top-k and entropy for every (hidden state, position) row; split into the server's decode time and the
  reduction (server total - decode) of that same run;
- per-layer: the alternative of one `lens_vectors` (Unembed) request per hidden state over the captured
  rows, which is what the single request saves.
Wall times are measured on the client and include gRPC transfer. The machine's load average is printed:
on a shared machine, compare the rows with each other rather than with another run.

    python scripts/bench_lens.py --reduction [--model PATH]

times the server's lens reduction alone, in this process: `Weights.lens` on 256 random rows (one chunk)
of the default model's residual width, and the LM-head product inside it.
"""
from __future__ import annotations

import argparse
import os
import time

from _server import connect

TEXT = ("The history of the city goes back more than two thousand years, to a settlement on an island in the "
        "river. Over the centuries it grew into a centre of trade, learning and government, and its streets, "
        "bridges and markets were rebuilt many times after fires, floods and wars. ")


def timed(call, repeats: int):
    """(fastest wall time in ms, the result of that run): on a shared machine the fastest run is the one
    least disturbed by other processes."""
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        elapsed = (time.perf_counter() - start) * 1e3
        if best is None or elapsed < best[0]:
            best = (elapsed, result)
    return best


def reduction(model: str | None, repeats: int) -> None:
    import numpy as np

    from lmscope.service.model_files import pull_default_model
    from lmscope.service.weights import Weights

    weights = Weights(str(model or pull_default_model(progress=None)))
    rows = np.random.default_rng(0).normal(size=(256, weights.lm_head.shape[1])).astype(np.float32)
    product, _ = timed(lambda: weights.unembed(rows), repeats)
    total, _ = timed(lambda: weights.lens(rows, top_k=5, temperature=1.0, target_ids=[]), repeats)
    print(f"load average {os.getloadavg()}: Weights.lens on 256 rows {total:.0f} ms, of which final norm + "
          f"LM-head product {product:.0f} ms (fastest of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="use a running server instead of starting one")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="server threads when starting one (1 measures steadily on a busy machine)")
    parser.add_argument("--reduction", action="store_true", help="time the server-side lens reduction alone")
    parser.add_argument("--model", help="GGUF file for --reduction (default: the default model)")
    args = parser.parse_args()
    if args.reduction:
        reduction(args.model, args.repeats)
        return
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
            forward, _ = timed(lambda prompt=prompt: client.run(prompt, layers=[], logits="last"), args.repeats)
            capture, run = timed(lambda prompt=prompt: client.run(prompt, logits=False), args.repeats)
            lens_ms, lens = timed(lambda prompt=prompt: client.logit_lens(prompt, top_k=5), args.repeats)
            states = run.hidden_states
            per_layer, _ = timed(lambda states=states: [client.lens_vectors(s, top_k=5) for s in states],
                                 args.repeats)
            megabytes = states.nbytes / 2 ** 20
            print(f"| {n} | {states.shape[0] * states.shape[1]} | {forward:.0f} | {capture:.0f} ({megabytes:.1f}) "
                  f"| {lens_ms:.0f} ({lens.decode_ms:.0f} + {lens.total_ms - lens.decode_ms:.0f}) "
                  f"| {capture + per_layer:.0f} ({capture:.0f} + {per_layer:.0f}) |", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
