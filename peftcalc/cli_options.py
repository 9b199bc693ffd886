"""The CLI's shared options and input checks (peftcalc/cli.py's commands use them): one definition
of each option that several commands take, the helpers that check paths, lists and formats before
any heavy import, and the text of one `measure` row."""

from __future__ import annotations

from typing import Optional

import typer

from peftcalc.errors import InputError

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_KIND", "ALPHA", "ATTENTION", "BATCH", "BOTTLENECK", "CHART_SUFFIXES", "CKPT", "CKPT_EVERY",
    "CKPT_REENTRANT", "CONFIG", "DATASET_TOKENS", "DEVICE", "DORA", "DOUBLE_QUANT", "EXTRAS", "FORMAT", "FORMATS", "GPU_OPT",
    "GPUS", "GPUS_PER_NODE", "GRAD_ACCUM", "KEEP_OUTPUTS", "LOSS", "LOSS_CHUNKS", "MAX_GRAD_NORM", "MEASURE_DEVICES", "METHOD", "MFU",
    "MODEL_ARG", "OFFLOAD", "OPTIMIZER", "PARALLEL_OFFLOAD", "PRECISION", "PREPARE_KBIT", "PRICE", "RANK", "RESHARD", "ROUTING", "SEQ", "SHARDING",
    "TARGETS", "TASKS", "TRACE", "TRAINABLE_LAYERS", "TRAINER_LOOP", "VIRTUAL_TOKENS", "VISION_LAYERS", "can_write", "check_format", "gpus_value",
    "check_limit", "check_out_file", "check_out_folder", "echo_rows", "fmt_cell", "int_list", "measure_text",
    "method_list", "missing_extra_text", "model_arg", "phase_text", "require", "with_config", "writable_folder",
]

FORMATS = ("table", "json", "csv", "markdown")
MEASURE_DEVICES = ("cuda", "cpu", "fake")  # measure.setup.DEVICES, checked here before torch is imported
CHART_SUFFIXES = ("", ".png", ".svg")  # a chart is written as <stem>.png and <stem>.svg
# What each optional extra of pyproject.toml brings (a command that needs one says which to install).
EXTRAS = {"reports": ("pandas", "matplotlib"), "measure": ("torch", "transformers", "peft", "safetensors",
                                                           "bitsandbytes", "tqdm")}


def model_arg(value: Optional[str]) -> Optional[str]:
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
MODEL_ARG = typer.Argument("llama-3.1-8b", callback=model_arg, help="Registry name (see `peftcalc models`), HF "
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
VISION_LAYERS = typer.Option(None, "--vision-layers", "--unfreeze-vision-layers", help="Vision-language models: also "
                             "unfreeze and train the top N vision-tower layers the projector reads (default 0; the "
                             "API's vision_layers).")
PREPARE_KBIT = typer.Option(None, "--prepare-kbit/--no-prepare-kbit", help="QLoRA: peft's "
                            "prepare_model_for_kbit_training (norms, embeddings and lm_head upcast to fp32, so "
                            "activations and logits are fp32 too); default on for qlora, as the usual QLoRA recipe "
                            "(peft guide, TRL SFTTrainer) does.")
BATCH = typer.Option(1, "--batch-size", "-b", help="Micro-batch size.")
SEQ = typer.Option(512, "--seq-len", "-s", help="Sequence length in tokens (vision models use their patch count).")
PRECISION = typer.Option("bf16", "--precision", help="fp32 | bf16 | amp-bf16 | fp16 | amp-fp16 | mixed-bf16 (with "
                         "--sharding fsdp/hsdp/zero*: fp32 master weights, bf16 compute)")
OPTIMIZER = typer.Option("adamw-fused", "--optimizer", help="adamw-fused (torch AdamW(fused=True), the HF Trainer's "
                         "default with torch >= 2.8) | adamw (foreach) | adamw-8bit | paged-adamw-8bit | "
                         "paged-adamw-32bit | lion-8bit | lion-32bit | paged-lion-8bit | paged-lion-32bit "
                         "(bitsandbytes) | sgd | adafactor")
GRAD_ACCUM = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step (gradient accumulation): the peak "
                          "over the whole step; tokens per step in time and cost.")
