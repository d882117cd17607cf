"""The refusal experiment of arXiv 2406.11717 on Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), end to end, timed.

1. `Client.refusal_direction`: difference in means at the last post-instruction token (the end of the chat
   template's assistant header) on the *fit* split of the bundled English prompts (40 + 40), the paper's
   layer selection (bypass, induce, KL) on part of the *validation* split;
2. `Client.evaluate_refusal` on the *held-out* split (20 + 20): baseline, ablated and induced refusal rates,
   by refusal-token probability and by greedy generations, and KL on harmless prompts;
3. `lmscope.service.abliterate`: the abliterated GGUF (size, write time, re-quantization cost per tensor),
   loaded by lmscope (held-out refusal, KL of its harmless next-token distributions to run-time ablation and
   to the original) and by plain llama.cpp (`llama_cpp.Llama`: load time, greedy chat answers);
4. prints a markdown block (and, with --docs, writes it between the markers in docs/steering.md) and draws
   the per-layer refusal rates of the selection to docs/refusal_layers.png.

    .venv/bin/python scripts/bench_refusal.py [--layers 6:22:2] [--validation 10] [--max-tokens 16] [--docs]

The machine is shared: the block states the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time

import numpy as np

from lmscope.client import Client
from lmscope.client.refusal import is_refusal, load_prompts, next_token_kl, refusal_token_ids
from lmscope.service.abliterate import abliterate
from lmscope.service.launch import launch_server
from lmscope.service.model_files import pull_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "steering.md"
FIGURE = ROOT / "docs" / "refusal_layers.png"
BEGIN, END = "<!-- refusal-qwen:begin -->", "<!-- refusal-qwen:end -->"
MODEL = "qwen2.5-coder-1.5b-instruct"


def layer_range(text: str) -> list[int]:
    start, stop, step = (int(x) for x in text.split(":"))
    return list(range(start, stop, step))


def plot(direction, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(direction.scores)
    scores = [direction.scores[L] for L in layers]
    fig, (rates, kl) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    rates.axhline(direction.baseline_harmful_rate, color="C3", ls=":", label="harmful, baseline")
    rates.axhline(direction.baseline_harmless_rate, color="C0", ls=":", label="harmless, baseline")
    rates.plot(layers, [s.bypass_rate for s in scores], "o-", color="C3", label="harmful, direction ablated")
    rates.plot(layers, [s.induce_rate for s in scores], "s-", color="C0", label="harmless, direction added")
    rates.axvline(direction.best_layer, color="grey", lw=0.8)
    rates.set_ylabel("refused (p(refusal tokens) > 1/2)")
    rates.set_ylim(-0.05, 1.05)
    rates.legend(fontsize=8, loc="center left")
    rates.set_title(f"{MODEL}: refusal direction per layer (validation prompts; chosen layer {direction.best_layer})",
                    fontsize=9)
    kl.plot(layers, [s.kl for s in scores], "d-", color="C2")
    kl.axhline(0.1, color="C2", ls=":", lw=0.8)
    kl.set_ylabel("KL harmless,\nablated (nats)")
    kl.set_xlabel("layer (output of block L)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def timed_server(path, threads: int):
    start = time.perf_counter()
    server = launch_server(path, args=("--threads", str(threads), "--n-ctx", "2048"))
    return server, time.perf_counter() - start


def plain_llama_cpp(path: pathlib.Path, prompts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    from llama_cpp import Llama

    start = time.perf_counter()
    model = Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    seconds = time.perf_counter() - start
    answers = [model.create_chat_completion([{"role": "user", "content": p}], max_tokens=max_tokens,
                                            temperature=0.0)["choices"][0]["message"]["content"] for p in prompts]
    model.close()
    return seconds, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="GGUF path or model name (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", default="6:22:2", help="candidate layers start:stop:step (default %(default)s)")
    parser.add_argument("--validation", type=int, default=10, help="validation prompts of each kind")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--corrections", type=int, default=3, help="abliteration error-feedback rounds")
    parser.add_argument("--out", default=None, help="keep the abliterated GGUF here (default: a temporary file)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    parser.add_argument("--docs", action="store_true", help="write the block into docs/steering.md and the plot")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/bench_refusal.py", *sys.argv[1:]])
    load = [os.getloadavg()[0]]
    model_path = pull_model(args.model, progress=None) if not os.path.exists(args.model) else pathlib.Path(args.model)
    fit = [load_prompts(k, ["en"], split="fit") for k in ("harmful", "harmless")]
    validation = [load_prompts(k, ["en"], split="validation")[:args.validation] for k in ("harmful", "harmless")]
    held_out = [load_prompts(k, ["en"], split="held_out") for k in ("harmful", "harmless")]
    figures: dict = {"command": command}
    server, figures["server_start_s"] = timed_server(model_path, args.threads)
    start = time.perf_counter()
    try:
        with Client(server.address) as client:
            direction = client.refusal_direction(*fit, layers=layer_range(args.layers), val_harmful=validation[0],
                                                 val_harmless=validation[1])
            print(direction)
            evaluation = client.evaluate_refusal(direction, *held_out, max_tokens=args.max_tokens)
            print(evaluation)
            runtime_ablated = evaluation.measures["harmless ablated"].logits
            refusal_ids = refusal_token_ids(client)
    finally:
        server.stop()
    figures["experiment_s"] = time.perf_counter() - start
    load.append(os.getloadavg()[0])

    with tempfile.TemporaryDirectory(prefix="lmscope-abliterated-") as folder:
        out = pathlib.Path(args.out or pathlib.Path(folder) / f"{model_path.stem}.abliterated.gguf")
        report = abliterate(model_path, direction.vector(), out, layer=direction.best_layer,
                            corrections=args.corrections, threads=args.threads, progress=print)
        edited, figures["abliterated_lmscope_start_s"] = timed_server(out, args.threads)
        try:
            with Client(edited.address) as client:
                harmful = client.measure_refusal(held_out[0], condition="harmful, abliterated file",
                                                 max_tokens=args.max_tokens, refusal_tokens=refusal_ids,
                                                 progress=True)
                harmless = client.measure_refusal(held_out[1], condition="harmless, abliterated file",
                                                  generate=False, refusal_tokens=refusal_ids, progress=True)
        finally:
            edited.stop()
        figures["plain_llama_cpp_load_s"], answers = plain_llama_cpp(out, held_out[0][:3], args.max_tokens)
        figures["plain_llama_cpp_load_original_s"], original_answers = plain_llama_cpp(model_path, held_out[0][:3],
                                                                                        args.max_tokens)
    load.append(os.getloadavg()[0])

    kl_to_runtime = next_token_kl(runtime_ablated, harmless.logits)
    kl_to_original = next_token_kl(evaluation.measures["harmless"].logits, harmless.logits)
    by_type: dict[str, list] = {}
    for edit in report.edits:
        by_type.setdefault(edit.type_name, []).append(edit)
    requantization = "\n".join(
        f"| {kind} | {len(edits)} | {np.mean([e.change for e in edits]):.2%} | "
        f"{np.mean([e.requantize_error for e in edits]):.2%} | {np.mean([e.surviving_write for e in edits]):.1%} |"
        for kind, edits in sorted(by_type.items()))
    rd = direction
    layer_rows = "\n".join(f"| {L} | {s.bypass_rate:.0%} | {s.induce_rate:.0%} | {s.kl:.3f} | "
                           f"{'yes' if s.eligible else 'no'} |" for L, s in sorted(rd.scores.items()))
    block = f"""Measured by `{command}` (load average {load[0]:.1f} at the start, {load[1]:.1f} after the experiment,
{load[2]:.1f} at the end, on 2 shared cores: the machine ran other agents' jobs; times scale with the load).

Direction: difference in means at the last token of the chat template (after `<|im_start|>assistant\\n`) over
the *fit* split ({rd.n_harmful} harmful / {rd.n_harmless} harmless English prompts), {rd.seconds_means:.0f} s;
selection over layers {sorted(rd.scores)} on {len(validation[0])} + {len(validation[1])} *validation* prompts,
{rd.seconds_selection:.0f} s: {rd.selection}. **Chosen layer {rd.best_layer}** (norm of the difference in means
{rd.scale():.1f}). Per candidate layer (validation prompts, refusal-token measure; baseline: harmful
{rd.baseline_harmful_rate:.0%}, harmless {rd.baseline_harmless_rate:.0%}):

| layer | harmful refused, ablated | harmless refused, added | KL harmless ablated | eligible |
|---|---|---|---|---|
{layer_rows}

Held-out prompts ({len(held_out[0])} harmful, {len(held_out[1])} harmless), greedy, evaluation {evaluation.seconds:.0f} s:

{evaluation.table()}

| abliterated file | n | refusal tokens p > 1/2 | refusal phrase in {args.max_tokens} greedy tokens |
|---|---|---|---|
| harmful | {len(held_out[0])} | {harmful.token_rate:.0%} | {harmful.generation_rate:.0%} |
| harmless | {len(held_out[1])} | {harmless.token_rate:.0%} | - |

KL of the abliterated file's harmless next-token distributions: to run-time ablation
{kl_to_runtime.mean():.4f} nats (max {kl_to_runtime.max():.4f}), to the original model {kl_to_original.mean():.4f}
(run-time ablation to the original: {evaluation.mean_kl:.4f}).

Abliteration: {report.summary()}; {args.corrections} error-feedback rounds. Load time: lmscope server
{figures["abliterated_lmscope_start_s"]:.1f} s (the original {figures["server_start_s"]:.1f} s), plain llama.cpp
`llama_cpp.Llama` {figures["plain_llama_cpp_load_s"]:.1f} s (the original
{figures["plain_llama_cpp_load_original_s"]:.1f} s). Re-quantization, mean per tensor type:

| type | tensors | moved by the projection | error re-quantization adds | direction's write left |
|---|---|---|---|---|
{requantization}

Plain llama.cpp (`create_chat_completion`, greedy), first held-out harmful prompts:

""" + "\n".join(f"- {p!r}: original {o!r} ({'refusal' if is_refusal(o) else 'answer'}); abliterated {a!r} "
                f"({'refusal' if is_refusal(a) else 'answer'})"
                for p, o, a in zip(held_out[0], original_answers, answers)) + f"""

Whole experiment (directions, selection, evaluation): {figures["experiment_s"] / 60:.1f} min.
"""
    print(block)
    figures.update(load=load, layer=rd.best_layer, evaluation={name: {"token": m.token_rate, "generation":
                   m.generation_rate} for name, m in evaluation.measures.items()}, kl=evaluation.mean_kl,
                   abliterated={"token": harmful.token_rate, "generation": harmful.generation_rate,
                                "kl_to_runtime": float(kl_to_runtime.mean()),
                                "kl_to_original": float(kl_to_original.mean()), "bytes": report.bytes,
                                "seconds": report.seconds})
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    if args.docs:
        text = DOCS.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            sys.exit(f"{DOCS} lacks the markers {BEGIN} ... {END}")
        head, rest = text.split(BEGIN, 1)
        DOCS.write_text(head + BEGIN + "\n" + block + END + rest.split(END, 1)[1], encoding="utf-8")
        plot(rd, FIGURE)
        print(f"written to {DOCS} and {FIGURE}")


if __name__ == "__main__":
    main()
