"""Assembling a view: one HTML fragment holding its style, its data (compact JSON) and its script.

A view must work where nothing can be fetched: a notebook on a remote machine, a file opened from disk,
a browser offline. So everything is inline and the fragment is the same text in both places:
`_repr_html_` returns it, and `to_html` wraps it in a minimal document (`document`). No CDN, no widget
server, no external font: tokens use the browser's own monospace and CJK fonts.

Several views can share one notebook page: the style is scoped to `.lmv`, the data sits in the
fragment's own ``<script type="application/json">``, and the script finds its container through
`document.currentScript` (or, where a front end evaluates scripts out of place, as the first not yet
drawn container with the fragment's content hash, `data-view`).

Data size. Floats are written with as many significant digits as the eye and a hover read-out need
(`numbers`), and flat arrays replace nested ones; see docs/views.md for the sizes this gives.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import pathlib
from functools import lru_cache

import numpy as np

_ASSETS = pathlib.Path(__file__).parent


@lru_cache(maxsize=None)
def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


class Raw(str):
    """JSON text already encoded (a flat number array from `numbers`), spliced into `to_json` as is."""


def numbers(values, digits: int = 4) -> Raw:
    """A flat JSON array of `values` with `digits` significant digits (NaN and infinities become null)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    spec = f"{{:.{digits}g}}"
    return Raw("[" + ",".join(spec.format(v) if math.isfinite(v) else "null" for v in flat.tolist()) + "]")


def integers(values) -> Raw:
    """A flat JSON array of integers."""
    return Raw("[" + ",".join(str(int(v)) for v in np.asarray(values).reshape(-1).tolist()) + "]")


def to_json(value) -> str:
    """JSON for the data block, with `Raw` pieces spliced in, safe inside a <script> element."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, (np.integer,)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return json.dumps(float(value)) if math.isfinite(value) else "null"
    # "<" appears only inside strings here; escaping it keeps "</script>" in a token from ending the block.
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def fragment(kind: str, data: dict, title: str) -> str:
    """The self-contained HTML of one view: `kind` is the renderer in views.js (lens, attention, ...)."""
    payload = to_json(data)
    key = hashlib.sha256(f"{kind}\0{payload}".encode()).hexdigest()[:16]
    script = (_asset("views.js") + f"\nlmscopeView({json.dumps(kind)}, document.currentScript ? "
              f"document.currentScript.parentElement : Array.from(document.querySelectorAll("
              f"'div.lmv[data-view=\"{key}\"]')).find((n) => !n.dataset.rendered));\n")
    return (f'<div class="lmv" data-kind="{kind}" data-view="{key}">'
            f"<style>{_asset('views.css')}</style>"
            f'<div class="lmv-title">{html.escape(title)}</div>'
            f'<script type="application/json" class="lmv-data">{payload}</script>'
            f'<div class="lmv-fallback">This view is drawn by its inline script: in JupyterLab trust the notebook, or '
            f'open the page <code>.to_html(path)</code> writes in a browser.</div>'
            f"<script>{script}</script></div>")


def document(fragment_html: str, title: str) -> str:
    """A whole page around one fragment: what `to_html` writes."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title></head>\n<body>\n{fragment_html}\n</body></html>\n")


def write(fragment_html: str, title: str, path=None) -> str:
    """The page around `fragment_html`; written (UTF-8) to `path` when one is given."""
    page = document(fragment_html, title)
    if path is not None:
        pathlib.Path(path).write_text(page, encoding="utf-8")
    return page