KEEP_OUTPUTS = typer.Option(False, "--keep-outputs", help="The loop keeps the model outputs (logits) referenced "
                            "through backward (outputs = model(**batch); outputs.loss.backward()), as PEFT's examples "
                            "and LitGPT do; the HF Trainer drops them.")
LOSS = typer.Option("hf", "--loss", help="hf (transformers ForCausalLMLoss) | chunked (torchtune "
                    "CEWithChunkedOutputLoss) | liger (LigerFusedLinearCrossEntropyLoss) | cce (Cut Cross-Entropy) | trl (TRL "
                    "SFTTrainer's fused LM head and collator batch)")
LOSS_CHUNKS = typer.Option(8, "--loss-chunks", help="--loss chunked: chunks of the lm_head output (torchtune's "
                           "default 8).")
OFFLOAD = typer.Option(False, "--offload-activations", help="Saved activations to host memory "
                       "(torch.autograd.graph.save_on_cpu).")
MAX_GRAD_NORM = typer.Option(None, "--max-grad-norm", help="Gradient clipping (torch.nn.utils.clip_grad_norm_) "
                             "before the optimizer step; the Trainer's default is 1.0.")
GPUS = typer.Option("1", "--gpus", help="Data-parallel GPUs (ranks), or 'auto': the fewest of the card (--gpu, default "
                    "H100 80GB) on which this setting fits, and the largest batch there.")
GPUS_PER_NODE = typer.Option(8, "--gpus-per-node", help="GPUs per node (HSDP shards within a node).")
SHARDING = typer.Option("none", "--sharding", help="none | ddp | fsdp (FSDP2) | hsdp | zero1 | zero2 | zero3 "
                        "(DeepSpeed); memory per GPU, rank by rank.")
RESHARD = typer.Option(True, "--reshard-after-forward/--no-reshard-after-forward", help="FSDP2: free each block's "
                       "gathered parameters after its forward (default) or keep them to its backward.")
PARALLEL_OFFLOAD = typer.Option("none", "--offload", help="none | optimizer (ZeRO-Offload) | params (ZeRO-3 offload_param, "
                       "FSDP2 CPUOffloadPolicy): what lives in host memory.")
CKPT = typer.Option(False, "--grad-checkpointing", help="Gradient checkpointing (non-reentrant, per block).")
CKPT_EVERY = typer.Option(1, "--checkpoint-every", help="With --grad-checkpointing: checkpoint every N-th block only "
                          "(transformers activation_checkpointing_enable(every_n_layers=N)); the others keep their "
                          "activations (default 1: every block).")
CKPT_REENTRANT = typer.Option(False, "--checkpoint-reentrant", help="With --grad-checkpointing: reentrant "
                              "checkpointing (use_reentrant=True, what peft.prepare_model_for_kbit_training's "
                              "default gets from torch).")
ATTENTION = typer.Option("sdpa", "--attention", help="sdpa | eager")
ROUTING = typer.Option("balanced", "--routing", help="Mixture-of-experts routing: balanced | skewed | worst "
                       "(how the router spreads tokens over the experts; see peftcalc.settings.ROUTINGS).")
EXPERTS_IMPL = typer.Option("grouped_mm", "--experts", help="Mixture-of-experts experts implementation: grouped_mm "
                            "(transformers' default) | batched_mm | eager (see peftcalc.settings.EXPERTS).")
ROUTER_AUX_LOSS = typer.Option(False, "--router-aux-loss", help="Mixture-of-experts: the model config's "
                               "output_router_logits (every router's logits returned, the auxiliary load-balancing loss "
                               "times router_aux_loss_coef added to the loss: transformers load_balancing_loss_func).")
