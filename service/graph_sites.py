"""Finding a model's capture sites among llama.cpp's graph nodes, as the eval callback sees them.

llama.cpp names graph nodes with `cb(tensor, "name", layer)`, producing e.g. `l_out-5`. A name can label
several nodes (the Q projection, its reshape and its RoPE are all `Qcur-L`), so a rule also says which op it
means, and some tensors have no name at all (qwen2's attention output): a rule then starts at a named node
and follows its consumers step by step (`Step` in `service/architectures.py`). The rules are per family
(`service/architectures.py`); this module resolves them for one model (`SiteRules`) and matches nodes in
graph order (`NodeMatcher`), for the start-up probe and for every request alike.

Which sites a model really has is not assumed from the rules: the engine decodes a probe at start-up and
offers only the sites it found and verified (`service/verification.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

from lmscope.proto.sites import site_kind, site_layer

from . import ggml
from .architectures import Family

_GET_ROWS = "GET_ROWS"  # llama.cpp's selection of output rows in the last block: looked through by steps


@dataclass(frozen=True)
class ResolvedRule:
    node: bytes                     # concrete node name
    op: int | None                  # op code of the named node, or None
    steps: tuple[int, ...]          # op codes of the consumer steps


class SiteRules:
    """The concrete rule of every site name the family places, for a model with `n_layer` blocks."""

    def __init__(self, family: Family, site_names: list[str], tensor_names):
        self.family = family
        self.rules: dict[str, ResolvedRule] = {}
        for site in site_names:
            rule = family.sites.get(site_kind(site))
            if rule is None:
                continue
            layer = site_layer(site)
            fill = (lambda t, layer=layer: t.format(L=layer)) if layer is not None else (lambda t: t)
            steps = tuple(ggml.OP_CODES[s.op] for s in rule.then
                          if s.if_tensor is None or fill(s.if_tensor) in tensor_names)
            self.rules[site] = ResolvedRule(fill(rule.node).encode(), ggml.OP_CODES[rule.op] if rule.op else None,
                                            steps)

    def __contains__(self, site: str) -> bool:
        return site in self.rules

    def matcher(self, sites) -> "NodeMatcher":
        return NodeMatcher({site: self.rules[site] for site in sites})


class NodeMatcher:
    """Answers, node by node in graph order, which of its sites a node holds (the first match per ubatch)."""

    def __init__(self, rules: dict[str, ResolvedRule]):
        self.by_name: dict[bytes, list[tuple[str, ResolvedRule]]] = {}
        for site, rule in rules.items():
            self.by_name.setdefault(rule.node, []).append((site, rule))
        self.n_sites = len(rules)
        self._get_rows = ggml.OP_CODES[_GET_ROWS]
        self.found: set[str] = set()
        self._anchors: dict[int, list[tuple[str, ResolvedRule, int]]] = {}  # node address -> (site, rule, next step)

    def begin_ubatch(self) -> None:
        self.found.clear()
        self._anchors.clear()

    def match(self, tensor: int) -> list[str]:
        hits = []
        wanted = self.by_name.get(ggml.name_of(tensor))
        if wanted:
            op = ggml.op_of(tensor)
            for site, rule in wanted:
                if site in self.found or (rule.op is not None and op != rule.op):
                    continue
                if rule.steps:
                    if not any(s == site for entries in self._anchors.values() for s, _, _ in entries):
                        self._anchors.setdefault(tensor, []).append((site, rule, 0))
                else:
                    self.found.add(site)
                    hits.append(site)
        if self._anchors:
            hits += self._follow(tensor)
        return hits

    def _follow(self, tensor: int) -> list[str]:
        hits = []
        for source in ggml.sources_of(tensor):
            entries = self._anchors.get(source) if source else None
            if not entries:
                continue
            op = ggml.op_of(tensor)
            keep = []
            for site, rule, step in entries:
                if op == self._get_rows:
                    self._anchors.setdefault(tensor, []).append((site, rule, step))
                elif op == rule.steps[step]:
                    if step + 1 == len(rule.steps):
                        self.found.add(site)
                        hits.append(site)
                    else:
                        self._anchors.setdefault(tensor, []).append((site, rule, step + 1))
                else:
                    keep.append((site, rule, step))
            if keep:
                self._anchors[source] = keep
            else:
                del self._anchors[source]
        return hits
