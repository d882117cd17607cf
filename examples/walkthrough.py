# %% [markdown]
# # Inside a language model, layer by layer — an lmscope walkthrough
#
# Every demo of a lecture on LM internals, run for real on SmolLM2-135M-Instruct (a quantized GGUF file,
# 30 layers, on a CPU). Each section names the paper it reproduces and says in one line what to look for.
#
# This file is the single source: `python examples/walkthrough.py` runs it as a script (CI does), and
# `python scripts/dev_sync_walkthrough.py --execute` turns it into `walkthrough.ipynb` with its outputs.
# It connects to the server named by `LMSCOPE_SERVER` (host:port) or starts one on the default model.
# Pictures go to `docs/walkthrough/`.

# %%
import atexit
import os
import pathlib
import sys

import matplotlib.pyplot as plt  # a notebook shows figures inline; a script without a display uses Agg
import numpy as np

from lmscope.client import Client
from lmscope.client.heatmap import cjk_font

# Pictures go next to this file's repository (a notebook starts in its own folder); elsewhere, to ./docs.
HERE = pathlib.Path(__file__).resolve().parent if "__file__" in globals() else pathlib.Path.cwd()
ROOT = next((p for p in [HERE, *HERE.parents] if (p / "pyproject.toml").exists()), pathlib.Path.cwd())
FIGURES = ROOT / "docs" / "walkthrough"
FIGURES.mkdir(parents=True, exist_ok=True)
if cjk_font():  # draw Chinese labels when a CJK font is installed (scripts/setup.sh installs one)
    plt.rcParams["font.family"] = ["DejaVu Sans", cjk_font()]

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
    if "ipykernel" in sys.modules:  # in the notebook, show it too
        from IPython.display import display

        display(fig)
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


# %% [markdown]
# ## 2. The embedding table
# Each token id selects one row of the embedding table: the same token always gets the same row, and tokens
# used alike end up with similar rows (word2vec's observation, arXiv 1301.3781, holds inside LMs too).
# Analogies by vector arithmetic — Emb(冷) - Emb(cold) + Emb(small) ≈ Emb(小)? — are tried below with the
# honest result: in a small model's *input* embeddings they mostly do not work. Look for: sensible
# neighbours of " apple" and " king"; whether 小 / " queen" show up at all.

# %%
ids = c.tokenize(" apple apple", add_special=False).token_ids
rows = c.embedding_rows(ids)
print(f"' apple' is token {ids[0]}; its row has {rows.shape[1]} numbers; same token, same row: "
      f"{np.array_equal(rows[0], rows[1])}")
for word in [" apple", " king", " Paris"]:
    print(c.nearest_tokens(word, k=8))
for a, b, c_word, expected in [("冷", "cold", "small", "小"), (" king", " man", " woman", " queen")]:
    result = c.analogy(a, b, c_word, k=10)
    print(result)
    print(f"   rank of {expected!r} among the answers: "
          f"{next((i for i, t in enumerate(result.neighbours.tokens) if t == expected), 'not in the top 10')}")


# %% [markdown]
# ## 3. Layer by layer: contextual embeddings (arXiv 1909.00512)
# The embedding of a token is the same everywhere; its hidden state is not. Each layer mixes in context, so
# the same word in two different contexts drifts apart with depth. Look for: "Apple" the fruit vs the
# company (and 蘋果 in 來吃蘋果 vs 蘋果手機) starting at similarity 1.0 and separating in later layers.

# %%
pairs = {
    "Apple": ["Apple pie with cream is my favourite dessert.", "Apple released a new iPhone today."],
    "蘋果": ["我想來吃蘋果", "蘋果手機很貴"],
}
fig, ax = plt.subplots(figsize=(7, 3.5))
for word, contexts in pairs.items():
    similarity = c.contextual_similarity(word, contexts)
    ax.plot(range(len(similarity.layers)), similarity.mean_similarity, marker=".", label=f"{word}: {contexts}")
    print(word, np.round(similarity.mean_similarity[::5], 3))
ax.set_xlabel("hidden state (0 = embedding, L + 1 = output of block L)")
ax.set_ylabel("cosine similarity across contexts")
ax.legend(fontsize=7)
save(fig, "contextual_similarity")


