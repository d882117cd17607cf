"""The peer of scripts/bench_transformers.py: Hugging Face transformers, fp32, on the same GGUF file, in its own process.

    python scripts/bench_transformers_peer.py WORKLOAD.json     (run by bench_transformers.py; needs `pip install -e ".[bench]"`)

transformers loads the GGUF itself (`from_pretrained(dir, gguf_file=...)`: every tensor dequantized to
float32, llama.cpp's q/k permutation undone), so both tools run the same weights. The workload file (token
ids chosen by bench_transformers.py, so both tools see identical inputs) says what to time; results go to stdout as
JSON lines: {"ready": ...} as soon as the first hidden states exist (bench_transformers.py stamps the cold start when it
reads that line), then {"results": ...}.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    work = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(work["threads"])
    model_path = Path(work["model"])
    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                 dtype=torch.float32).eval()
    prompt = torch.tensor([work["prompt_ids"]])
    with torch.inference_mode():
        first = model(prompt[:, :8], output_hidden_states=True)
    print(json.dumps({"ready": len(first.hidden_states)}), flush=True)
    if work.get("cold_only"):
        return
    repeat = work["repeat"]
    out: dict = {"torch": torch.__version__}
    import transformers

    out["transformers"] = transformers.__version__
    layers = model.model.layers
    with torch.inference_mode():
        # 128-token prompt: every hidden state + all logits (what output_hidden_states gives), and plain.
        model(prompt, output_hidden_states=True)  # warm-up
        out["prompt_hidden_ms"] = _median_ms(lambda: model(prompt, output_hidden_states=True), repeat)
        out["prompt_plain_ms"] = _median_ms(lambda: model(prompt, logits_to_keep=1), repeat)
        states = model(prompt, output_hidden_states=True)
        out["hidden_last_row"] = torch.stack([h[0, -1] for h in states.hidden_states]).tolist()
        out["logits_argmax"] = states.logits[0].argmax(-1).tolist()

        # Greedy generation, plain / steered (a hook adds a vector to one block's output) / ablated (hooks
        # project a direction out of the embeddings and every block's output).
        steer_layer, vector = work["steer_layer"], torch.tensor(work["steer_vector"])
        direction = torch.tensor(work["ablate_direction"])
        direction = direction / direction.norm()

        def add_vector(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden += vector
            return output

        def project_out(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden -= (hidden @ direction)[..., None] * direction
            return output

        def generate(n_tokens: int) -> float:
            ids = torch.tensor([work["chat_prompt_ids"]])
            result = model(ids, use_cache=True)
            cache, token = result.past_key_values, result.logits[0, -1].argmax()
            start = time.perf_counter()
            for _ in range(n_tokens - 1):
                result = model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache, token = result.past_key_values, result.logits[0, -1].argmax()
            return n_tokens / (time.perf_counter() - start)

        n_gen = work["generate_tokens"]
        out["generate_tok_s"] = statistics.median(generate(n_gen) for _ in range(repeat))
        hook = layers[steer_layer].register_forward_hook(add_vector)
        out["generate_steered_tok_s"] = statistics.median(generate(n_gen) for _ in range(repeat))
        hook.remove()
        hooks = [module.register_forward_hook(project_out) for module in [model.model.embed_tokens, *layers]]
        out["generate_ablated_tok_s"] = statistics.median(generate(n_gen) for _ in range(repeat))
        for hook in hooks:
            hook.remove()

        # Batch: hidden states at the last position of every layer for many short prompts, left-padded
        # batches (transformers' fastest way), and one prompt at a time.
        batch_ids, batch_size = work["batch_ids"], work["batch_size"]

        def batched():
            rows = []
            for start in range(0, len(batch_ids), batch_size):
                part = batch_ids[start:start + batch_size]
                width = max(len(p) for p in part)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in part])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
                states = model(ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
                rows.append(torch.stack([h[:, -1] for h in states], 1))
            return torch.cat(rows)

        def sequential():
            return [torch.stack([h[0, -1] for h in model(torch.tensor([p]), output_hidden_states=True,
                                                         logits_to_keep=1).hidden_states]) for p in batch_ids]
        out["batch_batched_ms"] = _median_ms(batched, 1)
        out["batch_sequential_ms"] = _median_ms(sequential, 1)

        # Logit lens over every hidden state and position: final norm + LM head + softmax + top-10.
        norm, head = model.model.norm, model.lm_head
        hidden = torch.stack(model(prompt, output_hidden_states=True).hidden_states)[:, 0]

        def lens():
            probs = torch.softmax(head(norm(hidden)), dim=-1)
            return probs.topk(10, dim=-1)
        out["lens_ms"] = _median_ms(lens, repeat)
    out["peak_rss_mb"] = _status_mb("VmHWM")
    out["rss_mb"] = _status_mb("VmRSS")
    print(json.dumps({"results": out}), flush=True)


if __name__ == "__main__":
    main()
