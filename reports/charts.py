"""Shared matplotlib set-up: the Agg backend, a style that survives grey-scale printing (every
series differs by hatch, marker or line style, not by colour alone), bytes in GiB, and saving
each figure as PNG and SVG."""

from __future__ import annotations

from pathlib import Path

GIB = 1024**3

# Fills for stacked bars: grey levels from dark to light, each with its own hatch.
FILLS = [
    ("#222222", ""), ("#ffffff", "////"), ("#888888", ""), ("#ffffff", "xx"), ("#cccccc", ".."),
    ("#ffffff", "\\\\\\\\"), ("#555555", ""), ("#eeeeee", "--"),
]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2, 2, 2))]
GREYS = ["#000000", "#444444", "#777777", "#222222", "#555555", "#888888", "#333333", "#666666"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 130, "font.size": 10, "axes.titlesize": 11,
        "axes.grid": True, "grid.color": "#dddddd", "grid.linewidth": 0.6, "axes.axisbelow": True,
        "hatch.linewidth": 0.7, "legend.framealpha": 0.95, "svg.fonttype": "none",
    })
    return plt


# One fixed look per method (marker, line style, grey, hollow marker?), the same in every chart;
# no two share both marker and line style.
METHOD_STYLES = {
    "full": ("o", "-", "#000000", False),
    "frozen": ("s", "--", "#444444", True),
    "freeze": ("^", "-.", "#666666", False),
    "lora": ("v", ":", "#000000", True),
    "qlora": ("D", (0, (5, 1)), "#444444", False),
    "adapter": ("P", "--", "#777777", True),
    "prefix": ("X", (0, (3, 1, 1, 1, 1, 1)), "#222222", False),
    "prompt": ("*", (0, (1, 1)), "#555555", True),
    "bitfit": ("h", (0, (8, 2, 2, 2)), "#333333", False),
    "ia3": ("<", (0, (6, 2)), "#000000", True),
}


def line_style(i, name: str | None = None) -> dict:
    """Marker, line style and grey of series `i` (or of method `name`, which keeps its look)."""
    if name in METHOD_STYLES:
        marker, ls, grey, hollow = METHOD_STYLES[name]
    else:
        marker, ls, grey = MARKERS[i % len(MARKERS)], LINESTYLES[(i * 3) % len(LINESTYLES)], GREYS[i % len(GREYS)]
        hollow = bool(i % 2)
    return {"marker": marker, "linestyle": ls, "color": grey, "markerfacecolor": "white" if hollow else grey,
            "markeredgecolor": grey, "markersize": 6.5, "linewidth": 1.4}


def label_lines(ax, lines, x_axes: float = 1.0, fontsize: float = 7.5) -> None:
    """Horizontal reference lines (value, label) with labels at the right edge of `ax`, outside
    it; of two lines closer than 6% of the axis span, the lower label goes under its line."""
    import math

    lo, hi = ax.get_ylim()
    log = ax.get_yscale() == "log"
    pos = (lambda v: math.log10(v)) if log else (lambda v: v)
    span = pos(hi) - pos(lo)
    shown = [(v, t) for v, t in sorted(lines) if lo <= v <= hi]
    for k, (v, text) in enumerate(shown):
        ax.axhline(v, color="black", linewidth=0.8, linestyle=(0, (4, 3)))
        below = k + 1 < len(shown) and (pos(shown[k + 1][0]) - pos(v)) < 0.06 * span
        ax.annotate(text, xy=(x_axes, v), xycoords=("axes fraction", "data"), xytext=(3, -1 if below else 1),
                    textcoords="offset points", va="top" if below else "bottom", ha="left", fontsize=fontsize,
                    annotation_clip=False)


def fill_style(i: int) -> dict:
    face, hatch = FILLS[i % len(FILLS)]
    return {"color": face, "hatch": hatch, "edgecolor": "black", "linewidth": 0.6}


def stem_of(out: str | Path) -> Path:
    """`out` without a .png/.svg suffix (both files are written)."""
    p = Path(out)
    return p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p


def save(fig, out: str | Path) -> list[str]:
    """Save `fig` as <stem>.png and <stem>.svg; returns both paths."""
    stem = stem_of(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, bbox_inches="tight")
        paths.append(str(path))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def gib(n) -> float:
    return n / GIB
