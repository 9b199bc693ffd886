"""Memory breakdown per method (stacked bars) and peak memory vs batch size and vs sequence
length with the GPU catalog's capacities as horizontal lines: the chart that answers "which card".

Bar heights are the memory a card must hold: the calculator's reserved memory (the allocated peak
plus caching-allocator slack plus the CUDA context, what nvidia-smi shows), the quantity
``peftcalc estimate`` uses for "fits". The stack splits it into the components live at the peak.
"""

from __future__ import annotations

from peftcalc.settings import DEFAULT_OPTIMIZER
from peftcalc import estimate
from peftcalc.errors import InputError
from peftcalc.hardware import gpu_catalog
from peftcalc.methods import METHODS
from peftcalc.config import load_spec

GIB = 1024**3
# Stacked components: name -> the calculator's components it sums (overhead also takes what
# reserved adds over the allocated peak).
STACK = {
    "weights": ("weights_frozen", "weights_trainable", "buffers"),
    "gradients": ("gradients",),
    "optimizer": ("optimizer_states",),
    "activations": ("activations",),
    "logits": ("logits_loss",),
    "overhead": ("temporaries", "inputs"),
}
STACK_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "activations": "saved activations",
    "logits": "logits / loss buffers",
    "overhead": "overhead (temporaries, inputs, allocator slack, CUDA context)",
}
DEFAULT_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)


def _components(e) -> dict:
    parts = dict(e.memory.components)
    out = {k: sum(int(parts.get(n, 0)) for n in names) for k, names in STACK.items()}
    out["overhead"] += int(e.memory.reserved_bytes - e.memory.peak_bytes)
    return out


def breakdown_frame(model, batch_sizes=(1, 2, 4, 8), seq_len: int = 512, methods=METHODS, precision: str = "bf16",
                    optimizer: str = DEFAULT_OPTIMIZER, grad_checkpointing: bool = False, attention: str = "sdpa",
                    rank=None, targets=None, seq_lens=None):
    """One row per (method, batch, seq): the stacked components (bytes), allocated peak, reserved,
    phase, and the smallest catalog GPU that fits. The batch sweep runs at `seq_len`; the sequence
    sweep (`seq_lens`) at the first batch size. Methods the model cannot take are left out (noted
    in ``df.attrs['skipped']``)."""
    import pandas as pd

    spec = load_spec(model)
    seq_lens = list(seq_lens) if seq_lens is not None else ([] if spec.is_vision else _seq_default(spec))
    points = [(b, seq_len, "batch") for b in batch_sizes] + [(batch_sizes[0], s, "seq") for s in seq_lens]
    rows, skipped = [], {}
    cards = sorted(gpu_catalog(), key=lambda g: g.memory_bytes)
    for m in methods:
        kw = {"rank": rank, "targets": targets} if m in ("lora", "qlora") else {}
        for b, s, sweep in points:
            try:
                e = estimate(spec, method=m, batch_size=b, seq_len=s, precision=precision, optimizer=optimizer,
                             grad_checkpointing=grad_checkpointing, attention=attention, device="cuda", **kw)
            except InputError as exc:
                skipped[m] = str(exc)
                break
            fits = [g.name for g in cards if e.memory.reserved_bytes <= g.memory_bytes]
            rows.append({"model": spec.name, "method": m, "sweep": sweep, "batch_size": b, "seq_len": s,
                         **{f"{k}_bytes": v for k, v in _components(e).items()},
                         "peak_bytes": e.memory.peak_bytes, "reserved_bytes": e.memory.reserved_bytes,
                         "peak_phase": e.memory.peak_phase, "smallest_gpu": fits[0] if fits else "none"})
    df = pd.DataFrame(rows)
    df.attrs.update(skipped=skipped, setting=_setting(spec, seq_len, precision, optimizer, grad_checkpointing,
                                                      attention, rank, targets))
    return df


def _seq_default(spec) -> list[int]:
    limit = spec.max_positions or 10**9
    return [s for s in DEFAULT_SEQ_LENS if s <= limit]


def _setting(spec, seq_len, precision, optimizer, ckpt, attention, rank, targets) -> str:
    lora = f", LoRA r={rank or 8} {targets or 'default targets'}"
    return (f"{precision}, {optimizer}{', grad checkpointing' if ckpt else ''}, {attention}{lora}"
            + ("" if spec.is_vision else f", seq {seq_len}"))


def gpu_lines() -> list[tuple[float, str]]:
    """(GiB, label) per distinct capacity of the catalog; cards within 3% of each other share a line."""
    cards = sorted(gpu_catalog(), key=lambda g: g.memory_bytes)
    groups: list[list] = []
    for g in cards:
        if groups and g.memory_bytes <= groups[-1][0].memory_bytes * 1.03:
            groups[-1].append(g)
        else:
            groups.append([g])
    return [(max(g.memory_bytes for g in grp) / GIB, " / ".join(g.name for g in grp)) for grp in groups]


def log2_axes_with_capacities(ax, xs, two_line_groups: bool = False) -> None:
    """A log2 x axis ticked at `xs`, a log y axis stretched to show every card capacity, and those capacities as
    labelled horizontal lines (gpu_lines); `two_line_groups` puts a shared line's capacity on a second line."""
    from reports.charts import label_lines

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.minorticks_off()
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    caps = gpu_lines()
    ax.set_ylim(min(lo, caps[0][0] / 1.3), max(hi, caps[-1][0] * 1.15))
    label_lines(ax, [(c, f"{n}\n({c:.0f} GiB)" if two_line_groups and " / " in n else f"{n} ({c:.0f} GiB)")
                     for c, n in caps], fontsize=7)


