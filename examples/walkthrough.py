# %% [markdown]
# # Inside a language model, layer by layer — an lmscope walkthrough
#
# Every demo of a lecture on LM internals, run for real on SmolLM2-135M-Instruct (a quantized GGUF file,
# 30 layers, on a CPU). Each section names the paper it reproduces and says in one line what to look for.
#
# This file is the single source: `python examples/walkthrough.py` runs it as a script (CI does), and
# `python scripts/sync_walkthrough.py --execute` turns it into `walkthrough.ipynb` with its outputs.
# It connects to the server named by `LMSCOPE_SERVER` (host:port) or starts one on the default model.
# Pictures go to `docs/walkthrough/`.

# %%
import atexit
import os
import pathlib

import matplotlib.pyplot as plt  # a notebook shows figures inline; a script without a display uses Agg
import numpy as np

from lmscope.client import Client

ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "pyproject.toml").exists())
FIGURES = ROOT / "docs" / "walkthrough"
FIGURES.mkdir(parents=True, exist_ok=True)

address = os.environ.get("LMSCOPE_SERVER")
if not address:
    from lmscope.service.launch import launch_server

    server = launch_server(args=("--n-ctx", "2048"))
    atexit.register(server.stop)
    address = server.address
c = Client(address)
info = c.model_info()
print(info)


def save(fig, name):
    fig.savefig(FIGURES / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"saved docs/walkthrough/{name}.png")


# %% [markdown]
# ## 1. Tokenization
# A model never sees characters, only token ids. Look for: a Chinese character is often *several* tokens
# (byte-level BPE splits rare characters into UTF-8 bytes), while common English words are one token.

# %%
for text in ["今天天氣真好！", "The weather is really nice today!"]:
    tokens = c.tokenize(text, add_special=False)
    print(f"{text!r}: {len(text)} characters -> {len(tokens)} tokens")
    for token_id, piece in zip(tokens.token_ids, tokens.pieces):
        print(f"   {token_id:>6}  {piece!r}")
