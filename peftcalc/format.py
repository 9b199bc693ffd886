"""Rendering estimates as a terminal table, markdown, CSV or JSON. Plain Python, no rich."""

from __future__ import annotations

import csv
import io
import json

from peftcalc.memory import COMPONENTS

__all__ = ["COMPONENT_LABELS", "GIB", "estimate_flat", "gib", "hours", "human_bytes", "method_summary",
           "render_estimate", "render_estimate_markdown", "render_estimate_text", "rows_to_csv",
           "rows_to_markdown", "text_table", "training_summary"]

GIB = 1024**3
COMPONENT_LABELS = {
    "weights_frozen": "weights (frozen)",
    "weights_trainable": "weights (trainable)",
    "buffers": "buffers",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "saved activations",
    "logits_loss": "logits / loss buffers",
    "temporaries": "temporaries",
    "inputs": "inputs",
}


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:,.1f} s"
    if h < 1:
        return f"{h * 60:,.1f} min"
    return f"{h:,.2f} h"


def text_table(rows: list[list[str]], header: list[str] | None = None, align: str | None = None) -> str:
    all_rows = ([header] if header else []) + rows
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    align = align or "l" + "r" * (len(widths) - 1)
    lines = []
    for j, r in enumerate(all_rows):
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        lines.append("  ".join(cells).rstrip())
        if header and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def method_summary(e) -> str:
    m = e.method
    parts = [m.method]
    if m.method in ("lora", "qlora"):
        targets = m.targets if m.targets is not None else "default"
        parts.append(f"r={m.rank} targets={','.join(targets) if isinstance(targets, tuple) else targets}")
        if m.dora:
            parts.append("DoRA")
        if m.method == "qlora":
            parts.append("NF4" + (" + double quant" if m.double_quant else ""))
    elif m.method == "adapter":
        parts.append(m.adapter_kind)
    elif m.method in ("prefix", "prompt"):
        parts.append(f"{m.num_virtual_tokens} virtual tokens")
    elif m.method == "freeze" and m.trainable_layers is not None:
        parts.append(f"top {m.trainable_layers} blocks")
    if getattr(m, "vision_layers", 0):
        parts.append(f"+ top {m.vision_layers} vision layers")
    return " ".join(parts)


def training_summary(t) -> str:
    ckpt = ""
    if t.grad_checkpointing:
        ckpt = ", gradient checkpointing" + (f" every {t.checkpoint_every} blocks" if t.checkpoint_every != 1 else "")
        ckpt += " (reentrant)" if t.checkpoint_reentrant else ""
    return f"batch {t.batch_size} x seq {t.seq_len}, {t.precision}, {t.optimizer}, {t.attention} attention" + ckpt


def render_estimate_text(e) -> str:
    out = []
    out.append(f"{e.model} ({e.architecture}) - {method_summary(e)}")
    out.append(training_summary(e.training) + f", device {e.memory.device}")
    if e.image_tokens:
        out.append(f"vision-language model: the language model sees {e.training.seq_len} text + {e.image_tokens} "
                   f"image tokens = {e.training.seq_len + e.image_tokens} per sample")
    p = e.params
    out.append("")
    out.append(f"Parameters  total {p.total:,}  trainable {p.trainable:,} ({p.percent:.4f}%)")
    out.append("")
    rows = [[COMPONENT_LABELS[c], gib(e.memory.components.get(c, 0))] for c in COMPONENTS
            if e.memory.components.get(c, 0)]
    rows.append([f"peak ({e.memory.device}, steady-state step)", gib(e.memory.peak_bytes)])
    rows.append(["peak phase", e.memory.peak_phase])
    rows.append(["step 1 peak", gib(e.memory.step1_peak_bytes)])
    rows.append(["+ allocator slack", gib(e.memory.overhead["allocator_slack"])])
    rows.append(["+ CUDA context", gib(e.memory.overhead["cuda_context"])])
    rows.append(["GPU memory needed (nvidia-smi)", gib(e.memory.reserved_bytes)])
    out.append(text_table(rows, ["Memory at the peak", ""]))
    out.append("")
    gpu_rows = []
    for g in e.gpus:
        gpu_rows.append([g.name, gib(g.memory_bytes), "yes" if g.fits else "no", gib(g.headroom_bytes),
                         str(g.max_batch_size), f"{g.step_seconds:,.3f} s", hours(g.epoch_hours),
                         f"${g.epoch_cost_usd:,.2f}"])
    out.append(text_table(gpu_rows, ["GPU", "memory", "fits", "headroom", "max batch", "step", "epoch", "epoch cost"]))
    out.append("")
    if e.cost:
        c = e.cost
        out.append(f"Time and cost on {c.gpu} at {c.mfu:.0%} MFU: {c.flops_per_step / 1e12:,.1f} TFLOP per step, "
                   f"{c.step_seconds:,.3f} s per step, {c.steps_per_epoch:,} steps per epoch of "
                   f"{c.dataset_tokens:,} tokens = {hours(c.epoch_hours)}, ${c.epoch_cost_usd:,.2f} at ${c.price_per_hour:.2f}/h")
    else:
        out.append("No GPU in the catalog fits this setting: try --grad-checkpointing, a smaller batch or QLoRA.")
    s = e.storage
    out.append(f"Storage: {human_bytes(s.per_task_bytes)} per task; {s.tasks} task(s) = {human_bytes(s.total_bytes)}"
               + (f" (base {human_bytes(s.base_bytes)} + adapters)" if s.base_bytes else "")
               + f"; {s.tasks} full fine-tuned copies = {human_bytes(s.full_models_total_bytes)}")
    return "\n".join(out)


