"""The end of a MemoryCallback run: one harness-format row (``measure.record``: settings, key, environment,
prediction; the measured steps of the run) and the text comparing predicted with measured, component by
component."""

from __future__ import annotations

import json
from pathlib import Path

from peftcalc.errors import InputError

__all__ = ["comparison_text", "harness_row", "write_row"]

# peftcalc's memory components -> the tracer's categories (reports/rows.py COMPONENT_MAP)
COMPONENTS = (("weights", ("weights_frozen", "weights_trainable", "buffers"), "parameters"),
              ("gradients", ("gradients",), "gradients"),
              ("optimizer", ("optimizer_states",), "optimizer_state"),
              ("activations", ("activations",), "activations"),
              ("inputs", ("inputs",), "inputs"),
              ("other", ("logits_loss", "temporaries"), "other"))


def harness_row(cb, outcome: str = "ok", error: str | None = None) -> dict:
    """The run as one row `peftcalc report` reads: the settings (the model's config inline, so the report
    recomputes the prediction for any model), the measured steps (the last one is the steady state), the
    prediction and the environment."""
    from measure.record import environment, predict, row_key, settings_record

    device = cb.training.device
    settings = settings_record(cb.spec, cb.method, cb.training, device, len(cb.steps), cb.method.prepare_kbit)
    settings["model_config"] = {k: v for k, v in cb.spec.hf_config.items() if not k.startswith("_")}
    row = {"key": row_key(settings), "settings": settings, "outcome": outcome, "error": error,
           "harness": {"loop": "transformers Trainer (peftcalc.integrations.transformers.MemoryCallback)"},
           "params": {"total": sum(p.numel() for p in cb._model.parameters()),
                      "trainable": sum(p.numel() for p in cb._model.parameters() if p.requires_grad)},
           "measured": None}
    if cb.steps:
        first, last = cb.steps[0], cb.steps[-1]
        measured = {"source": "tracer" if device == "cpu" else "cuda_allocator",
                    "peak_bytes": last["peak_bytes"], "peak_phase": last["peak_phase"],
                    "step1_peak_bytes": first["peak_bytes"], "step1_peak_phase": first["peak_phase"],
                    "steps": cb.steps}
        for key in ("categories_at_peak", "reserved_peak_bytes"):
            if key in last:
                measured[key] = last[key]
        if "categories_at_peak" in first:
            measured["step1_categories_at_peak"] = first["categories_at_peak"]
        if "reserved_peak_bytes" in first:
            measured["step1_reserved_peak_bytes"] = first["reserved_peak_bytes"]
        row["measured"] = measured
    row.update(predict(cb.spec, cb.method, cb.training, device))
    row["environment"] = environment(device)
    return row


def write_row(path: str, row: dict) -> None:
    """Append `row` as one JSON line to `path` (InputError, one line, when it cannot be written)."""
    from measure.record import to_json_line

    try:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            f.write(to_json_line(row) + "\n")
    except OSError as exc:
        raise InputError(f"cannot write the MemoryCallback row to {path}: {exc.strerror or exc}") from None


def comparison_text(e, row: dict, not_modelled=()) -> str:
    """Predicted vs measured peak (steady state and step 1), and the components at the peak."""
    from peftcalc.format import gib

    m = row.get("measured") or {}
    if not m:
        return f"peftcalc: predicted peak {gib(e.memory.peak_bytes)}; no step was measured ({row['outcome']})"
    lines = [f"peftcalc: predicted vs measured ({m['source']}, {len(m['steps'])} steps, outcome {row['outcome']})",
             f"{'':<22}{'predicted':>16}{'measured':>16}{'error':>9}"]

    def line(name, p, meas):
        err = f"{100 * (p - meas) / meas:+.2f}%" if meas else "-"
        return f"{name:<22}{p:>16,}{meas:>16,}{err:>9}"

    lines.append(line(f"peak ({e.memory.peak_phase.split(':')[0]}/{m['peak_phase']})", e.memory.peak_bytes,
                      m["peak_bytes"]))
    lines.append(line("step 1 peak", e.memory.step1_peak_bytes, m["step1_peak_bytes"]))
    if "reserved_peak_bytes" in m:
        lines.append(line("reserved", e.memory.reserved_bytes, m["reserved_peak_bytes"]))
    cats = m.get("categories_at_peak")
    if cats:
        lines.append("at the peak:")
        parts = dict(e.memory.components)
        for name, pred_names, cat in COMPONENTS:
            lines.append(line(f"  {name}", sum(parts.get(n, 0) for n in pred_names), cats.get(cat, 0)))
    else:
        lines.append("predicted components: " + json.dumps({k: int(v) for k, v in dict(e.memory.components).items()}))
    if not_modelled:
        lines.append("not modelled (the estimate ignores them): " + "; ".join(not_modelled))
    return "\n".join(lines)
