"""`peftcalc crossover`: where a parameter-efficient method stops saving memory against another
(by default full fine-tuning) as the sequence length or the batch size grows.

peft#1514 (TinyLlama-1.1B, LoRA r=64 on every linear, bf16) reported LoRA using as much memory as full
fine-tuning at long context. The calculator reproduces it. Full fine-tuning pays a fixed cost at its
peak (the start of backward, before any gradient exists): AdamW's two states, 4 bytes per parameter in
bf16. LoRA pays per token: each peft LoRA Linear saves its own copy of its input, upcast to the fp32
adapter's dtype (peft tuners/lora/layer.py Linear.forward: ``x = self._cast_input_dtype(x,
lora_A.weight.dtype)``), seven fp32 copies per Llama block where full fine-tuning's Linears save four
bf16 inputs (q/k/v share one, gate/up share one). Past some length LoRA's peak overtakes full
fine-tuning's; this module finds that length (or batch size) exactly: the smallest value at which the
method's predicted peak reaches the other's.
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.errors import InputError
from peftcalc.memory import COMPONENTS, timeline
from peftcalc.methods import check_applies, check_combination, make_plan, max_seq_len
from peftcalc.settings import TrainingSettings, check_training

__all__ = ["AXES", "crossover", "crossover_sentence", "first_crossing", "render_crossover", "scan_points"]

AXES = {"seq-len": "seq_len", "seq_len": "seq_len", "batch-size": "batch_size", "batch_size": "batch_size"}


def _peak(plan, t: TrainingSettings) -> tuple[int, dict]:
    tl = timeline(plan, t)
    return tl.peak_bytes, dict(tl.components)


def _gap(plan_a, plan_b, t: TrainingSettings) -> int:
    """Peak of plan_a minus peak of plan_b at training settings t (bytes)."""
    return _peak(plan_a, t)[0] - _peak(plan_b, t)[0]


def scan_points(start: int, limit: int) -> list[int]:
    """The values the scan tries: start, then doubling, then limit (powers of two are where people
    set sequence lengths and batch sizes)."""
    points, v = [], start
    while v < limit:
        points.append(v)
        v *= 2
    return points + [limit]


def first_crossing(gap, start: int, limit: int) -> tuple[int | None, list[tuple[int, int]]]:
    """Smallest integer v in [start, limit] with gap(v) >= 0, and the scan it came from: gap is tried at
    scan_points(start, limit); in the first interval where it turns non-negative the crossing is found
    by bisection (gap is assumed monotonic inside that interval, which holds when both peaks grow
    linearly or quadratically in the axis with the same peak event, and is checked at both ends). A
    crossing that opens and closes again between two scan points is not seen."""
    scanned, prev = [], None
    for v in scan_points(start, limit):
        g = gap(v)
        scanned.append((v, g))
        if g >= 0:
            if prev is None:
                return v, scanned
            lo, hi = prev, v  # gap(lo) < 0 <= gap(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if gap(mid) >= 0:
                    hi = mid
                else:
                    lo = mid
            return hi, scanned
        prev = v
    return None, scanned


def crossover(model, method: str = "lora", against: str = "full", over: str = "seq-len", limit: int | None = None,
              training: dict | None = None, **method_kw) -> dict:
    """Where `method`'s predicted peak first reaches `against`'s as `over` (seq-len or batch-size) grows,
    the other training settings fixed (`training`: TrainingSettings fields; `method_kw`: the method's
    settings, e.g. rank=64, targets='all-linear'; `against` takes its defaults)."""
    from peftcalc.api import method_settings, resolved_settings, default_method
    from peftcalc.config import load_spec

    axis = AXES.get(over)
    if axis is None:
        raise InputError(f"over must be seq-len or batch-size, got '{over}'", names=("over",))
    spec = load_spec(model)
    method = method or default_method(spec)
    if method == against:
        raise InputError(f"method and against are both '{method}'; compare two different methods",
                         names=("method", "against"))
    base = TrainingSettings(**(training or {}))
    check_training(base)
    settings_m = method_settings(method, **method_kw)
    check_applies(method, method_kw)
    plan_m = make_plan(spec, resolved_settings(spec, settings_m))
    plan_a = make_plan(spec, resolved_settings(spec, method_settings(against)))
    if limit is None and axis == "seq_len":  # up to the positions a model with learned ones has
        limit = max_seq_len(spec, plan_m.settings) or 131_072
    limit = limit or 1024
    if limit < 1:
        raise InputError(f"limit must be a positive integer, got {limit}", names=("limit",))
    start = getattr(base, axis)
    if start > limit:
        raise InputError(f"limit {limit} is below the starting {over} {start}", names=("limit",))
    for plan in (plan_m, plan_a):  # both runnable from the start to the limit
        check_combination(spec, plan.settings, limit if axis == "seq_len" else base.seq_len, base.grad_checkpointing)

    def at(v: int) -> TrainingSettings:
        return replace(base, **{axis: v})

    value, scanned = first_crossing(lambda v: _gap(plan_m, plan_a, at(v)), start, limit)
    out = {"model": spec.name, "method": method, "against": against, "over": axis, "start": start, "limit": limit,
           "trainable": plan_m.trainable, "against_trainable": plan_a.trainable,
           "scan": [{axis: v, "gap_bytes": g} for v, g in scanned], "crossover": value}
    if value is not None:
        for key, v in (("at", value), ("before", value - 1 if value > start else None)):
            if v is None:
                continue
            pm, cm = _peak(plan_m, at(v))
            pa, ca = _peak(plan_a, at(v))
            out[key] = {axis: v, "method_peak_bytes": pm, "against_peak_bytes": pa,
                        "components": {c: {"method": cm.get(c, 0), "against": ca.get(c, 0)} for c in COMPONENTS}}
    return out


def crossover_sentence(r: dict) -> str:
    axis = "sequence length" if r["over"] == "seq_len" else "batch size"
    if r["crossover"] is None:
        return (f"{r['method']} stays below {r['against']} on {r['model']} for every {axis} from {r['start']} to "
                f"{r['limit']}.")
    if r["crossover"] == r["start"]:
        return f"{r['method']} already needs at least as much memory as {r['against']} at {axis} {r['start']}."
    return (f"{r['method']} needs at least as much memory as {r['against']} on {r['model']} from {axis} "
            f"{r['crossover']:,} on ({r['before'][r['over']]:,} is the last {axis} where it saves memory).")


def render_crossover(r: dict, fmt: str) -> str:
    import json

    from peftcalc.format import COMPONENT_LABELS, bytes_column, text_table, gib, rows_to_csv, rows_to_markdown

    if fmt == "json":
        return json.dumps(r, indent=2)
    scan = [{r["over"]: s[r["over"]], "method_minus_against_bytes": s["gap_bytes"]} for s in r["scan"]]
    if fmt == "csv":
        return rows_to_csv(scan)
    lines = [crossover_sentence(r)]
    if fmt == "markdown":
        return "\n\n".join([lines[0], rows_to_markdown(scan)])
    gaps = bytes_column([s["method_minus_against_bytes"] for s in scan])  # one unit for the whole column
    lines += ["", text_table([[f"{s[r['over']]:,}", g] for s, g in zip(scan, gaps)],
                         [r["over"].replace("_", " "), f"{r['method']} - {r['against']} peak"])]
    if "at" in r:
        at = r["at"]
        rows = [[COMPONENT_LABELS[c], gib(v["method"]), gib(v["against"]), gib(v["method"] - v["against"])]
                for c, v in at["components"].items() if v["method"] or v["against"]]
        rows.append(["peak", gib(at["method_peak_bytes"]), gib(at["against_peak_bytes"]),
                     gib(at["method_peak_bytes"] - at["against_peak_bytes"])])
        lines += ["", f"At {r['over'].replace('_', ' ')} {at[r['over']]:,}, at each method's peak:",
                  text_table(rows, ["", r["method"], r["against"], "difference"], "lrrr")]
    return "\n".join(lines)
