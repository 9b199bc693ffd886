"""The design-review report: report.md, PNG and SVG charts and CSV tables under one folder.

Sections: 1. predicted vs measured (committed GPU data is the headline, CPU and fake-tensor data
reported apart); 2. trainable vs total against the typical ranges of two public PEFT glossary pages
(Inferensys, "Trainable Parameters" and "Frozen Backbone"); 3. storage vs task count (one frozen base
plus T task modules against T full models); 4. memory breakdown and "which card"; 5. a back-of-envelope
7B vision-language memory breakdown recomputed with LLaVA-1.5-7B; 6. where LoRA overtakes full
fine-tuning at long context (peft#1514), predicted and traced.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path

from reports import accuracy
from reports.render import cell, frame_markdown, markdown
from reports.rows import REPO, SOURCES, load_rows

SECTIONS = ("accuracy", "trainable", "storage", "breakdown", "vlm", "crossover")
SOURCE_TITLES = {
    "gpu": "GPU (cuda: torch.cuda.max_memory_allocated)",
    "cpu": "real CPU runs (storage tracer)",
    "fake": "fake tensors on CPU (storage tracer, no memory used)",
}
TABLE_COLUMNS = {
    "n": ("n", "int"), "median_abs_pct": ("median abs %", "apct"), "worst_abs_pct": ("worst abs %", "apct"),
    "worst_signed_pct": ("worst signed %", "pct"), "median_signed_pct": ("bias (median signed %)", "pct"),
}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_csv(df, path: Path, files: list) -> None:
    df.to_csv(path, index=False)
    files.append(str(path))


def accuracy_section(df, out: Path, files: list) -> list[str]:
    """Markdown of section 1; writes its CSVs and charts."""
    md = ["## 1. Predicted vs measured peak memory", ""]
    if df.empty:
        md += ["No measured rows yet: nothing under reports/data/*.jsonl (the harness writes them: "
               "`python -c \"from measure.matrix import run_matrix; run_matrix('ci', 'reports/data/ci.jsonl')\"`).", ""]
        return md
    md += ["Error = (predicted - measured) / measured of the peak of the steady-state step (the last measured "
           "step; optimizer states already allocated). Predictions are recomputed with the current calculator "
           "(device 'cuda' for GPU rows, 'cpu' for CPU and fake-tensor rows); 'stored' is the prediction written "
           "into the row when it was measured. Rows that failed (OOM, error) are counted, not scored.", ""]
    counts = []
    for source, g in df.groupby("source", observed=True, sort=True):
        outcomes = ", ".join(f"{k} {v}" for k, v in g["outcome"].value_counts().items())
        files_of = ", ".join(sorted({Path(f).name for f in g["file"]}))
        counts.append([str(source), str(len(g)), outcomes, str(int((g["predicted_from"] == "current").sum())),
                       files_of])
    md += [markdown(["source", "rows", "outcomes", "predicted now", "files"], counts, "lrlrl"), ""]
    _write_csv(df, out / "rows.csv", files)

    by_method = accuracy.error_table(df, ("source", "method"))
    stored = accuracy.error_table(df, ("source", "method"), column="stored_error")
    if not by_method.empty and not stored.empty:
        by_method = by_method.merge(stored[["source", "method", "median_abs_pct"]].rename(
            columns={"median_abs_pct": "stored_median_abs_pct"}), on=["source", "method"], how="left")
    by_family = accuracy.error_table(df, ("source", "family"))
    by_device = accuracy.error_table(df, ("source", "device_name"))
    comps = accuracy.component_table(df)
    for name, t in (("errors_by_method", by_method), ("errors_by_family", by_family),
                    ("errors_by_device", by_device), ("errors_by_component", comps)):
        _write_csv(t, out / f"{name}.csv", files)
    worst_all = []

    charts = accuracy.scatter_chart(df, out / "predicted_vs_measured")
    charts += accuracy.error_strip_chart(df, out / "errors_by_method")
    files += charts
    if charts:
        md += ["![predicted vs measured](predicted_vs_measured.png)", "",
               "![signed error by method](errors_by_method.png)", ""]

    present = [s for s in SOURCES if (df["source"] == s).any()]
    if "gpu" not in present:
        md += ["### Headline: GPU", "",
               "**No GPU data committed yet** (reports/data/gpu*.jsonl). The CPU and fake-tensor figures below "
               "check the calculator against the storage tracer, not against the CUDA allocator: they miss "
               "the 512-byte block rounding and cuBLAS workspaces (DESIGN.md, truth sources).", ""]
    for k, source in enumerate(present):
        sub = df[df["source"] == source]
        title = SOURCE_TITLES.get(source, source)
        md += [f"### {'Headline: ' if source == 'gpu' else ''}{title}", ""]
        overall = accuracy.error_table(sub, ("source",))
        if overall.empty:
            md += ["_(no scored rows)_", ""]
            continue
        o = overall.iloc[0]
        md += [f"{int(o['n'])} scored rows: median |error| {o['median_abs_pct']:.2f}%, worst {o['worst_abs_pct']:.2f}% "
               f"(signed {o['worst_signed_pct']:+.2f}%), bias {o['median_signed_pct']:+.2f}%.", ""]
        cols = {"method": ("method", ""), **TABLE_COLUMNS}
        if "stored_median_abs_pct" in by_method:
            cols["stored_median_abs_pct"] = ("stored prediction: median abs %", "apct")
        md += ["Per method:", "", frame_markdown(by_method[by_method["source"] == source], cols), ""]
        md += ["Per family:", "", frame_markdown(by_family[by_family["source"] == source],
                                                 {"family": ("family", ""), **TABLE_COLUMNS}), ""]
        md += ["Per device:", "", frame_markdown(by_device[by_device["source"] == source],
                                                 {"device_name": ("device", ""), **TABLE_COLUMNS}), ""]
        c = comps[comps["source"] == source] if not comps.empty else comps
        if not c.empty:
            n_same = int(accuracy.measured_ok(sub)["same_peak_phase"].fillna(False).astype(bool).sum())
            md += [f"Components at the peak, as a share of the peak's error: (predicted - measured component) / "
                   f"measured peak, in %, over the {n_same} rows whose predicted and measured peaks fall in the "
                   f"same phase (the harness's tracer categories; predicted activations include the logits/loss "
                   f"buffers, which the tracer counts as saved activations; 'other' is the tracer's temporaries, outputs "
                   f"and checkpointing buffers against the calculator's temporaries). The shares of a row add up to "
                   f"its peak error:", "",
                   frame_markdown(c, {"component": ("component", ""), **TABLE_COLUMNS}), ""]
        if source == "gpu":
            res = accuracy.error_table(sub, ("source",), column="reserved_error")
            if not res.empty:
                r = res.iloc[0]
                md += [f"Reserved memory (max_memory_reserved vs the calculator's reserved less the CUDA context): "
                       f"median |error| {r['median_abs_pct']:.2f}%, worst {r['worst_abs_pct']:.2f}% (n={int(r['n'])}).", ""]
        step1 = accuracy.error_table(sub, ("source",), column="step1_error")
        if not step1.empty:
            r = step1.iloc[0]
            md += [f"Step 1 (no optimizer states yet): median |error| {r['median_abs_pct']:.2f}%, worst "
                   f"{r['worst_abs_pct']:.2f}% (n={int(r['n'])}).", ""]
        ok = accuracy.measured_ok(sub)
        counted = ok[ok["predicted_params_total"].notna() & ok["params_total"].notna()]
        bad = counted[(counted["predicted_params_total"] != counted["params_total"]) |
                      (counted["predicted_params_trainable"] != counted["params_trainable"])]
        md += [f"Parameter counts: {len(counted) - len(bad)} of {len(counted)} rows match the harness's "
               f"count exactly (total and trainable)." + ("" if bad.empty else " Mismatches: " + "; ".join(
                   f"{r.model} {r.variant}: {int(r.predicted_params_trainable):,} vs {int(r.params_trainable):,} "
                   f"trainable" for r in bad.head(5).itertuples())), ""]
        worst = accuracy.worst_rows(df, 10, source)
        worst_all.append(worst)
        md += ["Worst ten rows:", "", frame_markdown(worst, {
            "model": ("model", ""), "variant": ("method", ""), "settings": ("settings", ""),
            "measured_peak_bytes": ("measured", "bytes"), "predicted_peak_bytes": ("predicted", "bytes"),
            "error_pct": ("error %", "pct"), "measured_peak_phase": ("measured phase", ""),
            "predicted_peak_phase": ("predicted phase", "")}), ""]
    if worst_all:
        import pandas as pd

        _write_csv(pd.concat(worst_all), out / "worst_rows.csv", files)
    missing = df[df["predicted_from"] != "current"]
    if not missing.empty:
        md += [f"{len(missing)} row(s) not predicted by the current calculator:", ""]
        md += [f"- {r.source} {r.model} {r.variant} {r.settings}: {r.prediction_note or 'no prediction'}"
               + (" (scored with the row's stored prediction)" if r.predicted_from == "stored" else "")
               for r in missing.head(20).itertuples()]
        md.append("")
    return md


def trainable_section(models, out: Path, files: list, batch_size=1, seq_len=512, precision="bf16") -> list[str]:
    from reports.trainable import citations, trainable_frame, trainable_markdown_rows

    md = ["## 2. Trainable vs total parameters against published typical ranges", "",
          "Every method at its defaults (peft's where peft has one) on real models, against the typical trainable "
          "fractions two public PEFT glossary pages give ([1] and [2], named below the tables). 'OUTSIDE' flags a "
          "real figure outside the claimed range.", ""]
    for model in models:
        df = trainable_frame(model, batch_size=batch_size, seq_len=seq_len, precision=precision)
        _write_csv(df, out / f"trainable_{df['model'].iloc[0]}.csv", files)
        header, cells = trainable_markdown_rows(df)
        md += [f"### {df['model'].iloc[0]}", "", f"Peak at: {df.attrs['setting']}.", "",
               markdown(header, cells, "llrrrrlllll"), ""]
        outside = df[(df["outside_method_table"] == True) | (df["outside_frozen_backbone"] == True)]  # noqa: E712
        if not outside.empty:
            md += ["Outside the claimed ranges: " + "; ".join(
                f"{r.method} ({r.settings}) {r.trainable_pct:.4g}% vs {r.claim_method_table or r.claim_frozen_backbone}"
                for r in outside.itertuples()) + ".", ""]
    md += ["Claims:", "", *(f"- {c}." for c in citations(df)), ""]
    return md


def storage_section(model, tasks, out: Path, files: list) -> list[str]:
    from reports.storage_report import STORAGE_CLAIMS, storage_chart

    s = storage_chart(model, tasks, out / "storage_vs_tasks")
    files += s["files"]
    _write_csv(s["table"], out / "storage_vs_tasks.csv", files)
    t_max = s["tasks_max"]
    cells = []
    for m, v in s["methods"].items():
        cells.append([m, cell(v["per_task_bytes"]), f"{v['per_task_pct_of_full']:.4g}%",
                      "-" if v["crossover_tasks"] is None else str(v["crossover_tasks"]),
                      f"{v[f'total_bytes_at_{t_max}'] / 1024**3:,.2f}",
                      f"{v[f'full_models_bytes_at_{t_max}'] / 1024**3:,.2f}"])
    claim, source = STORAGE_CLAIMS["per_task_fraction"]
    return ["## 3. Storage vs number of tasks: one frozen base plus T task modules", "",
            "![storage vs tasks](storage_vs_tasks.png)", "",
            markdown(["method", "per-task file (bytes)", "of one full model", "PEFT smaller from T =",
                      f"total at T={t_max} (GiB)", f"{t_max} full models (GiB)"], cells, "lrrrrr"), "",
            s["crossover_sentence"], "",
            f"Claimed: a task module is {claim} ({source}); the per-task column above is the real fraction of "
            "each method.", ""]


def breakdown_section(model, batch_sizes, out: Path, files: list) -> list[str]:
    r = breakdown_chart_files(model, batch_sizes, out)
    files += r["files"]
    _write_csv(r["table"], out / "breakdown.csv", files)
    wc = r["which_card"]
    cells = [[m] + [str(wc.loc[m, b]) for b in wc.columns] for m in wc.index]
    md = ["## 4. Memory breakdown and which card", "",
          "![memory breakdown](breakdown.png)", "", "![which card](breakdown_scaling.png)", "",
          f"Smallest catalog GPU whose memory holds the reserved peak ({r['model']}, {r['setting']}):", "",
          markdown(["method"] + [f"batch {b}" for b in wc.columns], cells)]
    if r["skipped"]:
        md += ["", "Not applicable: " + "; ".join(f"{m}: {why}" for m, why in r["skipped"].items()) + "."]
    return md + [""]


def breakdown_chart_files(model, batch_sizes, out: Path) -> dict:
    from reports.breakdown import breakdown_chart

    return breakdown_chart(model, batch_sizes, out / "breakdown.png")


def vlm_section(out: Path, files: list) -> list[str]:
    from reports.vlm import vlm_frame, vlm_markdown

    df = vlm_frame()
    _write_csv(df, out / "vlm_7b_breakdown.csv", files)
    return ["## 5. A 7B vision-language memory breakdown, recomputed", "", vlm_markdown(df), ""]


def crossover_section(df) -> list[str]:
    """peft#1514: the calculator's crossover (peftcalc.crossover) for TinyLlama-1.1B, LoRA r=64 on every
    linear against full fine-tuning (bf16, batch 1), on CUDA and on the trace's device, beside the
    traced peaks of both methods in the result files (matrix `crossover`)."""
    from peftcalc.crossover import crossover, crossover_sentence

    md = ["## 6. Where LoRA stops saving memory (peft#1514)", ""]
    for device in ("cuda", "cpu"):
        r = crossover("tinyllama-1.1b", method="lora", rank=64, targets="all-linear",
                      training={"seq_len": 128, "device": device})
        md.append(f"- predicted, `--device {device}`: {crossover_sentence(r)}")
    rows = df[(df["model"] == "tinyllama-1.1b") & (df["outcome"] == "ok")] if not df.empty else df
    if not rows.empty:
        cells = []
        for seq, g in rows.groupby("seq_len", sort=True):
            by = {m: r for m, r in zip(g["method"], g.itertuples())}
            if {"lora", "full"} <= set(by):
                lo, fu = by["lora"], by["full"]
                cells.append([f"{seq:,}", f"{lo.measured_peak_bytes:,.0f}", f"{fu.measured_peak_bytes:,.0f}",
                              f"{lo.measured_peak_bytes - fu.measured_peak_bytes:+,.0f}",
                              f"{lo.predicted_peak_bytes - fu.predicted_peak_bytes:+,.0f}"])
        if cells:
            md += ["", "Traced (fake tensors, the real model's shapes) against predicted (`--device cpu`), bytes:", "",
                   markdown(["seq len", "LoRA traced peak", "full traced peak", "LoRA - full traced",
                             "LoRA - full predicted"], cells)]
    return md + [""]


def build_report(jsonl_paths, out_dir, *, sections=SECTIONS, trainable_models=("llama-2-7b", "bert-base"),
                 storage_model: str = "llama-2-7b", tasks: str = "1..100", breakdown_model: str = "llama-3.1-8b",
                 batch_sizes=(1, 2, 4, 8), configs: dict | None = None, recompute: bool = True) -> dict:
    """Write report.md, charts (PNG + SVG) and CSVs under `out_dir` from the harness rows in
    `jsonl_paths`; returns the summary (see reports.accuracy.summarize) with 'files' and 'report'."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in jsonl_paths]
    df = load_rows(paths, recompute=recompute, configs=configs)
    files: list[str] = []
    md = ["# peftcalc report", "",
          f"Generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by the calculator at commit "
          f"{_git_commit()} from {len(paths)} result file(s): {', '.join(Path(p).name for p in paths) or 'none'}.", ""]
    if "accuracy" in sections:
        md += accuracy_section(df, out, files)
    if "trainable" in sections:
        md += trainable_section(trainable_models, out, files)
    if "storage" in sections:
        md += storage_section(storage_model, tasks, out, files)
    if "breakdown" in sections:
        md += breakdown_section(breakdown_model, list(batch_sizes), out, files)
    if "vlm" in sections:
        md += vlm_section(out, files)
    if "crossover" in sections:
        md += crossover_section(df)
    summary = accuracy.summarize(df)
    report = out / "report.md"
    report.write_text("\n".join(md))
    files.append(str(report))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    files.append(str(out / "summary.json"))
    summary.update(report=str(report), files=files, frame=df)
    return summary
