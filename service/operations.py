"""What a worker process does for each RPC, on top of its `Engine`.

Requests arrive already validated against the model's shape (`service/requests.py`); what can only be
checked once prompts are tokenized (lengths, positions, capture size) is checked by the engine before any
call into llama.cpp. Results are plain dicts of Python values and numpy arrays, ready for the servicer to
stream.
"""
from __future__ import annotations

import ctypes
import math
import os
import time

import numpy as np

from .engine import Engine, ForwardRequest
from .errors import RequestError


class Operations:
    def __init__(self, engine: Engine, test_hooks: bool = False):
        self.engine = engine
        self.test_hooks = test_hooks

    def _tokens(self, prompt: dict) -> list[int]:
        if prompt.get("token_ids"):
            return list(prompt["token_ids"])
        return self.engine.prompt_tokens(prompt.get("text", ""), chat=prompt.get("chat", False),
                                         bos=not prompt.get("no_bos", False))

    def tokenize(self, text: str, add_special: bool, parse_special: bool, chat: bool) -> dict:
        if chat:
            text = self.engine.apply_chat_template(text)
            parse_special = True
        ids = self.engine.tokenize(text, add_special=add_special, parse_special=parse_special)
        return {"token_ids": ids, "pieces": [self.engine.piece(t) for t in ids], "text": text}

    def detokenize(self, token_ids: list[int]) -> dict:
        bad = [t for t in token_ids if not 0 <= t < self.engine.n_vocab]
        if bad:
            raise RequestError("OUT_OF_RANGE", f"token id {bad[0]} is outside the vocabulary [0, {self.engine.n_vocab})")
        return {"text": self.engine.detokenize(token_ids), "pieces": [self.engine.piece(t) for t in token_ids]}

    def run(self, prompts: list[dict], capture: list[str], positions: list[int] | None, logits: str,
            float16: bool, interventions: list, lens: dict | None, crash: str | None = None) -> dict:
        start = time.perf_counter()
        if crash:
            self.crash(crash)
        token_lists = [self._tokens(p) for p in prompts]
        result = self.engine.forward(ForwardRequest(prompts=token_lists, capture=capture, positions=positions,
                                                    logits=logits, interventions=interventions,
                                                    lens_row_bytes=self._lens_row_bytes(lens)))
        tensors: list[tuple[str, int, np.ndarray]] = []
        if lens is not None:
            tensors += self._lens_of_run(capture, result, lens)
        if lens is None or lens.get("keep_captures"):
            for site in capture:
                tensors += [(site, s, a) for s, a in enumerate(result.captures[site])]
        if result.logits is not None:
            tensors += [("logits", s, a) for s, a in enumerate(result.logits)]
        if float16:
            tensors = [(n, s, a.astype(np.float16) if a.dtype == np.float32 else a) for n, s, a in tensors]
        return {"sequences": [{"token_ids": t, "positions": p} for t, p in zip(token_lists, result.positions)],
                "sites": capture, "tensors": tensors, "decode_ms": result.decode_ms,
                "total_ms": (time.perf_counter() - start) * 1e3}

    def _lens_row_bytes(self, lens: dict | None) -> int:
        """Bytes of lens results per unembedded row: top ids and probabilities, targets, entropy, logits."""
        if lens is None:
            return 0
        per_row = 8 * min(lens["top_k"], self.engine.n_vocab) + 8 * len(lens["target_ids"]) + 8  # + entropy, KL
        return per_row + (4 * self.engine.n_vocab if lens["return_logits"] else 0)

    def _check_lens(self) -> None:
        if self.engine.unembed_error:
            raise RequestError("FAILED_PRECONDITION", self.engine.unembed_error)

    def _lens_of_run(self, capture, result, lens: dict) -> list[tuple[str, int, np.ndarray]]:
        """Lens reductions per prompt, stacked over the captured sites: (n_sites, n_positions, ...).

        When the final block's output is captured, `lens.kl_to_final` (n_sites, n_positions) is KL(final
        layer's distribution || each site's) at the same position, computed in the same vocabulary pass: the
        final site's rows go last, as the reduction's reference rows.
        """
        self._check_lens()
        final = f"blocks.{self.engine.n_layer - 1}.resid_post"
        order = [site for site in capture if site != final] + [final] * (final in capture)
        back = np.argsort([capture.index(site) for site in order])  # computed order -> requested order
        out = []
        for s in range(len(result.positions)):
            stacked = np.stack([result.captures[site][s] for site in order])  # (sites, positions, n_embd)
            flat = stacked.reshape(-1, stacked.shape[-1])
            reduced = self._lens(flat, lens, reference_rows=stacked.shape[1] if final in capture else 0)
            for name, array in reduced.items():
                out.append((f"lens.{name}", s, array.reshape(stacked.shape[:2] + array.shape[1:])[back]))
        return out

    def _lens(self, vectors: np.ndarray, spec: dict, reference_rows: int = 0) -> dict[str, np.ndarray]:
        return self.engine.weights.lens(vectors, top_k=spec["top_k"], temperature=spec["temperature"],
                                        target_ids=spec["target_ids"], final_norm=not spec["skip_final_norm"],
                                        keep_logits=spec["return_logits"], reference_rows=reference_rows)

    def unembed(self, vectors: np.ndarray, spec: dict, reference_rows: int = 0, float16: bool = False) -> dict:
        self._check_lens()
        reduced = self._lens(vectors.astype(np.float32), spec, reference_rows=reference_rows)
        return {"tensors": [(f"lens.{name}", 0, a) for name, a in reduced.items()]}

    def weights(self, name: str, axis: int, indices: list[int], float16: bool) -> dict:
        weights = self.engine.weights
        tensor = weights.tensors.get(name)
        if tensor is None:
            raise RequestError("NOT_FOUND", f"the model has no tensor {name!r}; ModelInfo.tensor_types counts them, "
                                            f"GGUF names look like 'token_embd.weight' or 'blk.0.ffn_down.weight'")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if indices:
            if not 0 <= axis < len(shape):
                raise RequestError("INVALID_ARGUMENT", f"axis {axis} is out of range for {name} of shape {list(shape)}")
            bad = [i for i in indices if not 0 <= i < shape[axis]]
            if bad:
                raise RequestError("OUT_OF_RANGE",
                                   f"index {bad[0]} is out of range for axis {axis} of {name} (size {shape[axis]})")
            self._check_answer_size(name, len(indices) * math.prod(shape) // shape[axis])
            index = np.asarray(indices, dtype=np.int64)
            array = weights.rows(name, index) if axis == 0 and len(shape) == 2 else np.take(weights.read(name), index, axis=axis)
        else:
            self._check_answer_size(name, math.prod(shape))
            array = weights.read(name)
        return {"tensors": [("weights", 0, array.astype(np.float16) if float16 else array)]}

    def _check_answer_size(self, name: str, n_values: int) -> None:
        limit = self.engine.config.max_capture_bytes
        if 4 * n_values > limit:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"{n_values} values of {name} ({4 * n_values / 2**20:.1f} MiB as float32) exceed the "
                               f"server's limit of {limit / 2**20:.0f} MiB per answer: ask for fewer indices")

    def nearest_tokens(self, vectors: np.ndarray, k: int, table: str, exclude_ids: list[int]) -> dict:
        found = self.engine.weights.nearest(vectors, k, table, exclude_ids)
        return {"tensors": [(f"nearest.{name}", 0, a) for name, a in found.items()]}

    def generate(self, prompt: dict, max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
                 stop: list[str], interventions: list):
        tokens = self._tokens(prompt)
        yield {"start": {"prompt_token_ids": tokens}}
        yield from self.engine.generate(tokens, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        seed=seed, stop=stop, interventions=interventions)

    def crash(self, how: str) -> None:
        """Test hook (off unless the server runs with test hooks): kill this worker the way native code would
        ("segv", "abort"), or hang it like a native call that never returns and ignores cancellation ("hang")."""
        if not self.test_hooks:
            raise RequestError("PERMISSION_DENIED", "test hooks are disabled on this server")
        if how == "abort":
            os.abort()
        if how == "hang":
            time.sleep(24 * 3600)
        ctypes.string_at(0)  # segmentation fault
