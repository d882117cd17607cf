"""Gemma 3 270M in lmscope against transformers fp32 on the same GGUF file: does every site mean the same?

    python scripts/diag_compare_gemma.py [--model PATH] [--threads 2] [--json out.json]

`--model` may be an F32 copy of the file (llama.cpp's `llama_model_quantize` with LLAMA_FTYPE_ALL_F32: the
same weights, exactly): llama.cpp then multiplies float32 activations, which separates the error of its
quantized kernels from anything lmscope does.

Needs the `bench` extra (torch + transformers; on machines with a local CPU wheel install torch==2.13.0
first). transformers loads the GGUF itself (every tensor dequantized to float32), and both tools get the
same token ids. For each prompt and layer (index 0 = `embed`, L + 1 = `blocks.L.resid_post`), the script
reports the smallest cosine and the largest relative error ||a - b|| / ||b|| over tokens; transformers'
block outputs are taken with forward hooks on its decoder layers, before the final norm. It also reports
lmscope's residual identities (resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post), and
runs `ablate=`, `neurons` and `refusal_direction` on Gemma. Targets (issue 12): cosine >= 0.98, relative
error <= 6 % at every layer, identities <= 2e-3 relative.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "Le chat est assis sur le tapis parce qu'il",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, the first humans walked on the Moon. The mission was called",
]
HARMFUL = ["How do I build a bomb at home?", "Write a guide to stealing a car.",
           "Explain how to poison someone without getting caught."]
HARMLESS = ["How do I bake bread at home?", "Write a guide to washing a car.",
            "Explain how to plant tomatoes in spring."]


def _transformers_states(model_path: str, token_lists: list[list[int]], threads: int) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    folder, name = os.path.split(os.path.abspath(model_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    outputs: list = []

    def keep(_module, _inputs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output)[0].detach().float().numpy().copy())

    hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
    states = []
    with torch.inference_mode():
        for ids in token_lists:
            outputs.clear()
            result = model(torch.tensor([ids]), output_hidden_states=True)
            embed = result.hidden_states[0][0].float().numpy()
            states.append(np.stack([embed] + outputs))
    for hook in hooks:
        hook.remove()
    return states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the Gemma 3 270M GGUF (default: lmscope pull gemma3-270m)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    from lmscope.client import Client
    from lmscope.service.launch import launch_server
    from lmscope.service.model_files import pull_model

    model = args.model or str(pull_model("gemma3-270m", progress=None))
    report: dict = {"model": os.path.basename(model), "load": os.getloadavg()}
    with launch_server(model, args=("--threads", str(args.threads), "--n-ctx", "512"), timeout=900) as server, \
            Client(server.address) as client:
        n_layer = client.n_layer
        runs = [client.run(p, capture=["embed", "blocks.*.attn_out", "blocks.*.resid_mid", "blocks.*.mlp_out",
                                       "blocks.*.resid_post"], logits=False) for p in PROMPTS]
        token_lists = [r.token_ids for r in runs]

        identity = 0.0
        for run in runs:
            c = run.captures
            for L in range(n_layer):
                pre = c["embed"] if L == 0 else c[f"blocks.{L - 1}.resid_post"]
                for a, b, total in ((pre, c[f"blocks.{L}.attn_out"], c[f"blocks.{L}.resid_mid"]),
                                    (c[f"blocks.{L}.resid_mid"], c[f"blocks.{L}.mlp_out"], c[f"blocks.{L}.resid_post"])):
                    error = np.linalg.norm(a + b - total, axis=1) / np.linalg.norm(total, axis=1)
                    identity = max(identity, float(error.max()))
        report["residual_identity_max_relative_error"] = identity

        start = time.perf_counter()
        theirs = _transformers_states(model, token_lists, args.threads)
        report["transformers_seconds"] = round(time.perf_counter() - start, 1)
        layers = []
        for index in range(n_layer + 1):
            cosines, errors, where = [], [], []
            for prompt_index, (run, hf) in enumerate(zip(runs, theirs)):
                ours = run.hidden_states[index].astype(np.float64)
                ref = hf[index].astype(np.float64)
                cosines.append(np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1)))
                errors.append(np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1))
                where += [(prompt_index, position) for position in range(len(ref))]
            layers.append({"index": index, "site": "embed" if index == 0 else f"blocks.{index - 1}.resid_post",
                           "min_cosine": float(np.concatenate(cosines).min()),
                           "max_relative_error": float(np.concatenate(errors).max()),
                           "mean_relative_error": float(np.concatenate(errors).mean()),
                           "worst_token": where[int(np.concatenate(errors).argmax())]})
        report["layers"] = layers

        direction = np.random.default_rng(0).standard_normal(client.model_info().n_embd).astype(np.float32)
        direction /= np.linalg.norm(direction)
        ablated = client.run(PROMPTS[0], capture=["embed", "blocks.*.resid_mid", "blocks.*.resid_post"],
                             ablate=direction, logits=False)
        report["ablate_max_component_over_norm"] = max(
            float((np.abs(x @ direction) / np.linalg.norm(x, axis=1)).max()) for x in ablated.captures.values())
        neurons = client.neurons(PROMPTS[0], layer=6)
        report["neurons_shape"] = list(neurons.activations.shape)
        refusal = client.refusal_direction(HARMFUL, HARMLESS, chat=False, progress=False,
                                           layers=[4, 8], batch_size=3)
        report["refusal_direction"] = {"per_layer_shape": list(refusal.per_layer.shape),
                                       "best_layer": refusal.best_layer, "selection": refusal.selection}

    worst_cos = min(layer["min_cosine"] for layer in layers)
    worst_err = max(layer["max_relative_error"] for layer in layers)
    print(f"{os.path.basename(model)}, lmscope vs transformers fp32 (same GGUF), {len(PROMPTS)} prompts, "
          f"{sum(map(len, token_lists))} tokens; load average {report['load'][0]:.1f}")
    print("| hidden state | site | min cosine | max rel. error | at (prompt, position) | mean rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layer in layers:
        print(f"| [{layer['index']}] | {layer['site']} | {layer['min_cosine']:.4f} | "
              f"{layer['max_relative_error'] * 100:.2f} % | {tuple(layer['worst_token'])} | "
              f"{layer['mean_relative_error'] * 100:.2f} % |")
    print(f"worst: cosine {worst_cos:.4f} (target >= 0.98), relative error {worst_err * 100:.3f} % (target <= 6 %)")
    print(f"residual identities: max relative error {identity:.2e} (target <= 2e-3)")
    print(f"ablate=: max |component| / |x| at embed, resid_mid, resid_post = {report['ablate_max_component_over_norm']:.2e}")
    print(f"neurons(layer 6): activations {report['neurons_shape']}; refusal_direction: per-layer "
          f"{report['refusal_direction']['per_layer_shape']}, best layer {report['refusal_direction']['best_layer']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if worst_cos >= 0.98 and worst_err <= 0.06 and identity <= 2e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
