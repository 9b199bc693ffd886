"""Rendering estimates as a terminal table, markdown, CSV or JSON. Plain Python, no rich."""

from __future__ import annotations

import csv
import io
import json

from peftcalc.settings import DEFAULT_OPTIMIZER
from peftcalc.sharding import SHARDED_COMPONENTS as COMPONENTS

__all__ = ["COMPONENT_LABELS", "DOES_NOT_FIT", "GIB", "bytes_column", "estimate_flat", "gib", "hours", "human_bytes",
           "method_summary", "plural", "render_estimate", "render_estimate_markdown", "render_estimate_text",
           "rows_to_csv", "rows_to_markdown", "storage_sentence", "task_file_word", "text_table", "traced_lines",
           "training_summary",
           "vision_tokens"]

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
    "unsharded_params": "unsharded parameters",
    "unsharded_gradients": "unsharded gradients",
    "all_gather_buffers": "all-gather buffers",
    "reduce_scatter_buffers": "reduce-scatter buffers",
    "gradient_buckets": "gradient buckets (DDP, ZeRO reduce)",
    "master_weights": "fp32 master partition (ZeRO)",
    "gradient_partition": "gradient partition (ZeRO)",
}


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 copy', '2 copies', '1,000 tasks'."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def bytes_column(values: list[float]) -> list[str]:
    """Byte counts of one table column, all in one unit: the largest that keeps the biggest value at or above 1
    (B when every value is below 1 KiB)."""
    top = max((abs(v) for v in values), default=0)
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if top >= size:
            return [f"{v / size:,.2f} {unit}" for v in values]
    return [f"{int(v):,} B" for v in values]


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


def training_summary(t, vision_tokens: int | None = None) -> str:
    """One line of training settings; `vision_tokens`: a vision encoder's sequence (patches + class token),
    shown in place of --seq-len, which such a model does not read."""
    ckpt = ""
    if t.grad_checkpointing:
        ckpt = ", gradient checkpointing" + (f" every {t.checkpoint_every} blocks" if t.checkpoint_every != 1 else "")
        ckpt += " (reentrant)" if t.checkpoint_reentrant else ""
    seq = (f"{vision_tokens} vision tokens (patches + class token)" if vision_tokens is not None
           else f"seq {t.seq_len}")
    return (f"batch {t.batch_size} x {seq}, {t.precision}, {optimizer_text(t.optimizer)}, {t.attention} attention"
            + ckpt + recipe_text(t) + parallel_summary(t))


def optimizer_text(name: str) -> str:
    """The optimizer, said to be the HF Trainer's default when it is (settings.DEFAULT_OPTIMIZER)."""
    return f"{name} (the HF Trainer's default)" if name == DEFAULT_OPTIMIZER else name


def recipe_text(t) -> str:
    """The recipe settings that differ from their defaults, as a suffix of the training line."""
    parts = []
    if getattr(t, "grad_accum", 1) > 1:
        parts.append(f"{t.grad_accum} micro-batches per optimizer step")
    if getattr(t, "loss", "hf") != "hf":
        parts.append(f"{t.loss} loss" + (f" in {t.loss_chunks} chunks" if t.loss == "chunked" else ""))
    if getattr(t, "keep_outputs", False):
        parts.append("outputs kept through backward")
    if getattr(t, "max_grad_norm", None) is not None:
        parts.append(f"gradients clipped to norm {t.max_grad_norm:g}")
    return "".join(", " + p for p in parts)


def parallel_summary(t) -> str:
    """', fsdp on 8 GPUs (per GPU below)' and the like; '' on one GPU."""
    if getattr(t, "sharding", "none") == "none":
        return ""
    extras = [] if t.reshard_after_forward else ["no reshard after forward"]
    extras += [f"{t.gpus_per_node} per node"] if t.sharding == "hsdp" else []
    extras += [f"offload {t.offload}"] if t.offload != "none" else []
    more = f" ({', '.join(extras)})" if extras else ""
    return f", {t.sharding} on {t.gpus} GPUs{more}, memory per GPU (rank 0)"


def rank_lines(e) -> list[str]:
    """How the model is wrapped (peftcalc.sharding.wrapping_text), and a line for each rank whose memory differs
    from rank 0's (the last: dim 0 not divisible by the ranks)."""
    from peftcalc.sharding import wrapping_text

    wrapping = wrapping_text(e.method.method, e.training) if getattr(e.training, "sharding", "none") != "none" else ""
    return ([wrapping] if wrapping else []) + [f"rank {r['rank']}: peak {gib(r['peak_bytes'])} ({r['peak_phase']}), step 1 {gib(r['step1_peak_bytes'])}"
            for r in getattr(e.memory, "ranks", ())[1:]]


DOES_NOT_FIT = "-"  # what the GPU table shows for the time and cost of a card the setting does not fit


