"""Storage vs task count, the usual parameter-efficient fine-tuning storage argument: one frozen base
plus T task files for each parameter-efficient method, against T fully fine-tuned copies of the model.

Sizes are the exact safetensors file sizes of :mod:`peftcalc.storage` (what ``save_pretrained``
writes for peft methods, the trainable tensors for the others, ``model.safetensors`` for a full
copy), in the model's bf16/fp16 weight dtype.
"""

from __future__ import annotations

import math

from peftcalc.errors import InputError
from peftcalc.methods import METHODS, MethodSettings, make_plan
from peftcalc.config import load_spec
from peftcalc.storage import storage

# The claims the storage section checks: (claim, where it comes from). Both are the common PEFT
# storage argument, usually stated without a primary source.
STORAGE_CLAIMS = {
    "per_task_fraction": ("very often 0.1% to 1% of the base", "a common PEFT rule of thumb, stated without a "
                          "primary source"),
    "one_base": ("storing T tasks costs one base plus T small task modules, not T full models",
                 "the standard PEFT storage argument"),
}


MAX_TASK_POINTS = 10_000  # task counts one chart takes (a range 1..10**9 would not fit in memory)


def parse_tasks(tasks) -> list[int]:
    """'1..100' (every T from 1 to 100), '1,10,100', an int, or a list of ints; at most
    MAX_TASK_POINTS values."""
    if isinstance(tasks, int):
        values = [tasks]
    elif isinstance(tasks, (list, tuple, range)):
        _check_points(len(tasks), tasks)
        values = [int(t) for t in tasks]
    else:
        text = str(tasks).strip()
        try:
            bounds = [int(x) for x in text.split("..", 1)] if ".." in text else None
            values = [] if bounds else [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--tasks must look like '1..100' or '1,10,100', got {tasks!r}") from None
        if bounds:
            lo, hi = bounds
            if lo < 1:
                raise InputError(f"--tasks must be positive integers, got {tasks!r}")
            _check_points(hi - lo + 1, tasks)
            values = list(range(lo, hi + 1))
        _check_points(len(values), tasks)
    if not values or min(values) < 1:
        raise InputError(f"--tasks must be positive integers, got {tasks!r}")
    return sorted(set(values))


def _check_points(n: int, tasks) -> None:
    if n > MAX_TASK_POINTS:
        raise InputError(f"--tasks {tasks} has {n:,} task counts, more than {MAX_TASK_POINTS:,}; use a shorter "
                         "range, or a list such as 1,10,100,1000000000")


def per_method_storage(model, precision_dtype: str = "bfloat16", methods=METHODS) -> dict:
    """method -> (base_bytes, per_task_bytes); full fine-tuning is (0, one full model). Methods the
    model cannot take are left out."""
    spec = load_spec(model)
    out = {}
    for m in methods:
        try:
            plan = make_plan(spec, MethodSettings(m))
        except InputError:
            continue
        s = storage(plan, precision_dtype, 1)
        out[m] = (s.base_bytes, s.per_task_bytes)
    return out


def crossover(base: int, per_task: int, full: int) -> int | None:
    """The smallest T for which one base plus T task files is smaller than T full models:
    base + T * per_task < T * full  <=>  T > base / (full - per_task). None if never."""
    if per_task >= full:
        return None
    t = math.floor(base / (full - per_task)) + 1
    return max(t, 1)


def storage_frame(model, tasks, precision_dtype: str = "bfloat16", methods=METHODS):
    """Long table: method, T, total bytes (base + T x per task), the T full models it replaces, the
    per-task file, the ratio to full fine-tuning."""
    import pandas as pd

    spec = load_spec(model)
    ts = parse_tasks(tasks)
    per = per_method_storage(spec, precision_dtype, methods)
    full = per.get("full") or (0, storage(make_plan(spec, MethodSettings("full")), precision_dtype, 1).per_task_bytes)
    full_one = full[1]
    rows = []
    for m, (base, task) in per.items():
        for t in ts:
            total = base + t * task
            rows.append({"model": spec.name, "method": m, "tasks": t, "base_bytes": base, "per_task_bytes": task,
                         "total_bytes": total, "full_models_bytes": t * full_one,
                         "ratio_to_full": total / (t * full_one)})
    df = pd.DataFrame(rows)
    df.attrs["full_model_bytes"] = full_one
    df.attrs["crossover"] = {m: crossover(b, p, full_one) for m, (b, p) in per.items() if m != "full"}
    df.attrs["dtype"] = precision_dtype
    return df


def storage_summary(df) -> dict:
    """Per method: per-task bytes and its fraction of a full model, the crossover T, and the totals
    at the largest T."""
    full_one = df.attrs["full_model_bytes"]
    t_max = int(df["tasks"].max())
    out = {"model": df["model"].iloc[0], "full_model_bytes": int(full_one), "tasks_max": t_max, "methods": {}}
    for m, g in df.groupby("method", sort=False):
        last = g[g["tasks"] == t_max].iloc[0]
        out["methods"][m] = {
            "base_bytes": int(last["base_bytes"]),
            "per_task_bytes": int(last["per_task_bytes"]),
            "per_task_pct_of_full": 100.0 * last["per_task_bytes"] / full_one,
            "crossover_tasks": df.attrs["crossover"].get(m),
            f"total_bytes_at_{t_max}": int(last["total_bytes"]),
            f"full_models_bytes_at_{t_max}": int(last["full_models_bytes"]),
        }
    return out


def crossover_sentence(summary: dict) -> str:
    cross = {m: v["crossover_tasks"] for m, v in summary["methods"].items() if m != "full"}
    groups: dict = {}
    for m, t in cross.items():
        groups.setdefault(t, []).append(m)
    parts = []
    for t, ms in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        if t is None:
            parts.append(f"{', '.join(ms)}: never (a task file is as large as a full model)")
        else:
            parts.append(f"{', '.join(ms)}: from T = {t}")
    return (f"One base + T task files is smaller than T full copies of {summary['model']} "
            f"({'; '.join(parts)}). At T = 1 the shared base plus one task file always costs a little more "
            f"than one full model; from T = 2 on the full copies cost about T times the base.")


def storage_chart(model, tasks, out, precision_dtype: str = "bfloat16", methods=METHODS) -> dict:
    """Total storage (GiB, log axis) vs T for each method and for T full models, the crossover
    stated in the title; PNG and SVG. Returns the numbers (see :func:`storage_summary`)."""
    from reports.charts import GIB, line_style, pyplot, save

    df = storage_frame(model, tasks, precision_dtype, methods)
    summary = storage_summary(df)
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.8))
    ts = sorted(df["tasks"].unique())
    dense = len(ts) > 12
    # Methods whose files are the same size (QLoRA saves the same adapter as LoRA) share a line.
    lines: dict = {}
    for m in df["method"].unique():
        key = (summary["methods"][m]["base_bytes"], summary["methods"][m]["per_task_bytes"])
        lines.setdefault(key, []).append(m)
    order = sorted(lines.items(), key=lambda kv: (kv[0][0] != 0, -kv[0][1]))
    for i, ((base, task), ms) in enumerate(order):
        g = df[df["method"] == ms[0]].sort_values("tasks")
        full = base == 0
        st = line_style(i, ms[0])
        if dense:
            st["markevery"] = _mark_indices(list(g["tasks"]), shifted=i % 2 == 1)
        if full:
            st.update(color="black", linewidth=2.4, linestyle="-", marker="o", markerfacecolor="black",
                      markeredgecolor="black")
            label = f"full fine-tuning: T full models ({task / GIB:.2f} GiB each)"
        else:
            label = f"{', '.join(ms)}: base + T x {_human(task)}"
        ax.plot(g["tasks"], g["total_bytes"] / GIB, label=label, **st)
        ax2.plot(g["tasks"], g["tasks"] * task / GIB, label=", ".join(ms) if not full else "full (T models)", **st)
    for a in (ax, ax2):
        a.set_yscale("log")
        if max(ts) / min(ts) >= 20:
            a.set_xscale("log")
        a.set_xlabel("number of tasks T")
    ax.set_ylabel("total storage (GiB, log scale)")
    ax2.set_ylabel("storage of the T task files alone (GiB, log scale)")
    base_gib = summary["full_model_bytes"] / GIB
    ax2.axhline(base_gib, color="black", linewidth=0.9, linestyle=(0, (2, 2)),
                label=f"one base model ({base_gib:.2f} GiB)")
    cross = {v["crossover_tasks"] for m, v in summary["methods"].items() if m != "full"}
    cross_text = f"PEFT smaller from T = {min(c for c in cross if c)}" if any(cross) else "no crossover"
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(precision_dtype, precision_dtype)
    t_max = summary["tasks_max"]
    full_at_max = summary["methods"]["full"][f"total_bytes_at_{t_max}"] / GIB
    ax.set_title(f"total: one {dtype} base + T task files vs T full models\n"
                 f"({cross_text}; at T = {t_max}: T full models {full_at_max:,.0f} GiB)")
    ax2.set_title("what the T task files add on top of the shared base")
    ax.legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{summary['model']}: storage vs number of tasks (safetensors file sizes, {dtype})", y=1.0)
    fig.tight_layout()
    summary["files"] = save(fig, out)
    summary["crossover_sentence"] = crossover_sentence(summary)
    summary["table"] = df
    return summary


def _mark_indices(ts: list[int], shifted: bool = False) -> list[int]:
    """Indices of the T nearest to 1, 2, 5, 10, 20, 50, ... (even marker spacing on a log axis);
    `shifted` uses 1.5, 3, 7, 15, ... instead, so two lines that nearly coincide keep visible markers."""
    steps = (1.5, 3, 7) if shifted else (1, 2, 5)
    targets, v = [], 1
    while v <= ts[-1]:
        targets += [m * v for m in steps]
        v *= 10
    idx = {min(range(len(ts)), key=lambda i: abs(ts[i] - t)) for t in targets if t <= ts[-1]}
    return sorted(idx if shifted else idx | {len(ts) - 1})


def _human(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
