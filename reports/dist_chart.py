"""Per-GPU memory vs the number of GPUs, one line per data-parallel strategy, with the GPU catalog's capacities as
horizontal lines: the chart that answers "how many cards of which kind" (issue 15).

Each point is ``peftcalc.estimate(model, ..., gpus=N, sharding=S)``'s reserved memory of rank 0 (the allocated
peak plus caching-allocator slack plus the CUDA context: what a card must hold, the quantity estimate's "fits"
uses); N = 1 is the one-GPU step (sharding none), where the precision runs on one GPU. A strategy the calculator refuses for the setting (a
CombinationError, such as DDP with a parameter outside the loss, or a strategy not modelled yet) is left out and
its reason kept in the frame's attrs.
"""

from __future__ import annotations

from peftcalc import estimate
from peftcalc.errors import CombinationError, InputError

GIB = 1024**3
STRATEGIES = ("ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def dist_frame(model, method: str = "full", gpu_counts=GPU_COUNTS, strategies=STRATEGIES, **settings):
    """DataFrame (strategy, gpus, peak_bytes, reserved_bytes, peak_phase) of rank 0 for every strategy and GPU
    count; `settings` are estimate's other keywords. attrs: skipped {strategy: reason}."""
    import pandas as pd

    rows, skipped = [], {}
    try:
        base = estimate(model, method=method, **settings)
    except CombinationError as exc:  # mixed-bf16 needs a sharding: no one-GPU point
        base, skipped["one GPU"] = None, str(exc)
    for s in strategies:
        for n in gpu_counts:
            if n == 1 and base is None:
                continue
            try:
                e = base if n == 1 else estimate(model, method=method, gpus=n, sharding=s, **settings)
            except (CombinationError, InputError) as exc:
                skipped.setdefault(s, str(exc))
                break
            rows.append({"strategy": s, "gpus": n, "peak_bytes": e.memory.peak_bytes,
                         "reserved_bytes": e.memory.reserved_bytes, "peak_phase": e.memory.peak_phase})
    df = pd.DataFrame(rows, columns=["strategy", "gpus", "peak_bytes", "reserved_bytes", "peak_phase"])
    df = df[df["strategy"].isin([s for s in strategies if s not in skipped])].reset_index(drop=True)
    df.attrs.update(model=model if base is None else base.model, method=method, skipped=skipped)
    return df


def dist_chart(model, out, method: str = "full", gpu_counts=GPU_COUNTS, strategies=STRATEGIES, **settings) -> dict:
    """`out` as PNG and SVG: rank 0's reserved memory per GPU vs N (log-log) per strategy, card capacities as
    labelled horizontal lines (reports.breakdown.gpu_lines). Returns the frame and the files."""
    from reports.breakdown import log2_axes_with_capacities
    from reports.charts import line_style, pyplot, save

    df = dist_frame(model, method, gpu_counts, strategies, **settings)
    if df.empty:
        raise InputError(f"no strategy runs {method} on {model}: " + "; ".join(
            f"{s}: {why}" for s, why in df.attrs["skipped"].items()))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6.0))
    for i, (s, g) in enumerate(df.groupby("strategy", sort=False)):
        g = g.sort_values("gpus")
        ax.plot(g["gpus"], g["reserved_bytes"] / GIB, label=s, **line_style(i))
    log2_axes_with_capacities(ax, sorted(df["gpus"].unique()))
    ax.set_xlabel("GPUs (data-parallel ranks)")
    ax.set_ylabel("memory per GPU, rank 0 (GiB, reserved)")
    ax.set_title(f"{df.attrs['model']} - {method}: per-GPU memory vs GPUs")
    ax.legend(loc="lower left", fontsize=8)
    return {"table": df, "skipped": df.attrs["skipped"], "files": save(fig, out)}
