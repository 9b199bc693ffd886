"""Small renderers: DataFrames and row lists as markdown, CSV, JSON or a plain-text table."""

from __future__ import annotations

import csv
import io
import json
import math

GIB = 1024**3


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell(v, kind: str = "") -> str:
    """Format one value: kind 'gib' (bytes -> GiB), 'pct' (signed %), 'apct' (unsigned %), 'int'."""
    if is_missing(v):
        return "-"
    if hasattr(v, "item"):
        v = v.item()
    if kind == "gib":
        return f"{v / GIB:,.3f}"
    if kind == "bytes":
        return human_bytes(v)
    if kind == "pct":
        return f"{v:+.2f}"
    if kind == "apct":
        return f"{v:.2f}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}"
    return str(v).replace("|", "/")


def human_bytes(n) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def markdown(header: list[str], cells: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def plain(header: list[str], cells: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rows = [header] + cells
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def frame_markdown(df, columns: dict, align: str | None = None) -> str:
    """`columns`: column -> (header, kind) as in :func:`cell`."""
    if df is None or df.empty:
        return "_(no rows)_"
    header = [h for h, _ in columns.values()]
    cells = [[cell(r.get(c), kind) for c, (_, kind) in columns.items()] for r in df.to_dict("records")]
    if align is None:
        align = "".join("r" if kind in ("gib", "bytes", "pct", "apct", "int") else "l" for _, kind in columns.values())
    return markdown(header, cells, align)


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if is_missing(v) else v) for k, v in r.items()})
    return buf.getvalue()


def rows_json(rows: list[dict]) -> str:
    def clean(v):
        if hasattr(v, "item"):
            v = v.item()
        return None if is_missing(v) else v

    return json.dumps([{k: clean(v) for k, v in r.items()} for r in rows], indent=2)
