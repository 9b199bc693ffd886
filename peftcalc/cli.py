"""`peftcalc` command line. `estimate`, `compare`, `models` and `gpus` never import torch; `measure`
and the report commands import the harness and the plotting code lazily, inside the command."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from peftcalc.errors import InputError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Memory, time and cost of fine-tuning a transformer (full, LoRA, QLoRA, adapters, prefix/prompt, "
    "BitFit, IA3), before you rent the GPU.",
)

FORMATS = ("table", "json", "csv", "markdown")

# Shared options (one definition each, used by every command that takes them).
MODEL_ARG = typer.Argument("llama-3.1-8b", help="Registry name (see `peftcalc models`), HF repo id of a registry "
                           "entry, or a path to a config.json (file or directory).")
METHOD = typer.Option(None, "--method", "-m", help="full | frozen | freeze | lora | qlora | adapter | prefix | "
                      "prompt | bitfit | ia3; vision-language models (LLaVA): projector | projector-llm | lora | "
                      "adapter (in the vision tower); BLIP-2: qformer (default: lora; qformer for BLIP-2)")
RANK = typer.Option(None, "--rank", "-r", help="LoRA rank (default 8, peft's default).")
ALPHA = typer.Option(None, "--alpha", help="LoRA alpha (default 2 x rank; does not change memory).")
TARGETS = typer.Option(None, "--targets", help="Comma-separated module names, or all-linear (default: peft's "
                       "default targets for the family).")
DORA = typer.Option(False, "--dora", help="DoRA (weight-decomposed LoRA).")
DOUBLE_QUANT = typer.Option(None, "--double-quant/--no-double-quant", help="QLoRA double quantization (default "
                            "on).")
BOTTLENECK = typer.Option(None, "--bottleneck", help="Adapter bottleneck size (default hidden/16; the block "
                          "adapter: 256).")
ADAPTER_KIND = typer.Option(None, "--adapter-kind", help="houlsby (after attention and FFN) | pfeiffer (after FFN) | "
                            "block (vision-language models: a bottleneck adapter after each vision layer, "
                            "LayerNorm(x + up(gelu(down(x))))). Default houlsby; block on a vision-language model.")
VIRTUAL_TOKENS = typer.Option(None, "--num-virtual-tokens", help="Prefix/prompt length (default 20).")
TRAINABLE_LAYERS = typer.Option(None, "--trainable-layers", help="freeze: train the top K blocks (default a quarter).")
VISION_LAYERS = typer.Option(None, "--unfreeze-vision-layers", help="Vision-language models: also train the top N "
                             "vision-tower layers the projector reads (default 0).")
PREPARE_KBIT = typer.Option(None, "--prepare-kbit/--no-prepare-kbit", help="QLoRA: peft's "
                            "prepare_model_for_kbit_training (norms, embeddings and lm_head upcast to fp32, so "
                            "activations and logits are fp32 too); default on for qlora, as the usual QLoRA recipe "
                            "(peft guide, TRL SFTTrainer) does.")
BATCH = typer.Option(1, "--batch-size", "-b", help="Micro-batch size.")
SEQ = typer.Option(512, "--seq-len", "-s", help="Sequence length in tokens (vision models use their patch count).")
PRECISION = typer.Option("bf16", "--precision", help="fp32 | bf16 | amp-bf16 | fp16 | amp-fp16")
OPTIMIZER = typer.Option("adamw", "--optimizer", help="adamw | adamw-8bit | sgd | adafactor")
CKPT = typer.Option(False, "--grad-checkpointing", help="Gradient checkpointing (non-reentrant, per block).")
CKPT_EVERY = typer.Option(1, "--checkpoint-every", help="With --grad-checkpointing: checkpoint every N-th block only "
                          "(transformers activation_checkpointing_enable(every_n_layers=N)); the others keep their "
                          "activations (default 1: every block).")
CKPT_REENTRANT = typer.Option(False, "--checkpoint-reentrant", help="With --grad-checkpointing: reentrant "
                              "checkpointing (use_reentrant=True, what peft.prepare_model_for_kbit_training's "
                              "default gets from torch).")
ATTENTION = typer.Option("sdpa", "--attention", help="sdpa | eager")
DEVICE = typer.Option("cuda", "--device", help="cuda: predict max_memory_allocated; cpu: predict the CPU/fake trace.")
GPU_OPT = typer.Option(None, "--gpu", help="GPU for time and cost (default: the cheapest one that fits).")
PRICE = typer.Option(None, "--price", help="Override the GPU's hourly price (USD).")
TASKS = typer.Option(1, "--tasks", help="Number of tasks for the storage total.")
DATASET_TOKENS = typer.Option(10_000_000, "--dataset-tokens", help="Tokens per epoch.")
MFU = typer.Option(0.35, "--mfu", help="Model FLOPs utilisation assumed for time (default 0.35).")
FORMAT = typer.Option("table", "--format", "-f", help="table | json | csv | markdown")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")


@app.command()
def estimate(
    model: str = MODEL_ARG, method: Optional[str] = METHOD, rank: Optional[int] = RANK, alpha: Optional[int] = ALPHA,
    targets: Optional[str] = TARGETS, dora: bool = DORA, double_quant: Optional[bool] = DOUBLE_QUANT,
    bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    vision_layers: Optional[int] = VISION_LAYERS, prepare_kbit: Optional[bool] = PREPARE_KBIT,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, device: str = DEVICE, gpu: Optional[str] = GPU_OPT,
    price: Optional[float] = PRICE, tasks: int = TASKS, dataset_tokens: int = DATASET_TOKENS, mfu: float = MFU,
    format: str = FORMAT,
) -> None:
    """Parameters, memory breakdown and peak phase, GPU fit, time, cost and storage."""
    from peftcalc.api import estimate as run_estimate
    from peftcalc.format import render_estimate

    _check_format(format)
    e = run_estimate(model, method=method, rank=rank, alpha=alpha, targets=targets, dora=dora or None,
                     double_quant=double_quant, bottleneck=bottleneck, adapter_kind=adapter_kind,
                     num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers,
                     vision_layers=vision_layers, prepare_kbit=prepare_kbit, batch_size=batch_size,
                     seq_len=seq_len, precision=precision, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                     checkpoint_every=checkpoint_every, checkpoint_reentrant=checkpoint_reentrant,
                     attention=attention, device=device, gpu=gpu, price=price, tasks=tasks,
                     dataset_tokens=dataset_tokens, mfu=mfu)
    typer.echo(render_estimate(e, format))


@app.command()
def compare(
    model: str = MODEL_ARG, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, device: str = DEVICE, gpu: Optional[str] = GPU_OPT,
    tasks: int = TASKS, dataset_tokens: int = DATASET_TOKENS, mfu: float = MFU, format: str = FORMAT,
) -> None:
    """Every method side by side on one model and one training setting."""
    from peftcalc.compare import compare_methods, render_compare

    _check_format(format)
    rows = compare_methods(model, rank=rank, targets=targets, batch_size=batch_size, seq_len=seq_len,
                           precision=precision, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                           checkpoint_every=checkpoint_every, checkpoint_reentrant=checkpoint_reentrant,
                           attention=attention, device=device, gpu=gpu, tasks=tasks, dataset_tokens=dataset_tokens,
                           mfu=mfu)
    typer.echo(render_compare(rows, format))


@app.command()
def crossover(
    model: str = MODEL_ARG, method: Optional[str] = METHOD, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    dora: bool = DORA, bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    against: str = typer.Option("full", "--against", help="The method to compare with (default full)."),
    over: str = typer.Option("seq-len", "--over", help="seq-len | batch-size: the setting that grows."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Largest value tried (default 131072 tokens or "
                                        "batch 1024)."),
    batch_size: int = BATCH, seq_len: int = typer.Option(128, "--seq-len", "-s", help="Sequence length (where "
                                                         "the scan starts with --over seq-len)."),
    precision: str = PRECISION, optimizer: str = OPTIMIZER, grad_checkpointing: bool = CKPT,
    checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, device: str = DEVICE, format: str = FORMAT,
) -> None:
    """Where a method stops saving memory against another (default: full fine-tuning) as the sequence
    length or batch size grows (peft#1514: LoRA on all linears overtakes full fine-tuning at long context)."""
    from peftcalc.crossover import crossover as find_crossover, render_crossover

    _check_format(format)
    method_kw = {k: v for k, v in dict(rank=rank, targets=targets, dora=dora or None, bottleneck=bottleneck,
                                       adapter_kind=adapter_kind, num_virtual_tokens=num_virtual_tokens,
                                       trainable_layers=trainable_layers).items() if v is not None}
    training = dict(batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
                    grad_checkpointing=grad_checkpointing, checkpoint_every=checkpoint_every,
                    checkpoint_reentrant=checkpoint_reentrant, attention=attention, device=device)
    r = find_crossover(model, method=method or "lora", against=against, over=over, limit=limit, training=training,
                       **method_kw)
    typer.echo(render_crossover(r, format))


@app.command()
def models(format: str = FORMAT) -> None:
    """The built-in model registry, with the config each entry came from."""
    from peftcalc.families import build_layout
    from peftcalc.config import load_spec, registry_names

    _check_format(format)
    rows = []
    for name in registry_names():
        spec = load_spec(name)
        rows.append({"name": name, "architecture": spec.architecture,
                     "params": build_layout(spec).total_params,
                     "layers": spec.num_layers, "hidden": spec.hidden_size, "source": spec.source})
    _echo_rows(rows, format)


@app.command()
def gpus(format: str = FORMAT) -> None:
    """The GPU catalog: memory, dense bf16 TFLOP/s and indicative price."""
    from peftcalc.hardware import gpu_catalog

    _check_format(format)
    rows = [{"name": g.name, "memory_GiB": round(g.memory_bytes / 1024**3, 2), "bf16_tflops": g.bf16_tflops,
             "fp32_tflops": g.fp32_tflops, "usd_per_hour": g.price_per_hour, "source": g.source} for g in gpu_catalog()]
    _echo_rows(rows, format)


@app.command()
def measure(
    model: Optional[str] = typer.Argument(None, help="Model to measure (as for estimate); omit with --matrix."),
    method: Optional[str] = METHOD, rank: Optional[int] = RANK, alpha: Optional[int] = ALPHA,
    targets: Optional[str] = TARGETS, dora: bool = DORA, double_quant: Optional[bool] = DOUBLE_QUANT,
    bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    prepare_kbit: Optional[bool] = PREPARE_KBIT,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION,
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu | fake (fake: meta-device model on "
                                         "fake tensors, no memory used). Default cuda for one run; for "
                                         "--matrix, the matrix's own devices."),
    steps: int = typer.Option(3, "--steps", help="Training steps (the first is step 1; the last is the steady state)."),
    matrix: Optional[str] = typer.Option(None, "--matrix", help="A matrix file (measure/matrices/*.toml, or "
                                         "'ci' / 'gpu') to sweep; rows are appended to --out as they finish."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="JSON-lines file for --matrix (resumed if present)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="--matrix: only the first N runs."),
    format: str = FORMAT,
) -> None:
    """Run real training steps and record their memory (and the calculator's prediction beside it)."""
    import json
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()

    if matrix:
        if model:
            raise InputError("give a model or --matrix, not both")
        if not out:
            raise InputError("--matrix needs --out FILE (JSON lines; an existing file is resumed)")
        from measure.matrix import run_matrix

        summary = run_matrix(_matrix_path(matrix), out, device=device, limit=limit)
        typer.echo(json.dumps(summary, indent=2) if format == "json" else
                   f"{summary['ran']} run(s) measured ({summary['ok']} ok, {summary['oom']} oom, "
                   f"{summary['error']} error), {summary['skipped_done']} already in {out}, "
                   f"{summary['seconds']} s")
        return
    if not model:
        raise InputError("give a model to measure, or --matrix FILE --out FILE")
    _check_format(format)
    from measure.record import to_json_line
    from measure.run import measure_one
    from peftcalc.api import method_settings, default_method
    from peftcalc.settings import TrainingSettings
    from peftcalc.config import load_spec

    spec = load_spec(model)
    settings = method_settings(method or default_method(spec), rank=rank, alpha=alpha, targets=targets, dora=dora,
                                double_quant=double_quant, bottleneck=bottleneck, adapter_kind=adapter_kind,
                                num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers,
                                prepare_kbit=prepare_kbit)
    dev = device or "cuda"
    training = TrainingSettings(batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
                                grad_checkpointing=grad_checkpointing, attention=attention,
                                device="cuda" if dev == "cuda" else "cpu", checkpoint_every=checkpoint_every,
                                checkpoint_reentrant=checkpoint_reentrant)
    row = measure_one(spec, settings, training, device=dev, steps=steps)
    if format == "json":
        typer.echo(to_json_line(row))
        return
    typer.echo(_measure_text(row))
    if row.get("outcome") == "error":
        raise typer.Exit(1)


def _matrix_path(name: str) -> str:
    from pathlib import Path

    if Path(name).exists():
        return name
    bundled = Path(__file__).resolve().parent.parent / "measure" / "matrices" / f"{name}.toml"
    if bundled.exists():
        return str(bundled)
    raise InputError(f"no matrix file '{name}' (bundled: ci, gpu)")


def _measure_text(row: dict) -> str:
    from peftcalc.format import gib

    s = row.get("settings", {})
    lines = [f"{s.get('model')} {s.get('method', {}).get('method', '') if isinstance(s.get('method'), dict) else s.get('method', '')}"
             f" on {s.get('device')}: outcome {row.get('outcome')}" + (f" ({row.get('error')})" if row.get("error") else "")]
    if row.get("params"):
        lines.append(f"parameters: total {row['params']['total']:,}, trainable {row['params']['trainable']:,}")
    m, p = row.get("measured") or {}, row.get("predicted") or {}
    if m.get("peak_bytes"):
        lines.append(f"measured peak (steady state): {gib(m['peak_bytes'])} in {m.get('peak_phase')}; "
                     f"step 1: {gib(m.get('step1_peak_bytes', 0))}")
    if p.get("peak_bytes") and m.get("peak_bytes"):
        err = 100 * (p["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"]
        lines.append(f"predicted peak: {gib(p['peak_bytes'])} in {p.get('peak_phase')} ({err:+.2f}%)")
    return "\n".join(lines)


@app.command()
def report(
    files: list[str] = typer.Argument(..., help="Harness result files (JSON lines), e.g. reports/data/*.jsonl."),
    out: str = typer.Option("build/report", "--out", "-o", help="Output folder for report.md, charts and CSVs."),
) -> None:
    """Predicted vs measured: error tables and charts from harness results."""
    from reports.cli_api import build_report, error_summary_text

    summary = build_report(files, out)
    typer.echo(error_summary_text(summary))
    typer.echo(f"wrote {summary['report']}")


@app.command()
def table(
    model: str = MODEL_ARG, batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION,
    format: str = FORMAT,
) -> None:
    """Trainable vs total parameters for every method, beside the typical ranges public PEFT glossaries claim
    (Inferensys, "Trainable Parameters" and "Frozen Backbone")."""
    from reports.cli_api import trainable_table

    typer.echo(trainable_table(model, format, batch_size=batch_size, seq_len=seq_len, precision=precision))


@app.command()
def storage(
    model: str = MODEL_ARG,
    tasks: str = typer.Option("1..100", "--tasks", help="Task counts: a range 1..100 or a list 1,10,100."),
    out: str = typer.Option("storage.png", "--out", "-o", help="Chart file (PNG; an SVG is written beside it)."),
) -> None:
    """Total storage vs number of tasks: one base plus T adapters against T full models."""
    from reports.cli_api import storage_chart

    typer.echo(storage_chart(model, tasks, out)["text"])


@app.command()
def chart(
    model: str = MODEL_ARG,
    batch_size: str = typer.Option("1,2,4,8", "--batch-size", "-b", help="Comma-separated batch sizes."),
    seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER, grad_checkpointing: bool = CKPT,
    attention: str = ATTENTION, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default: all)."),
    out: str = typer.Option("breakdown.png", "--out", "-o", help="Chart file (PNG; an SVG is written beside it)."),
) -> None:
    """Stacked memory breakdown per method, and peak vs batch size and sequence length against GPU sizes."""
    from reports.cli_api import breakdown_chart

    batches = _int_list(batch_size, "--batch-size")
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    r = breakdown_chart(model, batches, out, seq_len=seq_len, methods=method_list, precision=precision,
                        optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention, rank=rank,
                        targets=targets)
    typer.echo(r["text"])


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{flag} takes positive integers, got '{text}'")
    return values


def _echo_rows(rows: list[dict], fmt: str) -> None:
    import json

    from peftcalc.format import rows_to_csv, rows_to_markdown, text_table

    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        typer.echo(rows_to_csv(rows))
    elif fmt == "markdown":
        typer.echo(rows_to_markdown(rows))
    else:
        keys = list(rows[0])
        typer.echo(text_table([[_fmt_cell(r[k]) for k in keys] for r in rows], keys, "l" * len(keys)))


def _fmt_cell(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# Flags whose name is not "--" + the API parameter's with dashes (InputError.names -> what the CLI shows).
FLAG_NAMES = {"vision_layers": "--unfreeze-vision-layers", "model": "MODEL"}


def cli_message(exc: InputError) -> str:
    """The one line the CLI prints for an InputError: the API parameters it names shown as flags."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for name in getattr(exc, "names", ()):
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w'./-]){re.escape(name)}(?![\w'-])", flag, text)
    return f"error: {text}"


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except InputError as exc:
        typer.echo(cli_message(exc), err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except typer.TyperException as exc:  # a flag typer itself rejects (not an integer, no such option): one line
        message = " ".join((exc.format_message() if hasattr(exc, "format_message") else str(exc)).split())
        if message:  # (no arguments at all: the help is printed and the message is empty)
            typer.echo(f"error: {message}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    if isinstance(rc, int) and rc:  # typer.Exit(n) inside a command
        sys.exit(rc)


if __name__ == "__main__":
    main()