def estimate_flat(e) -> dict:
    """One flat row (for CSV and markdown)."""
    row = {
        "model": e.model,
        "method": e.method.method,
        "batch_size": e.training.batch_size,
        "seq_len": e.training.seq_len,
        "precision": e.training.precision,
        "optimizer": e.training.optimizer,
        "grad_checkpointing": e.training.grad_checkpointing,
        "checkpoint_every": e.training.checkpoint_every,
        "checkpoint_reentrant": e.training.checkpoint_reentrant,
        "attention": e.training.attention,
        "device": e.memory.device,
        "params_total": e.params.total,
        "params_trainable": e.params.trainable,
        "trainable_percent": round(e.params.percent, 6),
        "peak_bytes": e.memory.peak_bytes,
        "peak_phase": e.memory.peak_phase,
        "reserved_bytes": e.memory.reserved_bytes,
    }
    row.update({f"mem_{k}": v for k, v in e.memory.components.items()})
    row["storage_per_task_bytes"] = e.storage.per_task_bytes
    row["storage_total_bytes"] = e.storage.total_bytes
    if e.cost:
        row.update({"gpu": e.cost.gpu, "step_seconds": round(e.cost.step_seconds, 6),
                    "epoch_hours": round(e.cost.epoch_hours, 6), "epoch_cost_usd": round(e.cost.epoch_cost_usd, 4)})
    row["fits"] = ",".join(g.name for g in e.gpus if g.fits)
    return row


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


def rows_to_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def render_estimate(e, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(e.to_dict(), indent=2)
    if fmt == "csv":
        return rows_to_csv([estimate_flat(e)])
    if fmt == "markdown":
        return render_estimate_markdown(e)
    return render_estimate_text(e)


def render_estimate_markdown(e) -> str:
    lines = [f"**{e.model}** ({e.architecture}), {method_summary(e)}; {training_summary(e.training)}", ""]
    lines.append(f"Parameters: {e.params.total:,} total, {e.params.trainable:,} trainable ({e.params.percent:.4f}%)")
    lines.append("")
    rows = [{"component": COMPONENT_LABELS[c], "GiB": round(e.memory.components.get(c, 0) / GIB, 3)}
            for c in COMPONENTS if e.memory.components.get(c, 0)]
    rows.append({"component": f"**peak** ({e.memory.peak_phase})", "GiB": round(e.memory.peak_bytes / GIB, 3)})
    rows.append({"component": "reserved (nvidia-smi)", "GiB": round(e.memory.reserved_bytes / GIB, 3)})
    lines.append(rows_to_markdown(rows))
    lines.append("")
    lines.append(rows_to_markdown([{"GPU": g.name, "fits": "yes" if g.fits else "no",
                                    "max batch": g.max_batch_size, "step s": round(g.step_seconds, 4),
                                    "epoch h": round(g.epoch_hours, 3), "epoch $": round(g.epoch_cost_usd, 2)}
                                   for g in e.gpus]))
    return "\n".join(lines)
