"""What the CLI calls (``peftcalc report | table | storage | chart``): plain functions taking the
command's arguments and returning strings (tables) or JSON-serialisable dicts (charts, with a
'text' entry to print). Bad input raises peftcalc.errors.InputError with a one-line message.

    peftcalc report reports/data/*.jsonl --out build/report  ->  build_report(paths, out); error_summary_text(s, fmt)
    peftcalc table llama-2-7b --format markdown              ->  trainable_table(model, fmt)
    peftcalc storage llama-2-7b --tasks 1..100 --out s.png   ->  storage_chart(model, tasks, out, fmt)
    peftcalc chart llama-3.1-8b --batch-size 1,2,4,8 --out b.png -> breakdown_chart(model, [1, 2, 4, 8], out)
    (the 7B VLM memory breakdown, recomputed)                ->  vlm_table(fmt)
"""

from __future__ import annotations

from pathlib import Path

from peftcalc.settings import DEFAULT_OPTIMIZER
from peftcalc.errors import InputError
from reports.render import markdown, plain, rows_csv, rows_json

FORMATS = ("table", "markdown", "csv", "json")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")


def build_report(jsonl_paths: list[str], out_dir: str, **kw) -> dict:
    """report.md, PNG + SVG charts and CSVs under `out_dir`; returns the summary: 'error_table' (per
    source and method: n, median/worst |error| %, worst signed %, bias %), 'overall' (per source),
    'counts', 'unpredicted', 'headline' ('gpu' when GPU rows exist), 'report', 'files'."""
    from reports.report import build_report as _build

    check_result_files(jsonl_paths)
    summary = _build(list(jsonl_paths), out_dir, **kw)
    summary.pop("frame", None)
    return summary


def check_result_files(jsonl_paths: list[str]) -> list[str]:
    """Check the harness result files a report reads: InputError (one line) for a file that is missing,
    unreadable or not text, or when no file holds a result row; else one warning per file whose lines
    are skipped (not JSON, or JSON that is not a harness row) or that holds no row, returned for the
    caller to print."""
    scans = [(path, *_scan_result_file(path)) for path in jsonl_paths]
    empty = [(path, skipped) for path, rows, skipped in scans if rows == 0]
    if scans and len(empty) == len(scans):
        path, skipped = empty[0]
        others = f" (nor do the {len(empty) - 1} other files)" if len(empty) > 1 else ""
        raise InputError(_no_rows_text(path, skipped) + others)
    return [_no_rows_text(path, skipped) if rows == 0 else f"skipped {_skipped_text(skipped)} of {path}"
            for path, rows, skipped in scans if rows == 0 or skipped["lines"] > rows]


def _scan_result_file(path: str) -> tuple[int, dict]:
    """(result rows, {'lines': n, 'not JSON': n, "JSON without 'settings'": n})."""
    import json

    try:
        p = Path(path)
        if p.is_dir():
            raise InputError(f"{path} is a folder; give harness result files (JSON lines)")
        if not p.is_file():
            raise InputError(f"no such result file: {path}")
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(f"cannot read result file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file (binary?); give harness result files (JSON lines)") from None
    rows, skipped = 0, {"lines": 0, "not JSON": 0, "JSON without 'settings'": 0}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        skipped["lines"] += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped["not JSON"] += 1
            continue
        if isinstance(row, dict) and "settings" in row:  # what reports.rows.read_jsonl keeps
            rows += 1
        else:
            skipped["JSON without 'settings'"] += 1
    return rows, skipped


def _skipped_text(skipped: dict) -> str:
    """'2 of 5 lines (2 not JSON)'."""
    parts = [f"{n} {why}" for why, n in skipped.items() if why != "lines" and n]
    n = sum(v for k, v in skipped.items() if k != "lines")
    return f"{n} of {skipped['lines']} line{'s' if skipped['lines'] != 1 else ''} ({', '.join(parts)})"


def _no_rows_text(path: str, skipped: dict) -> str:
    expected = "expected the JSON lines `peftcalc measure` writes"
    if not skipped["lines"]:
        return f"{path} is empty: no harness result rows ({expected})"
    parts = ", ".join(f"{n} {why}" for why, n in skipped.items() if why != "lines" and n)
    lines = f"{skipped['lines']} line{'s' if skipped['lines'] != 1 else ''}"
    return f"{path} has no harness result rows ({lines}: {parts}); {expected}"


def error_summary_text(summary: dict, fmt: str = "table") -> str:
    """The compact error table for the end of a CI log (`fmt` table); or its rows (per source and
    method, then each source's ALL row) as JSON, CSV or a markdown table."""
    from reports.accuracy import error_summary_text as _text

    _check_format(fmt)
    if fmt == "table":
        return _text(summary)
    rows = error_summary_rows(summary)
    if fmt == "json":
        return rows_json(rows)
    if fmt == "csv":
        return rows_csv(rows).rstrip("\n")
    if not rows:
        return "no measured rows: nothing to compare"
    keys = list(rows[0])
    return markdown(keys, [[_cell(r[k]) for k in keys] for r in rows], "ll" + "r" * (len(keys) - 2))


SUMMARY_COLUMNS = ("source", "method", "n", "median_abs_pct", "worst_abs_pct", "worst_signed_pct", "median_signed_pct")


