"""`lmscope demo`: a two-minute tour of what lmscope shows, on the default model.

On a server started on the default model (unless `--server` or `--model` says otherwise), it prints: the
model, how a sentence becomes tokens, the next-token table, every layer's hidden state, a logit lens over
the layers, and a short chat answer with its speed.
"""
from __future__ import annotations

import time

import numpy as np

from .client import Client


def demo(c: Client) -> int:
    """The tour, on the server `c` talks to (`lmscope demo` connects or starts one: `lmscope.client.serving`)."""
    info = c.model_info()
    print(f"\n== model\n{info}")

    text = "今天天氣真好！"
    tokens = c.tokenize(text, add_special=False)
    print(f"\n== tokens of {text!r}: {len(tokens)} tokens for {len(text)} characters")
    print("   ids   ", tokens.token_ids)
    print("   bytes ", [p.hex(" ") for p in tokens.pieces])

    prompt = "The capital of France is"
    start = time.perf_counter()
    run = c.run(prompt)
    elapsed = (time.perf_counter() - start) * 1e3
    print(f"\n== forward pass of {prompt!r}: {len(run.token_ids)} tokens, "
          f"server {run.decode_ms:.0f} ms, round trip {elapsed:.0f} ms")
    print(f"   hidden_states {run.hidden_states.shape} (embedding + {info.n_layer} block outputs), "
          f"logits {run.logits.shape}")
    print("   next token:")
    print(c.top_k(run.logits[-1], k=5))

    target_id = c.token_id(" Paris")
    lens = c.lens_vectors(run.hidden_states[:, -1], top_k=1, target_ids=[target_id])
    pieces = c.tokenize_pieces(lens["top_ids"][:, 0])
    print("\n== logit lens at the last token (final norm + LM head applied to each layer's hidden state)")
    print(f"   {'layer':>5}  {'top-1':<14} {'p(top-1)':>8}  {'p( Paris)':>9}  {'rank':>5}")
    for i in range(0, info.n_layer + 1, max(1, info.n_layer // 10)):
        name = "embed" if i == 0 else str(i - 1)
        print(f"   {name:>5}  {pieces[i]!r:<14} {lens['top_probs'][i, 0]:8.3f}  "
              f"{lens['target_probs'][i, 0]:9.4f}  {lens['target_ranks'][i, 0]:>5}")

    question = "What is the capital of France?"
    generation = c.generate(question, chat=True, max_tokens=32)
    print(f"\n== chat: {question!r}\n   {generation.text!r}  "
          f"({len(generation.token_ids)} tokens, {generation.tokens_per_second:.0f} tok/s)")
    norms = np.linalg.norm(run.hidden_states[:, -1], axis=-1)
    print(f"\n== residual-stream norm of the last token, layer by layer: "
          f"{' '.join(f'{n:.0f}' for n in norms[::3])}")
    return 0
