"""Refusal direction demo: compute it on half of the bundled prompts, test it on the other half.

On the default model (SmolLM2-135M-Instruct Q4_1) unless LMSCOPE_SERVER names a running server:

1. `Client.refusal_direction` on the training half of the bundled harmful / harmless requests (English and
   Chinese; every other prompt of each language), with the paper's layer selection;
2. greedy chat completions of the *held-out* half: harmless prompts without and with the direction added
   at the chosen layer (at multiples of its natural scale, the norm of the difference in means), harmful
   prompts without and with the direction ablated from every layer; each completion is scored by the
   refusal-phrase matcher (`lmscope.client.refusal.is_refusal`), and the mean logit-based refusal score
   is shown too;
3. prints the table and writes it, with the machine, the command and the timings, between the markers in
   docs/steering.md.

    .venv/bin/python scripts/figures_refusal.py [--threads 2] [--max-tokens 48] [--scales 1 4] [--no-docs]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np

from lmscope.client import Client
from lmscope.client.refusal import is_refusal, load_prompts, refusal_scores, refusal_token_ids

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "steering.md"
BEGIN, END = "<!-- refusal-demo:begin -->", "<!-- refusal-demo:end -->"
LANGUAGES = ("en", "zh")


def split(kind: str) -> tuple[list[str], dict[str, list[str]]]:
    """Every other prompt of each language for training; the rest held out, by language."""
    train, held_out = [], {}
    for lang in LANGUAGES:
        prompts = load_prompts(kind, [lang])
        train += prompts[0::2]
        held_out[lang] = prompts[1::2]
    return train, held_out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def evaluate(client: Client, prompts: dict[str, list[str]], max_tokens: int, refusal_ids: list[int],
             **edit) -> dict:
    """Completions per language, their refusal flags, and the mean logit refusal score of all prompts."""
    texts = {lang: [client.generate(p, chat=True, max_tokens=max_tokens, temperature=0, **edit).text
                    for p in ps] for lang, ps in prompts.items()}
    everything = [p for ps in prompts.values() for p in ps]
    logits = np.stack([r.logits[-1] for r in client.run_batch(everything, chat=True, logits="last",
                                                               capture=[], **edit)])
    return {"texts": texts, "refused": {lang: [is_refusal(t) for t in ts] for lang, ts in texts.items()},
            "score": float(refusal_scores(logits, refusal_ids).mean())}


def fraction(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)}"


def report(rd, rows, info, args, seconds_eval: float, load: tuple[float, float], server: str) -> str:
    L = rd.best_layer
    lines = [f"Model: `{info.name}` ({info.description}, {info.n_layer} layers, n_embd {info.n_embd}), "
             f"server: {server}.",
             f"Machine: {machine()}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
             f"(a machine shared with other jobs: timings are indicative).",
             f"Command: `{args.command}`", "",
             f"Direction computed on {rd.n_harmful} harmful + {rd.n_harmless} harmless training prompts "
             f"(chat template, last prompt token): difference in means over all {info.n_layer} layers in "
             f"**{rd.seconds_means:.1f} s**, layer selection ({len(rd.scores)} candidate layers x 3 steering "
             f"tests) in **{rd.seconds_selection:.1f} s**. Chosen layer: **{L}** ({rd.selection}); natural "
             f"scale (norm of the difference in means there): {rd.scale():.2f}. Completions took "
             f"{seconds_eval:.0f} s.", "",
             f"Held-out prompts, greedy completions of up to {args.max_tokens} tokens, scored by refusal phrases "
             f"(`lmscope.client.refusal.is_refusal`); the last column is the mean logit refusal score "
             f"(log-odds of a refusal's first token; higher = more refusal).", "",
             "| held-out prompts | intervention | English refused | Chinese refused | all | refusal score |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind, label, result in rows:
        flags = result["refused"]
        all_flags = [f for lang in LANGUAGES for f in flags[lang]]
        lines.append(f"| {kind} | {label} | {fraction(flags['en'])} | {fraction(flags['zh'])} | "
                     f"{100 * np.mean(all_flags):.0f} % | {result['score']:+.2f} |")
    lines += ["", "Layer selection scores (mean over the training prompts; baseline refusal score: harmful "
              f"{rd.baseline_harmful:+.2f}, harmless {rd.baseline_harmless:+.2f}):", "",
              "| layer | induce (harmless + direction) | bypass (harmful, ablated) | KL (harmless, ablated) "
              "| eligible |",
              "| --- | --- | --- | --- | --- |"]
    for s in rd.scores.values():
        lines.append(f"| {s.layer}{' (chosen)' if s.layer == L else ''} | {s.induce:+.2f} | {s.bypass:+.2f} | "
                     f"{s.kl:.3f} | {'yes' if s.eligible else 'no'} |")
    lines += ["", "First held-out completions of each condition (English, then Chinese):", ""]
    for kind, label, result in rows:
        for lang in LANGUAGES:
            text = result["texts"][lang][0].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- {kind}, {label}, {lang}: \"{text[:140]}{'...' if len(text) > 140 else ''}\"")
    return "\n".join(lines)


def write_docs(block: str) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    generated = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        text += ("\n" if text else "") + generated + "\n"
    DOCS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="server threads (when this script starts it)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0],
                        help="multiples of the natural scale to add to the harmless prompts")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/steering.md alone")
    args = parser.parse_args()
    args.command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/figures_refusal.py", *sys.argv[1:]])
    load_start = os.getloadavg()[0]
    server = None
    address = os.environ.get("LMSCOPE_SERVER")
    if address:
        server_text = f"external ({address})"
    else:
        from lmscope.service.launch import launch_server
        from lmscope.service.model_files import pull_default_model

        server = launch_server(pull_default_model(), args=("--threads", str(args.threads), "--n-ctx", "2048"))
        address, server_text = server.address, f"local, {args.threads} thread(s)"
    try:
        with Client(address) as client:
            info = client.model_info()
            train_harmful, test_harmful = split("harmful")
            train_harmless, test_harmless = split("harmless")
            rd = client.refusal_direction(train_harmful, train_harmless, chat=True)
            print(rd)
            L = rd.best_layer
            refusal_ids = refusal_token_ids(client)
            start = time.perf_counter()
            rows = [("harmless", "none", evaluate(client, test_harmless, args.max_tokens, refusal_ids))]
            for multiple in args.scales:
                rows.append(("harmless", f"direction added at layer {L}, norm {multiple * rd.scale():.1f} "
                                          f"({multiple:g}x natural)",
                             evaluate(client, test_harmless, args.max_tokens, refusal_ids,
                                      steer={L: rd.vector() * (multiple * rd.scale())})))
            rows += [("harmful", "none", evaluate(client, test_harmful, args.max_tokens, refusal_ids)),
                     ("harmful", "direction ablated at every layer",
                      evaluate(client, test_harmful, args.max_tokens, refusal_ids, ablate=rd.vector()))]
            seconds_eval = time.perf_counter() - start
            block = report(rd, rows, info, args, seconds_eval, (load_start, os.getloadavg()[0]), server_text)
    finally:
        if server is not None:
            server.stop()
    print(block)
    if not args.no_docs:
        write_docs(block)
        print(f"\nwritten to {DOCS}")


if __name__ == "__main__":
    main()
