"""The start-up probe: which capture sites this model really has, and proof that they mean what they say.

The family's rules (`service/architectures.py`) say where each site *should* be. At start-up the engine
decodes a short prompt (in the smallest context, `Contexts.get`) and:

1. records every node a rule matches (shape, type, contiguity, and whether the last block keeps only the
   rows of output tokens there), with the last token as the only output;
2. decodes the prompt again with every token an output, capturing the residual stream, the norms and the
   attention patterns of every layer, and checks them against arithmetic they must satisfy:
   - ``embed`` equals the token-embedding rows times the family's scale (Gemma: sqrt(n_embd));
   - ``resid_pre + attn_out == resid_mid`` and ``resid_mid + mlp_out == resid_post`` at every layer
     (``resid_pre`` is ``embed`` for block 0 and the previous ``resid_post`` after): llama.cpp adds these
     in float32, so the sums agree to the rounding of one float32 add;
   - ``ln1``/``ln2`` are the RMS norms of the block's stream with the block's norm weights, Gemma's
     ``*_pre_norm`` outputs become ``attn_out``/``mlp_out`` through the post-norms, ``ln_final`` is the final
     norm of the last ``resid_post``;
   - every attention row is a probability distribution over the causal keys;
   - final norm + LM head (+ the head's bias and soft-capping) in numpy reproduce llama.cpp's logits within
     the error llama.cpp's quantized matrix product is allowed (`unembedding_error_bound`).
3. A site that fails, or that no check can reach on an architecture outside the registry, is not offered:
   `unavailable` maps it (or ``blocks.*.<kind>`` when every layer shares the reason) to the reason, which
   `model_info`, the server log and the error for a request naming it all show.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lmscope.proto import tensor_names
from lmscope.proto.sites import SITE_KINDS, all_site_names, is_pattern_site, site_kind, site_layer

from . import architectures, ggml
from .batching import Contexts, Row, collect_logits
from .capture import CapturePass
from .graph_sites import SiteRules
from .model import Model

if TYPE_CHECKING:
    from .weights import Weights

PROBE_TEXT = "The quick brown fox jumps over the lazy dog"
PROBE_TOKENS = 8
CHECK_VOCAB_SAMPLE = 256  # vocabulary rows compared by the unembedding check (plus each position's top 8)

EPS32 = float(np.finfo(np.float32).eps)
ADD_TOLERANCE = 8 * EPS32    # one float32 add is exact to half an ulp of its result: relative to the row's max
NORM_TOLERANCE = 1e-5        # RMSNorm in float32 (a mean over n_embd, a sqrt, two products), numpy vs ggml
SUM_TOLERANCE = 1e-4         # attention rows: float32 softmax sums over at most PROBE_TOKENS keys


@dataclass
class Verified:
    site_shapes: dict[str, tuple[int, ...]]
    output_rows_sites: set[str]
    unavailable: dict[str, str]
    unembed_error: str | None
    checks: dict[str, float] = field(default_factory=dict)  # check -> worst error seen (relative)


class _Recorder:
    """A pass that reads nothing: it records each site's node as the graph is computed."""

    def __init__(self, matcher):
        self.error: BaseException | None = None
        self.matcher = matcher
        self.seen: dict[str, tuple[tuple[int, ...], int, bool]] = {}  # site -> (ne, type, contiguous)
        self._layout_checked = False

    def begin_ubatch(self, rows, outputs, first_cell) -> None:
        self.matcher.begin_ubatch()

    def callback(self, tensor, ask, _user_data) -> bool:
        try:
            if ask:
                if not self._layout_checked:
                    ggml.check_layout(tensor)
                    self._layout_checked = True
                for site in self.matcher.match(tensor):
                    self.seen[site] = (ggml.shape_of(tensor), ggml.type_of(tensor), ggml.is_contiguous(tensor))
            return not ask
        except BaseException as exc:  # an exception must not unwind through C
            self.error = self.error or exc
            return not ask


def _shape(site: str, ne) -> tuple[int, ...]:
    """The site's shape without its token axes (`SiteKind.shape`), read from its node's ggml `ne`."""
    axes = SITE_KINDS[site_kind(site)].shape
    dims = tuple(reversed(ne[:len(axes)]))  # ggml lists a tensor's axes innermost first
    return tuple(int(d) for d, axis in zip(dims, axes) if axis != "tokens")


