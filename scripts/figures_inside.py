"""The figures and examples of docs/inside.md, on the default model (SmolLM2-135M-Instruct Q4_1).

    .venv/bin/python scripts/figures_inside.py            # writes docs/attention.png, docs/patch_sweep.png
                                                          # and prints the examples as Markdown

Starts its own server on a free port. The attention heatmap of the Chinese prompt ("兩顆青蘋果", two green
apples) is drawn only when a CJK font is installed; on Debian/Ubuntu: ``sudo apt-get install fonts-noto-cjk``
(then remove ``~/.cache/matplotlib`` so that matplotlib sees the new font). Without one it is skipped.
Generation is greedy, so the outputs printed are reproducible with the same model file and llama.cpp build.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")

from lmscope.client import Client  # noqa: E402
from lmscope.client.activation_patching import IDENTITY_PROMPT  # noqa: E402
from lmscope.client.heatmap import cjk_font  # noqa: E402
from lmscope.service.launch import launch_server  # noqa: E402
from lmscope.service.model_files import pull_default_model  # noqa: E402

SENTENCE = "The cat sat on the mat because it was tired, and the cat slept."
CJK_PROMPT = "兩顆青蘋果"
ATTENTION_LAYER, ATTENTION_HEAD = 16, 0
ENTITY_TARGET = "Syria: country in the Middle East. Leonardo DiCaprio: American actor. x:"
SOURCES = ["Diana, Princess of Wales", "The Eiffel Tower is in Paris", "Barack Obama"]
CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--out", default="docs", help="folder for the PNG files")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(exist_ok=True)
    model = args.model or pull_default_model(progress=None)
    start = time.perf_counter()
    with launch_server(model, args=("--threads", "2", "--n-ctx", "1024")) as server, Client(server.address) as c:
        print(f"model: {c.model_info()!r}\n")
        attention_figures(c, out)
        patchscopes(c)
        patch_sweep(c, out)
        neurons(c)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


def attention_figures(c: Client, out: pathlib.Path) -> None:
    att = c.attention(SENTENCE)
    att.plot(ATTENTION_LAYER, ATTENTION_HEAD, save=out / "attention.png")
    print(f"wrote {out / 'attention.png'}: layer {ATTENTION_LAYER} head {ATTENTION_HEAD}, {SENTENCE!r}\n")
    rows = att.head_summary().rows()
    print("Heads with the highest previous-token score on that sentence:\n")
    print("| layer | head | entropy (nats) | previous-token | first-token |\n| --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: -r["previous_token"])[:5]:
        print(f"| {r['layer']} | {r['head']} | {r['entropy']:.2f} | {r['previous_token']:.2f} | "
              f"{r['first_token']:.2f} |")
    print()
    if cjk_font() is None:
        print(f"no CJK font installed: skipped the heatmap of {CJK_PROMPT!r} (apt-get install fonts-noto-cjk)\n")
        return
    cjk = c.attention(CJK_PROMPT, layers=[ATTENTION_LAYER])
    cjk.plot(ATTENTION_LAYER, ATTENTION_HEAD, save=out / "attention_cjk.png")
    print(f"wrote {out / 'attention_cjk.png'} with font {cjk_font()}; tokens {cjk.tokens}\n")


def patchscopes(c: Client) -> None:
    print("Patchscopes, the issue's entity-description target (source layer 8 -> target layer 3, 20 tokens):\n")
    print("| source (last token's state) | generated after the target prompt |\n| --- | --- |")
    print(f"| (none: unpatched) | {c.generate(ENTITY_TARGET, max_tokens=20).text!r} |")
    for source in SOURCES:
        ps = c.patchscope(source, source_layer=8, target=ENTITY_TARGET, target_layer=3, max_tokens=20)
        print(f"| {source} | {ps.text!r} |")
    print("\nThe default token-identity target, same layer in and out (12 tokens):\n")
    print("| source | layer | generated |\n| --- | --- | --- |")
    print(f"| (none: unpatched) | - | {c.generate(IDENTITY_PROMPT, max_tokens=12).text!r} |")
    for source in SOURCES:
        for layer in (2, 8, 15):
            ps = c.patchscope(source, source_layer=layer, max_tokens=12)
            print(f"| {source} ({ps.source_token!r}) | {layer} | {ps.text!r} |")
    print()


def patch_sweep(c: Client, out: pathlib.Path) -> None:
    sweep = c.patch_sweep(CLEAN, CORRUPTED)
    sweep.plot(normalized=True, save=out / "patch_sweep.png")
    print(f"wrote {out / 'patch_sweep.png'}: {sweep!r}\n")


def neurons(c: Client) -> None:
    layer = 20
    acts = c.neurons(CLEAN, layer)
    ids, values = acts.top(position=-1, k=1)
    neuron = int(ids[0])
    print(f"Strongest layer-{layer} neuron on the last token of {CLEAN!r}: {neuron} ({values[0]:.2f})\n")
    print("```\n" + repr(c.neuron_top_tokens(layer, neuron, k=8)) + "\n```\n")
    corpus = [CLEAN, CORRUPTED, SENTENCE, "Berlin is the capital of Germany.", "Madrid is in Spain.",
              "I had pasta for dinner.", "The river flows to the sea.", "Tokyo is a large city in Japan."]
    print("```\n" + repr(c.top_activating(corpus, layer, neuron, k=6, progress=False)) + "\n```")


if __name__ == "__main__":
    main()
