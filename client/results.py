"""Result types: small dataclasses holding numpy arrays, with a readable repr."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fidelity import FidelityMap


def _python(value, field):
    """A proto field's value as plain Python: dict for a map or a message, list for a repeated field."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    if field.is_repeated:
        return list(value)
    if field.message_type is not None:
        return {f.name: _python(getattr(value, f.name), f) for f in field.message_type.fields}
    return value


class ModelInfo:
    """The served model: every field of the wire's `ModelInfo` (proto/lmscope.proto, which documents them) as a
    Python value, read from the message's descriptor, so a field added to the proto appears here by itself.
    Maps are dicts, repeated fields lists, nested messages (`limits`, `memory`) dicts of their fields.

    n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx: the model's shape and the server's context;
    capture_sites / unavailable_sites: what can be captured and why the rest cannot; limits: what one request
    may ask (max_prompt_tokens, max_capture_bytes, max_generated_tokens, max_batch_prompts, max_message_bytes).
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)

    @classmethod
    def from_proto(cls, message) -> "ModelInfo":
        return cls(**{field.name: _python(getattr(message, field.name), field) for field in message.DESCRIPTOR.fields})

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
                f"{mib('output_buffer')} (at most {m.get('n_outputs_max', m['n_ubatch'])} output rows per ubatch)",
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
    n_ubatches: int = 0  # llama.cpp calls the request's prompts were decoded in (the whole request's)

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

    @property
    def fidelity(self) -> FidelityMap | None:
        """The run's `FidelityMap` (`lmscope.client.fidelity`), or None unless it was run with fidelity=True."""
        if "fidelity.estimate" not in self.extra:
            return None
        return FidelityMap.from_arrays(self.extra, self.positions)

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