# %% [markdown]
# ## 4. The LM head: logits -> softmax -> probabilities
# The last hidden state goes through the final norm and the LM head to give one logit per vocabulary entry;
# softmax turns them into probabilities, and the temperature sharpens (T < 1) or flattens (T > 1) them.
# SmolLM2 ties its embeddings: the LM head *is* the embedding table, so a logit is the dot product of the
# final-normed state with that token's embedding row. Look for: " Paris" on top; the curve flattening with T.

# %%
prompt = "The capital of France is"
run = c.run(prompt, capture=["ln_final"], logits="last", positions=[-1])
logits = run.logits[-1].astype(np.float64)
print(c.top_k(logits, k=5))
print("tied embeddings:", info.tied_embeddings)
top = c.top_k(logits, k=5)
rows = c.embedding_rows(top.ids)
by_hand = rows @ run.captures["ln_final"][-1]
print("logit = ln_final . embedding row:", np.round(by_hand, 3), "vs llama.cpp", np.round(top.logits, 3))

fig, ax = plt.subplots(figsize=(7, 3.5))
for temperature in (0.5, 1.0, 2.0):
    table = c.top_k(logits, k=15, temperature=temperature)
    ax.plot(range(15), table.probs, marker="o", label=f"T = {temperature}")
ax.set_xticks(range(15), [p.replace(" ", "␣") for p in c.top_k(logits, k=15).pieces], rotation=60)
ax.set_ylabel("probability")
ax.set_title(f"next token after {prompt!r}")
ax.legend()
save(fig, "temperature")


# %% [markdown]
# ## 5. Projection to low dimensions and linear probes (arXiv 2310.02207, "Language Models Represent Space and Time")
# Hidden states live in hundreds of dimensions; PCA shows their main axes, and a linear probe asks whether a
# property can be read off linearly. Look for: cities grouping by continent in the PCA picture, and the
# probe's R² for latitude/longitude rising in the middle layers.

# %%
from lmscope.client.datasets import world_cities

cities = world_cities()
every_fourth = slice(0, None, 4)  # ~120 cities from every continent keep this section quick
names = cities.names[every_fourth]
projection = c.project(names, layer=[4, 15, 25], progress=False)
save(projection.plot(labels=cities.continents[every_fourth]), "pca_cities")
coordinates = np.stack([cities.latitude[every_fourth], cities.longitude[every_fourth]], axis=1)
probe = c.probe(names, coordinates, layer=list(range(0, info.n_layer, 3)), output_names=["latitude", "longitude"],
                progress=False)
print(probe)
save(probe.plot(), "probe_cities")


# %% [markdown]
# ## 6. Representation engineering: the refusal direction (arXiv 2406.11717)
# Refusal is mediated by one direction: the difference between the mean hidden states of harmful and of
# harmless requests. Each candidate layer is tested by *adding* its direction to harmless prompts (do they
# start refusing?) and *ablating* it from harmful ones (do they stop?); the best layer wins. Look for: the
# steered harmless request turning into a refusal, and the ablated harmful request no longer refusing — a
# 135M model refuses weakly, so the table shows whatever really happens.

# %%
from lmscope.client import refusal

# The bundled prompts come with a fixed fit / validation / held-out split; a slice keeps this section quick.
train_harmful, test_harmful = (refusal.load_prompts("harmful", ["en"], split=s)[:14] for s in ("fit", "held_out"))
train_harmless, test_harmless = (refusal.load_prompts("harmless", ["en"], split=s)[:14] for s in ("fit", "held_out"))
rd = c.refusal_direction(train_harmful, train_harmless, chat=True, layers=[6, 10, 14, 18], progress=False)
print(rd)
print(f"{'layer':>5} {'induce':>8} {'bypass':>8} {'KL':>7}")
for layer, score in sorted(rd.scores.items()):
    print(f"{layer:>5} {score.induce:8.3f} {score.bypass:8.3f} {score.kl:7.3f}")

v, layer, scale = rd.vector(), rd.best_layer, rd.scale()
print(f"\nsteering at layer {layer} with {scale:.1f} x the unit direction; ablating it everywhere")
for prompt in test_harmless[:3]:
    plain = c.generate(prompt, chat=True, max_tokens=24)
    steered = c.generate(prompt, chat=True, max_tokens=24, steer={layer: scale * v})
    print(f"harmless {prompt!r}\n   plain:   {plain.text!r}\n   + dir:   {steered.text!r}")
