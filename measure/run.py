"""Measure the memory of real training steps: :func:`measure_one` builds a model, runs warm-up and
measured steps (forward with labels, backward, optimizer step, ``zero_grad(set_to_none=True)``) and
returns one JSON-serialisable row.

Devices:
  cuda  real weights on the GPU; peaks from ``torch.cuda.max_memory_allocated`` after
        ``reset_peak_memory_stats`` at each phase start (plus ``max_memory_reserved`` and step
        time); one extra step is traced by :class:`measure.tracer.StorageTracer` for the breakdown.
  cpu   real random weights on the CPU, traced by the StorageTracer.
  fake  the real module tree with fake-tensor parameters (:mod:`measure.fake`), traced the same way;
        no memory is used.

A step's peak is counted as ``max_memory_allocated`` counts it after ``reset_peak_memory_stats`` at
the step's start: every live tensor - parameters, optimizer state and inputs included.

This module owns one run from end to end and nothing more: :mod:`measure.setup` checks the settings and
builds the model, optimizer and batch, :mod:`measure.loop` runs and meters the steps, and
:mod:`measure.record` makes the row around them (settings, key, prediction, environment).
:mod:`measure.matrix` runs many of these; nothing here imports it.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from measure.loop import run_cuda, run_traced
from measure.record import environment, predict, row_key, settings_record
from measure.setup import LOSSES, build_for_device, check_run, precision_policy
from peftcalc.methods import PEFT_METHODS, MethodSettings
from peftcalc.settings import TrainingSettings
from peftcalc.config import load_spec
from peftcalc.spec import ModelSpec

__all__ = ["classify_failure", "execute", "free_memory", "measure_one", "save_trainable"]


# -- one run --------------------------------------------------------------------------------


def measure_one(spec: ModelSpec | str | dict, method_settings: MethodSettings, training_settings: TrainingSettings,
                device: str = "cuda", steps: int = 3, *, prepare_kbit: bool = False, seed: int = 0,
                trace_cuda: bool = True, predicted: bool = True) -> dict:
    """Measure `steps` training steps (step 1 and the last, steady-state step are reported apart)
    and return one JSON-serialisable row; see the module docstring. Bad settings raise InputError;
    anything that fails while running is recorded as the row's outcome ('oom' or 'error')."""
    spec = load_spec(spec)
    check_run(spec, method_settings, training_settings, device, steps)
    if method_settings.method == "qlora":  # the run key and the method's own setting mean the same
        method_settings = replace(method_settings, prepare_kbit=bool(prepare_kbit or method_settings.prepare_kbit))
    prepare_kbit = method_settings.prepare_kbit
    settings = settings_record(spec, method_settings, training_settings, device, steps, prepare_kbit, seed)
    row = {"key": row_key(settings), "settings": settings, "outcome": "ok", "error": None,
           "harness": {"loss": LOSSES[spec.task]}, "params": None, "measured": None}
    started = time.perf_counter()
    try:
        result = execute(spec, method_settings, training_settings, device, steps, prepare_kbit, seed, trace_cuda)
        row["harness"].update(result.pop("harness_notes"))
        row.update(result)
    except Exception as exc:
        row["outcome"], row["error"] = classify_failure(exc)
        row["error_trace"] = traceback.format_exc(limit=-4)
    finally:
        free_memory()
    row["wall_time_s"] = round(time.perf_counter() - started, 3)
    if predicted:
        row.update(predict(spec, method_settings, training_settings, device))
    row["environment"] = environment(device)
    return row


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """('oom', message) for out-of-memory errors (CUDA or the CPU allocator), else ('error', message)."""
    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None),) if t is not None)
    text = str(exc).lower()
    if isinstance(exc, oom_types) or "out of memory" in text or "can't allocate memory" in text:
        return "oom", message
    return "error", message


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute(spec, method, training, device, steps, prepare_kbit, seed, trace_cuda) -> dict:
    torch.manual_seed(seed)
    policy = precision_policy(training, device)
    with tempfile.TemporaryDirectory(prefix="peftcalc-measure-") as workdir:
        if training.sharding == "ddp":
            from measure.dist import measure_ddp

            return measure_ddp(spec, method, training, steps, policy, workdir)
        if training.sharding.startswith("zero"):
            from measure.zero import measure_zero

            return measure_zero(spec, method, training, steps, policy)
        if training.sharding != "none":
            from measure.dist import measure_dist

            return measure_dist(spec, method, training, steps, policy)
        if device == "fake":
            return _execute_fake(spec, method, training, steps, policy)
        return _execute_real(spec, method, training, device, steps, policy, workdir, prepare_kbit, trace_cuda)


def _execute_fake(spec, method, training, steps, policy) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from measure.fake import real_cpu_kernel_dtypes, real_input_semantics

    fake_mode = FakeTensorMode()
    t0 = time.perf_counter()
    model = build_for_device(spec, method, training, "fake", policy, fake_mode)
    build_s = time.perf_counter() - t0
    with real_input_semantics(), real_cpu_kernel_dtypes():
        result = run_traced(model, spec, training, "fake", steps, policy, fake_mode)
    result["timing"] = {"build_s": round(build_s, 3), **result.pop("timing")}
    return result


def _execute_real(spec, method, training, device, steps, policy, workdir, prepare_kbit, trace_cuda) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # from_pretrained's bars would break the matrix's
    t0 = time.perf_counter()
    model = build_for_device(spec, method, training, device, policy, workdir=workdir, prepare_kbit=prepare_kbit)
    build_s = time.perf_counter() - t0
    if device == "cuda":
        result = run_cuda(model, spec, training, steps, policy, trace_cuda)
    else:
        result = run_traced(model, spec, training, "cpu", steps, policy, contextlib.nullcontext())
        result["saved"] = save_trainable(model, method, workdir)
    result["timing"] = {"build_s": round(build_s, 3), **result.pop("timing")}
    return result


def save_trainable(model, method: MethodSettings, workdir: str) -> dict:
    """Save what a user would keep after training: the peft adapter (``save_pretrained``:
    adapter_model.safetensors) or the trainable parameters (safetensors ``save_file``)."""
    out = Path(workdir) / "saved"
    if method.method in PEFT_METHODS:
        model.save_pretrained(out)
        path = out / "adapter_model.safetensors"
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        path = out / "trainable.safetensors"
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(path))
    return {"file": path.name, "bytes": path.stat().st_size}

