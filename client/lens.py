"""The logit lens and the latent-language curve: what each layer's residual stream would predict.

How it is computed. Hidden state i (0 = the token embeddings, L + 1 = the output of block L) at every
position goes through the model's own final norm and LM head, and softmax(logits / temperature) is
reduced to top-k tokens, entropy and the probability and rank of chosen target tokens. All of it is ONE
`Run` request: the server captures `embed` and every `blocks.L.resid_post`, unembeds all those rows in
numpy (`service/weights.py`, `Weights.lens`) and streams back only the reductions, so the vocabulary never
travels and a 7B model's LM head never leaves the server.

The final norm. Every layer's state is normalized with the model's final RMSNorm (weights included)
before the LM head, as in nostalgebraist's original logit lens (GPT-2's ln_f). The residual stream's norm
grows with depth, and the head was trained on normed vectors: without the norm early layers give
distributions whose temperature means nothing. With it, the last hidden state reproduces the model's own
next-token distribution exactly (llama.cpp computes the same thing; see tests/integration/test_lens.py).

Targets and multi-token words. A target given as text is reduced to its FIRST token, tokenized as
written and without BOS (`CoreClient.token_id`): " Paris" and "Paris" are different tokens, and for a
word split into several tokens the probability is that of its first piece (an upper bound on the word's
probability: other words share that piece). Results say when a word had more than one token.

Tuned-lens hook. `affine` maps hidden state i through h -> h @ A_i.T + b_i before the final norm and the
head (a tuned lens's translator in the residual form h + A'h + b is A_i = I + A'). The states are then
captured raw, transformed on the client and unembedded with `Unembed` requests (`lens_vectors`), still
server-side for the vocabulary math.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from lmscope.proto.wire import lmscope_pb2 as pb

from .errors import invalid_argument
from .fidelity import FidelityMap

Affine = Mapping[int, tuple] | Sequence[tuple | None]
# Rows per Unembed request on the affine path: keeps each request far below the gRPC message limit.
UNEMBED_BYTES_PER_REQUEST = 16 << 20


def hidden_state_labels(n_layer: int) -> list[str]:
    """Row labels of lens results: "embed" for hidden state 0, then the block index "0" ... "n_layer-1"."""
    return ["embed"] + [str(L) for L in range(n_layer)]


@dataclass
class TargetTrace:
    """The probability and rank of one token at every layer and position (rank 0 = the top token)."""

    token_id: int
    token: str
    probs: np.ndarray  # (n_layer + 1, n_positions)
    ranks: np.ndarray  # (n_layer + 1, n_positions)
    multi_token: bool = False  # the text it came from had more than one token; this is its first

    def __repr__(self) -> str:
        last = ", ".join(f"{p:.3f}" for p in self.probs[:, -1])
        note = " (first token of a multi-token word)" if self.multi_token else ""
        return f"TargetTrace({self.token!r} id {self.token_id}{note}; last position per layer: [{last}])"


@dataclass
class LogitLens:
    """Logit lens over hidden states 0..n_layer (rows) and the returned positions (columns).

    top_ids / top_probs: (n_layer + 1, n_positions, top_k); entropy: (n_layer + 1, n_positions), in nats.
    kl_to_final: (n_layer + 1, n_positions), KL(the model's final distribution || each hidden state's lens
    distribution) in nats (server-side, in the lens's vocabulary pass; with a tuned lens, on the client's
    float32 copy of the head: see `lmscope.client.tuned_lens`). The last row is 0.
    top_tokens[i][j]: the text of top_ids[i, j] (lists of strings). positions: the prompt positions of the
    columns; token_ids / prompt_tokens: the whole prompt's ids and their text.
    """

    token_ids: list[int]
    positions: list[int]
    prompt_tokens: list[str]
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_tokens: list[list[list[str]]]
    entropy: np.ndarray
    temperature: float
    targets: dict[int, TargetTrace] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    # (n_layer + 1, n_positions): KL(final distribution || each hidden state's) in nats, at the temperature
    kl_to_final: np.ndarray | None = None
    token_pieces: dict[int, bytes] = field(default_factory=dict, repr=False)  # raw bytes of every id above, for views
    decode_ms: float = 0.0  # server: the forward pass with capture (llama_decode)
    total_ms: float = 0.0   # server: the whole request, the lens reduction included
    hidden_states: np.ndarray | None = None  # (n_layer + 1, n_positions, n_embd) with keep_states=True
    fidelity: FidelityMap | None = None  # with fidelity=True: where activation rounding moves the states
    # ids -> (probs, ranks, texts) of more targets, and word -> (first token id, multi_token)
    _fetch_targets: Callable[[list[int]], tuple[np.ndarray, np.ndarray, list[str]]] | None = field(default=None,
                                                                                                  repr=False)
    _token_of: Callable[[str | int], tuple[int, bool]] | None = field(default=None, repr=False)

    @property
    def n_layer(self) -> int:
        return self.top_ids.shape[0] - 1

    @property
    def input_tokens(self) -> list[str]:
        """The text of the token at each lensed position."""
        return [self.prompt_tokens[p] for p in self.positions]

    def column(self, position: int) -> int:
        """The column of a prompt position (negative counts from the end of the prompt)."""
        absolute = position + len(self.token_ids) if position < 0 else position
        if absolute not in self.positions:
            raise IndexError(f"position {position} was not lensed; lensed positions: {self.positions}")
        return self.positions.index(absolute)

    def prob_of(self, token: str | int) -> TargetTrace:
        """Probability and rank of a token (id, or text -> its first token) at every layer and position.

        Tokens passed as `targets` to `logit_lens` are answered from the result; another costs one more
        request (the server reduces again; nothing else is recomputed on the client).
        """
        token_id, multi = self._token_of(token)
        if token_id not in self.targets:
            probs, ranks, texts = self._fetch_targets([token_id])
            self.targets[token_id] = TargetTrace(token_id, texts[0], probs[..., 0], ranks[..., 0], multi)
        trace = self.targets[token_id]
        return dataclasses.replace(trace, multi_token=True) if multi and not trace.multi_token else trace

    @property
    def flags(self) -> np.ndarray | None:
        """(n_layer + 1, n_positions) bool: the cells whose hidden state the fidelity map flags (the embedding
        row never: no product precedes it), or None when the lens was run without fidelity=True."""
        if self.fidelity is None:
            return None
        return np.concatenate([np.zeros((1, len(self.positions)), bool), self.fidelity.flags])

    @property
    def next_token_ids(self) -> list[int | None]:
        """The token that really follows each lensed position in the prompt (None after the last one)."""
        return [self.token_ids[p + 1] if p + 1 < len(self.token_ids) else None for p in self.positions]

    def table(self, position: int = -1, k: int | None = None) -> str:
        """A per-layer text table at one prompt position: entropy, top-k tokens and target probabilities."""
        j = self.column(position)
        k = self.top_ids.shape[2] if k is None else min(k, self.top_ids.shape[2])
        shown = list(self.targets.values())
        head = f"{'layer':>6} {'entropy':>8}  " + "  ".join(f"{'top-' + str(r + 1):<22}" for r in range(k))
        head += "".join(f"  {repr(t.token)[:14]:>14} p / rank" for t in shown)
        lines = [f"position {self.positions[j]} (input {self.input_tokens[j]!r}), temperature {self.temperature:g}",
                 head]
        flags = self.flags
        if flags is not None:
            lines.append(f"! = the fidelity map flags the row (activation rounding moves it by > "
                         f"{self.fidelity.threshold:.0%})")
        for i, label in enumerate(self.layers):
            cells = [f"{repr(self.top_tokens[i][j][r])[:14]:<14} {self.top_probs[i, j, r]:7.4f}" for r in range(k)]
            mark = "!" if flags is not None and flags[i, j] else " "
            row = f"{label:>5}{mark} {self.entropy[i, j]:8.3f}  " + "  ".join(cells)
            row += "".join(f"  {t.probs[i, j]:14.4f} / {int(t.ranks[i, j]):<5}" for t in shown)
            lines.append(row)
        return "\n".join(lines)

    def plot(self, color: str = "prob", *, title: str | None = None, save=None):
        """Heatmap like the original logit-lens post: cells show the top-1 token of each layer/position.

        color: "prob" (the top-1 probability), "entropy", or a target token (text or id) whose
        probability colours the cells. Framed cells: the top-1 token is the prompt's real next token.
        """
        from . import plots

        top1 = [[cell[0] for cell in row] for row in self.top_tokens]
        if color == "prob":
            values, name, cmap, limits = self.top_probs[:, :, 0], "top-1 probability", "Blues", (0.0, 1.0)
        elif color == "entropy":
            values, name, cmap, limits = self.entropy, "entropy (nats)", "viridis_r", (0.0, None)
        else:
            trace = self.prob_of(color)
            values, name, cmap, limits = trace.probs, f"p({trace.token!r})", "Blues", (0.0, 1.0)
        next_ids = self.next_token_ids
        correct = np.array([[nxt is not None and self.top_ids[i, j, 0] == nxt for j, nxt in enumerate(next_ids)]
                            for i in range(len(self.layers))])
        next_text = [self.prompt_tokens[p + 1] if p + 1 < len(self.token_ids) else "" for p in self.positions]
        return plots.lens_heatmap(top1, values, self.layers, self.input_tokens, correct=correct, value_name=name,
                                  cmap=cmap, vmin=limits[0], vmax=limits[1], top_labels=next_text,
                                  title="logit lens" if title is None else title, save=save)

    def to_html(self, path=None, *, color: str | int = "prob") -> str:
        """The logit-lens view (`lmscope.client.views`): the layers x positions grid, hover a cell for its
        top-k; a self-contained page, written to `path` if given. color: "prob", "entropy" or a target
        token (text or id), the colouring it opens with (every target the result holds can be picked)."""
        from .views import lens_html, write

        return write(lens_html(self, color=color), "lmscope logit lens", path)

    def _repr_html_(self) -> str:
        from .views import lens_html

        return lens_html(self)

    def __repr__(self) -> str:
        return (f"LogitLens({len(self.layers)} hidden states x {len(self.positions)} positions, "
                f"top_k={self.top_ids.shape[2]}, targets={[t.token for t in self.targets.values()]})")


@dataclass
class LatentLanguage:
    """Per-layer probability of a target-language word and of its English pivot at the last position.

    target_probs / pivot_probs: (n_layer + 1,) summed over the given spellings' first tokens.
    """

    layers: list[str]
    target_probs: np.ndarray
    pivot_probs: np.ndarray
    target_tokens: list[str]
    pivot_tokens: list[str]
    top_tokens: list[str]
    entropy: np.ndarray
    multi_token: list[str] = field(default_factory=list)  # spellings reduced to their first token

    def plot(self, *, title: str | None = None, save=None):
        from . import plots

        return plots.layer_curves(
            self.layers,
            {f"target {self.target_tokens}": self.target_probs, f"pivot {self.pivot_tokens}": self.pivot_probs},
            ylabel="probability (logit lens, last position)", ylim=(0.0, 1.0),
            title="latent language" if title is None else title, save=save)

    def __repr__(self) -> str:
        rows = "\n".join(f"  {label:>6} {t:8.4f} {p:8.4f}   {top!r}"
                         for label, t, p, top in zip(self.layers, self.target_probs, self.pivot_probs, self.top_tokens))
        note = f"\n  first token only: {self.multi_token}" if self.multi_token else ""
        return (f"LatentLanguage(target {self.target_tokens}, pivot {self.pivot_tokens}){note}\n"
                f"  {'layer':>6} {'target':>8} {'pivot':>8}   top-1\n{rows}")


def first_token(client, word: str | int) -> tuple[int, bool]:
    """(id, multi_token) of a word's first token, tokenized as written without BOS; ids pass through."""
    if not isinstance(word, str):
        return int(word), False
    ids = client.tokenize(word, add_special=False).token_ids
    if not ids:
        raise invalid_argument(f"{word!r} tokenizes to nothing; give a word or a token id")
    return ids[0], len(ids) > 1


