"""How far llama.cpp's hidden states are from exact math, by default and with `lmscope serve --precise`, and
what the precise mode costs.

For each setting, on one model: 1 - the smallest cosine similarity, over every hidden state (embedding and every
block's output) at every position of a few prompts (English, Chinese, code), between the server's states and
the float64 numpy forward pass of the same GGUF weights (tests/reference.py, float32 KV cache); the worker's
resident memory; the median time of a 128-token run (every hidden state, all logits) over --repeat rounds.

    .venv/bin/python scripts/bench_precise.py [--model PATH] [--repeat 3]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

from lmscope.client import Client
from lmscope.service import procinfo
from lmscope.service.launch import launch_server
from lmscope.service.model_files import pull_default_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from reference import ReferenceModel  # noqa: E402  (the independent numpy forward pass)

PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin.",
           "今天天氣真好！我們去公園散步吧。",
           "def mean(xs):\n    return sum(xs) / len(xs)\n"]
LONG = ("The history of the old harbour town begins in Roman times, when a few fishermen settled on the banks "
        "of the river. Over the centuries it grew into a centre of trade, learning and the arts. ") * 4
SETTINGS = {"default": (), "--precise": ("--precise",)}


def cosines(states: np.ndarray, exact: np.ndarray) -> np.ndarray:
    states = states.astype(np.float64)
    return (states * exact).sum(-1) / np.linalg.norm(states, axis=-1) / np.linalg.norm(exact, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or pull_default_model(progress=None)
    reference = ReferenceModel(model, dtype=np.float64, kv_cache="f32")
    print(f"model {model}\n")
    print("| setting | weights, KV cache | 1 - min cosine to float64 | worker memory | 128 tokens, all logits |")
    print("| --- | --- | --- | --- | --- |")
    for name, flags in SETTINGS.items():
        with launch_server(model, args=("--threads", str(args.threads)) + flags) as server, \
                Client(server.address) as c:
            worst = 1.0
            for prompt in PROMPTS:
                ids = c.tokenize(prompt).token_ids
                acts = reference.forward(ids)
                exact = np.concatenate([acts["embed"][None], acts["resid_post"]])
                worst = min(worst, float(cosines(c.run(ids, logits=False).hidden_states, exact).min()))
            long_ids = c.tokenize(LONG).token_ids[:128]
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                c.run(long_ids)
                times.append(time.perf_counter() - start)
            info = c.model_info()
            workers = procinfo.server_rss_bytes(server.process.pid)["workers"]
            print(f"| {name} | {info.file_type}, {info.kv_cache_type} | {1 - worst:.1e} | {workers / 2**20:,.0f} MiB | "
                  f"{statistics.median(times) * 1e3:,.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
