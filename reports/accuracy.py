"""Predicted vs measured: error tables (per method, family, device; per source), the worst rows,
component errors, the bounds CI holds the calculator to.

Error of a row: signed = (predicted - measured) / measured of the steady-state step's peak
(measure.run: the last step's max_memory_allocated-comparable peak); the tables give the median
and the worst of |signed| in percent, and the median signed error (the bias).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from reports.rows import ERROR_COMPONENTS, SOURCES

BOUNDS_FILE = Path(__file__).parent / "bounds.toml"
WORST_COLUMNS = ["source", "model", "variant", "settings", "device_name", "measured_peak_bytes",
                 "predicted_peak_bytes", "error_pct", "measured_peak_phase", "predicted_peak_phase", "key"]


def measured_ok(df):
    """Rows with a measurement and a prediction (outcome ok, both peaks known)."""
    if df.empty:
        return df
    return df[(df["outcome"] == "ok") & df["error"].notna()]


def _stats(errors) -> dict:
    a = errors.abs()
    worst_i = a.idxmax()
    return {"n": int(len(errors)),
            "median_abs_pct": float(a.median() * 100),
            "worst_abs_pct": float(a.max() * 100),
            "worst_signed_pct": float(errors.loc[worst_i] * 100),
            "median_signed_pct": float(errors.median() * 100)}


def error_table(df, by=("source", "method"), column: str = "error"):
    """n, median and worst |error| (%), the worst's sign, and the median signed error (bias, %) of
    each group of rows that have `column`."""
    import pandas as pd

    by = list(by)
    ok = measured_ok(df)
    ok = ok[ok[column].notna()] if not ok.empty else ok
    if ok.empty:
        return pd.DataFrame(columns=by + ["n", "median_abs_pct", "worst_abs_pct", "worst_signed_pct",
                                          "median_signed_pct"])
    rows = []
    for keys, g in ok.groupby(by, observed=True, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        rows.append({**dict(zip(by, keys)), **_stats(g[column])})
    return pd.DataFrame(rows)


def worst_rows(df, k: int = 10, source: str | None = None):
    """The `k` rows with the largest |error|, with their settings."""
    ok = measured_ok(df)
    if source is not None and not ok.empty:
        ok = ok[ok["source"] == source]
    if ok.empty:
        return ok.reindex(columns=WORST_COLUMNS)
    ok = ok.assign(error_pct=ok["error"] * 100)
    return ok.reindex(ok["error"].abs().sort_values(ascending=False).index)[WORST_COLUMNS].head(k)


def component_table(df):
    """Per source and component (weights, gradients, optimizer, activations): the error of the
    bytes live at the peak, where the harness split them (its tracer categories)."""
    import pandas as pd

    ok = measured_ok(df)
    rows = []
    if not ok.empty:
        for source, g in ok.groupby("source", observed=True, sort=True):
            for comp in ERROR_COMPONENTS:
                col = f"error_{comp}"
                e = g[col].dropna() if col in g else []
                e = e[~e.isin([math.inf, -math.inf])] if len(e) else e
                if len(e):
                    rows.append({"source": source, "component": comp, **_stats(e.reset_index(drop=True))})
    return pd.DataFrame(rows, columns=["source", "component", "n", "median_abs_pct", "worst_abs_pct",
                                       "worst_signed_pct", "median_signed_pct"])


def summarize(df) -> dict:
    """The summary build_report returns: counts, the (source, method) error table as records,
    per-source overall figures, and the rows without a prediction."""
    overall = error_table(df, by=("source",))
    table = error_table(df, by=("source", "method"))
    counts = {}
    if not df.empty:
        for source, g in df.groupby("source", observed=True, sort=True):
            counts[str(source)] = {"rows": int(len(g)), **{str(k): int(v) for k, v in g["outcome"].value_counts().items()},
                                   "predicted_from_current": int((g["predicted_from"] == "current").sum()),
                                   "predicted_from_stored": int((g["predicted_from"] == "stored").sum()),
                                   "unpredicted": int((g["predicted_from"] == "none").sum())}
    unpredicted = [] if df.empty else [
        {"source": str(r.source), "model": r.model, "variant": r.variant, "settings": r.settings,
         "note": r.prediction_note} for r in df[df["predicted_from"] != "current"].itertuples()]
    return {
        "rows": int(len(df)),
        "counts": counts,
        "overall": _records(overall),
        "error_table": _records(table),
        "phase": phase_table(df),
        "components": _records(component_table(df)),
        # offload_activations rows: the host copies' largest sum (measure/offload.py) against memory.host_bytes
        "host": _records(error_table(df, by=("source",), column="host_error")) if "host_error" in df else [],
        "unpredicted": unpredicted,
        "headline": "gpu" if "gpu" in counts else None,
    }


def phase_table(df) -> dict:
    """Per source: rows whose peak phase both sides name, how many the calculator named right
    (reports.rows.phase_group of each side equal), and that share in percent."""
    ok = measured_ok(df)
    out = {}
    if ok.empty:
        return out
    for source, g in ok.groupby("source", observed=True, sort=True):
        named = g["same_peak_phase"].dropna()
        right = int(named.astype(bool).sum())
        out[str(source)] = {"n": int(len(named)), "right": right,
                            "right_pct": round(100.0 * right / len(named), 2) if len(named) else None}
    return out


def _records(df) -> list[dict]:
    out = []
    for r in df.to_dict("records"):
        out.append({k: (str(v) if k in ("source", "method", "family", "device_name") else _plain(v)) for k, v in r.items()})
    return out


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 4)
    return v


def error_summary_text(summary: dict) -> str:
    """A compact plain-text table for the end of a CI log: per source and method, n, median and
    worst |error| and the bias, GPU first."""
    lines = ["peftcalc: predicted vs measured peak memory, current calculator",
             "error = (predicted - measured) / measured of the steady-state step peak"]
    if not summary.get("rows"):
        lines.append("no measured rows (no reports/data/*.jsonl yet): nothing to compare")
        return "\n".join(lines)
    header = ["source", "method", "n", "median|e|%", "worst|e|%", "worst e%", "bias%"]
    body = []
    by_source = {}
    for r in summary["error_table"]:
        by_source.setdefault(r["source"], []).append(r)
    overall = {r["source"]: r for r in summary["overall"]}
    for source in list(SOURCES) + sorted(set(by_source) - set(SOURCES)):
        if source not in by_source:
            if source == "gpu":
                body.append(["gpu", "(no GPU data committed)", "", "", "", "", ""])
            continue
        for r in by_source[source]:
            body.append([source, r["method"], str(r["n"]), f"{r['median_abs_pct']:.2f}", f"{r['worst_abs_pct']:.2f}",
                         f"{r['worst_signed_pct']:+.2f}", f"{r['median_signed_pct']:+.2f}"])
        o = overall[source]
        body.append([source, "ALL", str(o["n"]), f"{o['median_abs_pct']:.2f}", f"{o['worst_abs_pct']:.2f}",
                     f"{o['worst_signed_pct']:+.2f}", f"{o['median_signed_pct']:+.2f}"])
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    prev = None
    for cells in body:
        if prev is not None and cells[0] != prev:
            lines.append("")
        lines.append(fmt(cells))
        prev = cells[0]
    phases = summary.get("phase", {})
    if phases:
        lines.append("")
        lines.append("peak phase right: " + "; ".join(
            f"{src} {p['right']}/{p['n']} ({p['right_pct']:.1f}%)" for src, p in phases.items() if p["n"]))
    host = summary.get("host", [])
    if host:
        lines.append("offloaded activations' host bytes: " + "; ".join(
            f"{r['source']} {r['n']} rows, worst |error| {r['worst_abs_pct']:.4f}%" for r in host))
    missing = len(summary.get("unpredicted", []))
    if missing:
        lines.append(f"{missing} row(s) not predicted by the current calculator (see report.md)")
    return "\n".join(lines)


# -- bounds -----------------------------------------------------------------------------------


def load_bounds(path: str | Path = BOUNDS_FILE) -> dict:
    return tomllib.loads(Path(path).read_text())


def check_bounds(summary: dict, bounds: dict) -> list[str]:
    """Violations of `bounds` (see reports/bounds.toml) by a summary of committed data: per source,
    the overall median and worst |error|; per (source, method) where a method table sets its own;
    and the number of rows the current calculator did not predict."""
    problems = []
    overall = {r["source"]: r for r in summary.get("overall", [])}
    table = {(r["source"], r["method"]): r for r in summary.get("error_table", [])}
    components = {(r["source"], r["component"]): r for r in summary.get("components", [])}
    host = {r["source"]: r for r in summary.get("host", [])}
    for source, b in bounds.get("sources", {}).items():
        o = overall.get(source)
        if o is not None:
            problems += _check(f"{source}", o, b)
        if source in host:  # the offloaded activations' host bytes, held to the source's peak bounds
            problems += _check(f"{source} host bytes", host[source], b)
        phase = summary.get("phase", {}).get(source)
        floor = b.get("min_phase_right_pct")
        if floor is not None and phase and phase["right_pct"] is not None and phase["right_pct"] < floor:
            problems.append(f"{source}: peak phase right in {phase['right_pct']:.2f}% of rows "
                            f"({phase['right']}/{phase['n']}) < bound {floor}%")
        for comp, cb in b.get("components", {}).items():
            r = components.get((source, comp))
            if r is not None:
                problems += _check(f"{source}/{comp} component", r, cb)
        for method, mb in b.get("methods", {}).items():
            r = table.get((source, method))
            if r is not None:
                problems += _check(f"{source}/{method}", r, mb)
        limit = b.get("max_unpredicted_rows")
        missing = summary.get("counts", {}).get(source, {})
        n_missing = missing.get("predicted_from_stored", 0) + missing.get("unpredicted", 0)
        if limit is not None and n_missing > limit:
            problems.append(f"{source}: {n_missing} rows not predicted by the current calculator > bound {limit}")
    return problems


def _check(where: str, r: dict, b: dict) -> list[str]:
    out = []
    for key in ("median_abs_pct", "worst_abs_pct"):
        if key in b and r[key] > b[key]:
            out.append(f"{where}: {key.replace('_pct', '')} error {r[key]:.2f}% > bound {b[key]}% (n={r['n']})")
    return out


# -- charts -----------------------------------------------------------------------------------


def _chart_rows(df):
    """The measured rows, the sources present (GPU first) and the methods, for one panel per source."""
    ok = measured_ok(df)
    sources = [s for s in SOURCES if not ok.empty and (ok["source"] == s).any()]
    return ok, sources, sorted(ok["method"].unique()) if sources else []


def scatter_chart(df, out, title_suffix: str = "") -> list[str]:
    """Predicted vs measured peak (GiB, log-log), one panel per source (GPU first), the y = x line
    and a +-10% band; one marker per method."""
    from matplotlib.ticker import LogLocator, NullFormatter

    from reports.charts import GIB, line_style, pyplot, save

    plt = pyplot()
    ok, sources, methods = _chart_rows(df)
    if not sources:
        return []
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 5.0), squeeze=False)
    for ax, source in zip(axes[0], sources):
        g = ok[ok["source"] == source]
        meas, pred = g["measured_peak_bytes"] / GIB, g["predicted_peak_bytes"] / GIB
        lo, hi = min(meas.min(), pred.min()) / 1.5, max(meas.max(), pred.max()) * 1.5
        if hi / lo < 100:  # at least two decades, so the log axes carry labelled ticks
            mid = (hi * lo) ** 0.5
            lo, hi = mid / 10, mid * 10
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1.0, label="y = x")
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], color="black", linewidth=0.7, linestyle=":", label="+-10%")
        ax.plot([lo, hi], [lo * 0.9, hi * 0.9], color="black", linewidth=0.7, linestyle=":")
        for i, m in enumerate(methods):
            gm = g[g["method"] == m]
            if gm.empty:
                continue
            st = line_style(i, m)
            ax.scatter(gm["measured_peak_bytes"] / GIB, gm["predicted_peak_bytes"] / GIB, marker=st["marker"],
                       facecolors=st["markerfacecolor"], edgecolors=st["markeredgecolor"], s=30, linewidths=0.9,
                       label=f"{m} ({len(gm)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # decades only: minor labels collide on narrow ranges
            axis.set_minor_formatter(NullFormatter())
            axis.set_major_locator(LogLocator(base=10, numticks=12))
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        name = {"gpu": "GPU (cuda max_memory_allocated)", "cpu": "real CPU runs (storage tracer)",
                "fake": "fake tensors (storage tracer)"}[source]
        med = (g["error"].abs().median() * 100)
        ax.set_title(f"{name}\n{len(g)} rows, median |error| {med:.1f}%")
        ax.set_xlabel("measured peak (GiB)")
        ax.set_ylabel("predicted peak (GiB)")
        ax.legend(fontsize=7.5, loc="upper left", ncol=1)
    models = ok["model"].nunique()
    fig.suptitle(f"peftcalc (current calculator): predicted vs measured peak of the steady-state training step\n"
                 f"{len(ok)} rows, {models} models, settings per row in rows.csv{title_suffix}", y=1.04)
    fig.tight_layout()
    return save(fig, out)


def error_strip_chart(df, out) -> list[str]:
    """Signed error (%) of every row, one line per method, one panel per source: the spread and
    the bias at a glance."""
    from reports.charts import line_style, pyplot, save

    plt = pyplot()
    ok, sources, methods = _chart_rows(df)
    if not sources:
        return []
    fig, axes = plt.subplots(1, len(sources), figsize=(5.0 * len(sources), 0.45 * len(methods) + 1.8),
                             squeeze=False, sharey=True)
    for ax, source in zip(axes[0], sources):
        g = ok[ok["source"] == source]
        for i, m in enumerate(methods):
            e = g.loc[g["method"] == m, "error"] * 100
            if e.empty:
                continue
            st = line_style(i, m)
            jitter = [(k % 5 - 2) * 0.09 for k in range(len(e))]
            ax.scatter(e, [i + j for j in jitter], marker=st["marker"], facecolors=st["markerfacecolor"],
                       edgecolors=st["markeredgecolor"], s=22, linewidths=0.8)
            ax.plot([e.median()] * 2, [i - 0.3, i + 0.3], color="black", linewidth=2.0)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods)
        ax.set_ylim(-0.7, len(methods) - 0.3)
        ax.invert_yaxis()
        ax.set_xlabel("signed error (predicted - measured) / measured (%)")
        ax.set_title(f"{source}: {len(g)} rows (bar = median)")
    fig.suptitle("peftcalc: error of the predicted peak, by method", y=1.02)
    fig.tight_layout()
    return save(fig, out)