def vision_tokens(e) -> int | None:
    """The tokens a vision encoder (ViT, CLIP's vision tower) sees per image, patches + class token, whatever
    --seq-len says; None for any other model (a vision-language model reads --seq-len for its text)."""
    from peftcalc.config import load_spec
    from peftcalc.errors import InputError

    try:
        spec = load_spec(e.model)
    except (InputError, OSError, ValueError):
        spec = None
    if spec is None or spec.architecture != e.architecture:  # a config dict's spec: not loadable by name
        return None
    return spec.vision_seq_len if spec.is_vision and not spec.is_vlm and not spec.is_blip2 else None


def task_file_word(method: str, n: int = 2) -> str:
    """What one task's file is called: an adapter for the PEFT methods and bottleneck adapters, a task file
    for the others (frozen, freeze, bitfit, the VLM and BLIP-2 methods: a subset of the model's own weights)."""
    from peftcalc.methods import PEFT_METHODS

    word = "adapter" if method in PEFT_METHODS or method == "adapter" else "task file"
    return word if n == 1 else word + "s"


def storage_sentence(e) -> str:
    s = e.storage
    base = ""
    if s.base_bytes:
        base = f" (base {human_bytes(s.base_bytes)} + {plural(s.tasks, task_file_word(e.method.method, 1))})"
    checkpoint = ""
    if s.mxfp4_checkpoint_bytes:
        checkpoint = (f". Checkpoint as published: {human_bytes(s.mxfp4_checkpoint_bytes)} with the experts in MXFP4 "
                      f"(4-bit values, one uint8 scale per 32), {human_bytes(s.bf16_checkpoint_bytes)} in bf16 as "
                      "Mxfp4Config(dequantize=True) loads it for fine-tuning")
    return (f"Storage: {human_bytes(s.per_task_bytes)} per task; {plural(s.tasks, 'task')} = "
            f"{human_bytes(s.total_bytes)}{base}; {plural(s.tasks, 'full fine-tuned copy', 'full fine-tuned copies')}"
            f" = {human_bytes(s.full_models_total_bytes)}{checkpoint}")


def _gpu_rows(e) -> list[list[str]]:
    """The GPU table: a card the setting does not fit gets no step time, epoch time or cost (they would read
    as a plan; JSON keeps them)."""
    rows = []
    for g in e.gpus:
        if g.fits:
            plan = [f"{g.step_seconds:,.3f} s", hours(g.epoch_hours), f"${g.epoch_cost_usd:,.2f}"]
        else:
            plan = [DOES_NOT_FIT] * 3
        rows.append([g.name, gib(g.memory_bytes), "yes" if g.fits else "no", gib(g.headroom_bytes),
                     DOES_NOT_FIT if g.max_batch_size is None else str(g.max_batch_size)] + plan)
    return rows


def _chosen_misfit(e) -> str | None:
    """The line saying the GPU named with --gpu does not fit the setting (None when it fits)."""
    fit = next((g for g in e.gpus if e.cost and g.name == e.cost.gpu), None)
    if fit is None or fit.fits:
        return None
    return (f"{fit.name} ({gib(fit.memory_bytes)}) does not fit this setting (it needs {gib(e.memory.reserved_bytes)}):"
            f" the time and cost below are not a plan, only what the step would take if it fit.")


def traced_lines(e) -> list[str]:
    """What a traced estimate (estimated_by "traced") says about itself: how it was traced, what its peak
    counts, and what it does not give; nothing for a modelled one."""
    if e.estimated_by != "traced":
        return []
    tr = e.trace
    lines = [f"Traced on fake tensors in {tr['seconds']:,.1f} s ({tr['steps']} steps, step {tr['step_reported']} "
             "reported): the peak counts live tensor storage as the CPU allocator would (--device cpu), not the "
             "CUDA caching allocator; the GPU fit adds the allocator slack and CUDA context; max batch: not traced."]
    if tr["flops"].startswith("approximate"):
        lines.append("Time and cost: FLOPs approximated from the traced parameter counts (6N per token, plus "
                     "attention), not modelled for this family; storage: the traced model's tensors.")
    return lines


