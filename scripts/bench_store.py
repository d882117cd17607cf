"""Activation store and tuned lens on the default model: the figures of docs/datasets.md.

    python scripts/bench_store.py [--server HOST:PORT] [--prompts 1000] [--heldout 200] [--dir /tmp/lmscope-bench-store]
                                  [--steps 40] [--batch-tokens 32] [--json out.json]

1. Collect: `Client.collect` of every block's last-position resid_post (float16) for --prompts prompts,
   timed, with MB on disk; then the same captures with `run()` one prompt at a time.
2. Tuned lens: fitted on that store (`fit_tuned_lens`), timed; then, on --heldout other prompts collected
   the same way, the mean KL(final || lens) per layer for the logit lens and the tuned lens.

Prompts (`bench_prompts`): 20 templates x the bundled cities for training, 4 other templates for the
held-out prompts, shuffled with a fixed seed, so every run uses the same sets. The load average before and
after each phase is printed: the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import time

import numpy as np
from _server import connect

from lmscope.client.datasets import world_cities
from lmscope.client.tuned_lens import evaluate, store_states

# Training prompts come from these templates; held-out prompts from HELDOUT_TEMPLATES, which the lens never
# sees: a stricter test than held-out prompts of the same templates, whose next-token distributions the
# last token alone largely gives away.
TEMPLATES = (
    "The city of {city} is located in",
    "{city} is a city in {country}. The people there speak",
    "If you travel to {city}, you should visit",
    "Q: Which continent is {country} on?\nA:",
    "The weather in {city} today is",
    "My friend from {city} told me that",
    "The population of {city} is about",
    "In {city}, the most popular food is",
    "{city} was founded in the year",
    "The capital of {country} is",
    "Flights from {city} to",
    "A short history of {city}:",
    "The mayor of {city} said on Monday that",
    "Hotels in {city} are usually",
    "The distance from {city} to the sea is",
    "When I lived in {city}, every morning I",
    "{country}'s national flag has the colours",
    "The main river that flows through {city} is called",
    "Tourists who visit {country} often complain about",
    "The football team of {city} won the",
)
HELDOUT_TEMPLATES = (
    "Real estate prices in {city} have",
    "The oldest building in {city} is",
    "People in {country} usually eat dinner at",
    "The train from {city} arrives at",
)


def _from(templates, n: int, seed: int) -> list[str]:
    cities = world_cities()
    prompts = sorted({t.format(city=c, country=k) for t in templates for c, k in zip(cities.names, cities.countries)})
    if n > len(prompts):
        raise ValueError(f"only {len(prompts)} distinct prompts")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:n]]


def bench_prompts(n: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts of other templates), deterministic."""
    return _from(TEMPLATES, n, seed), _from(HELDOUT_TEMPLATES, n_heldout, seed + 1)


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--dir", default="/tmp/lmscope-bench-store")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--skip-sequential", action="store_true", help="leave out the run()-per-prompt baseline")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[None],
                        help="collect's batch size(s); several: one collect each, timed in turn (default: collect's)")
    parser.add_argument("--collect-only", action="store_true", help="leave out the tuned lens")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    root = pathlib.Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    train, heldout = bench_prompts(args.prompts, args.heldout)
    out: dict = {}
    with connect(args.server) as client:
        info = client.model_info()
        sites = client.sites("blocks.*.resid_post")
        print(f"model {info.name}, {info.n_layer} layers, n_embd {info.n_embd}; {len(train)} + {len(heldout)} prompts")

        out["collect"] = []
        for batch_size in args.batch_size:
            shutil.rmtree(root / "train", ignore_errors=True)
            print(f"[collect, batch_size {batch_size or 'default'}] load before {load()}")
            start = time.perf_counter()
            store = client.collect(train, root / "train", sites="blocks.*.resid_post", positions=[-1],
                                   dtype="float16", batch_size=batch_size)
            seconds = time.perf_counter() - start
            mb = store.nbytes_on_disk() / 1e6
            tokens = store.n_tokens
            out["collect"].append({"batch_size": store.manifest["batch_size"], "prompts": len(store), "tokens": tokens,
                                   "seconds": seconds, "mb_on_disk": mb, "prompts_per_s": len(store) / seconds,
                                   "tokens_per_s": tokens / seconds, "load_after": load()})
            print(f"[collect, batch_size {store.manifest['batch_size']}] {len(store)} prompts ({tokens} tokens) x "
                  f"{len(sites)} sites in {seconds:.1f} s: {len(store) / seconds:.1f} prompts/s, {tokens / seconds:.0f} "
                  f"tokens/s, {mb:.1f} MB on disk; load after {load()}")

        if not args.skip_sequential:
            print(f"[run() one at a time] load before {load()}")
            start = time.perf_counter()
            for prompt in train:
                client.run(prompt, capture=sites, positions=[-1], logits=False, dtype="float16")
            sequential = time.perf_counter() - start
            out["sequential"] = {"seconds": sequential, "prompts_per_s": len(train) / sequential, "load_after": load()}
            print(f"[run() one at a time] {sequential:.1f} s: {len(train) / sequential:.1f} prompts/s "
                  f"(the last collect: {sequential / seconds:.2f}x its speed); load after {load()}")
        if args.collect_only:
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
            return

        held = client.collect(heldout, root / "heldout", sites="blocks.*.resid_post", positions=[-1], dtype="float16")
        print(f"[tuned lens] load before {load()}")
        start = time.perf_counter()
        lens = client.fit_tuned_lens(store, steps=args.steps, batch_tokens=args.batch_tokens)
        fit_seconds = time.perf_counter() - start
        lens.save(root / "tuned_lens.npz")
        print(f"[tuned lens] fitted in {fit_seconds:.1f} s ({lens.training['n_train_tokens']} training tokens, "
              f"{args.steps} Adam steps of {args.batch_tokens} tokens); load after {load()}")
        head = client.lens_head()
        states, final = store_states(held)
        table = evaluate(head, states, final, lens)
        out["tuned_lens"] = {"fit_seconds": fit_seconds, "steps": args.steps, "batch_tokens": args.batch_tokens,
                             "training": lens.training, "load_after": load(),
                             "heldout_kl": {str(i): {"logit_lens": a, "tuned_lens": b} for i, (a, b) in table.items()}}
        print(f"\nheld-out mean KL(final || lens), nats, {len(heldout)} prompts of unseen templates x last position\n")
        print("| layer (block) | logit lens | tuned lens |\n| --- | --- | --- |")
        for i, (logit, tuned) in table.items():
            print(f"| {i - 1} | {logit:.3f} | {tuned:.3f} |")
        print(f"| {info.n_layer - 1} (last) | 0 | 0 |")
        worse = [i - 1 for i, (a, b) in table.items() if not b < a]
        print(f"\ntuned lens lower at every layer before the last: {not worse}" + (f" (not at {worse})" if worse else ""))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
