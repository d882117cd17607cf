"""Inside a layer: attention patterns, FFN neurons, activation patching and Patchscopes (`InsideMixin`).

Every tool here is a thin composition of the core RPCs (`CoreClient`): captures of named sites
(``blocks.L.attn.pattern``, ``blocks.L.mlp.post``, ``blocks.L.resid_post``), dequantized weight slices,
server-side lens reductions, and SET interventions, which the server applies inside llama.cpp's forward
pass. The result types and the method behind each tool are documented in `attention`, `neurons` and
`activation_patching`.

Bad input raises `LmscopeError` (`lmscope.client.errors`) whether the client or the server notices it: a
layer, head or neuron index outside the model is OUT_OF_RANGE, checked here against `ModelInfo` before any
request is sent; what depends on the prompt (positions, the size of the answer) is checked by the server.
"""
from __future__ import annotations

from typing import Sequence

import grpc
import numpy as np

from lmscope.proto.tensor_names import head_tensor_name

from .activation_patching import IDENTITY_PROMPT, Metric, Patchscope, PatchSweep, logit_difference
from .attention import Attention
from .dispatch import check_batch_size
from .errors import LmscopeError, check_index, invalid_argument
from .interface import ClientCore
from .interventions import Intervention, Patch
from .neurons import Hit, NeuronActivations, Neurons, NeuronTokens, TopActivating
from .progress import progress_bar
from .token_labels import snippet, token_labels

PATCHABLE_SITES = ("resid_post", "resid_mid", "attn_out", "mlp_out")