DEVICE = typer.Option("cuda", "--device", help="cuda | cpu | fake, as measure takes them. cuda: predict "
                      "torch.cuda.max_memory_allocated; cpu: the CPU allocator's peak; fake: the fake-tensor trace, "
                      "which counts what the CPU allocator would (the same figure as cpu).")
GPU_OPT = typer.Option(None, "--gpu", help="GPU for time and cost (default: the cheapest one that fits).")
PRICE = typer.Option(None, "--price", help="Override the GPU's hourly price (USD).")
TASKS = typer.Option(1, "--tasks", help="Number of tasks for the storage total.")
DATASET_TOKENS = typer.Option(10_000_000, "--dataset-tokens", help="Tokens per epoch.")
MFU = typer.Option(0.35, "--mfu", help="Model FLOPs utilisation assumed for time (default 0.35).")
FORMAT = typer.Option("table", "--format", "-f", help="table | json | csv | markdown")
TRACE = typer.Option(False, "--trace", help="Trace the training step of the real model on fake tensors (the "
                     "harness: pip install 'peftcalc[measure]'; seconds, not milliseconds) instead of modelling "
                     "it: any transformers model; counts as --device cpu. A family peftcalc does not model is "
                     "traced without it.")
TRAINER_LOOP = typer.Option(False, "--trainer-loop", help="The step is transformers Trainer's (set by --config: "
                            "accelerate's backward keeps one more loss scalar alive).")
CONFIG = typer.Option(None, "--config", help="A training config to read the run from: axolotl YAML, TRL YAML "
                      "(trl sft --config), LLaMA-Factory YAML or a transformers TrainingArguments JSON (the tool is "
                      "detected from the keys). The model on the command line and every flag given override it.")
ADAPTER_CONFIG = typer.Option(None, "--adapter-config", help="A peft adapter_config.json (LoRA, DoRA, rsLoRA, IA3, "
                              "prefix, prompt): the method and its settings.")


def gpus_value(text: str) -> int | str:
    """--gpus: a positive integer, or 'auto' (InputError naming the flag otherwise)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"--gpus must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise InputError(f"--gpus must be a positive integer or 'auto', got {value}")
    return value


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")


def require(command: str, extra: str, *modules: str) -> None:
    """Import the optional packages a command needs, or InputError naming the extra that brings them."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InputError(missing_extra_text(command, name, extra, exc)) from None


def missing_extra_text(command: str, module: str, extra: str, exc: ImportError) -> str:
    broken = exc.name and exc.name.split(".")[0] != module  # installed, but something it imports is not
    why = f"cannot be imported ({exc})" if broken else "is not installed"
    return f"peftcalc {command} needs {module}, which {why}: pip install 'peftcalc[{extra}]'"


def check_limit(limit: Optional[int], flag: str, minimum: int) -> None:
    if limit is not None and limit < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise InputError(f"{flag} must be {kind}, got {limit}")


def writable_folder(folder, flag: str, out: str) -> None:
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


def check_out_file(out: str, flag: str = "--out", suffixes: tuple | None = None) -> None:
    """`out` names a file that can be written: not a folder, in a folder that can be written, with
    one of `suffixes` (when given)."""
    from pathlib import Path

    p = Path(out)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {out}: unsupported suffix '{p.suffix}'; a chart is written as PNG and SVG "
                         "(give a name ending in .png or .svg, or none)")
    if p.is_dir():
        raise InputError(f"{flag} {out} is a folder; give a file name")
    writable_folder(p.parent, flag, out)
    if p.exists() and not can_write(p):
        raise InputError(f"cannot write {flag} {out}: permission denied")


def check_out_folder(out: str, flag: str = "--out") -> None:
    from pathlib import Path

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {out} is a file; give a folder (it receives report.md, charts and CSVs)")
    writable_folder(p, flag, out)


def can_write(path) -> bool:
    import os

    return os.access(path, os.W_OK)