def _rms(x: np.ndarray, weight: np.ndarray, eps: float, bias: np.ndarray | None = None) -> np.ndarray:
    x = x.astype(np.float32)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight
    return y if bias is None else y + bias


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |difference| over max |theirs|, per row, worst row."""
    scale = np.maximum(np.abs(theirs).max(axis=-1), 1e-30)
    return float((np.abs(ours - theirs).max(axis=-1) / scale).max())


def unembedding_error_bound(x: np.ndarray, head: np.ndarray, head_type: str) -> np.ndarray:
    """A bound on |llama.cpp's logit - numpy's| for normed rows x (n, n_embd) and head rows (k, n_embd).

    llama.cpp multiplies a quantized head by the activations quantized to 8 bits per block (Q8_0/Q8_K:
    blocks of 32 or 256, scale max|x_block| / 127, rounding error at most half a step), or by activations
    rounded to F16 for an F16 head; numpy multiplies the dequantized head by float32 x. The bound sums
    |w| times the activation's worst rounding error, computed with blocks of 256 (never smaller than the
    real error: a 256-block's scale is at least that of each of its 32-blocks), plus float32 accumulation
    (n_embd * eps32 of sum |w x|)."""
    x = x.astype(np.float64)
    absolute = np.abs(head.astype(np.float64))
    if head_type == "F32":
        step = np.zeros_like(x)
    elif head_type in ("F16", "BF16"):
        step = np.abs(x) * (2.0 ** -8 if head_type == "BF16" else 2.0 ** -11)
    else:
        n, width = x.shape
        block = 256 if width % 256 == 0 else 32
        blocks = np.abs(x).reshape(n, width // block, block).max(axis=2) / 127 / 2
        step = np.repeat(blocks, block, axis=1)
    accumulate = x.shape[1] * EPS32 * (np.abs(x) @ absolute.T)
    return step @ absolute.T + accumulate + 1e-6


def verify(model: Model, contexts: Contexts, weights: "Weights", site_rules: SiteRules) -> Verified:
    family = site_rules.family
    names = all_site_names(model.n_layer)
    unavailable: dict[str, str] = {}
    for site in names:
        if site not in site_rules:
            unavailable[site] = family.refused.get(site_kind(site)) or f"{family.name} has no such tensor"

    # One ubatch holds the whole probe, every row an output in step 2 (llama.cpp aborts on a call longer than
    # n_batch or with more outputs than n_outputs_max), so that the last block's output-rows-only sites show
    # as one row among several in step 1.
    tokens = model.tokenize(PROBE_TEXT, add_special=True)[:min(PROBE_TOKENS, contexts.n_batch, contexts.n_outputs_max)]
    if len(tokens) < 2:
        tokens = (tokens + [0, 1])[:2]
    ctx = contexts.get(flash_attn=False, n_cells=len(tokens))  # the smallest context, kept for the first request
    try:
        # 1. Where the sites are: the last token alone is an output, as in most requests.
        recorder = _Recorder(site_rules.matcher(list(site_rules.rules)))
        rows = [Row(t, p, 0, p == len(tokens) - 1, p == len(tokens) - 1) for p, t in enumerate(tokens)]
        contexts.decode(ctx, recorder, [rows])
        shapes, output_rows = {}, set()
        for site in site_rules.rules:
            if site not in recorder.seen:
                rule = site_rules.rules[site]
                unavailable[site] = family.refused.get(site_kind(site)) or (
                    f"llama.cpp's graph for this {family.name} model has no node {rule.node.decode()}"
                    + (" (or the steps after it)" if rule.steps else ""))
                continue
            ne, ggml_type, contiguous = recorder.seen[site]
            if ggml_type != ggml.GGML_TYPE_F32 or not contiguous:
                unavailable[site] = (f"its node is {'not float32' if ggml_type != ggml.GGML_TYPE_F32 else ''}"
                                     f"{' and ' if ggml_type != ggml.GGML_TYPE_F32 and not contiguous else ''}"
                                     f"{'a strided view (e.g. of a fused QKV projection)' if not contiguous else ''}")
                continue
            shapes[site] = _shape(site, ne)
            if not is_pattern_site(site) and int(np.prod(ne)) // int(np.prod(shapes[site])) == 1 < len(tokens):
                output_rows.add(site)

        # 2. What they hold: every token an output, every provable site captured.
        contexts.reset_memory(ctx)
        provable = [s for s in shapes if site_kind(s) in architectures.PROVABLE_KINDS]
        positions = list(range(len(tokens)))
        active = CapturePass(site_rules, shapes, output_rows, [tokens], provable, [positions], [])
        logits = [np.zeros((len(tokens), model.n_vocab), np.float32)]
        slots = [{p: p for p in positions}]
        contexts.decode(ctx, active, [[Row(t, p, 0, True, True) for p, t in enumerate(tokens)]],
                        on_decoded=lambda ubatch: collect_logits(ctx, ubatch, model.n_vocab, logits, slots))
    finally:
        contexts.reset_memory(ctx)
    captured = {site: arrays[0] for site, arrays in active.out.items()}
    checks: dict[str, float] = {}
    failed = _check(model, weights, family, tokens, captured, checks)
    for site, reason in failed.items():
        shapes.pop(site, None)
        unavailable[site] = reason
    if family is architectures.GENERIC:
        # Outside the registry only what a check proved is offered.
        for site in list(shapes):
            if site_kind(site) in architectures.PROVABLE_KINDS and site not in checks.get("_proved", set()):
                shapes.pop(site)
                unavailable[site] = (f"architecture {weights.architecture!r} is not in lmscope's registry and no "
                                     f"check could prove this site")
    checks.pop("_proved", None)
    unembed_error = _check_unembedding(model, weights, tokens, captured, logits[0], shapes, checks)
    return Verified(site_shapes={s: shapes[s] for s in names if s in shapes}, output_rows_sites=output_rows,
                    unavailable=collapse(unavailable, model.n_layer), unembed_error=unembed_error, checks=checks)


def _check(model: Model, weights: "Weights", family, tokens, captured, checks) -> dict[str, str]:
    """The sites whose captures contradict the arithmetic, with why; records proved sites in checks["_proved"]."""
    failed: dict[str, str] = {}
    proved: set[str] = set()

    def note(check: str, error: float) -> None:
        checks[check] = max(checks.get(check, 0.0), error)

    def norm_weight(template: str, layer: int):
        name = template.format(L=layer)
        bias = name.replace(".weight", ".bias")
        if name not in weights.tensors:
            return None
        return weights.read(name), (weights.read(bias) if bias in weights.tensors else None)

    eps = weights.rms_eps
    if "embed" in captured and family is not architectures.GENERIC:
        scale = np.float32(architectures.embedding_scale(family, model.n_embd))
        rows = weights.rows(tensor_names.TOKEN_EMBEDDING, np.asarray(tokens)) * scale
        error = _relative(rows, captured["embed"])
        note("embed == scale * embedding rows", error)
        if error > ADD_TOLERANCE:
            failed["embed"] = (f"embed differs from the token-embedding rows times {float(scale):g} "
                               f"(relative error {error:.2g})")
    for layer in range(model.n_layer):
        site = lambda kind, layer=layer: f"blocks.{layer}.{kind}"  # noqa: E731
        pre = "embed" if layer == 0 else site("resid_post").replace(f".{layer}.", f".{layer - 1}.")
        pre_ok = pre in captured and pre not in failed
        mid, post, attn, mlp = site("resid_mid"), site("resid_post"), site("attn_out"), site("mlp_out")
        first = second = None
        if pre_ok and mid in captured and attn in captured:
            error = _relative(captured[pre] + captured[attn], captured[mid])
            note("resid_pre + attn_out == resid_mid", error)
            first = error <= ADD_TOLERANCE
        if mid in captured and post in captured and mlp in captured:
            error = _relative(captured[mid] + captured[mlp], captured[post])
            note("resid_mid + mlp_out == resid_post", error)
            second = error <= ADD_TOLERANCE
        if first is False and second is not False:
            failed[attn] = "resid_pre + attn_out != resid_mid: the node is not what the attention branch adds"
        if second is False and first is not False:
            failed[mlp] = "resid_mid + mlp_out != resid_post: the node is not what the FFN branch adds"
        if first is False and second is False:
            for s in (attn, mid, mlp):
                failed[s] = "neither residual identity holds in this block"
        if first:
            proved.update((attn, mid) + ((pre,) if pre == "embed" else ()))
        if second:
            proved.update((mid, mlp, post))
        for kind, source, template in (("ln1", pre, tensor_names.ATTN_NORM), ("ln2", mid, tensor_names.FFN_NORM),
                                       ("attn_out_pre_norm", None, tensor_names.POST_ATTN_NORM),
                                       ("mlp_out_pre_norm", None, tensor_names.POST_FFN_NORM)):
            target = site(kind)
            if target not in captured:
                continue
            if source is None:  # a pre-norm branch output: its post-norm must give the branch's addition
                source, target = target, (attn if kind == "attn_out_pre_norm" else mlp)
            weight = norm_weight(template, layer)
            if weight is None or source not in captured or target not in captured or source in failed:
                continue
            error = _relative(_rms(captured[source], weight[0], eps, weight[1]), captured[target])
            note(f"{kind} norm", error)
            if error > NORM_TOLERANCE:
                failed[site(kind)] = (f"{site(kind)} is not the RMS norm its block's weights give "
                                      f"(relative error {error:.2g})")
            else:
                proved.add(site(kind))
        pattern = site("attn.pattern")
        if pattern in captured:
            sums = captured[pattern].sum(axis=-1)
            error = float(np.abs(sums - 1).max())
            note("attention rows sum to 1 over causal keys", error)
            if error > SUM_TOLERANCE:
                failed[pattern] = f"attention rows do not sum to 1 over the causal keys (error {error:.2g})"
            else:
                proved.add(pattern)
    last = f"blocks.{model.n_layer - 1}.resid_post"
    if "ln_final" in captured and last in captured:
        error = _relative(weights.final_norm(captured[last]), captured["ln_final"])
        note("ln_final == final norm of the last resid_post", error)
        if error > NORM_TOLERANCE:
            failed["ln_final"] = f"ln_final is not the final norm of {last} (relative error {error:.2g})"
        else:
            proved.add("ln_final")
    checks["_proved"] = proved
    return failed


def _check_unembedding(model: Model, weights: "Weights", tokens, captured, logits, shapes, checks) -> str | None:
    """None if numpy's final norm + LM head (+ bias, soft-capping) reproduce llama.cpp's logits, else why not.

    Only some vocabulary rows are compared (each position's top logits and a fixed random sample):
    dequantizing the whole LM head here would cost every worker its size in float32 before anyone asked
    for a lens."""
    last = f"blocks.{model.n_layer - 1}.resid_post"
    if last not in shapes or last not in captured:
        return f"this model offers no {last} site, so the lens cannot be checked"
    top = np.argsort(-logits, axis=1)[:, :8].reshape(-1)
    # The stdlib's generator, not numpy's: numpy.random imports `secrets`, hence OpenSSL (3 MB in every worker).
    sample = np.array(random.Random(0).sample(range(model.n_vocab), min(model.n_vocab, CHECK_VOCAB_SAMPLE)))
    ids = np.unique(np.concatenate([top, sample]))
    theirs = logits[:, ids]
    head = weights.rows(weights.head_name, ids)
    normed = weights.final_norm(captured[last])
    ours = weights.logit_transform(normed @ head.T, ids)
    bound = unembedding_error_bound(normed, head, weights.tensors[weights.head_name].tensor_type.name)
    excess = np.abs(ours - theirs) / bound   # soft-capping is 1-Lipschitz: the bound carries through it
    checks["unembedding error / its bound"] = float(excess.max())
    if excess.max() > 1:
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        return (f"final norm + LM head computed from the GGUF weights differ from llama.cpp's logits by "
                f"{float(np.abs(ours - theirs)[worst]):.3g} (allowed {float(bound[worst]):.3g} for a "
                f"{weights.tensors[weights.head_name].tensor_type.name} head) for architecture "
                f"{weights.architecture}: the lens and Unembed are disabled for this model")
    return None


def collapse(unavailable: dict[str, str], n_layer: int) -> dict[str, str]:
    """`blocks.*.<kind>` for a kind every layer lacks for one reason (with `{L}` for the layer), else per site."""
    by_kind: dict[str, dict[int, str]] = {}
    out: dict[str, str] = {}
    for site, reason in unavailable.items():
        layer = site_layer(site)
        if layer is None:
            out[site] = reason
        else:
            by_kind.setdefault(site_kind(site), {})[layer] = reason.replace(f"-{layer}", "-{L}")
    for kind, reasons in by_kind.items():
        if len(reasons) == n_layer and len(set(reasons.values())) == 1:
            out[f"blocks.*.{kind}"] = next(iter(reasons.values()))
        else:
            for layer, reason in reasons.items():
                out[f"blocks.{layer}.{kind}"] = reason.replace("-{L}", f"-{layer}")
    return out