def error_summary_rows(summary: dict) -> list[dict]:
    """The error summary's rows: each source's methods, then its overall row (method 'ALL')."""
    overall = {r["source"]: r for r in summary.get("overall", [])}
    rows, seen = [], []
    for r in summary.get("error_table", []):
        if r["source"] not in seen:
            seen.append(r["source"])
        rows.append({k: r.get(k) for k in SUMMARY_COLUMNS})
    out = []
    for source in seen:
        out += [r for r in rows if r["source"] == source]
        if source in overall:
            out.append({**{k: overall[source].get(k) for k in SUMMARY_COLUMNS}, "method": "ALL"})
    return _plain(out)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def trainable_table(model: str, fmt: str = "table", batch_size: int = 1, seq_len: int = 512,
                    precision: str = "bf16") -> str:
    """Every method on `model`: trainable, total, %, peak at the stated setting, the typical ranges two
    public PEFT glossary pages claim ([1] Inferensys "Trainable Parameters", method table; [2] Inferensys
    "Frozen Backbone", frozen backbone vs full fine-tuning; each row's source row in the CSV/JSON) and
    whether the real figure is outside them."""
    from reports.trainable import citations, trainable_frame, trainable_markdown_rows

    _check_format(fmt)
    df = trainable_frame(model, batch_size=batch_size, seq_len=seq_len, precision=precision)
    if fmt == "csv":
        return rows_csv(df.to_dict("records")).rstrip("\n")
    if fmt == "json":
        return rows_json(df.to_dict("records"))
    header, cells = trainable_markdown_rows(df)
    align = "llrrrrlllll"
    table = markdown(header, cells, align) if fmt == "markdown" else plain(header, cells, align)
    notes = [f"Peak at: {df.attrs['setting']}.", *(f"{c}." for c in citations(df))]
    if fmt == "markdown":
        return "\n".join([table, "", *notes])
    return "\n".join([table, *notes])


def storage_chart(model: str, tasks: str, out: str, fmt: str = "table") -> dict:
    """Total storage vs number of tasks T for each method (one base + T task files) against T full
    models, log axis, PNG + SVG at `out`; returns per-method numbers, the crossover, 'rows' (the
    table: one row per method) and 'text' (the table in `fmt`: table | json | csv | markdown; table
    and markdown end with the crossover sentence and the files written)."""
    from reports.storage_report import storage_chart as _chart

    _check_format(fmt)
    s = _chart(model, tasks, out)
    s.pop("table")
    t_max = s["tasks_max"]
    s["rows"] = [{"method": m, "per_task_bytes": v["per_task_bytes"], "per_task_pct_of_full": v["per_task_pct_of_full"],
                  "crossover_tasks": v["crossover_tasks"], f"total_bytes_at_{t_max}": v[f"total_bytes_at_{t_max}"]}
                 for m, v in s["methods"].items()]
    header = ["method", "per-task bytes", "of full", "crossover T", f"total GiB at T={t_max}"]
    cells = [[r["method"], f"{r['per_task_bytes']:,}", f"{r['per_task_pct_of_full']:.4g}%",
              "-" if r["crossover_tasks"] is None else str(r["crossover_tasks"]),
              f"{r[f'total_bytes_at_{t_max}'] / 1024**3:,.2f}"] for r in s["rows"]]
    if fmt == "json":
        s["text"] = rows_json(_plain(s["rows"]))
    elif fmt == "csv":
        s["text"] = rows_csv(_plain(s["rows"])).rstrip("\n")
    elif fmt == "markdown":
        s["text"] = "\n".join([markdown(header, cells, "lrrrr"), "", s["crossover_sentence"], "",
                               "wrote " + ", ".join(s["files"])])
    else:
        s["text"] = "\n".join([plain(header, cells, "lrrrr"), s["crossover_sentence"], "wrote " + ", ".join(s["files"])])
    return _plain(s)


def breakdown_chart(model: str, batch_sizes: list[int], out: str, seq_len: int = 512, methods=None,
                    precision: str = "bf16", optimizer: str = DEFAULT_OPTIMIZER, grad_checkpointing: bool = False,
                    attention: str = "sdpa", rank=None, targets=None, seq_lens=None) -> dict:
    """Stacked memory breakdown per method at each batch size (`out`), and reserved memory vs batch
    size and vs sequence length with GPU capacities (`<out>_scaling`), PNG + SVG; returns the
    numbers ('rows'), 'which_card' (method -> batch -> smallest GPU) and 'text'."""
    from peftcalc.methods import METHODS
    from reports.breakdown import breakdown_chart as _chart

    r = _chart(model, batch_sizes, out, seq_len=seq_len, methods=methods or METHODS, precision=precision,
               optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention, rank=rank,
               targets=targets, seq_lens=seq_lens)
    df, wc = r.pop("table"), r.pop("which_card")
    r["rows"] = df.to_dict("records")
    r["which_card"] = {m: {int(b): wc.loc[m, b] for b in wc.columns} for m in wc.index}
    cells = [[m] + [str(wc.loc[m, b]) for b in wc.columns] for m in wc.index]
    r["text"] = "\n".join([f"{r['model']} ({r['setting']}): smallest GPU that holds the reserved peak",
                           plain(["method"] + [f"batch {b}" for b in wc.columns], cells),
                           *(f"left out {m}: {why}" for m, why in r["skipped"].items()),
                           "wrote " + ", ".join(r["files"])])
    return _plain(r)


def vlm_table(fmt: str = "markdown") -> str:
    """A back-of-envelope 7B VLM memory breakdown recomputed with the calculator's llava-1.5-7b
    (reports.vlm)."""
    from reports.vlm import vlm_frame, vlm_markdown

    _check_format(fmt)
    df = vlm_frame()
    if fmt == "csv":
        return rows_csv(df.to_dict("records")).rstrip("\n")
    if fmt == "json":
        return rows_json(df.to_dict("records"))
    return vlm_markdown(df)


def _plain(obj):
    """numpy scalars -> Python numbers, recursively (the dicts go through json.dumps)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, AttributeError):
            return obj
    return obj