for prompt in test_harmful[:3]:
    plain = c.generate(prompt, chat=True, max_tokens=24)
    ablated = c.generate(prompt, chat=True, max_tokens=24, ablate=v)
    print(f"harmful  {prompt!r}\n   plain:   {plain.text!r}\n   ablated: {ablated.text!r}")

# %% [markdown]
# The same experiment on a model that does refuse, Qwen2.5-Coder-1.5B-Instruct, when it has been pulled
# (`lmscope pull qwen2.5-coder-1.5b-instruct`; set-up does): a small slice here, the full run with its
# figures in docs/steering.md (`scripts/bench_refusal.py`). Look for: the held-out harmful requests refused
# at baseline and answered with the direction ablated, and harmless ones refused with it added.

# %%
try:
    from lmscope.service.model_files import QWEN25_CODER_15B, model_cache_dir

    qwen_path = model_cache_dir() / QWEN25_CODER_15B.filename
except ImportError:  # a client-only installation cannot start a server
    qwen_path = None
if qwen_path is not None and qwen_path.exists():
    from lmscope.service.launch import launch_server

    with launch_server(qwen_path, args=("--n-ctx", "2048")) as qwen_server, Client(qwen_server.address) as q:
        fit = [refusal.load_prompts(kind, ["en"], split="fit")[:8] for kind in ("harmful", "harmless")]
        val = [refusal.load_prompts(kind, ["en"], split="validation")[:4] for kind in ("harmful", "harmless")]
        held = [refusal.load_prompts(kind, ["en"], split="held_out")[:4] for kind in ("harmful", "harmless")]
        qwen_rd = q.refusal_direction(*fit, layers=[12, 18], val_harmful=val[0], val_harmless=val[1],
                                      progress=False)
        print(qwen_rd)
        evaluation = q.evaluate_refusal(qwen_rd, *held, max_tokens=12, progress=False)
        print(evaluation.table())
        for name in ("harmful", "harmful ablated", "harmless induced"):
            print(f"{name:>16}: {evaluation.measures[name].generations[0]!r}")
else:
    print("Qwen2.5-Coder-1.5B-Instruct is not in the model cache: `lmscope pull qwen2.5-coder-1.5b-instruct`")


# %% [markdown]
# ## 7. Logit lens (nostalgebraist 2020) and the latent language (arXiv 2402.10588)
# Apply the final norm and the LM head to every layer's hidden state, as if the model stopped there. Look
# for: " Paris" appearing only in the last layers; and, translating French to Chinese, the English word
# "flower" rising in the middle layers before 花 takes over — "do Llamas work in English?".

# %%
lens = c.logit_lens("The capital of France is", top_k=3)
print(lens.table(position=-1))
save(lens.plot(), "logit_lens")
latent = c.latent_language('Français: "fleur" - 中文: "', target="花", pivot="flower")
print(latent)
save(latent.plot(), "latent_language")

# %% [markdown]
# The same lens to explore (`lmscope.client.views`): hover a cell for that layer's top-k with
# probabilities and the targets' ranks; the framed cells predict the real next token. A notebook shows the
# result itself; a script writes the page (self-contained, no network) to open in a browser.

# %%
import tempfile

VIEWS = pathlib.Path(tempfile.mkdtemp(prefix="lmscope-views-"))
explore = c.logit_lens("The capital of France is Paris. The capital of Germany is", targets=[" Berlin", " Paris"])
explore.to_html(VIEWS / "logit_lens.html")
print(f"wrote {VIEWS / 'logit_lens.html'}")
explore


# %% [markdown]
# ## 8. Patchscopes: what does a hidden state mean? (arXiv 2401.06102)
# Take the hidden state of the last token of an entity name at one layer, patch it into a few-shot
# "describe x" prompt in place of `x`, and let the model talk. Look for: a description of the entity,
# although the target prompt never names it.

# %%
target = "Syria: country in the Middle East. Leonardo DiCaprio: American actor. x:"
for source in ["Diana, Princess of Wales", "Barack Obama", "the Eiffel Tower in Paris"]:
    ps = c.patchscope(source=source, source_layer=8, source_position=-1, target=target, target_layer=3,
                      target_position=-1, max_tokens=12)
    print(f"{source!r:32} -> {ps.text!r}")

# %% [markdown]
# Activation patching (causal tracing) asks where the model keeps what it needs: the clean run's hidden
# state at one (layer, position) is patched into the corrupted run, and the score is how much of the clean
# answer comes back (1 = all of it). Look for: the subject token carries it through the early and middle
# layers, then the last position does. Hover a cell for its value.

