"""Tiny deterministic GGUF models of every supported architecture family, for tests.

:func:`build_tiny_model` writes a small random-weight model that llama.cpp loads and decodes like any real
GGUF file, in a few tens of milliseconds, without a network or another model file. Tests use it
wherever the behaviour of the service, not the quality of the model, is under test.

What the file contains:

* By default (``family="llama"``) ``general.architecture = "llama"`` with RMSNorm, rotary embeddings
  (normal / non-NeoX mode, base 10000), grouped-query attention and a SwiGLU feed-forward block: the same
  graph llama.cpp builds for Llama, SmolLM2 and friends. The other :data:`FAMILIES` (``qwen2``, ``qwen3``,
  ``gemma2``, ``gemma3``, ``phi3``, ``mixtral``, ``qwen2moe``, ``qwen3moe``) add what their llama.cpp graphs read: q/k/v
  biases, QK-norm, scaled embeddings, post-norms, GeGLU, soft-capping, sliding-window layers (window of
  4 tokens, so that ten-token prompts cross it), fused matrices, routed and shared experts. Each uses the
  tensor names, shapes and metadata keys llama.cpp's loader expects for that architecture.
* A real byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer ``"gpt-2"``): the 256
  byte tokens (GPT-2's byte-to-unicode alphabet, so any UTF-8 text, Chinese included, tokenizes without
  an unknown token), :data:`N_MERGES` merges learned deterministically from a small built-in English text
  (so common words like ``" the"``, ``" capital"`` or ``" France"`` are single tokens) and four control
  tokens: ``<|bos|>`` (BOS, added to every prompt), ``<|endoftext|>`` (EOS), ``<|im_start|>`` and
  ``<|im_end|>`` (end of a chat turn). The vocabulary has :data:`TINY_VOCAB_SIZE` tokens.
* A ChatML ``tokenizer.chat_template`` (when ``chat_template=True``).
* Random weights from ``numpy.random.default_rng(seed)``, scaled so that every activation stays of order
  one, attention patterns are neither uniform nor one-hot and the logits (standard deviation about 4)
  depend on the prompt. The same arguments always give byte-identical files.

``weight_type`` chooses how the matrices (and stacks of expert matrices) are stored: ``"f32"``, ``"f16"``
or ``"q8_0"`` (quantized with :func:`gguf.quants.quantize`; it needs ``n_embd`` and ``n_ff`` to be
multiples of 32). Norm weights, biases and the shared-expert gate vector are always F32. ``tied=True``
leaves out ``output.weight``: llama.cpp then uses ``token_embd.weight`` as the output matrix (the default
for Gemma, the only layout gemma2 loads).

Example::

    >>> import tempfile, pathlib
    >>> from lmscope.service.testing import build_tiny_model, TINY_VOCAB_SIZE
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf"
    >>> path = build_tiny_model(out, n_layer=2, tied=True, weight_type="q8_0")
    >>> path == out and path.stat().st_size > 0
    True
    >>> import gguf
    >>> reader = gguf.GGUFReader(path)
    >>> len(reader.fields["tokenizer.ggml.tokens"].data) == TINY_VOCAB_SIZE
    True
    >>> "output.weight" in {t.name for t in reader.tensors}
    False

From a shell: ``python scripts/dev_make_tiny_model.py /tmp/tiny.gguf --n-layer 2 --tied --weight-type q8_0``
(``--family gemma3`` for another family).
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import architectures

__all__ = [
    "build_tiny_model",
    "Family",
    "FAMILIES",
    "TINY_EXPERTS",
    "TINY_EXPERTS_USED",
    "tiny_vocab",
    "N_MERGES",
    "SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "CHATML_TEMPLATE",
    "WEIGHT_TYPES",
]

#: Control tokens, in id order (ids 0-3).
SPECIAL_TOKENS = ("<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(4)

#: Number of BPE merges learned from :data:`_CORPUS`.
N_MERGES = 240

#: Number of tokens in the tiny models' vocabulary (checked by :func:`tiny_vocab`).
TINY_VOCAB_SIZE = 500

#: ChatML, the format SmolLM2-Instruct and Qwen use; llama.cpp recognises it by ``<|im_start|>``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEIGHT_TYPES = ("f32", "f16", "q8_0")

# Training text for the merges: plain English written for this module. Only the merges learned from it
# matter, so it favours the words that appear in test prompts.
_CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. Paris is a city in France, and Berlin is
a city in Germany. What is the capital of France? The answer is Paris.
The weather is nice today. It is a good day to go for a walk in the park with a friend.
I have two green apples and three red apples. She has one apple and he has two. They have many apples.
The cat sat on the mat. The dog ran in the garden. A bird is singing in the tree near the house.
This is a small model for testing. The model reads the text, one token at a time, and predicts the next
token. We look inside the model to see what it does with each word of the prompt.
There are many languages in the world: English, French, German, Spanish, Chinese and Japanese.
Water is wet and fire is hot. The sun is bright in the morning and the moon is bright at night.
My name is Alice. Her name is Mary and his name is John. What is your name? Where do you live?
Hello, how are you? I am fine, thank you. Please tell me a story about a king and a queen.
Once upon a time there was a little girl who lived in a village near the forest.
She was very happy when she found the old book, and she read it all day long.
You should always be kind to other people, because they will be kind to you.
The number one comes before two, and two comes before three, four and five.
It was the best of times, it was the worst of times. In the beginning there was the word.
Love is patient, love is kind. The quick brown fox jumps over the lazy dog.
"""