def render_estimate_text(e) -> str:
    out = []
    out.append(f"{e.model} ({e.architecture}) - {method_summary(e)}")
    out.append(training_summary(e.training, vision_tokens(e)) + f", device {e.memory.device}")
    out.extend(traced_lines(e))
    auto = getattr(e, "gpus_auto", None)
    if auto:
        out.append(f"--gpus auto: {auto['gpus']} x {auto['gpu']}, the fewest on which this fits; the largest batch "
                   f"there is {auto['max_batch']}")
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
    rows.append(["peak phase", e.memory.peak_phase if e.memory.peak_micro_batch is None else
                 f"{e.memory.peak_phase}, micro-batch {_micro_batch_text(e)}"])
    rows.append(["step 1 peak", gib(e.memory.step1_peak_bytes)])
    rows.append(["+ allocator slack", gib(e.memory.overhead["allocator_slack"])])
    rows.append(["+ CUDA context", gib(e.memory.overhead["cuda_context"])])
    if e.memory.paged_bytes:
        rows.append(["+ paged optimizer states (unified memory)", gib(e.memory.paged_bytes)])
    rows.append(["GPU memory needed (nvidia-smi)", gib(e.memory.reserved_bytes)])
    if e.memory.host_bytes:
        rows.append(["host memory, pinned (offloaded activations)", gib(e.memory.host_bytes)])
    out.append(text_table(rows, ["Memory at the peak", ""]))
    out.extend(rank_lines(e))
    if e.memory.traced != "traced" and e.training.loss == "trl":
        out.append("(trl loss on CUDA: TRL's Triton kernels, modelled from their source, not traced: the CPU traces "
                   "hold its torch path, and no GPU run has checked the CUDA one yet)")
    elif e.memory.traced != "traced":
        out.append(f"({e.training.loss if e.training.loss in ('liger', 'cce') else e.training.optimizer}: "
                   "modelled from its source, not traced: it runs on CUDA only, and no GPU run has checked it yet)")
    out.append("")
    out.append(text_table(_gpu_rows(e), ["GPU", "memory", "fits", "headroom", "max batch", "step", "epoch", "epoch cost"]))
    out.append("")
    if e.cost:
        c = e.cost
        misfit = _chosen_misfit(e)
        if misfit:
            out.append(misfit)
        out.append(f"Time and cost on {c.gpu} at {c.mfu:.0%} MFU: {c.flops_per_step / 1e12:,.1f} TFLOP per step, "
                   f"{c.step_seconds:,.3f} s per step, {c.steps_per_epoch:,} steps per epoch of "
                   f"{c.dataset_tokens:,} tokens = {hours(c.epoch_hours)}, ${c.epoch_cost_usd:,.2f} at ${c.price_per_hour:.2f}/h"
                   + (f" x {c.gpus} GPUs" if getattr(c, "gpus", 1) > 1 else ""))
        if getattr(c, "gpus", 1) > 1:
            out.append(f"Communication per GPU and step: {human_bytes(c.comm_bytes_per_step)} sent in "
                       f"{c.comm_seconds:,.3f} s (overlapped with compute: the step takes the longer of the two); "
                       "FLOPs and step time are one GPU's, tokens per step all GPUs'")
    else:
        out.append("No GPU in the catalog fits this setting: try --grad-checkpointing, a smaller batch or QLoRA.")
    out.append(storage_sentence(e))
    return "\n".join(out)


def _micro_batch_text(e) -> str:
    """'1', or '2 (and every later one)' for micro-batches 2..N of an accumulation step."""
    n = e.training.grad_accum
    return "1" if e.memory.peak_micro_batch == 1 else ("2" if n == 2 else f"2 (2-{n} alike)")


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
        "estimated_by": e.estimated_by,
    }
    if e.memory.host_bytes:  # offloaded activations' pinned host copies
        row["host_bytes"] = e.memory.host_bytes
    if e.trace is not None:
        row["trace_seconds"] = e.trace["seconds"]
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
    lines = [f"**{e.model}** ({e.architecture}), {method_summary(e)}; {training_summary(e.training, vision_tokens(e))}",
             *traced_lines(e), ""]
    lines.append(f"Parameters: {e.params.total:,} total, {e.params.trainable:,} trainable ({e.params.percent:.4f}%)")
    lines.append("")
    rows = [{"component": COMPONENT_LABELS[c], "GiB": round(e.memory.components.get(c, 0) / GIB, 3)}
            for c in COMPONENTS if e.memory.components.get(c, 0)]
    rows.append({"component": f"**peak** ({e.memory.peak_phase})", "GiB": round(e.memory.peak_bytes / GIB, 3)})
    rows.append({"component": "reserved (nvidia-smi)", "GiB": round(e.memory.reserved_bytes / GIB, 3)})
    lines.append(rows_to_markdown(rows))
    lines.append("")
    lines.append(rows_to_markdown([{"GPU": g.name, "fits": "yes" if g.fits else "no",
                                    "max batch": DOES_NOT_FIT if g.max_batch_size is None else g.max_batch_size,
                                    "step s": round(g.step_seconds, 4) if g.fits else DOES_NOT_FIT,
                                    "epoch h": round(g.epoch_hours, 3) if g.fits else DOES_NOT_FIT,
                                    "epoch $": round(g.epoch_cost_usd, 2) if g.fits else DOES_NOT_FIT}
                                   for g in e.gpus]))
    return "\n".join(lines)
