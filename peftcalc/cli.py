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
    # click's plain help: option names are never cut (rich's table truncates them at 80 columns)
    rich_markup_mode=None,
    help="Memory, time and cost of fine-tuning a transformer (full, LoRA, QLoRA, adapters, prefix/prompt, "
    "BitFit, IA3), before you rent the GPU.",
)

FORMATS = ("table", "json", "csv", "markdown")
MEASURE_DEVICES = ("cuda", "cpu", "fake")  # measure.setup.DEVICES, checked here before torch is imported
CHART_SUFFIXES = ("", ".png", ".svg")  # a chart is written as <stem>.png and <stem>.svg
# What each optional extra of pyproject.toml brings (a command that needs one says which to install).
EXTRAS = {"reports": ("pandas", "matplotlib"), "measure": ("torch", "transformers", "peft", "safetensors",
                                                           "bitsandbytes", "tqdm")}


def _model_arg(value: Optional[str]) -> Optional[str]:
    """A model argument too long to be a file name is no model (the registry's names are short)."""
    import errno
    import os

    if value is not None:
        try:
            os.stat(value)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise InputError(f"unknown model '{value[:24]}...' ({len(value)} characters): too long for a "
                                 "registry name or a config path") from None
        except ValueError:  # a NUL byte
            raise InputError("unknown model: the name contains a NUL byte") from None
    return value

# Shared options (one definition each, used by every command that takes them).
MODEL_ARG = typer.Argument("llama-3.1-8b", callback=_model_arg, help="Registry name (see `peftcalc models`), HF "
                           "repo id of a registry entry, or a path to a config.json (file or directory).")
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


def _require(command: str, extra: str, *modules: str) -> None:
    """Import the optional packages a command needs, or InputError naming the extra that brings them."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InputError(_missing_extra_text(command, name, extra, exc)) from None


def _missing_extra_text(command: str, module: str, extra: str, exc: ImportError) -> str:
    broken = exc.name and exc.name.split(".")[0] != module  # installed, but something it imports is not
    why = f"cannot be imported ({exc})" if broken else "is not installed"
    return f"peftcalc {command} needs {module}, which {why}: pip install 'peftcalc[{extra}]'"


def _check_limit(limit: Optional[int], flag: str, minimum: int) -> None:
    if limit is not None and limit < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise InputError(f"{flag} must be {kind}, got {limit}")


def _writable_folder(folder, flag: str, out: str) -> None:
    """Create `folder` (and its parents) and write a temporary file in it, or InputError."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write {flag} {out}: cannot create the folder {folder} "
                         f"({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {flag} {out}: cannot create files in {folder} "
                         f"({exc.strerror or exc})") from None


def _check_out_file(out: str, flag: str = "--out", suffixes: tuple | None = None) -> None:
    """`out` names a file that can be written: not a folder, in a folder that can be written, with
    one of `suffixes` (when given)."""
    from pathlib import Path

    p = Path(out)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {out}: unsupported suffix '{p.suffix}'; a chart is written as PNG and SVG "
                         "(give a name ending in .png or .svg, or none)")
    if p.is_dir():
        raise InputError(f"{flag} {out} is a folder; give a file name")
    _writable_folder(p.parent, flag, out)
    if p.exists() and not _can_write(p):
        raise InputError(f"cannot write {flag} {out}: permission denied")


def _check_out_folder(out: str, flag: str = "--out") -> None:
    from pathlib import Path

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {out} is a file; give a folder (it receives report.md, charts and CSVs)")
    _writable_folder(p, flag, out)


def _can_write(path) -> bool:
    import os

    return os.access(path, os.W_OK)


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
    _check_limit(limit, "--limit", 1)
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
    model: Optional[str] = typer.Argument(None, callback=_model_arg, help="Model to measure (as for estimate); "
                                          "omit with --matrix."),
    method: Optional[str] = METHOD, rank: Optional[int] = RANK, alpha: Optional[int] = ALPHA,
    targets: Optional[str] = TARGETS, dora: bool = DORA, double_quant: Optional[bool] = DOUBLE_QUANT,
    bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    prepare_kbit: Optional[bool] = PREPARE_KBIT,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION,
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu | fake (fake: meta-device model on "
                                         "fake tensors, no memory used). Default for one run: cuda when torch "
                                         "sees a CUDA device, else cpu; for --matrix, the matrix's own devices."),
    steps: int = typer.Option(3, "--steps", help="Training steps (the first is step 1; the last is the steady state)."),
    matrix: Optional[str] = typer.Option(None, "--matrix", help="A matrix file (measure/matrices/*.toml, or "
                                         "'ci' / 'gpu') to sweep; rows are appended to --out as they finish."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="JSON-lines file for --matrix (resumed if present)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="--matrix: only the first N runs."),
    format: str = FORMAT,
) -> None:
    """Run real training steps and record their memory (and the calculator's prediction beside it)."""
    _check_format(format)
    if device is not None and device not in MEASURE_DEVICES:
        raise InputError(f"unknown device '{device}'; choose from {', '.join(MEASURE_DEVICES)}")
    if matrix:
        if model:
            raise InputError("give a model or --matrix, not both")
        if not out:
            raise InputError("--matrix needs --out FILE (JSON lines; an existing file is resumed)")
        _check_limit(limit, "--limit", 0)
        path = _matrix_path(matrix)
        _check_out_file(out)
        _measure_imports()
        _measure_matrix(path, out, device, limit, format)
        return
    if not model:
        raise InputError("give a model to measure, or --matrix FILE --out FILE")
    if out is not None or limit is not None:
        raise InputError(f"{'--out' if out is not None else '--limit'} goes with --matrix; one run prints its row "
                         "(--format json for the JSON line)")
    _measure_imports()
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
    dev = device or _default_device()
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