class InsideMixin:
    """Attention, neurons, patching and Patchscopes; mixed into `Client`."""

    # ----- checks and labels -----------------------------------------------------------------------

    def _check_neuron(self: ClientCore, neuron: int) -> int:
        return check_index(neuron, self.model_info().n_ff, "neuron", "feed-forward neurons")

    def token_labels(self, token_ids: Sequence[int]) -> list[str]:
        """A readable label per token (see `lmscope.client.token_labels`)."""
        return token_labels(self.token_pieces(token_ids))

    # ----- attention -------------------------------------------------------------------------------

    def attention(self, prompt, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                  chat: bool = False) -> Attention:
        """Attention probabilities of `layers` (default all) for every head (or `heads`) of one prompt."""
        info = self.model_info()
        layers = list(range(info.n_layer)) if layers is None else [self.check_layer(L) for L in layers]
        heads = list(range(info.n_head)) if heads is None else [check_index(h, info.n_head, "head", "heads")
                                                                  for h in heads]
        sites = [f"blocks.{L}.attn.pattern" for L in layers]
        run = self.run(prompt, capture=sites, logits=False, chat=chat)
        probs = np.stack([run.captures[site] for site in sites])[:, heads]
        return Attention(probs=probs, layers=layers, heads=[int(h) for h in heads],
                         tokens=self.token_labels(run.token_ids), token_ids=run.token_ids)

    # ----- neurons ---------------------------------------------------------------------------------

    def neurons(self, prompt, layer: int, chat: bool = False) -> Neurons:
        """Neuron activations ``blocks.{layer}.mlp.post`` (silu(gate) * up) for every token: (n_tokens, n_ff)."""
        site = f"blocks.{self.check_layer(layer)}.mlp.post"
        run = self.run(prompt, capture=[site], logits=False, chat=chat)
        return Neurons(layer=layer, activations=run.captures[site], tokens=self.token_labels(run.token_ids),
                       token_ids=run.token_ids)

    def neuron_value(self, layer: int, neuron: int) -> np.ndarray:
        """The neuron's value vector: column `neuron` of ``blk.{layer}.ffn_down.weight``, (n_embd,).

        Only that column travels; the server dequantizes the matrix."""
        info = self.model_info()
        if not info.ffn_value_tensor:
            raise LmscopeError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{info.site_rules}: a mixture of experts runs each token through its own experts, "
                               f"so a neuron has no single value vector")
        name = info.ffn_value_tensor.format(L=self.check_layer(layer))
        return self.weights(name, [self._check_neuron(neuron)], axis=1)[:, 0]

    def neuron_top_tokens(self, layer: int, neuron: int, k: int = 10) -> NeuronTokens:
        """The tokens the neuron's value vector promotes and suppresses, through the LM head without the
        final norm (Geva et al., arXiv 2012.14913; see `lmscope.client.neurons`).

        The server ranks the whole vocabulary (lens top-k of the vector and of its negation); only the
        2k LM-head rows of the winners come back, to report the exact logit contributions."""
        value = self.neuron_value(layer, neuron)
        reduced = self.lens_vectors(np.stack([value, -value]), top_k=k, final_norm=False)
        ids = reduced["top_ids"].astype(np.int64)                       # (2, k): promoted, suppressed
        head = head_tensor_name(self.model_info().tied_embeddings)
        logits = (self.weights(head, ids.reshape(-1).tolist()) @ value).reshape(ids.shape)
        labels = self.token_labels(ids.reshape(-1))
        return NeuronTokens(layer=layer, neuron=neuron,
                            top_ids=ids[0], top_tokens=labels[:k], top_logits=logits[0],
                            bottom_ids=ids[1], bottom_tokens=labels[k:], bottom_logits=logits[1])

    def neuron_activations(self, prompts, layer: int, neurons: int | Sequence[int], k: int = 8, *,
                           chat: bool = False) -> NeuronActivations:
        """`neurons` of `layer` at every token of `prompts` (a text, token ids, or a list of them), with each
        neuron's promoted and suppressed tokens (`neuron_top_tokens`, `k` each): what the neuron view shows
        (``.to_html(path)``, or the result itself in a notebook)."""
        site = f"blocks.{self.check_layer(layer)}.mlp.post"
        chosen = [self._check_neuron(n) for n in ([neurons] if isinstance(neurons, (int, np.integer)) else neurons)]
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        runs = self.run_batch([prompts] if single else list(prompts), capture=[site], logits=False, chat=chat)
        return NeuronActivations(layer=layer, neurons=chosen, tokens=[self.token_labels(r.token_ids) for r in runs],
                                 activations=[r.captures[site][:, chosen] for r in runs],
                                 projections=[self.neuron_top_tokens(layer, n, k=k) for n in chosen])

    def top_activating(self, prompts: Sequence, layer: int, neuron: int, k: int = 10, *, batch_size: int = 32,
                       context: int = 6, skip_bos: bool = True, progress: bool = True) -> TopActivating:
        """The `k` tokens of `prompts` on which the neuron's activation is largest, with text around them.

        Prompts are decoded `batch_size` at a time (`iter_runs`) capturing only ``blocks.{layer}.mlp.post``;
        only the neuron's column is kept, so memory stays small for a large corpus. `skip_bos` leaves out the BOS
        token, on which many neurons fire regardless of the text.
        """
        site = f"blocks.{self.check_layer(layer)}.mlp.post"
        neuron = self._check_neuron(neuron)
        bos = self.model_info().bos_token_id
        columns: list[np.ndarray] = []
        token_lists: list[list[int]] = []
        prompts = list(prompts)
        with progress_bar(len(prompts), enabled=progress, desc=f"layer {layer} neuron {neuron}") as bar:
            for run in self.iter_runs(prompts, batch_size=batch_size, capture=[site], logits=False):
                columns.append(run.captures[site][:, neuron].astype(np.float32))
                token_lists.append(run.token_ids)
                bar.update(1)
        ranked = []
        for p, (column, ids) in enumerate(zip(columns, token_lists)):
            ranked += [(float(column[i]), p, i) for i in range(len(ids)) if not (skip_bos and ids[i] == bos)]
        ranked.sort(key=lambda hit: -hit[0])
        return TopActivating(layer=layer, neuron=neuron, hits=self._hits(ranked[:k], token_lists, context),
                             n_tokens_scanned=len(ranked), activations=columns)

    def _hits(self, ranked, token_lists, context: int) -> list[Hit]:
        """Hits with a text window of `context` tokens either side (the windows' pieces from `token_pieces`,
        in requests within the server's limits)."""
        windows = []
        for _, p, i in ranked:
            ids = token_lists[p]
            windows.append((max(0, i - context), i, min(len(ids), i + context + 1)))
        all_ids = [t for (_, p, _), (a, _, b) in zip(ranked, windows) for t in token_lists[p][a:b]]
        pieces = self.token_pieces(all_ids)
        hits, offset = [], 0
        for (value, p, i), (a, _, b) in zip(ranked, windows):
            window = pieces[offset:offset + b - a]
            offset += b - a
            hits.append(Hit(prompt=p, position=i, token=token_labels(window)[i - a], activation=value,
                            context=snippet(window, i - a)))
        return hits

    # ----- patching --------------------------------------------------------------------------------

    def patchscope(self, source, source_layer: int, source_position: int = -1, target: str = IDENTITY_PROMPT,
                   target_layer: int | None = None, target_position: int = -1, max_tokens: int = 20,
                   stop: Sequence[str] = ()) -> Patchscope:
        """Patchscopes (arXiv 2401.06102): what does the source's hidden state say when the model reads it?

        Captures ``blocks.{source_layer}.resid_post`` of `source` at `source_position`, then generates from
        `target` with that state SET at (`target_layer`, default the source layer, `target_position`) in
        the prompt pass; the generated tokens are not patched. The default target is the paper's
        token-identity prompt (`IDENTITY_PROMPT`), patched at its final "?".
        """
        source_layer = self.check_layer(source_layer)
        target_layer = source_layer if target_layer is None else self.check_layer(target_layer)
        site = f"blocks.{source_layer}.resid_post"
        run = self.run(source, capture=[site], positions=[source_position], logits=False)
        vector = run.captures[site][0]
        generation = self.generate(target, max_tokens=max_tokens, stop=stop,
                                   patch=[Patch(layer=target_layer, position=target_position, vector=vector)])
        n_target = len(generation.prompt_token_ids)
        return Patchscope(text=generation.text, token_ids=generation.token_ids, source_layer=source_layer,
                          source_position=run.positions[0],
                          source_token=self.token_labels(run.token_ids)[run.positions[0]], target=target,
                          target_layer=target_layer,
                          target_position=target_position + n_target if target_position < 0 else target_position,
                          vector=vector)

    def patch_sweep(self, clean, corrupted, metric: Metric | None = None, layers: Sequence[int] | None = None,
                    positions: Sequence[int] | None = None, *, site: str = "resid_post", batch_size: int = 32,
                    progress: bool = False) -> PatchSweep:
        """Activation patching over layers x positions: the clean run's `site` state patched into the
        corrupted run, one cell at a time, scored by `metric(last-position logits)`.

        The two prompts must have the same number of tokens. The default metric is the logit difference
        between the clean and the corrupted run's top next tokens (`logit_difference`). Cells are decoded
        `batch_size` at a time: each request holds that many copies of the corrupted prompt, each with its
        own SET intervention (`Intervention.sequences`), and sent through `send_runs` (split to the server's
        limits).
        """
        batch_size = check_batch_size(batch_size)
        if site not in PATCHABLE_SITES:
            raise invalid_argument(f"site {site!r} cannot be swept; use one of {', '.join(PATCHABLE_SITES)}")
        layers = list(range(self.model_info().n_layer)) if layers is None else [self.check_layer(L) for L in layers]
        sites = [f"blocks.{L}.{site}" for L in layers]
        clean_run = self.run(clean, capture=sites, positions=positions, logits="last")
        corrupted_run = self.run(corrupted, capture=[], logits="last")
        n_tokens = len(clean_run.token_ids)
        if len(corrupted_run.token_ids) != n_tokens:
            raise invalid_argument(f"the clean prompt has {n_tokens} tokens and the corrupted one "
                           f"{len(corrupted_run.token_ids)}: patching position by position needs equal lengths")
        if metric is None:
            good, bad = int(np.argmax(clean_run.logits[-1])), int(np.argmax(corrupted_run.logits[-1]))
            if good == bad:
                raise invalid_argument(f"the clean and corrupted prompts predict the same token ({good}); pass "
                               f"metric=logit_difference(good_id, bad_id) with the answers to compare")
            metric = logit_difference(good, bad)
            metric.__name__ = "logit[{!r}] - logit[{!r}]".format(*self.token_labels([good, bad]))
        cells = [(i, j) for i in range(len(layers)) for j in range(len(clean_run.positions))]
        values = np.zeros((len(layers), len(clean_run.positions)))

        def requests():
            for start in range(0, len(cells), batch_size):
                chunk = cells[start:start + batch_size]
                interventions = [Intervention("set", [sites[i]], clean_run.captures[sites[i]][j],
                                              positions=[clean_run.positions[j]], sequences=[s])
                                 for s, (i, j) in enumerate(chunk)]
                yield self.run_request([corrupted_run.token_ids] * len(chunk), capture=[], logits="last",
                                       interventions=interventions)

        with progress_bar(len(cells), enabled=progress, desc="patched runs") as bar:
            for (i, j), run in zip(cells, self.send_runs(requests())):
                values[i, j] = metric(run.logits[-1])
                bar.update(1)
        clean_labels = self.token_labels(clean_run.token_ids)
        corrupted_labels = self.token_labels(corrupted_run.token_ids)
        tokens = [clean_labels[p] if clean_labels[p] == corrupted_labels[p]
                  else f"{clean_labels[p]}/{corrupted_labels[p]}" for p in clean_run.positions]
        return PatchSweep(values=values, layers=layers, positions=list(clean_run.positions), tokens=tokens,
                          clean_value=metric(clean_run.logits[-1]), corrupted_value=metric(corrupted_run.logits[-1]),
                          site=site, metric_name=getattr(metric, "__name__", "metric"))
