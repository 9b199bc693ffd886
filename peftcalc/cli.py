"""`peftcalc` command line. `estimate`, `compare`, `models` and `gpus` never import torch; `measure`
and the report commands import the harness and the plotting code lazily, inside the command."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from peftcalc.errors import InputError, as_flags
from peftcalc.cli_options import (
    ADAPTER_CONFIG, ADAPTER_KIND, ALPHA, ATTENTION, BATCH, BOTTLENECK, CHART_SUFFIXES, CKPT, CKPT_EVERY,
    CKPT_REENTRANT, CONFIG, DATASET_TOKENS, DEVICE, DORA, DOUBLE_QUANT, EXTRAS, FORMAT, GPU_OPT, GPUS, GPUS_PER_NODE, GRAD_ACCUM,
    KEEP_OUTPUTS, LOSS, LOSS_CHUNKS, MAX_GRAD_NORM, MEASURE_DEVICES, METHOD, MFU, MODEL_ARG, OFFLOAD, PARALLEL_OFFLOAD,
    OPTIMIZER, PRECISION, PREPARE_KBIT, PRICE, RANK, RESHARD, ROUTING, EXPERTS_IMPL, ROUTER_AUX_LOSS, SEQ, SHARDING, TARGETS, TASKS, TRACE, TRAINABLE_LAYERS, TRAINER_LOOP,
    VIRTUAL_TOKENS,
    VISION_LAYERS, check_format, check_limit, gpus_value, check_out_file, check_out_folder, echo_rows, int_list, method_list,
    measure_text, missing_extra_text, model_arg, require, with_config,
)

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


@app.command()
def estimate(
    model: str = MODEL_ARG, method: Optional[str] = METHOD, rank: Optional[int] = RANK, alpha: Optional[int] = ALPHA,
    targets: Optional[str] = TARGETS, dora: bool = DORA, double_quant: Optional[bool] = DOUBLE_QUANT,
    bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    vision_layers: Optional[int] = VISION_LAYERS, prepare_kbit: Optional[bool] = PREPARE_KBIT,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, device: str = DEVICE, grad_accum: int = GRAD_ACCUM, keep_outputs: bool = KEEP_OUTPUTS,
    loss: str = LOSS, loss_chunks: int = LOSS_CHUNKS, offload_activations: bool = OFFLOAD,
    max_grad_norm: Optional[float] = MAX_GRAD_NORM, gpus: str = GPUS, gpus_per_node: int = GPUS_PER_NODE,
    sharding: str = SHARDING, reshard_after_forward: bool = RESHARD, offload: str = PARALLEL_OFFLOAD,
    gpu: Optional[str] = GPU_OPT,
    price: Optional[float] = PRICE, tasks: int = TASKS, dataset_tokens: int = DATASET_TOKENS, mfu: float = MFU,
    format: str = FORMAT, trace: bool = TRACE, trainer_loop: bool = TRAINER_LOOP, config: Optional[str] = CONFIG,
    adapter_config: Optional[str] = ADAPTER_CONFIG, routing: str = ROUTING, experts: str = EXPERTS_IMPL,
    router_aux_loss: bool = ROUTER_AUX_LOSS, ctx: typer.Context = None,
) -> None:
    """Parameters, memory breakdown and peak phase, GPU fit, time, cost and storage."""
    from peftcalc.format import render_estimate

    check_format(format)
    kw = with_config(ctx, format)  # every parameter as the API names it (a --config file's run under the flags)
    kw["dora"] = kw["dora"] or None
    trace, model = kw.pop("trace"), kw.pop("model")
    unmodelled = _traced_automatically(model)
    if trace or unmodelled:  # the harness on fake tensors (measure.traced), imported only here
        _measure_imports("estimate")
        from measure.traced import traced_estimate as run_estimate
    else:
        from peftcalc.api import estimate as run_estimate
    kw["gpus"] = gpus_value(kw["gpus"])
    e = run_estimate(model, **kw)
    if unmodelled:
        typer.echo(f"{unmodelled} is not modelled analytically; traced on fake tensors ({e.trace['seconds']:,.1f} s)",
                   err=True)
    typer.echo(render_estimate(e, format))


def _traced_automatically(model: str) -> str | None:
    """The model_type of a config.json peftcalc does not model, when the harness that traces it is installed
    (else None: estimate's error then names the supported model types and the --trace route)."""
    from peftcalc.unmodelled import harness_missing, unmodelled_config

    config = unmodelled_config(model)
    if config is None or harness_missing():
        return None
    return config["model_type"]


@app.command()
def compare(
    model: str = MODEL_ARG, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, device: str = DEVICE, gpu: Optional[str] = GPU_OPT,
    tasks: int = TASKS, dataset_tokens: int = DATASET_TOKENS, mfu: float = MFU, format: str = FORMAT,
    trainer_loop: bool = TRAINER_LOOP, config: Optional[str] = CONFIG,
    adapter_config: Optional[str] = ADAPTER_CONFIG, ctx: typer.Context = None,
) -> None:
    """Every method side by side on one model and one training setting."""
    from peftcalc.compare import compare_methods, render_compare

    check_format(format)
    kw = with_config(ctx, format)  # a --config file's training settings, rank and targets under the flags
    rows = compare_methods(kw.pop("model"), **kw)
    typer.echo(render_compare(rows, format, flags=True))


@app.command()
def crossover(
    model: str = MODEL_ARG, method: Optional[str] = METHOD, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    dora: bool = DORA, bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    against: str = typer.Option("full", "--against", help="The method to compare with (default full)."),
    over: str = typer.Option("seq-len", "--over", help="seq-len | batch-size: the setting that grows."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Largest value tried (default 131072 tokens or "
                                        "batch 1024)."),
    batch_size: int = BATCH, seq_len: int = typer.Option(512, "--seq-len", "-s", help="Sequence length in tokens "
                                                         "(default 512, as elsewhere); with --over seq-len, where the "
                                                         "scan starts (give a smaller one, e.g. -s 128, to scan "
                                                         "shorter sequences)."),
    precision: str = PRECISION, optimizer: str = OPTIMIZER, grad_checkpointing: bool = CKPT,
    checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, device: str = DEVICE, format: str = FORMAT, trainer_loop: bool = TRAINER_LOOP,
    config: Optional[str] = CONFIG, adapter_config: Optional[str] = ADAPTER_CONFIG, ctx: typer.Context = None,
) -> None:
    """Where a method stops saving memory against another (default: full fine-tuning) as the sequence
    length or batch size grows (peft#1514: LoRA on all linears overtakes full fine-tuning at long context)."""
    from peftcalc.crossover import crossover as find_crossover, render_crossover

    from peftcalc.methods import METHOD_KNOBS

    check_format(format)
    check_limit(limit, "--limit", 1)
    kw = with_config(ctx, format)  # a --config file's run under the flags
    kw["dora"] = kw["dora"] or None
    model, method = kw.pop("model"), kw.pop("method")
    method_kw = {k: v for k, v in kw.items() if k in METHOD_KNOBS and v is not None}
    training = {k: v for k, v in kw.items() if k not in METHOD_KNOBS}
    r = find_crossover(model, method=method or "lora", against=against, over=over, limit=limit, training=training,
                       **method_kw)
    typer.echo(render_crossover(r, format))


@app.command()
def models(format: str = FORMAT) -> None:
    """The built-in model registry, with the config each entry came from."""
    from peftcalc.families import build_layout
    from peftcalc.config import load_spec, registry_names

    check_format(format)
    rows = []
    for name in registry_names():
        spec = load_spec(name)
        rows.append({"name": name, "architecture": spec.architecture,
                     "params": build_layout(spec).total_params,
                     "layers": spec.num_layers, "hidden": spec.hidden_size, "source": spec.source})
    echo_rows(rows, format)


@app.command()
def gpus(format: str = FORMAT) -> None:
    """The GPU catalog: memory, dense bf16 TFLOP/s and indicative price."""
    from peftcalc.hardware import gpu_catalog

    check_format(format)
    rows = [{"name": g.name, "memory_GiB": round(g.memory_bytes / 1024**3, 2), "bf16_tflops": g.bf16_tflops,
             "fp32_tflops": g.fp32_tflops, "usd_per_hour": g.price_per_hour, "source": g.source} for g in gpu_catalog()]
    echo_rows(rows, format)


@app.command()
def measure(
    model: Optional[str] = typer.Argument(None, callback=model_arg, help="Model to measure (as for estimate); "
                                          "omit with --matrix."),
    method: Optional[str] = METHOD, rank: Optional[int] = RANK, alpha: Optional[int] = ALPHA,
    targets: Optional[str] = TARGETS, dora: bool = DORA, double_quant: Optional[bool] = DOUBLE_QUANT,
    bottleneck: Optional[int] = BOTTLENECK, adapter_kind: Optional[str] = ADAPTER_KIND,
    num_virtual_tokens: Optional[int] = VIRTUAL_TOKENS, trainable_layers: Optional[int] = TRAINABLE_LAYERS,
    prepare_kbit: Optional[bool] = PREPARE_KBIT,
    batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER,
    grad_checkpointing: bool = CKPT, checkpoint_every: int = CKPT_EVERY, checkpoint_reentrant: bool = CKPT_REENTRANT,
    attention: str = ATTENTION, grad_accum: int = GRAD_ACCUM, keep_outputs: bool = KEEP_OUTPUTS,
    loss: str = LOSS, loss_chunks: int = LOSS_CHUNKS, offload_activations: bool = OFFLOAD,
    max_grad_norm: Optional[float] = MAX_GRAD_NORM, gpus: str = GPUS, gpus_per_node: int = GPUS_PER_NODE,
    sharding: str = SHARDING, reshard_after_forward: bool = RESHARD, offload: str = PARALLEL_OFFLOAD,
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu | fake (fake: meta-device model on "
                                         "fake tensors, no memory used). Default for one run: cuda when torch "
                                         "sees a CUDA device, else cpu; for --matrix, the matrix's own devices."),
    steps: int = typer.Option(3, "--steps", help="Training steps (the first is step 1; the last is the steady state)."),
    matrix: Optional[str] = typer.Option(None, "--matrix", help="A matrix file (measure/matrices/*.toml, or "
                                         "'ci' / 'gpu') to sweep; rows are appended to --out as they finish."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="JSON-lines file for --matrix (resumed if present)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="--matrix: only the first N runs."),
    format: str = FORMAT, config: Optional[str] = CONFIG, adapter_config: Optional[str] = ADAPTER_CONFIG,
    ctx: typer.Context = None,
) -> None:
    """Run real training steps and record their memory (and the calculator's prediction beside it)."""
    check_format(format)
    if matrix and (config or adapter_config):
        raise InputError(f"{'--config' if config else '--adapter-config'} describes one run; a --matrix file its own")
    if device is not None and device not in MEASURE_DEVICES:
        raise InputError(f"unknown device '{device}'; choose from {', '.join(MEASURE_DEVICES)}")
    if matrix:
        if model:
            raise InputError("give a model or --matrix, not both")
        if not out:
            raise InputError("--matrix needs --out FILE (JSON lines; an existing file is resumed)")
        check_limit(limit, "--limit", 0)
        path = _matrix_path(matrix)
        check_out_file(out)
        _measure_imports()
        _measure_matrix(path, out, device, limit, format)
        return
    if not model and not config and not adapter_config:
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

    from dataclasses import fields

    from peftcalc.methods import METHOD_KNOBS

    kw = with_config(ctx, format)  # a --config file's run under the flags
    kw["gpus"] = _measured_gpus(kw["gpus"])
    dev = kw.pop("device") or _default_device()
    spec = load_spec(kw.pop("model"))
    method = kw.pop("method")
    settings = method_settings(method or default_method(spec), kw.get("sharding"),
                               **{k: v for k, v in kw.items() if k in METHOD_KNOBS})
    training = TrainingSettings(**{k: v for k, v in kw.items() if k in {f.name for f in fields(TrainingSettings)}},
                                device="cuda" if dev == "cuda" else "cpu")
    row = measure_one(spec, settings, training, device=dev, steps=steps)
    if format == "json":
        typer.echo(to_json_line(row))
        return
    typer.echo(measure_text(row))
    if row.get("outcome") == "error":
        raise typer.Exit(1)


def _measured_gpus(text: str) -> int:
    """measure --gpus: the ranks of the traced job (a number: 'auto' is estimate's)."""
    value = gpus_value(text)
    if value == "auto":
        raise InputError("measure --gpus takes a number of ranks; 'auto' is estimate's")
    return value


def _measure_imports(command: str = "measure") -> None:
    """The harness's packages (or which extra to install); `import measure` quiets bitsandbytes'
    import-time notice; transformers' own warnings are quieted too."""
    import warnings

    import measure  # noqa: F401  (first: the package quiets bitsandbytes, which peft imports; measure/__init__.py)

    require(command, "measure", "torch", "transformers", "peft")
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


@app.command()
def report(
    files: list[str] = typer.Argument(..., help="Harness result files (JSON lines), e.g. reports/data/*.jsonl."),
    out: str = typer.Option("build/report", "--out", "-o", help="Output folder for report.md, charts and CSVs."),
    format: str = typer.Option("table", "--format", "-f", help="table | json | csv | markdown: the error summary "
                               "printed (per source and method; the report itself is always report.md)."),
) -> None:
    """Predicted vs measured: error tables and charts from harness results."""
    check_format(format)
    require("report", "reports", "pandas", "matplotlib")
    from reports.cli_api import build_report, check_result_files, error_summary_text

    for warning in check_result_files(files):
        typer.echo(f"warning: {warning}", err=True)
    check_out_folder(out)
    summary = build_report(files, out)
    typer.echo(error_summary_text(summary, format))
    typer.echo(f"wrote {summary['report']}", err=format in ("json", "csv"))


@app.command()
def table(
    model: str = MODEL_ARG, batch_size: int = BATCH, seq_len: int = SEQ, precision: str = PRECISION,
    format: str = FORMAT,
) -> None:
    """Trainable vs total parameters for every method, beside the typical ranges public PEFT glossaries claim
    (Inferensys, "Trainable Parameters" and "Frozen Backbone")."""
    check_format(format)
    require("table", "reports", "pandas")
    from reports.cli_api import trainable_table

    typer.echo(trainable_table(model, format, batch_size=batch_size, seq_len=seq_len, precision=precision))


@app.command()
def storage(
    model: str = MODEL_ARG,
    tasks: str = typer.Option("1..100", "--tasks", help="Task counts: one number (5, as for estimate's --tasks), "
                              "a list 1,10,100 or a range 1..100 (at most 10,000 of them; default 1..100)."),
    out: str = typer.Option("storage.png", "--out", "-o", help="Chart file: <name>.png (an SVG is written beside "
                            "it)."),
    format: str = typer.Option("table", "--format", "-f", help="table | json | csv | markdown: the per-method "
                               "table (json and csv: its rows only; the files written are named on stderr)."),
) -> None:
    """Total storage vs number of tasks: one base plus T task files (adapters, for the PEFT methods) against T full models."""
    check_format(format)
    require("storage", "reports", "pandas", "matplotlib")
    from reports.storage_report import parse_tasks

    parse_tasks(tasks)
    check_out_file(out, suffixes=CHART_SUFFIXES)
    from reports.cli_api import storage_chart

    r = storage_chart(model, tasks, out, format)
    typer.echo(r["text"])
    if format in ("json", "csv"):
        typer.echo("wrote " + ", ".join(r["files"]), err=True)


@app.command()
def chart(
    model: str = MODEL_ARG,
    batch_size: str = typer.Option("1,2,4,8", "--batch-size", "-b", help="Comma-separated batch sizes."),
    seq_len: int = SEQ, precision: str = PRECISION, optimizer: str = OPTIMIZER, grad_checkpointing: bool = CKPT,
    attention: str = ATTENTION, rank: Optional[int] = RANK, targets: Optional[str] = TARGETS,
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Methods to chart: repeat the flag "
                                               "(-m lora -m full) or give a comma-separated list (default: all)."),
    methods: Optional[str] = typer.Option(None, "--methods", hidden=True, help="Old spelling of --method."),
    out: str = typer.Option("breakdown.png", "--out", "-o", help="Chart file: <name>.png (an SVG is written beside "
                            "it, and <name>_scaling.png/.svg)."),
) -> None:
    """Stacked memory breakdown per method, and peak vs batch size and sequence length against GPU sizes.

    chart writes images (PNG and SVG), so it takes no --format; the table it prints is a summary. For the
    numbers as JSON, CSV or markdown, use `peftcalc compare --format ...`."""
    batches = int_list(batch_size, "--batch-size")
    given = [*(method or []), *([methods] if methods is not None else [])]
    method_names = method_list(",".join(given)) if given else None
    check_out_file(out, suffixes=CHART_SUFFIXES)
    require("chart", "reports", "pandas", "matplotlib")
    from reports.cli_api import breakdown_chart

    r = breakdown_chart(model, batches, out, seq_len=seq_len, methods=method_names, precision=precision,
                        optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention, rank=rank,
                        targets=targets)
    typer.echo(r["text"])


def cli_message(exc: InputError) -> str:
    """The one line the CLI prints for an InputError: the API parameters it names shown as flags."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"error: {as_flags(text, getattr(exc, 'names', ()))}"


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
    except ModuleNotFoundError as exc:  # an optional package imported deeper than a command's require
        extra = next((e for e, mods in EXTRAS.items() if (exc.name or "").split(".")[0] in mods), None)
        if extra is None:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        typer.echo(f"error: {missing_extra_text(command, exc.name.split('.')[0], extra, exc)}", err=True)
        sys.exit(2)
    if isinstance(rc, int) and rc:  # typer.Exit(n) inside a command
        sys.exit(rc)


if __name__ == "__main__":
    main()