_PRETOKEN = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE training on ``text``: most frequent adjacent pair first, ties by pair order."""
    alphabet = _byte_alphabet()
    counts = Counter(
        tuple(alphabet[b] for b in piece.encode("utf-8")) for piece in _PRETOKEN.findall(text)
    )
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pairs: Counter = Counter()
    for word, count in zip(words, freq):
        for pair in zip(word, word[1:]):
            pairs[pair] += count
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for word, count in zip(words, freq):
            if len(word) < 2 or best[0] not in word:
                continue
            i = 0
            merged = []
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            if len(merged) == len(word):
                continue
            for pair in zip(word, word[1:]):
                pairs[pair] -= count
            for pair in zip(merged, merged[1:]):
                pairs[pair] += count
            word[:] = merged
        pairs = +pairs  # drop pairs whose count fell to zero
    return merges


@functools.lru_cache(maxsize=1)
def tiny_vocab() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """The tokenizer of every tiny model: ``(tokens, token_types, merges)``.

    Token ids: 0-3 the :data:`SPECIAL_TOKENS` (type 3, control), 4-259 the byte tokens in byte order
    (type 1, normal), then one token per distinct merge result in merge order.
    """
    tokens = list(SPECIAL_TOKENS) + _byte_alphabet()
    types = [3] * len(SPECIAL_TOKENS) + [1] * 256
    seen = set(tokens)
    merges = _learn_merges(_CORPUS, N_MERGES)
    if len(merges) != N_MERGES:  # the corpus is fixed: this is a programming error
        raise AssertionError(f"learned {len(merges)} merges, expected {N_MERGES}")
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(1)
    if len(tokens) != TINY_VOCAB_SIZE:
        raise AssertionError(f"vocabulary has {len(tokens)} tokens, expected {TINY_VOCAB_SIZE}")
    return tuple(tokens), tuple(types), tuple(f"{a} {b}" for a, b in merges)


#: Routed experts of every tiny mixture of experts, and how many of them each token runs.
TINY_EXPERTS, TINY_EXPERTS_USED = 4, 2


def _feature(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.entry, name), doc=doc)


@dataclass(frozen=True)
class Family:
    """A tiny model of one family of the architecture registry (see :data:`FAMILIES`).

    ``entry`` is the family's registry record (``service/architectures.py``): its ``general.architecture``
    and graph features (q/k/v biases, QK-norm, post-norms, FFN layout, fused QKV, experts), which the file
    gets exactly, each mirroring a graph feature of llama.cpp's builder for the architecture
    (``vendor/llama.cpp/src/models/<architecture>.cpp`` in the llama-cpp-python sdist). The fields below are
    the tiny model's own sizes and values.
    """

    entry: architectures.Family
    sliding_window: int = 0       # window of the sliding-window layers, in tokens (0: none)
    sliding_window_pattern: Optional[int] = None  # written to the file; llama.cpp's default when None
    attn_softcap: float = 0.0     # attention logit soft-capping (gemma2)
    final_softcap: float = 0.0    # final logit soft-capping (gemma2)
    head_dim_factor: int = 1      # head_dim = factor * n_embd / n_head (Gemma 3 and Qwen3 use wide heads)
    rope_base: float = 10000.0
    rope_base_swa: Optional[float] = None  # RoPE base of the sliding-window layers, when it differs
    tied: Optional[bool] = None   # the only output layout llama.cpp loads for this family, if any
    default_tied: bool = False

    architecture = _feature("architecture", "the file's general.architecture")
    qkv_bias = _feature("qkv_bias", "q/k/v projections with biases (qwen2, qwen2moe)")
    qk_norm = _feature("qk_norm", "RMSNorm over each head of q and k before RoPE (qwen3, gemma3)")
    post_norms = _feature("post_norms", "RMSNorm on each branch's output before it joins the stream (gemma2/3)")
    ffn = _feature("ffn", '"swiglu", "geglu" or "fused_swiglu" (one ffn_up holding [gate; up], phi3)')
    fused_qkv = _feature("fused_qkv", "one attn_qkv matrix holding [q; k; v] (phi3)")
    shared_expert = _feature("shared_expert", "a sigmoid-gated shared expert beside the routed ones (qwen2moe)")

    @property
    def embed_scale(self) -> bool:
        """Token embeddings multiplied by sqrt(n_embd) (gemma2/3)."""
        return self.entry.embedding_scale is not None

    @property
    def n_expert(self) -> int:
        """Routed experts per block (0: a dense FFN)."""
        return TINY_EXPERTS if self.entry.moe else 0

    @property
    def n_expert_used(self) -> int:
        """Experts each token is routed to."""
        return TINY_EXPERTS_USED if self.entry.moe else 0


#: The model families :func:`build_tiny_model` writes, by ``family=`` name (the registry's short name).
FAMILIES = {family.entry.label: family for family in (
    # Llama 2/3, Mistral, SmolLM: RMSNorm, normal-mode RoPE, SwiGLU.
    Family(architectures.LLAMA),
    # Qwen 2 / 2.5: llama plus q/k/v biases, NeoX RoPE.
    Family(architectures.QWEN2),
    # Qwen 3: QK-norm, no biases, heads wider than n_embd / n_head.
    Family(architectures.QWEN3, head_dim_factor=2),
    # Gemma 2: scaled embeddings, pre+post norms around both branches, GeGLU, attention and final logit
    # soft-capping, sliding-window attention on every other layer (0, 2, ...), tied head. The caps are far
    # lower than the real 50 / 30 so that they bend the tiny model's small logits.
    Family(architectures.GEMMA2, sliding_window=4, attn_softcap=5.0, final_softcap=10.0, tied=True,
           default_tied=True),
    # Gemma 3: Gemma 2 without soft-capping, plus QK-norm, wide heads and local layers (0, 1, 3 with a
    # pattern of 3) with their own RoPE base.
    Family(architectures.GEMMA3, sliding_window=4, sliding_window_pattern=3, head_dim_factor=2, rope_base=1e6,
           rope_base_swa=1e4, default_tied=True),
    # Phi-3: fused QKV and fused gate+up matrices, NeoX RoPE.
    Family(architectures.PHI3),
    # Mixtral: the llama architecture with a routed mixture of SwiGLU experts (top-2 of 4, renormalised).
    Family(architectures.LLAMA_MOE),
    # Qwen 2 MoE: top-2 of 4 experts (weights not renormalised) plus a gated shared expert; untied head.
    Family(architectures.QWEN2_MOE, tied=False),
    # Qwen 3 MoE: Qwen 3's attention (QK-norm, wide heads) with top-2 of 4 renormalised experts.
    Family(architectures.QWEN3_MOE, head_dim_factor=2),
)}


def build_tiny_model(
    path: str | os.PathLike,
    *,
    family: str = "llama",
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    seed: int = 0,
    tied: Optional[bool] = None,
    weight_type: str = "f32",
    n_ctx_train: int = 512,
    chat_template: bool = True,
    massive_activation: float = 0.0,
) -> Path:
    """Write a deterministic random-weight GGUF model of ``family`` to ``path`` and return it as a ``Path``.

    ``family`` is a key of :data:`FAMILIES`. ``n_embd`` must be divisible by ``n_head`` with an even head
    size, ``n_head`` by ``n_head_kv``; ``weight_type`` is one of :data:`WEIGHT_TYPES`. ``tied=None`` takes
    the family's usual layout (untied, except Gemma); Gemma 2 and Qwen 2 MoE accept only their own.
    Mixture-of-experts families give each expert ``n_ff`` (mixtral) or ``n_ff // 2`` (qwen2moe, whose
    shared expert has ``n_ff``). Existing files are overwritten; missing parent folders are created.

    ``massive_activation=g > 0`` plants a massive activation at the first position (BOS), the way attention
    sinks of real models have one: BOS's embedding row is ``4 e_0`` (its other components 0) and every other
    row's component 0 is negative; no branch writes stream component 0 (row 0 of every output and down
    projection is 0), so it stays as embedded; in every block FFN neuron 0 (of every expert) reads component
    0 with gate and up weights ``g`` and writes nothing (column 0 of down is 0). At BOS, neuron 0 is then about
    (8 g)^2 (g = 10: thousands) beside neurons of order one; elsewhere act(gate) of a negative input is about
    0. The values do not read component 0 (as an attention sink's value is small, Sun et al. 2024, "Massive
    activations in large language models"). The 8-bit rounding of the FFN's activations before the down
    projection wipes out BOS's other neurons in neuron 0's block, which is what the fidelity map must flag
    (tests/integration/test_fidelity.py).
    """
    import gguf  # the server extra; imported here so that importing this module stays cheap

    fam = FAMILIES.get(family)
    if fam is None:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, not {family!r}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, not {weight_type!r}")
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head),
                        ("n_head_kv", n_head_kv), ("n_ff", n_ff), ("n_ctx_train", n_ctx_train)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError("n_embd must be a multiple of n_head with an even head size")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    n_ff_exp = n_ff // 2 if fam.shared_expert else n_ff
    if weight_type == "q8_0" and (n_embd % 32 or n_ff % 32 or n_ff_exp % 32):
        raise ValueError("q8_0 needs n_embd and n_ff (and n_ff // 2 for qwen2moe) to be multiples of 32")
    if not massive_activation >= 0:
        raise ValueError(f"massive_activation must be >= 0, not {massive_activation!r}")
    if tied is None:
        tied = fam.default_tied
    if fam.tied is not None and tied != fam.tied:
        raise ValueError(f"llama.cpp loads {family} models only with tied={fam.tied}")

    tokens, token_types, merges = tiny_vocab()
    n_vocab = len(tokens)
    head_dim = fam.head_dim_factor * n_embd // n_head
    n_embd_q = head_dim * n_head
    n_embd_kv = head_dim * n_head_kv

    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[weight_type]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[weight_type]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), fam.architecture)
    arch = fam.architecture

    writer.add_name("lmscope-tiny")
    writer.add_description("random-weight test model written by lmscope.service.testing")
    writer.add_file_type(int(file_type))
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(fam.rope_base)
    writer.add_layer_norm_rms_eps(1e-5 if not fam.post_norms else 1e-6)
    writer.add_vocab_size(n_vocab)
    if head_dim != n_embd // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if fam.sliding_window:
        writer.add_sliding_window(fam.sliding_window)
    if fam.sliding_window_pattern is not None:
        writer.add_uint32(f"{arch}.attention.sliding_window_pattern", fam.sliding_window_pattern)
    if fam.rope_base_swa is not None:
        writer.add_float32(f"{arch}.rope.freq_base_swa", fam.rope_base_swa)
    if fam.attn_softcap:
        writer.add_attn_logit_softcapping(fam.attn_softcap)
    if fam.final_softcap:
        writer.add_final_logit_softcapping(fam.final_softcap)
    if fam.n_expert:
        writer.add_expert_count(fam.n_expert)
        writer.add_expert_used_count(fam.n_expert_used)
        if arch != "llama":  # Qwen's loaders read the experts' width from here (llama uses n_ff)
            writer.add_expert_feed_forward_length(n_ff_exp)
    if fam.shared_expert:
        writer.add_expert_shared_feed_forward_length(n_ff)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(token_types))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(CHATML_TEMPLATE)

    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def norm_weight(n=n_embd, mean=1.0):
        return (mean + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def add_matrix(name, array):
        # numpy (rows, cols) = ggml ne [cols, rows]: a (n_out, n_in) array is the ggml {n_in, n_out}
        # weight that llama.cpp multiplies activations with; a leading expert axis becomes ne[2].
        if massive_activation:
            array = _plant(name, array, massive_activation, n_ff_exp if "_exps" in name else n_ff, n_embd_kv)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    def add_ffn(prefix, suffix, n_in, n_hidden, lead=()):
        """Gate, up and down projections (SwiGLU / GeGLU), optionally one per expert (``lead``)."""
        add_matrix(f"{prefix}.ffn_gate{suffix}.weight", normal(lead + (n_hidden, n_in), 1.0 / np.sqrt(n_in)))
        add_matrix(f"{prefix}.ffn_up{suffix}.weight", normal(lead + (n_hidden, n_in), 1.0 / np.sqrt(n_in)))
        add_matrix(f"{prefix}.ffn_down{suffix}.weight", normal(lead + (n_in, n_hidden), 1.0 / np.sqrt(n_hidden)))

    # Scales: rows of token_embd have norm about 4, so tied logits of the normalised final state have a
    # standard deviation of about 4 (Gemma's sqrt(n_embd) scale makes its embeddings' entries about 4, a
    # stream that the post-normed branches, of size about 1, then move); projections out of a normalised
    # state use 1/sqrt(fan_in), with q and k a little larger so that attention is not uniform (QK-norm
    # weights of about 1.5 do the same after the norm). Routers are sharper still, so that no token sits
    # near a tie between its k-th and (k+1)-th expert.
    embedding = normal((n_vocab, n_embd), 4.0 / np.sqrt(n_embd))
    if massive_activation:
        embedding[:, 0] = -np.abs(embedding[:, 0])
        embedding[BOS_ID] = 0.0
        embedding[BOS_ID, 0] = 4.0
    add_matrix("token_embd.weight", embedding)
    for il in range(n_layer):
        blk = f"blk.{il}"
        writer.add_tensor(f"{blk}.attn_norm.weight", norm_weight())
        q_std = k_std = 1.5 / np.sqrt(n_embd)
        v_std = 1.0 / np.sqrt(n_embd)
        if fam.fused_qkv:
            add_matrix(f"{blk}.attn_qkv.weight", np.concatenate([
                normal((n_embd_q, n_embd), q_std), normal((n_embd_kv, n_embd), k_std),
                normal((n_embd_kv, n_embd), v_std)]))
        else:
            add_matrix(f"{blk}.attn_q.weight", normal((n_embd_q, n_embd), q_std))
            add_matrix(f"{blk}.attn_k.weight", normal((n_embd_kv, n_embd), k_std))
            add_matrix(f"{blk}.attn_v.weight", normal((n_embd_kv, n_embd), v_std))
        if fam.qkv_bias:
            writer.add_tensor(f"{blk}.attn_q.bias", normal(n_embd_q, 0.5))
            writer.add_tensor(f"{blk}.attn_k.bias", normal(n_embd_kv, 0.5))
            writer.add_tensor(f"{blk}.attn_v.bias", normal(n_embd_kv, 0.5))
        if fam.qk_norm:
            writer.add_tensor(f"{blk}.attn_q_norm.weight", norm_weight(head_dim, 1.5))
            writer.add_tensor(f"{blk}.attn_k_norm.weight", norm_weight(head_dim, 1.5))
        add_matrix(f"{blk}.attn_output.weight", normal((n_embd, n_embd_q), 1.0 / np.sqrt(n_embd_q)))
        if fam.post_norms:
            writer.add_tensor(f"{blk}.post_attention_norm.weight", norm_weight())
        writer.add_tensor(f"{blk}.ffn_norm.weight", norm_weight())
        if fam.n_expert:
            add_matrix(f"{blk}.ffn_gate_inp.weight", normal((fam.n_expert, n_embd), 3.0 / np.sqrt(n_embd)))
            add_ffn(blk, "_exps", n_embd, n_ff_exp, lead=(fam.n_expert,))
            if fam.shared_expert:
                writer.add_tensor(f"{blk}.ffn_gate_inp_shexp.weight", normal(n_embd, 1.0 / np.sqrt(n_embd)))
                add_ffn(blk, "_shexp", n_embd, n_ff)
        elif fam.ffn == "fused_swiglu":
            add_matrix(f"{blk}.ffn_up.weight", normal((2 * n_ff, n_embd), 1.0 / np.sqrt(n_embd)))
            add_matrix(f"{blk}.ffn_down.weight", normal((n_embd, n_ff), 1.0 / np.sqrt(n_ff)))
        else:
            add_ffn(blk, "", n_embd, n_ff)
        if fam.post_norms:
            writer.add_tensor(f"{blk}.post_ffw_norm.weight", norm_weight())
    writer.add_tensor("output_norm.weight", norm_weight())
    if not tied:
        add_matrix("output.weight", normal((n_vocab, n_embd), 4.0 / np.sqrt(n_embd)))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _plant(name: str, array: np.ndarray, gain: float, n_ff: int, n_embd_kv: int) -> np.ndarray:
    """A weight matrix of `build_tiny_model` with the massive activation planted (see its docstring)."""
    kind = name.split(".")[-2]
    array = array.copy()
    if kind == "attn_v":
        array[:, 0] = 0.0                   # a sink's value: not made of its massive component
    if kind == "attn_qkv":
        array[-n_embd_kv:, 0] = 0.0
    if kind in ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp"):
        array[..., 0, :] = 0.0              # no branch writes stream component 0
    if kind in ("ffn_down", "ffn_down_exps", "ffn_down_shexp"):
        array[..., :, 0] = 0.0              # neuron 0 writes nothing
    if kind in ("ffn_gate", "ffn_up", "ffn_gate_exps", "ffn_up_exps", "ffn_gate_shexp", "ffn_up_shexp"):
        array[..., 0, :] = 0.0
        array[..., 0, 0] = gain             # neuron 0 reads component 0 only
        if kind == "ffn_up" and array.shape[-2] == 2 * n_ff:  # phi3's fused [gate; up]
            array[..., n_ff, :] = 0.0
            array[..., n_ff, 0] = gain
    return array