def breakdown_chart(model, batch_sizes, out, seq_len: int = 512, methods=METHODS, precision: str = "bf16",
                    optimizer: str = DEFAULT_OPTIMIZER, grad_checkpointing: bool = False, attention: str = "sdpa",
                    rank=None, targets=None, seq_lens=None) -> dict:
    """Two figures, each as PNG and SVG: `out` (stacked bars per method at every batch size) and
    `<out>_scaling` (reserved memory vs batch size and vs sequence length, GPU capacities as
    horizontal lines). Returns the numbers and the files."""
    from reports.charts import stem_of

    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError(f"--batch-size must be positive integers, got {batch_sizes}")
    df = breakdown_frame(model, batch_sizes, seq_len, methods, precision, optimizer, grad_checkpointing, attention,
                         rank, targets, seq_lens)
    if df.empty:  # every method was left out: say why instead of drawing nothing
        reasons = df.attrs["skipped"]
        if len(set(reasons.values())) == 1:
            raise InputError(next(iter(reasons.values())))
        raise InputError(f"no method runs on {model}: " + "; ".join(f"{m}: {why}" for m, why in reasons.items()))
    stem = stem_of(out)
    files = _bars(df, batch_sizes, stem)
    files += _scaling(df, stem.with_name(stem.name + "_scaling"))
    return {"model": df["model"].iloc[0], "setting": df.attrs["setting"], "skipped": df.attrs["skipped"],
            "files": files, "table": df, "which_card": which_card(df)}


def which_card(df):
    """method x batch size: the smallest catalog GPU whose memory holds the reserved peak."""
    b = df[df["sweep"] == "batch"]
    return b.pivot(index="method", columns="batch_size", values="smallest_gpu").reindex(
        [m for m in dict.fromkeys(b["method"])])


def _bars(df, batch_sizes, stem) -> list[str]:
    from reports.charts import fill_style, label_lines, pyplot, save

    plt = pyplot()
    b = df[df["sweep"] == "batch"]
    methods = list(dict.fromkeys(b["method"]))
    nb = len(batch_sizes)
    width = 0.8 / nb
    fig, ax = plt.subplots(figsize=(max(9.0, 1.0 + len(methods) * (0.35 + 0.28 * nb)), 6.2))
    for j, bs in enumerate(batch_sizes):
        sub = b[b["batch_size"] == bs].set_index("method").reindex(methods)
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(methods))]
        bottom = [0.0] * len(methods)
        for k, comp in enumerate(STACK):
            vals = list(sub[f"{comp}_bytes"] / GIB)
            ax.bar(xs, vals, width * 0.92, bottom=bottom, label=STACK_LABELS[comp] if j == 0 else None,
                   **fill_style(k))
            bottom = [x + y for x, y in zip(bottom, vals)]
        if nb > 1:
            for x, top in zip(xs, bottom):
                ax.annotate(f"b{bs}", (x, top), textcoords="offset points", xytext=(0, 2), ha="center",
                            fontsize=7, rotation=90 if nb > 4 else 0)
    ax.set_xlim(-0.5, len(methods) - 0.5)
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top)
    label_lines(ax, [(c, f"{n} ({c:.0f} GiB)") for c, n in gpu_lines() if c <= top])
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_ylabel("GPU memory at the peak (GiB)")
    ax.set_xlabel("method" + (f" (bars left to right: batch size {', '.join(map(str, batch_sizes))})" if nb > 1 else
                               f" (batch size {batch_sizes[0]})"))
    model = df["model"].iloc[0]
    ax.set_title(f"{model}: memory at the peak of a training step, by component\n{df.attrs['setting']}; "
                 f"bar height = reserved memory (nvidia-smi); dashed = GPU capacity")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    return save(fig, stem)


def _scaling(df, stem) -> list[str]:
    from reports.charts import line_style, pyplot, save

    plt = pyplot()
    has_seq = (df["sweep"] == "seq").any()
    fig, axes = plt.subplots(1, 2 if has_seq else 1, figsize=(15 if has_seq else 8.5, 6.0), squeeze=False)
    model = df["model"].iloc[0]
    panels = [("batch", "batch_size", "batch size")] + ([("seq", "seq_len", "sequence length (tokens)")] if has_seq else [])
    methods = list(dict.fromkeys(df["method"]))
    for ax, (sweep, col, label) in zip(axes[0], panels):
        d = df[df["sweep"] == sweep]
        for i, m in enumerate(methods):
            g = d[d["method"] == m].sort_values(col)
            ax.plot(g[col], g["reserved_bytes"] / GIB, label=m, **line_style(i, m))
        log2_axes_with_capacities(ax, sorted(d[col].unique()), two_line_groups=True)
        ax.set_xlabel(label)
        ax.set_ylabel("reserved GPU memory (GiB, log scale)")
        fixed = (f"seq {d['seq_len'].iloc[0]}" if sweep == "batch" else f"batch {d['batch_size'].iloc[0]}")
        ax.set_title(f"vs {label.split(' (')[0]} ({fixed})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8.5, loc="lower center", ncol=min(len(labels), 10),
               bbox_to_anchor=(0.5, -0.06))
    setting = df.attrs["setting"].rsplit(", seq", 1)[0]
    fig.suptitle(f"{model}: which card? reserved memory per method ({setting}); dashed lines = GPU capacity", y=1.0)
    fig.tight_layout()
    return save(fig, stem)