# %%
sweep = c.patch_sweep("The capital of France is", "The capital of Italy is")
sweep.to_html(VIEWS / "patch_sweep.html", normalized=True)
print(f"wrote {VIEWS / 'patch_sweep.html'}")
sweep


# %% [markdown]
# ## 9. Inside a layer: attention heads and FFN neurons
# Attention probabilities per head (arXiv 1706.03762): each row is a query token, each column a key; the
# mask is causal, so everything above the diagonal is 0. Then an FFN neuron read as a key-value memory
# (arXiv 2012.14913): its value vector (a column of the down projection) pushed through the LM head shows
# which tokens it promotes. Look for: heads that look at the previous token or at the first token.

# %%
att = c.attention("兩顆青蘋果", layers=[3, 10])
print(att.head_summary())
save(att.plot(layer=10, head=2), "attention_cjk")

neurons = c.neurons("The capital of France is Paris", layer=20)
strongest = int(neurons.top(position=-1, k=1)[0][0])
print(f"layer 20: neuron {strongest} fires most on the last token; its value vector through the LM head:")
print(c.neuron_top_tokens(layer=20, neuron=strongest, k=8))

# %% [markdown]
# To explore: every head of a layer as small multiples (hover one to enlarge it; hover a token to see
# where it attends and who attends to it), and the neuron's activation over a few texts beside the tokens
# it promotes.

# %%
heads = c.attention("The cat sat on the mat because it was tired, and the cat slept.", layers=[16])
heads.to_html(VIEWS / "attention.html")
print(f"wrote {VIEWS / 'attention.html'}")
heads

# %%
memory = c.neuron_activations(["The capital of France is Paris", "Berlin is the capital of Germany",
                               "The cat sat on the mat"], layer=20, neurons=[strongest])
memory.to_html(VIEWS / "neurons.html")
print(f"wrote {VIEWS / 'neurons.html'}")
memory


# %% [markdown]
# ## 10. Features, not neurons: a sparse autoencoder (arXiv 2406.04093)
# A neuron often fires for unrelated things; a sparse autoencoder (SAE) rewrites the residual stream as a
# sparse sum of many more directions ("features") that are easier to name. Here a small TopK SAE is fitted
# in seconds on the CPU from the activations of 24 passages of the Python reference (shipped with Python),
# then two features are explained and one steers generation. Look for: the top contexts name a feature (here
# the word "exception" being raised); at this middle layer the tokens its direction promotes say less. The
# fit in docs/sae.md is the full-size one (4,608 features on 105,000 tokens).

# %%
from lmscope.client.corpus import python_reference

SAE_SITE = "blocks.15.resid_post"
passages = python_reference(max_chars=400)[:24]
sae_store = c.collect(passages, pathlib.Path(tempfile.mkdtemp()) / "store", sites=[SAE_SITE], positions=None,
                      progress=False)
sae = c.fit_sae(sae_store, SAE_SITE, n_features=1152, k=16, epochs=8, batch_size=256, lr=2e-3, threads=1,
                progress=False)
print(sae, "on", sae_store.n_tokens, "tokens")
print(c.sae_loss_recovered(sae, python_reference(max_chars=400)[24:26], progress=False))

# %%
run = c.run("If the condition is false, an exception is raised", capture=[SAE_SITE], logits=False)
codes = sae.encode(run.captures[SAE_SITE])
where = c.token_labels(run.token_ids).index(" exception")
on_exception = int(np.argmax(codes[where]))      # the feature most active on " exception"
busiest = int(np.argmax((codes > 0).sum(axis=0)))  # the feature active on most tokens of this prompt
features = c.sae_features(sae, sae_store, [on_exception, busiest], contexts=4, window=6)
print(features)
features.to_html(VIEWS / "sae_features.html")
print(f"wrote {VIEWS / 'sae_features.html'}")

# %% [markdown]
# Steering with a feature adds its decoder direction to the residual stream at every position, in units of
# the feature's activation. Look for: at once and three times its largest activation in the store the
# continuation drifts; far beyond that (the residual norm is ~170 here) the text breaks down.

# %%
for times in (0, 1, 3):
    edit = [sae.steering(on_exception, times * features[on_exception].max_activation)] if times else []
    print(f"x{times}:", repr(c.generate("My favourite food is", max_tokens=16, interventions=edit).text))