def token_texts(client, ids) -> dict[int, str]:
    """The text of each distinct token id (a partial UTF-8 sequence shows as U+FFFD)."""
    return {t: piece.decode("utf-8", "replace") for t, piece in token_bytes(client, ids).items()}


def token_bytes(client, ids) -> dict[int, bytes]:
    """The raw bytes of each distinct token id (`token_pieces`: requests within the server's limits)."""
    unique = [int(t) for t in np.unique(np.asarray(ids, dtype=np.int64))]
    return dict(zip(unique, client.token_pieces(unique)))


class LensMixin:
    """Logit lens and latent-language analysis (needs `CoreClient`'s methods)."""

    def logit_lens(self, prompt, *, top_k: int = 5, temperature: float = 1.0, targets: Sequence = (),
                   positions: Sequence[int] | None = None, affine: Affine | None = None,
                   chat: bool = False, lens=None, keep_states: bool = False, fidelity: bool = False) -> LogitLens:
        """The logit lens of every hidden state (embedding + each block's output) at every position.

        prompt: text or token ids. top_k: tokens kept per cell. temperature: softmax temperature.
        targets: tokens (text -> first token, or ids) whose probability and rank to report (`prob_of`).
        positions: prompt positions to lens (default all; negative from the end).
        affine: optional per-hidden-state affine maps {i: (A_i, b_i)} (or a list indexed by i, None =
        identity) applied before the final norm: the tuned-lens hook (see the module docstring).
        lens: a `TunedLens` (`fit_tuned_lens` / `TunedLens.load`) fitted on this model: its translators
        become `affine`.
        keep_states: also return the hidden states (before any affine map) from the lens's own forward pass
        (`LogitLens.hidden_states`), instead of running the prompt again for them.
        fidelity: also compute the run's fidelity map (`LogitLens.fidelity`, `LogitLens.flags`; the table and
        the view mark the flagged cells): which hidden states llama.cpp's activation rounding moves.
        """
        if not temperature > 0:
            raise invalid_argument(f"temperature must be > 0, not {temperature}")
        info = self.model_info()
        if lens is not None:
            if affine is not None:
                raise invalid_argument("give a tuned lens or affine maps, not both")
            fitted_on = lens.model.get("fingerprint")
            if fitted_on and fitted_on != info.fingerprint:
                raise invalid_argument(f"this tuned lens was fitted on model {fitted_on[:12]} "
                                       f"({lens.model.get('name')}); the server holds {info.fingerprint[:12]} "
                                       f"({info.name})")
            affine = lens.affine()
        resolved = [first_token(self, t) for t in targets]
        target_ids = [r[0] for r in resolved]
        capture = ["embed"] + [f"blocks.{L}.resid_post" for L in range(info.n_layer)]

        states = None
        if affine is not None:
            raw = self.run(prompt, capture=capture, positions=positions, logits=False, chat=chat, fidelity=fidelity)
            states = _apply_affine(raw.hidden_states, affine, info.n_embd)

        def reduce(top: int, ids: list[int], keep: bool = False, kl: bool = False, fidelity: bool = False):
            """(run, lens arrays) for every (hidden state, position) row: one Run request with the lens (and
            the captured states too when `keep`), or, on the affine path, Unembed requests over the
            transformed states (with `kl`, against the untranslated final states as reference rows)."""
            if states is not None:
                return raw, self._lens_rows(states, raw.hidden_states[-1] if kl else None, top_k=top,
                                            temperature=temperature, target_ids=ids)
            spec = pb.LensSpec(enabled=True, top_k=top, temperature=temperature, target_ids=ids,
                               keep_captures=keep)
            lensed = self.send_run(self.run_request([prompt], capture=capture, positions=positions, logits=False,
                                                    chat=chat, lens=spec, fidelity=fidelity))[0]
            return lensed, {name.removeprefix("lens."): array for name, array in lensed.extra.items()
                            if name.startswith("lens.")}

        run, reduced = reduce(top_k, target_ids, keep_states, kl=True, fidelity=fidelity)

        def fetch_targets(ids: list[int]):
            more = reduce(0, ids)[1]
            return more["target_probs"], more["target_ranks"], self.tokenize_pieces(ids)

        top_ids = reduced["top_ids"]
        piece_bytes = token_bytes(self, np.concatenate([top_ids.reshape(-1), run.token_ids, target_ids]))
        pieces = {t: piece.decode("utf-8", "replace") for t, piece in piece_bytes.items()}
        lens = LogitLens(
            token_ids=run.token_ids, positions=run.positions, prompt_tokens=[pieces[t] for t in run.token_ids],
            top_ids=top_ids, top_probs=reduced["top_probs"],
            top_tokens=[[[pieces[int(t)] for t in cell] for cell in row] for row in top_ids],
            entropy=reduced["entropy"], temperature=temperature, layers=hidden_state_labels(info.n_layer),
            kl_to_final=reduced.get("kl_to_final"),
            token_pieces=piece_bytes, decode_ms=run.decode_ms, total_ms=run.total_ms,
            hidden_states=run.hidden_states if keep_states else None, fidelity=run.fidelity,
            _fetch_targets=fetch_targets, _token_of=lambda word: first_token(self, word))
        for n, (token_id, multi) in enumerate(resolved):
            lens.targets[token_id] = TargetTrace(token_id, pieces[token_id], reduced["target_probs"][..., n],
                                                 reduced["target_ranks"][..., n], multi)
        return lens

    def _lens_rows(self, states: np.ndarray, final_states: np.ndarray | None = None, **spec) -> dict[str, np.ndarray]:
        """`lens_vectors` over (n_hidden, n_positions, n_embd) states in requests of bounded size, reshaped to
        (n_hidden, n_positions, ...). With `final_states` (n_positions, n_embd) also `kl_to_final`, KL(final ||
        each row), in the same vocabulary pass: each request ends with the final states of its positions as
        reference rows (`kl_reference_rows`); row l * m + p of a request has reference row p."""
        n_hidden, n_positions, n_embd = states.shape
        extra = 0 if final_states is None else 1
        step = max(1, UNEMBED_BYTES_PER_REQUEST // (4 * n_embd * (n_hidden + extra)))
        parts = []
        for start in range(0, n_positions, step):
            chunk = slice(start, min(n_positions, start + step))
            m = chunk.stop - chunk.start
            rows = [states[:, chunk].reshape(-1, n_embd)] + ([final_states[chunk]] if extra else [])
            reduced = self.lens_vectors(np.concatenate(rows).astype(np.float32), **spec,
                                        kl_reference_rows=m * extra)
            parts.append({name: a[:n_hidden * m].reshape((n_hidden, m) + a.shape[1:]) for name, a in reduced.items()})
        return {name: np.concatenate([p[name] for p in parts], axis=1) for name in parts[0]}

    def latent_language(self, prompt, *, target: str | Sequence[str] = "花", pivot: str | Sequence[str] = "flower",
                        temperature: float = 1.0, chat: bool = False) -> LatentLanguage:
        """Wendler et al. 2024 (arXiv 2402.10588), "Do Llamas Work in English?": the logit lens at the
        prompt's last position, tracking the probability of the answer in the target language and of
        the same word in English (the pivot) through the layers.

        target / pivot: a spelling or several (e.g. ["flower", " flower"]); each is reduced to its first
        token and the distinct tokens' probabilities are summed. One request.
        """
        spellings = {"target": [target] if isinstance(target, str) else list(target),
                     "pivot": [pivot] if isinstance(pivot, str) else list(pivot)}
        resolved = {role: [first_token(self, s) for s in words] for role, words in spellings.items()}
        ids = {role: list(dict.fromkeys(r[0] for r in found)) for role, found in resolved.items()}
        lens = self.logit_lens(prompt, top_k=1, temperature=temperature, targets=ids["target"] + ids["pivot"],
                               positions=[-1], chat=chat)
        sums = {role: sum(lens.targets[t].probs[:, 0] for t in role_ids) for role, role_ids in ids.items()}
        pieces = {role: [lens.targets[t].token for t in role_ids] for role, role_ids in ids.items()}
        multi = [word for role in spellings for word, r in zip(spellings[role], resolved[role]) if r[1]]
        return LatentLanguage(layers=lens.layers, target_probs=sums["target"], pivot_probs=sums["pivot"],
                              target_tokens=pieces["target"], pivot_tokens=pieces["pivot"],
                              top_tokens=[row[0][0] for row in lens.top_tokens], entropy=lens.entropy[:, 0],
                              multi_token=multi)


def _apply_affine(states: np.ndarray, affine: Affine, n_embd: int) -> np.ndarray:
    """h_i -> h_i @ A_i.T + b_i for each hidden state i that has a map (None or a missing key: identity)."""
    n_states = states.shape[0]
    items = affine.items() if isinstance(affine, Mapping) else enumerate(affine)
    out = states.astype(np.float32).copy()
    for i, pair in items:
        if pair is None:
            continue
        if not -n_states <= i < n_states:
            raise invalid_argument(f"affine map for hidden state {i}, but there are {n_states} (0 = embed)")
        matrix, bias = pair
        matrix = np.asarray(matrix, dtype=np.float32)
        bias = np.zeros(n_embd, np.float32) if bias is None else np.asarray(bias, dtype=np.float32)
        if matrix.shape != (n_embd, n_embd) or bias.shape != (n_embd,):
            raise invalid_argument(f"affine map {i} must be (A: ({n_embd}, {n_embd}), b: ({n_embd},)); "
                                   f"got {matrix.shape} and {bias.shape}")
        out[i] = states[i].astype(np.float32) @ matrix.T + bias
    return out