def _measure_imports() -> None:
    """The harness's packages (or which extra to install); `import measure` quiets bitsandbytes'
    import-time notice; transformers' own warnings are quieted too."""
    import warnings

    import measure  # noqa: F401  (first: the package quiets bitsandbytes, which peft imports; measure/__init__.py)

    _require("measure", "measure", "torch", "transformers", "peft")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def _default_device() -> str:
    """cuda when torch sees a CUDA device, else cpu (torch is imported only by `measure`)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _measure_matrix(path: str, out: str, device: Optional[str], limit: Optional[int], fmt: str) -> None:
    import json

    from measure.matrix import run_matrix

    summary = run_matrix(path, out, device=device, limit=limit)
    typer.echo(json.dumps(summary, indent=2) if fmt == "json" else
               f"{summary['ran']} run(s) measured ({summary['ok']} ok, {summary['oom']} oom, "
               f"{summary['error']} error), {summary['skipped_done']} already in {out}, "
               f"{summary['seconds']} s")


def _matrix_path(name: str) -> str:
    from pathlib import Path

    bundled = Path(__file__).resolve().parent.parent / "measure" / "matrices" / f"{name}.toml"
    for p in (Path(name), bundled):
        try:
            if p.is_file():
                return str(p)
        except OSError:  # a name too long for a path
            continue
    raise InputError(f"no matrix file '{name[:80]}' (bundled: ci, gpu)")


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
    _require("report", "reports", "pandas", "matplotlib")
    from reports.cli_api import build_report, check_result_files, error_summary_text

    for warning in check_result_files(files):
        typer.echo(f"warning: {warning}", err=True)
    _check_out_folder(out)
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
    _check_format(format)
    _require("table", "reports", "pandas")
    from reports.cli_api import trainable_table

    typer.echo(trainable_table(model, format, batch_size=batch_size, seq_len=seq_len, precision=precision))


@app.command()
def storage(
    model: str = MODEL_ARG,
    tasks: str = typer.Option("1..100", "--tasks", help="Task counts: a range 1..100 or a list 1,10,100 (at most "
                              "10,000 of them)."),
    out: str = typer.Option("storage.png", "--out", "-o", help="Chart file: <name>.png (an SVG is written beside "
                            "it)."),
) -> None:
    """Total storage vs number of tasks: one base plus T adapters against T full models."""
    _require("storage", "reports", "pandas", "matplotlib")
    from reports.storage_report import parse_tasks

    parse_tasks(tasks)
    _check_out_file(out, suffixes=CHART_SUFFIXES)
    from reports.cli_api import storage_chart

    typer.echo(storage_chart(model, tasks, out)["text"])


@app.command()
def chart(
    model: str = MODEL_ARG,
    batch_size: str = typer.Option("1,2,4,8", "--batch-size", "-b", help="Comma-separated batch sizes."),
    seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER, grad_checkpointing: bool = CKPT,
    attention: str = ATTENTION, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default: all)."),
    out: str = typer.Option("breakdown.png", "--out", "-o", help="Chart file: <name>.png (an SVG is written beside "
                            "it, and <name>_scaling.png/.svg)."),
) -> None:
    """Stacked memory breakdown per method, and peak vs batch size and sequence length against GPU sizes."""
    batches = _int_list(batch_size, "--batch-size")
    method_list = _method_list(methods) if methods is not None else None
    _check_out_file(out, suffixes=CHART_SUFFIXES)
    _require("chart", "reports", "pandas", "matplotlib")
    from reports.cli_api import breakdown_chart

    r = breakdown_chart(model, batches, out, seq_len=seq_len, methods=method_list, precision=precision,
                        optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention, rank=rank,
                        targets=targets)
    typer.echo(r["text"])


def _method_list(text: str) -> list[str]:
    from peftcalc.methods import KNOWN_METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in KNOWN_METHODS]
    if unknown or not names:
        raise InputError(f"--methods: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"choose from {', '.join(KNOWN_METHODS)}" if names else
                         f"--methods takes comma-separated method names, got '{text}'")
    return names


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
    except ModuleNotFoundError as exc:  # an optional package imported deeper than a command's _require
        extra = next((e for e, mods in EXTRAS.items() if (exc.name or "").split(".")[0] in mods), None)
        if extra is None:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        typer.echo(f"error: {_missing_extra_text(command, exc.name.split('.')[0], extra, exc)}", err=True)
        sys.exit(2)
    if isinstance(rc, int) and rc:  # typer.Exit(n) inside a command
        sys.exit(rc)


if __name__ == "__main__":
    main()
