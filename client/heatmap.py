"""One labelled heatmap for the analysis results (attention patterns, patching sweeps).

matplotlib is an optional extra (``pip install lmscope[plot]``) and is imported only when a plot is drawn.
Token labels may hold CJK characters, which the default font (DejaVu Sans) cannot draw: when the labels
need it and a CJK font is installed (e.g. Debian's ``fonts-noto-cjk``), it is added as a fallback font;
otherwise such characters are shown as ``\\uXXXX`` escapes rather than as empty boxes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

_CJK_FONT_NAMES = ("Noto Sans CJK", "Noto Serif CJK", "Source Han Sans", "WenQuanYi", "AR PL", "Droid Sans Fallback",
                   "Noto Sans TC", "Noto Sans SC", "Noto Sans JP", "PingFang", "Microsoft YaHei", "SimHei")


@functools.lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The family name of an installed font that can draw CJK characters, or None."""
    from matplotlib import font_manager

    for font in font_manager.fontManager.ttflist:
        if any(font.name.startswith(name) for name in _CJK_FONT_NAMES):
            return font.name
    return None


def _needs_cjk(text: str) -> bool:
    return any(ord(ch) >= 0x2E80 for ch in text)


def _escape_wide(text: str) -> str:
    return "".join(ch if ord(ch) < 0x2E80 else f"\\u{ord(ch):04x}" for ch in text)


def heatmap(values: np.ndarray, *, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            xlabel: str, ylabel: str, colorbar_label: str, cmap: str = "viridis", vmin: float | None = None,
            vmax: float | None = None, ax=None, save: str | None = None):
    """Draw `values` (rows x columns) with labelled axes; returns the figure, saved to `save` if given
    (the format follows the file extension: .png, .svg, .pdf)."""
    import matplotlib.pyplot as plt

    labels = list(row_labels) + list(col_labels)
    family = None
    if any(_needs_cjk(label) for label in labels):
        font = cjk_font()
        if font is None:
            row_labels = [_escape_wide(label) for label in row_labels]
            col_labels = [_escape_wide(label) for label in col_labels]
        else:
            family = [plt.rcParams["font.family"][0], font]
    upright = max(map(len, col_labels), default=0) <= 2  # short column labels (layer numbers) stay upright
    if ax is None:
        n_rows, n_cols = values.shape
        width = min(18.0, max(6.0, 3.0 + (0.3 if upright else 0.45) * n_cols))
        height = min(14.0, max(3.0, 2.0 + 0.35 * n_rows))
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    else:
        fig = ax.figure
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(col_labels)))
    ax.set_yticks(range(len(row_labels)))
    text_options = {"family": family} if family else {}
    ax.set_xticklabels(col_labels, rotation=0 if upright else 90, **text_options)
    ax.set_yticklabels(row_labels, **text_options)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if save is not None:
        fig.savefig(save, dpi=150)
    return fig
