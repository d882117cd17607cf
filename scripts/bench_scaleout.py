"""Throughput of a hidden-state batch through one client over 1, 2, 3 ... `lmscope serve` replicas.

Usage: python scripts/bench_scaleout.py [--model PATH] [--servers 1,2,3] [--threads 1] [--prompts 96]
       [--batch-size 8] [--repeats 3] [--max-in-flight N] [--json OUT.json]

Each configuration starts that many servers on loopback (one worker each, `--threads` threads per worker),
warms them up, then times `Client([...]).run_batch(prompts, ...)` capturing every layer's residual stream
(`embed` + `blocks.*.resid_post`) at every token plus the last token's logits: the request a probe or a
refusal-direction job sends by the thousand. It reports the median over `--repeats` runs in prompts/s,
the speed-up over one server, how many servers were computing on average (the sum of the servers' own
time per request over the wall time: the client keeps N servers busy when this is close to N), and the
1-minute load average before each configuration (on a shared machine other people's work competes for
the same cores, so read numbers with it).

All servers share this machine's cores: with `servers x threads` above the core count, more replicas add
no compute, only contention. On separate hosts each replica brings its own cores and the speed-up stays
close to linear until the client or the network (the hidden states travel back) becomes the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from lmscope.client import Client
from lmscope.service.launch import launch_server

WORDS = ("the model reads a sentence about rivers mountains cities numbers colours music history and "
         "science then writes what it thinks comes next").split()


def prompts(n: int) -> list[str]:
    """Distinct prompts of 8-24 words (roughly 10-30 tokens)."""
    return [f"{i}. " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 17)) for i in range(n)]


def measure(model: str | None, n_servers: int, args) -> dict:
    server_args = ("--threads", str(args.threads), "--workers", "1", "--n-ctx", "2048")
    load = os.getloadavg()[0]
    with ThreadPoolExecutor(n_servers) as pool:
        servers = list(pool.map(lambda _: launch_server(model, args=server_args), range(n_servers)))
    try:
        batch = prompts(args.prompts)
        options = dict(layers=None, logits="last", batch_size=args.batch_size)
        with Client([s.address for s in servers], max_in_flight=args.max_in_flight) as client:
            client.run_batch(batch[: args.batch_size * n_servers * 2], **options)  # warm-up: every server
            times, busy = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                runs = client.run_batch(batch, **options)
                times.append(time.perf_counter() - t0)
                # Server-side time of each request (its Runs share one header): how many servers were
                # computing on average, whatever the cores they got.
                busy.append(sum(r.total_ms for r in runs[:: args.batch_size]) / 1e3 / times[-1])
            n_tokens = sum(len(r.token_ids) for r in runs)
            info = client.model_info()
    finally:
        for server in servers:
            server.stop()
    seconds = statistics.median(times)
    return dict(servers=n_servers, threads=args.threads, model=info.name, prompts=len(batch), tokens=n_tokens,
                seconds=seconds, prompts_per_s=len(batch) / seconds, tokens_per_s=n_tokens / seconds,
                times=times, servers_busy=statistics.median(busy), load_before=load)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--servers", default="1,2,3", help="comma-separated replica counts to measure")
    parser.add_argument("--threads", type=int, default=1, help="threads per server")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-in-flight", type=int, default=None, help="default: the client's (2 x workers)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    print(f"{os.cpu_count()} CPU cores; {args.prompts} prompts, {args.batch_size} per request, all hidden states "
          f"+ last logits; {args.threads} thread(s) per server", flush=True)
    results = []
    for n in (int(x) for x in args.servers.split(",")):
        result = measure(args.model, n, args)
        results.append(result)
        base = results[0]["prompts_per_s"]
        print(f"{n} server(s): {result['prompts_per_s']:7.1f} prompts/s {result['tokens_per_s']:8.0f} tokens/s "
              f"x{result['prompts_per_s'] / base:.2f}  {result['servers_busy']:.2f} servers busy  (median of "
              f"{[round(t, 2) for t in result['times']]} s; load before {result['load_before']:.1f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
