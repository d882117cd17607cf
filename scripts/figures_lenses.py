"""Figures for docs/lenses.md and the README, on the default model (SmolLM2-135M-Instruct Q4_1).

    python scripts/figures_lenses.py [--server HOST:PORT] [--out docs] [--label "SmolLM2-135M-Instruct Q4_1"]

- logit_lens.png: the logit lens of "The capital of France is" (every hidden state x every position;
  cells show the top-1 token, colour its probability, frames mark the prompt's real next token).
- pca.png: the last-token residual vectors of "The city of <name>" for the bundled world cities
  (client/data/world_cities.csv) at three depths, projected on their first two principal components
  (fitted per layer) and coloured by continent.

Without --server it starts a server on the default model (fetched once by `lmscope pull`).
"""
from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")

from _server import connect  # noqa: E402

from lmscope.client.datasets import world_cities  # noqa: E402

PROMPT = "The capital of France is"
LABEL_EVERY = 9  # label one city in LABEL_EVERY in the PCA panels, to stay readable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="use a running server instead of starting one")
    parser.add_argument("--label", help="model name for the titles (default: the GGUF file's general.name)")
    parser.add_argument("--out", default="docs", help="folder for the PNG files")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with connect(args.server) as client:
        info = client.model_info()
        label = args.label or info.name
        start = time.perf_counter()
        lens = client.logit_lens(PROMPT, top_k=5, targets=[" Paris"])
        print(f"logit lens: {time.perf_counter() - start:.2f} s")
        print(lens.table())
        lens.plot(title=f"{label}: logit lens of {PROMPT!r}", save=out / "logit_lens.png")

        cities = world_cities()
        layers = [2, info.n_layer // 2, info.n_layer - 1]
        start = time.perf_counter()
        projection = client.project(cities.prompts("The city of {city}"), layer=layers, method="pca")
        print(f"PCA of {len(cities)} cities at layers {layers}: {time.perf_counter() - start:.1f} s")
        continents = np.array(cities.continents)
        for layer in layers:
            means = {name: projection.coords[layer][continents == name, :2].mean(axis=0).round(1).tolist()
                     for name in sorted(set(cities.continents))}
            print(f"layer {layer}: mean (PC1, PC2) per continent {means}")
        labels = [name if i % LABEL_EVERY == 0 else "" for i, name in enumerate(cities.names)]
        projection.plot(labels=labels, color=cities.continents,
                        title=f"{label}: last-token states of {len(cities)} city names, PCA per layer",
                        save=out / "pca.png")
    print(f"wrote {out / 'logit_lens.png'} and {out / 'pca.png'}")


if __name__ == "__main__":
    main()
