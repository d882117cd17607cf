"""The vocabulary tables: nearest tokens, analogies, static vs contextual embeddings, tied tables.

The nearest-neighbour search over a whole table (n_vocab x n_embd: 113 MB for SmolLM2, 500 MB for a 7B
model) runs on the server (`NearestTokens`, which keeps the dequantized table and its row norms); the
client sends query vectors and receives ids and cosine scores. Words are reduced to their first token
(tokenized as written, without BOS), as in the logit lens; results flag words that had more than one.

Analogies are reported with and without their input words. Emb(a) - Emb(b) + Emb(c) is usually nearest
to c itself (or a), and the famous successes appear only once the inputs are excluded (Nissim et al.,
"Fair is better than sensational", 2020): `Analogy` keeps both lists so that a result can be read
honestly.

Contextual similarity follows Ethayarajh (2019): the same word's residual vector in different contexts,
cosine per layer, next to the mean cosine between unrelated tokens' vectors at that layer (the
anisotropy baseline: in deep layers any two vectors tend to point the same way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lmscope.proto.tensor_names import OUTPUT, TOKEN_EMBEDDING, head_tensor_name

from .errors import invalid_argument
from .lens import first_token, token_texts
from .projection import layer_sites

TIED_COSINE = 0.999  # sampled rows at least this similar: the two tables hold the same matrix (up to quantization)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of a with every row of b."""
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


@dataclass
class Neighbours:
    """The tokens nearest to a query in a vocabulary table, best first (cosine similarity)."""

    query: str
    table: str
    ids: np.ndarray
    tokens: list[str]
    scores: np.ndarray

    def __repr__(self) -> str:
        rows = "\n".join(f"  {i:>7} {t!r:<24} {s:7.4f}" for i, t, s in zip(self.ids, self.tokens, self.scores))
        return f"Neighbours({self.query} in {self.table}):\n{rows}"


@dataclass
class Analogy:
    """a - b + c: the nearest tokens with the inputs excluded (`neighbours`) and without (`unfiltered`)."""

    words: tuple[str, str, str]
    input_ids: tuple[int, int, int]
    neighbours: Neighbours
    unfiltered: Neighbours
    multi_token: list[str] = field(default_factory=list)

    @property
    def input_ranks(self) -> dict[str, int | None]:
        """Where each input word's token lands in the unfiltered list (0 = nearest; None = beyond k)."""
        listed = [int(i) for i in self.unfiltered.ids]
        return {word: listed.index(t) if t in listed else None for word, t in zip(self.words, self.input_ids)}

    def __repr__(self) -> str:
        a, b, c = self.words
        note = f"; first token only for {self.multi_token}" if self.multi_token else ""
        best = ", ".join(f"{t!r} {s:.3f}" for t, s in zip(self.neighbours.tokens[:5], self.neighbours.scores[:5]))
        overall = ", ".join(f"{t!r} {s:.3f}" for t, s in zip(self.unfiltered.tokens[:5], self.unfiltered.scores[:5]))
        return (f"Analogy({a!r} - {b!r} + {c!r}{note})\n  inputs excluded: {best}\n  all tokens:      {overall}\n"
                f"  input ranks among all tokens: {self.input_ranks}")


@dataclass
class ContextualSimilarity:
    """The same word in several contexts: cosine similarity of its residual vectors, per layer.

    similarity: (n_layers, n_contexts, n_contexts); mean_similarity: mean over pairs of contexts;
    baseline: mean cosine between other tokens of different contexts at that layer (anisotropy);
    static_similarity: (n_layers, n_contexts) cosine with the token's row of the embedding table.
    positions[i]: the position of the word's (last) token in context i; tokens[i]: its text.
    """

    word: str
    contexts: list[str]
    layers: list
    positions: list[int]
    tokens: list[str]
    similarity: np.ndarray
    mean_similarity: np.ndarray
    baseline: np.ndarray
    static_similarity: np.ndarray

    def plot(self, *, title: str | None = None, save=None):
        from . import plots

        labels = [str(layer) for layer in self.layers]
        curves = {f"same word ({self.word!r}), different contexts": self.mean_similarity,
                  "different tokens (anisotropy baseline)": self.baseline,
                  "word vs its static embedding": self.static_similarity.mean(axis=1)}
        return plots.layer_curves(labels, curves, ylabel="cosine similarity", ylim=(-0.05, 1.05),
                                  title=title or f"contextual similarity of {self.word!r}", save=save)

    def __repr__(self) -> str:
        rows = "\n".join(f"  {str(layer):>6} {m:8.3f} {b:8.3f} {s:8.3f}" for layer, m, b, s in
                         zip(self.layers, self.mean_similarity, self.baseline, self.static_similarity.mean(axis=1)))
        return (f"ContextualSimilarity({self.word!r} in {len(self.contexts)} contexts, tokens {self.tokens})\n"
                f"  {'layer':>6} {'same':>8} {'baseline':>8} {'static':>8}\n{rows}")


