"""Result types: small dataclasses holding numpy arrays, with a readable repr."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ModelInfo:
    architecture: str
    name: str
    description: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_ctx: int
    tied_embeddings: bool
    tensor_types: dict[str, int]
    file_type: str
    has_chat_template: bool
    chat_template: str
    bos_token_id: int
    eos_token_id: int
    capture_sites: list[str]
    fingerprint: str
    n_params: int
    file_size: int
    limits: dict[str, int]
    backend: str
    n_gpu_layers: int
    n_workers: int = 1
    unavailable_sites: dict[str, str] = field(default_factory=dict)  # site or "blocks.*.<kind>" -> why not offered
    embedding_scale: float = 1.0            # embed = embedding rows * this (Gemma: sqrt(n_embd))
    final_logit_softcapping: float = 0.0    # logits = cap * tanh(x / cap); 0 = none
    site_rules: str = ""                    # the registry entry that placed the sites (docs/architectures.md)
    verification: dict[str, float] = field(default_factory=dict)  # start-up check -> worst relative error
    unembed_error: str = ""                 # why the lens is disabled; empty when verified
    memory: dict[str, int] = field(default_factory=dict)  # expected bytes by part (proto MemoryEstimate)
    flash_attention: bool = True            # runs without an attention capture use flash attention (--flash-attn)
    batch_invariant: bool = False           # each prompt of a batch decoded as if alone (--batch-invariant)
    ffn_value_tensor: str = ""              # "blk.{L}.ffn_down.weight"; empty for mixtures of experts

    @classmethod
    def from_proto(cls, message) -> "ModelInfo":
        values = {}
        for name in cls.__dataclass_fields__:
            if name in ("limits", "memory"):
                part = getattr(message, name)
                values[name] = {f.name: getattr(part, f.name) for f in part.DESCRIPTOR.fields}
            else:
                value = getattr(message, name)
                values[name] = dict(value) if name in ("tensor_types", "unavailable_sites", "verification") else (
                    list(value) if name == "capture_sites" else value)
        return cls(**values)

    def __repr__(self) -> str:
        types = ", ".join(f"{k}:{v}" for k, v in sorted(self.tensor_types.items()))
        return (f"ModelInfo({self.name!r}, {self.architecture}, {self.description}; n_layer={self.n_layer}, "
                f"n_embd={self.n_embd}, n_head={self.n_head}/{self.n_head_kv} kv, n_ff={self.n_ff}, "
                f"n_vocab={self.n_vocab}, n_ctx={self.n_ctx}/{self.n_ctx_train} train, "
                f"tied={self.tied_embeddings}, chat_template={self.has_chat_template}, tensors[{types}], "
                f"{len(self.capture_sites)} capture sites ({len(self.unavailable_sites)} not offered), "
                f"fingerprint={self.fingerprint[:12]})")

    def memory_lines(self) -> list[str]:
        """The server's expected resident memory by part, in MiB, for people."""
        m = self.memory
        if not m.get("per_worker"):
            return ["expected memory: not reported by this server"]
        mib = lambda key: f"{m[key] / 2**20:,.1f} MiB"  # noqa: E731
        total = m["mapped_weights"] + self.n_workers * m["per_worker"]
        return [f"expected memory: {total / 2**20:,.1f} MiB = mapped weights {mib('mapped_weights')} (shared) "
                f"+ {self.n_workers} worker(s) x {mib('per_worker')}, plus each process's runtime",
                f"  per context (x{m['contexts']}): KV cache up to {mib('kv_cache')} (it grows with the requests), "
                f"compute buffer {mib('compute_buffer')} (n_ubatch {m['n_ubatch']}), output buffer "
                f"{mib('output_buffer')}",
                f"  per request: reduction budget {mib('reduction_budget')}"]


@dataclass
class Tokens:
    token_ids: list[int]
    pieces: list[bytes]
    text: str

    @property
    def strings(self) -> list[str]:
        """Each piece decoded on its own (a piece that is part of a multi-byte character shows as \\ufffd)."""
        return [p.decode("utf-8", "replace") for p in self.pieces]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{p!r}" for i, p in zip(self.token_ids[:24], self.pieces[:24]))
        more = f", ... {len(self) - 24} more" if len(self) > 24 else ""
        return f"Tokens({len(self)}: {shown}{more})"


@dataclass
class Run:
    """One prompt's forward pass.

    captures: site name -> array, one row per returned position (see `lmscope.proto.sites` for shapes).
    logits: (n_positions, n_vocab), or (1, n_vocab) when only the last token's were asked, or None.
    positions: the prompt positions the rows belong to.
    """
    token_ids: list[int]
    positions: list[int]
    logits: np.ndarray | None
    captures: dict[str, np.ndarray]
    n_layer: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    decode_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def hidden_states(self) -> np.ndarray:
        """(n_layer + 1, n_positions, n_embd): [0] the embeddings, [L + 1] the output of block L."""
        names = ["embed"] + [f"blocks.{L}.resid_post" for L in range(self.n_layer)]
        missing = [n for n in names if n not in self.captures]
        if missing:
            captured = [n for n in names if n in self.captures]
            more = "..." if len(captured) > 4 else ""
            raise KeyError(f"hidden_states needs every layer, but only {captured[:4]}{more} were captured; "
                           f"use run.resid_post(L) or run.captures[site]")
        return np.stack([self.captures[n] for n in names])

    def resid_post(self, layer: int) -> np.ndarray:
        return self.captures[f"blocks.{layer}.resid_post"]

    def __repr__(self) -> str:
        sites = list(self.captures)
        shown = sites[:3] + (["..."] if len(sites) > 3 else [])
        logits = None if self.logits is None else tuple(self.logits.shape)
        return (f"Run({len(self.token_ids)} tokens, {len(self.positions)} positions returned, "
                f"{len(sites)} sites {shown}, logits {logits}, decode {self.decode_ms:.1f} ms)")


@dataclass
class TopK:
    ids: np.ndarray
    pieces: list[str]
    probs: np.ndarray
    logits: np.ndarray

    def __repr__(self) -> str:
        rows = "\n".join(f"  {i:>7} {p!r:<20} {pr:8.4f} {lg:9.3f}"
                         for i, p, pr, lg in zip(self.ids, self.pieces, self.probs, self.logits))
        return f"TopK(\n  {'id':>7} {'piece':<20} {'prob':>8} {'logit':>9}\n{rows}\n)"


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_ms: float = 0.0
    generate_ms: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / (self.generate_ms / 1e3) if self.generate_ms > 0 else float("nan")

    def __repr__(self) -> str:
        return f"Generation({self.text!r}, {len(self.token_ids)} tokens, {self.finish_reason})"
