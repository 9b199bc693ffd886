"""`peftcalc compare`: every method on one model and one training setting."""

from __future__ import annotations

from peftcalc.api import estimate
from peftcalc.errors import InputError, as_flags
from peftcalc.methods import methods_for
from peftcalc.config import load_spec

__all__ = ["compare_methods", "render_compare"]


def compare_methods(model, **kw) -> list[dict]:
    """One row per method; a method the architecture cannot take gets a row saying why."""
    rows = []
    for method in methods_for(load_spec(model)):
        extra = {k: v for k, v in kw.items() if not (k in ("rank", "targets") and method not in ("lora", "qlora"))}
        try:
            e = estimate(model, method=method, **extra)
        except InputError as exc:
            if method == "lora" or method == "full":
                raise
            rows.append({"method": method, "note": str(exc), "note_params": list(exc.names)})
            continue
        fits = [g for g in e.gpus if g.fits]
        smallest = min(fits, key=lambda g: g.memory_bytes) if fits else None
        rows.append({
            "method": method,
            "trainable": e.params.trainable,
            "trainable_percent": e.params.percent,
            "total": e.params.total,
            "peak_bytes": e.memory.peak_bytes,
            "peak_phase": e.memory.peak_phase,
            "reserved_bytes": e.memory.reserved_bytes,
            "smallest_gpu": smallest.name if smallest else "none",
            "smallest_gpu_epoch_cost_usd": smallest.epoch_cost_usd if smallest else None,
            "epoch_cost_usd": e.cost.epoch_cost_usd if e.cost else None,
            "cost_gpu": e.cost.gpu if e.cost else None,
            "storage_per_task_bytes": e.storage.per_task_bytes,
            "note": "",
        })
    return rows


def render_compare(rows: list[dict], fmt: str, flags: bool = False) -> str:
    """The table (text): the epoch cost is on the smallest GPU that fits (the card of the column beside it); a
    method that cannot run gets dashes and a numbered note under the table (the same reason, one note), whose
    API parameter names (`note_params`) are shown as command-line flags when `flags`. The per-task file sizes
    are in one unit, MiB (a BitFit file is KiB, a full copy GiB)."""
    import json

    from peftcalc.format import text_table, gib, rows_to_csv, rows_to_markdown

    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        return rows_to_csv(rows)
    if fmt == "markdown":
        return rows_to_markdown(rows)
    table, notes = [], []
    for r in rows:
        if "trainable" not in r:
            note = as_flags(r["note"], r.get("note_params", ())) if flags else r["note"]
            if note not in notes:
                notes.append(note)
            table.append([r["method"], "-", "-", "-", "-", "-", "-", "-", "-", f"[{notes.index(note) + 1}]"])
            continue
        cost = r.get("smallest_gpu_epoch_cost_usd")
        table.append([r["method"], f"{r['trainable']:,}", f"{r['trainable_percent']:.4f}%", gib(r["peak_bytes"]),
                      r["peak_phase"], gib(r["reserved_bytes"]), r["smallest_gpu"],
                      f"${cost:,.2f}" if cost is not None else "-", f"{r['storage_per_task_bytes'] / 2**20:,.2f}", ""])
    header = ["method", "trainable", "%", "peak", "phase", "nvidia-smi", "smallest GPU", "epoch cost there",
              "per task (MiB)", "note"]
    out = text_table(table, header, "lrrrlrlrrl")
    if notes:
        out += "\n\n" + "\n".join(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return out