@dataclass
class EmbeddingTables:
    """Is the LM head the token-embedding table?

    tied: the file has no separate output matrix, so llama.cpp uses token_embd as the head. For untied
    files, `sampled` random rows of both tables are compared: equal_values says whether they hold the same
    matrix anyway (every sampled row's cosine >= TIED_COSINE, which allows for different quantizations).
    """

    tied: bool
    head_tensor: str
    sampled: int
    mean_cosine: float
    min_cosine: float
    max_abs_difference: float

    @property
    def equal_values(self) -> bool:
        return self.tied or self.min_cosine >= TIED_COSINE

    def __repr__(self) -> str:
        if self.tied:
            return "EmbeddingTables(tied: the LM head is token_embd.weight; the file has no output.weight)"
        return (f"EmbeddingTables(untied: head {self.head_tensor}; {self.sampled} sampled rows: cosine mean "
                f"{self.mean_cosine:.4f}, min {self.min_cosine:.4f}, max |difference| {self.max_abs_difference:.4g}"
                f"; {'the same matrix' if self.equal_values else 'different matrices'})")


class EmbeddingMixin:
    """Embedding-table analysis (needs `CoreClient`'s methods)."""

    def _table_rows(self, token_ids: Sequence[int], table: str) -> np.ndarray:
        if table == "embedding":
            return self.embedding_rows(token_ids)
        if table == "lm_head":
            head = head_tensor_name(self.model_info().tied_embeddings)
            return self.weights(head, list(token_ids))
        raise invalid_argument(f"table must be 'embedding' or 'lm_head', not {table!r}")

    def nearest_tokens(self, query, k: int = 10, *, table: str = "embedding", exclude: Sequence = ()):
        """The k tokens whose rows in `table` ("embedding" or "lm_head") are nearest (cosine) to a query.

        query: a word (its first token's row; the token itself is left out of the answer), a token id,
        a vector (n_embd,) or a matrix (n, n_embd) -> one `Neighbours` per row.
        exclude: more tokens (words or ids) to leave out.
        """
        excluded = [first_token(self, w)[0] for w in exclude]
        word_query = isinstance(query, (str, int, np.integer))
        if word_query:
            token_id, multi = first_token(self, query)
            vectors = self._table_rows([token_id], table)
            excluded.append(token_id)
        else:
            vectors = np.atleast_2d(np.asarray(query, dtype=np.float32))
        ids, scores = self.nearest_token_ids(vectors, k, table, exclude_ids=excluded)
        pieces = token_texts(self, np.concatenate([ids.reshape(-1), excluded]))
        described = ([f"{pieces[token_id]!r} (id {token_id}{', first token of ' + repr(query) if multi else ''})"]
                     if word_query else [f"vector {n}" for n in range(len(vectors))])
        found = [Neighbours(query=d, table=table, ids=row_ids, tokens=[pieces[int(t)] for t in row_ids],
                            scores=row_scores) for d, row_ids, row_scores in zip(described, ids, scores)]
        return found if np.ndim(query) == 2 else found[0]

    def analogy(self, a, b, c, k: int = 10, *, table: str = "embedding") -> Analogy:
        """Emb(a) - Emb(b) + Emb(c) -> nearest tokens ("a is to b as ? is to c"), inputs excluded and not."""
        found = [first_token(self, w) for w in (a, b, c)]
        ids = [f[0] for f in found]
        rows = self._table_rows(ids, table).astype(np.float64)
        vector = (rows[0] - rows[1] + rows[2]).astype(np.float32)
        query = f"{a!r} - {b!r} + {c!r}"
        result = []
        for exclude in (ids, []):
            top, scores = self.nearest_token_ids(vector, k, table, exclude_ids=exclude)
            pieces = self.tokenize_pieces(top[0])
            result.append(Neighbours(query=query, table=table, ids=top[0], tokens=pieces, scores=scores[0]))
        words = tuple(str(w) for w in (a, b, c))
        return Analogy(words=words, input_ids=tuple(ids), neighbours=result[0], unfiltered=result[1],
                       multi_token=[w for w, f in zip(words, found) if f[1]])

    def contextual_similarity(self, word: str, contexts: Sequence[str], layer=None, *,
                              batch_size: int = 64) -> ContextualSimilarity:
        """Cosine similarity of one word's residual vectors across contexts, per layer.

        The word's vector in a context is the state at its last token (the first position where the
        model has read all of it); the first occurrence of `word` in each context is used.
        layer: an int, "embed" or a list; default every hidden state.
        """
        n_layer = self.model_info().n_layer
        keys, sites = layer_sites(["embed"] + list(range(n_layer)) if layer is None else layer, n_layer)
        if len(contexts) < 2:
            raise invalid_argument("give at least two contexts to compare")
        prompts, positions, prefixes = [], [], []
        for context in contexts:
            ids, position, prefix = self._word_position(context, word)
            prompts.append(ids)
            positions.append(position)
            prefixes.append(prefix)
        runs = self.run_batch(prompts, batch_size=batch_size, progress=False, capture=sites, logits=False)
        word_ids = [p[q] for p, q in zip(prompts, positions)]
        static = self.embedding_rows(word_ids).astype(np.float64)
        n = len(contexts)
        similarity = np.zeros((len(keys), n, n))
        mean, baseline, static_similarity = np.zeros(len(keys)), np.zeros(len(keys)), np.zeros((len(keys), n))
        pairs = ~np.eye(n, dtype=bool)
        for i, site in enumerate(sites):
            states = [run.captures[site].astype(np.float64) for run in runs]
            vectors = np.stack([s[q] for s, q in zip(states, positions)])
            similarity[i] = _cosines(vectors, vectors)
            mean[i] = similarity[i][pairs].mean()
            static_similarity[i] = np.diag(_cosines(vectors, static))
            others = [np.delete(s[prefix:], q - prefix, axis=0) for s, q, prefix in zip(states, positions, prefixes)]
            baseline[i] = _mean_cross_cosine(others)
        return ContextualSimilarity(word=word, contexts=list(contexts), layers=keys, positions=positions,
                                    tokens=self.tokenize_pieces(word_ids), similarity=similarity,
                                    mean_similarity=mean, baseline=baseline, static_similarity=static_similarity)

    def _word_position(self, context: str, word: str) -> tuple[list[int], int, int]:
        """(prompt ids with BOS, position of the token holding the word's last byte, number of BOS-like
        tokens in front). Positions come from the tokens' byte pieces, so they are right whatever the
        tokenizer merges across the word's edges."""
        full = self.tokenize(context)
        plain = self.tokenize(context, add_special=False)
        prefix = len(full.token_ids) - len(plain.token_ids)
        if prefix < 0 or full.token_ids[prefix:] != plain.token_ids:
            raise invalid_argument(f"cannot align the tokens of {context!r} with and without BOS")
        raw, needle = context.encode(), word.encode()
        start = raw.find(needle)
        if start < 0:
            raise invalid_argument(f"{word!r} does not occur in the context {context!r}")
        ends = np.cumsum([len(p) for p in plain.pieces])
        if len(ends) == 0 or ends[-1] != len(raw):
            raise invalid_argument(f"the tokens of {context!r} do not spell its bytes; cannot locate {word!r}")
        index = int(np.searchsorted(ends, start + len(needle)))
        return full.token_ids, prefix + index, prefix

    def compare_embedding_tables(self, sample: int = 256, seed: int = 0) -> EmbeddingTables:
        """Tied-embedding detection: is the LM head the embedding table (by file, or by value)?"""
        info = self.model_info()
        if info.tied_embeddings:
            return EmbeddingTables(tied=True, head_tensor=TOKEN_EMBEDDING, sampled=0, mean_cosine=1.0,
                                   min_cosine=1.0, max_abs_difference=0.0)
        rng = np.random.default_rng(seed)
        ids = [int(t) for t in np.sort(rng.choice(info.n_vocab, size=min(sample, info.n_vocab), replace=False))]
        embedding = self.embedding_rows(ids).astype(np.float64)
        head = self.weights(OUTPUT, ids).astype(np.float64)
        cosines = np.einsum("ij,ij->i", embedding, head) / np.maximum(
            np.linalg.norm(embedding, axis=1) * np.linalg.norm(head, axis=1), 1e-30)
        return EmbeddingTables(tied=False, head_tensor=OUTPUT, sampled=len(ids),
                               mean_cosine=float(cosines.mean()), min_cosine=float(cosines.min()),
                               max_abs_difference=float(np.abs(embedding - head).max()))


def _mean_cross_cosine(groups: list[np.ndarray]) -> float:
    """Mean cosine between rows of different groups (tokens of different contexts)."""
    total, count = 0.0, 0
    for g in range(len(groups)):
        for h in range(g + 1, len(groups)):
            if len(groups[g]) and len(groups[h]):
                sims = _cosines(groups[g], groups[h])
                total += sims.sum()
                count += sims.size
    return total / count if count else float("nan")
