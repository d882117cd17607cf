"""Figures for the analysis results (matplotlib, the optional `plot` extra).

Every function here builds and returns a `matplotlib.figure.Figure` and, given `save="name.png"` (or .svg,
.pdf), writes it there too; nothing calls `plt.show()`, so the same code works in notebooks (where a
returned figure displays itself), scripts and tests. The result objects (`LogitLens.plot()`,
`Projection.plot()`, ...) call these with their own data.

matplotlib is imported only when a figure is asked for, so the client works without it.
"""
from __future__ import annotations

import contextlib
import pathlib
import unicodedata
from typing import Mapping, Sequence

import numpy as np

from .errors import invalid_argument

SAVE_FORMATS = (".png", ".svg", ".pdf")
# Fonts with CJK glyphs, tried in order when a figure shows tokens (DejaVu Sans, matplotlib's default, has none).
_CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Source Han Sans", "WenQuanYi Zen Hei", "Droid Sans Fallback",
              "Microsoft YaHei", "PingFang SC", "Hiragino Sans", "SimHei", "Arial Unicode MS")


def pyplot():
    """matplotlib.pyplot, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'lmscope[plot]' (or pip install matplotlib)") from exc
    return plt


@contextlib.contextmanager
def _token_fonts():
    """Let token text fall back to an installed CJK font where there is one (a no-op otherwise)."""
    import matplotlib
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    fallbacks = [name for name in _CJK_FONTS if name in installed]
    with matplotlib.rc_context({"font.family": ["DejaVu Sans", *fallbacks]} if fallbacks else {}):
        yield


def _finish(fig, save: str | pathlib.Path | None):
    if save is not None:
        path = pathlib.Path(save)
        if path.suffix.lower() not in SAVE_FORMATS:
            raise invalid_argument(f"save to a {', '.join(SAVE_FORMATS)} file, not {path.name!r}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


def token_label(text: str, width: int = 10) -> str:
    """A token as it can be shown in a cell: control characters escaped (as repr does), a token made only
    of whitespace made visible (a space as "␣"), long ones shortened."""
    blank = bool(text) and not text.strip()
    shown = "".join("␣" if blank and ch == " " else repr(ch)[1:-1] if blank or unicodedata.category(ch)[0] == "C"
                    else ch for ch in text)
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def lens_heatmap(cell_tokens: Sequence[Sequence[str]], values: np.ndarray, row_labels: Sequence[str],
                 column_labels: Sequence[str], *, correct: np.ndarray | None = None, value_name: str = "probability",
                 cmap: str = "Blues", vmin: float | None = None, vmax: float | None = None, title: str = "",
                 top_labels: Sequence[str] | None = None, save=None):
    """The logit-lens picture: one row per layer (input at the bottom), one column per position.

    cell_tokens[i][j]: the text written in the cell (the top-1 token); values[i, j]: its colour.
    correct[i, j]: cells drawn with a frame (top-1 equals the token that really comes next).
    top_labels: labels for the top axis (the next token of each position).
    """
    plt = pyplot()
    values = np.asarray(values, dtype=float)
    n_rows, n_cols = values.shape
    with _token_fonts():
        fig, ax = plt.subplots(figsize=(1.25 * n_cols + 2.5, 0.28 * n_rows + 1.8))
        image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        low, high = image.get_clim()
        for i in range(n_rows):
            for j in range(n_cols):
                shade = (values[i, j] - low) / (high - low) if high > low else 0.0
                ax.text(j, i, token_label(cell_tokens[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if shade > 0.6 else "black")
                if correct is not None and correct[i, j]:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="crimson", lw=1.2))
        ax.set_yticks(range(n_rows), list(row_labels), fontsize=7)
        ax.set_xticks(range(n_cols), [token_label(t, 14) for t in column_labels], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("layer (hidden state)")
        ax.set_xlabel("input token")
        if top_labels is not None:
            top = ax.secondary_xaxis("top")
            top.set_xticks(range(n_cols), [token_label(t, 14) for t in top_labels], rotation=45, ha="left",
                           fontsize=8)
            top.set_xlabel("next token")
        fig.colorbar(image, ax=ax, label=value_name, fraction=0.04, pad=0.02)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
    return _finish(fig, save)


def layer_curves(x_labels: Sequence[str], curves: Mapping[str, np.ndarray], *, ylabel: str, title: str = "",
                 ylim: tuple[float, float] | None = None, baseline: float | None = None,
                 baseline_label: str = "chance", save=None):
    """One line per named curve over the layers (x: hidden-state index, labelled by `x_labels`)."""
    plt = pyplot()
    with _token_fonts():
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(x_labels) + 2), 3.8))
        x = np.arange(len(x_labels))
        for name, values in curves.items():
            ax.plot(x, np.asarray(values, dtype=float), marker="o", markersize=3, label=name)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=baseline_label)
        step = -(-len(x_labels) // 16)  # at most 16 tick labels
        ax.set_xticks(x[::step], [x_labels[i] for i in x[::step]])
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
    return _finish(fig, save)


def scatter_panels(panels: Mapping[str, np.ndarray], *, labels: Sequence[str] | None = None, color=None,
                   axis_names: Sequence[str] = ("1", "2"), title: str = "", colorbar_label: str = "",
                   max_labels: int = 200, save=None):
    """2-D scatter plots, one panel per entry (e.g. per layer), sharing labels and colours.

    color: None, a sequence of numbers (a colour scale with a colour bar) or of category names (a legend).
    labels: text written next to each point (the first `max_labels` points only, to stay readable).
    """
    plt = pyplot()
    names = list(panels)
    n = len(names)
    columns = min(n, 3)
    rows = -(-n // columns)
    categories = None
    if color is not None and not np.issubdtype(np.asarray(color).dtype, np.number):
        categories = list(dict.fromkeys(color))
    with _token_fonts():
        fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        mappable = None
        for ax, name in zip(axes.flat, names):
            points = np.asarray(panels[name])
            if categories is not None:
                palette = plt.get_cmap("tab10" if len(categories) <= 10 else "tab20")
                for c, category in enumerate(categories):
                    mask = np.array([value == category for value in color])
                    ax.scatter(points[mask, 0], points[mask, 1], s=14, color=palette(c % palette.N),
                               label=str(category))
            else:
                mappable = ax.scatter(points[:, 0], points[:, 1], s=14, c=color,
                                      cmap="viridis" if color is not None else None)
            if labels is not None:
                for (x, y), text in list(zip(points[:, :2], labels))[:max_labels]:
                    ax.annotate(token_label(str(text), 18), (x, y), fontsize=6, alpha=0.8, xytext=(2, 2),
                                textcoords="offset points")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel(axis_names[0])
            ax.set_ylabel(axis_names[1])
            ax.grid(alpha=0.3)
        if categories is not None:
            axes.flat[0].legend(fontsize=7, markerscale=1.2)
        elif mappable is not None and color is not None:
            fig.colorbar(mappable, ax=list(axes.flat[:n]), label=colorbar_label, fraction=0.03)
        if title:
            fig.suptitle(title, fontsize=11)
        if color is None or categories is not None:
            fig.tight_layout()
    return _finish(fig, save)