def method_list(text: str) -> list[str]:
    from peftcalc.methods import KNOWN_METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in KNOWN_METHODS]
    if unknown or not names:
        raise InputError(f"--method: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"choose from {', '.join(KNOWN_METHODS)}" if names else
                         f"--method takes method names (repeat -m, or comma-separated), got '{text}'")
    return names


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{flag} takes positive integers, got '{text}'")
    return values


def echo_rows(rows: list[dict], fmt: str) -> None:
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
        typer.echo(text_table([[fmt_cell(r[k]) for k in keys] for r in rows], keys, "l" * len(keys)))


def fmt_cell(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def measure_text(row: dict) -> str:
    """One `peftcalc measure` row as text: outcome, parameters, measured and predicted peaks."""
    from peftcalc.format import gib

    s = row.get("settings", {})
    lines = [f"{s.get('model')} {s.get('method', {}).get('method', '') if isinstance(s.get('method'), dict) else s.get('method', '')}"
             f" on {s.get('device')}: outcome {row.get('outcome')}" + (f" ({row.get('error')})" if row.get("error") else "")]
    if row.get("params"):
        lines.append(f"parameters: total {row['params']['total']:,}, trainable {row['params']['trainable']:,}")
    m, p = row.get("measured") or {}, row.get("predicted") or {}
    if m.get("peak_bytes"):
        step1 = f" in {phase_text(m['step1_peak_phase'])}" if m.get("step1_peak_phase") else ""
        lines.append(f"measured peak (steady state): {gib(m['peak_bytes'])} in {phase_text(m.get('peak_phase'))}; "
                     f"step 1: {gib(m.get('step1_peak_bytes', 0))}{step1}")
    if m.get("host_peak_bytes") is not None:  # offload_activations: save_on_cpu's host copies (measure/offload.py)
        lines.append(f"offloaded to host memory (pinned on CUDA), largest sum: {gib(m['host_peak_bytes'])} "
                     f"({m['host_peak_bytes']:,} bytes, not in the peak)")
    if p.get("peak_bytes") and m.get("peak_bytes"):
        err = 100 * (p["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"]
        lines.append(f"predicted peak: {gib(p['peak_bytes'])} in {phase_text(p.get('peak_phase'))} ({err:+.2f}%)")
    elif row.get("predicted_error"):
        lines.append(f"predicted: none ({row['predicted_error']})")
    return "\n".join(lines)


def phase_text(name: Optional[str]) -> str:
    """A peak's phase named alike for measured and predicted rows: the step phase (forward, backward,
    optimizer; what the harness records), then the calculator's finer event when it has one
    ('backward:loss' -> 'backward (at loss)')."""
    if not name:
        return "an unknown phase"
    phase, _, event = str(name).partition(":")
    return f"{phase} (at {event})" if event else phase


# CLI parameters that are no keyword of the API (everything else a command takes is named as the API names it).
NOT_API_PARAMS = ("config", "adapter_config", "format", "against", "over", "limit", "steps", "matrix", "out")


def with_config(ctx: typer.Context, fmt: str) -> dict:
    """The command's parameters as the API's keywords (`ctx.params` without the CLI-only ones), with the run a
    --config / --adapter-config file describes under what the user gave explicitly: a parameter whose value
    came from the command line (click's ParameterSource, compared by name: typer may carry its own click), never a default. The line naming the tool and the
    settings it derived goes to stdout (stderr for json and csv, which must stay parseable); the line naming
    what is not modelled to stderr."""
    values = {k: v for k, v in ctx.params.items() if k not in NOT_API_PARAMS}
    config, adapter_config = ctx.params.get("config"), ctx.params.get("adapter_config")
    if config is None and adapter_config is None:
        return values
    from peftcalc.training_configs import from_files

    given = {k: v for k, v in values.items()
             if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT")}
    run = from_files(config, adapter_config, given=given)
    typer.echo(run.header(), err=fmt in ("json", "csv"))
    warning = run.warning()
    if warning:
        typer.echo(warning, err=True)
    return {**values, **{k: v for k, v in run.kwargs.items() if k in values}, "model": run.model}
