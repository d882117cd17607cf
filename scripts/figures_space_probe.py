"""Space probe (after Gurnee & Tegmark 2023, "Language Models Represent Space and Time"): how well a
linear read-out of each layer's residual stream recovers a city's latitude and longitude.

    python scripts/figures_space_probe.py [--server HOST:PORT] [--template "The city of {city}"] [--out docs/space_probe.png]
                                  [--label "SmolLM2-135M-Instruct Q4_1"] [--store DIR]

Each of the 466 bundled cities (client/data/world_cities.csv) is one prompt ("The city of Paris");
the state at the last token of every hidden state (embedding + each block) feeds a ridge regression, 5-fold
cross-validated (`Client.probe`). The figure shows held-out R^2 per layer for latitude and longitude; 0 is
what predicting the mean scores. The template may use {city}, {country}, {continent}: with the country in
the prompt the probe mostly reads the country's token, which is an easier task.

--store DIR keeps the activations in an activation store (`Client.collect`): the first run collects them
(resuming if interrupted), later runs probe straight from the files, without a server.
"""
from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")

from _server import connect  # noqa: E402

from lmscope.client import Client  # noqa: E402
from lmscope.client.datasets import world_cities  # noqa: E402
from lmscope.client.store import ActivationStore  # noqa: E402


def _complete_store(path: str, prompts: list[str]) -> ActivationStore | None:
    """The store at `path` if it already holds exactly these prompts, else None (collect first)."""
    try:
        store = ActivationStore.open(path)
    except FileNotFoundError:
        return None
    return store if store.prompts == prompts else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="use a running server instead of starting one")
    parser.add_argument("--label", help="model name for the titles (default: the GGUF file's general.name)")
    parser.add_argument("--template", default="The city of {city}", help="prompt per city (default: %(default)r)")
    parser.add_argument("--position", default="-1", help="token position to read, or 'mean' (default -1)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", default="docs/space_probe.png")
    parser.add_argument("--store", help="collect into / probe from this activation store directory")
    args = parser.parse_args()
    position = args.position if args.position == "mean" else int(args.position)
    cities = world_cities()
    prompts = cities.prompts(args.template)
    probe = dict(position=position, folds=args.folds, output_names=["latitude", "longitude"])
    start = time.perf_counter()
    stored = _complete_store(args.store, prompts) if args.store else None
    if stored is not None:  # everything is on disk: no server at all
        label = args.label or stored.model["name"]
        result = Client("127.0.0.1:9").probe(stored, cities.coordinates, **probe)  # never connects: a store needs no server
        print(f"{len(cities)} prompts from {stored}, {len(result.layers)} layers: {time.perf_counter() - start:.1f} s")
    else:
        with connect(args.server) as client:
            label = args.label or client.model_info().name
            data = prompts
            if args.store:
                data = client.collect(prompts, args.store, sites=["embed", "blocks.*.resid_post"],
                                      positions=None if position == "mean" else [position], dtype="float32")
            result = client.probe(data, cities.coordinates, **probe)
            print(f"{len(cities)} prompts, {len(result.layers)} layers: {time.perf_counter() - start:.1f} s")
    print(result)
    result.plot(title=f"{label}: linear probe for city coordinates (prompt {args.template!r}, "
                      f"{len(cities)} cities)", save=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
