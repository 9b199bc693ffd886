"""A traced estimate: the figures of :class:`peftcalc.api.Estimate` assembled from what the harness measured on
fake tensors (``measure.traced.traced_estimate`` runs the step and calls :func:`traced_estimate_from`), for any
transformers model, modelled here or not. Plain Python: the harness hands its measurement over as data.

What a trace gives and what it does not:
- memory: the tracer's peak of a steady-state step (the second of two), with ``--device cpu`` semantics (live
  tensor storage, as the CPU allocator sees it: no 512-byte rounding, no cuBLAS workspaces; see
  measure/tracer.py); its categories map onto the estimate's components (TRACER_COMPONENTS);
- the GPU fit: the traced peak plus the allocator slack and CUDA context (memory.reserved_bytes) against each
  card; the largest batch would need a trace per batch size, so it is not given;
- time and cost: peftcalc's (api._cost_on: hardware.step_flops) where the family is modelled, else from the
  traced parameter counts (:func:`approximate_step_flops`, stated as such);
- storage: peftcalc's where the family is modelled, else the safetensors files of the traced model's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Callable

from peftcalc.api import Cost, Estimate, GpuFit, Memory, Params, StorageInfo, _choose_gpu
from peftcalc.hardware import find_gpu, gpu_catalog, peak_tflops
from peftcalc.memory import CUDA_CONTEXT_BYTES, reserved_bytes
from peftcalc.plan import MethodSettings
from peftcalc.settings import TrainingSettings
from peftcalc.storage import safetensors_size

__all__ = ["APPROXIMATE_FLOPS", "TRACE_NOTE", "TRACER_COMPONENTS", "Trace", "approximate_step_flops", "cost_on",
           "traced_components", "traced_estimate_from", "traced_storage"]

# The tracer's categories (measure/tracer.py CATEGORIES) -> the estimate's components (peftcalc.memory.COMPONENTS).
# "parameters" is split by what the model holds (Trace.trainable_bytes, Trace.buffer_bytes); the logits and
# loss buffers nothing saves are among the tracer's "other", reported as temporaries.
TRACER_COMPONENTS = {"gradients": "gradients", "optimizer_state": "optimizer_states", "activations": "activations",
                     "other": "temporaries", "inputs": "inputs"}

TRACE_NOTE = ("traced on fake tensors: the peak counts live tensor storage as the CPU allocator would "
              "(--device cpu), not the CUDA caching allocator")
APPROXIMATE_FLOPS = ("approximate (no model of this family): forward 2 x M x tokens, backward 2 x M x tokens for "
                     "input gradients + 2 x trainable x tokens for weight gradients (Kaplan et al. 2020's 6N), "
                     "attention 4 x b x s^2 x hidden x layers forward and twice that backward (PaLM appendix B), "
                     "checkpointing re-runs the forward; M = the parameters that run as matmuls (all but the "
                     "input embedding, a tied output head once)")


@dataclass(frozen=True)
class Trace:
    """What the harness measured on one model, as plain data (measure.traced builds it)."""

    seconds: float  # wall time of the trace: building the fake model and its steps
    steps: int
    peak_bytes: int  # the last (steady-state) step's peak
    peak_phase: str
    step1_peak_bytes: int
    categories: dict  # tracer category -> bytes at the peak (they sum to peak_bytes)
    phase_peaks: dict  # phase -> peak bytes of the last step
    params_total: int
    params_trainable: int
    by_origin: dict  # origin -> {"total", "trainable"}
    trainable_bytes: int  # storage of the trainable parameters
    buffer_bytes: int  # storage of the model's buffers
    matmul_params: int  # parameters that run as matmuls (approximate_step_flops' M)
    task_tensors: tuple = ()  # (name, shape, dtype) of what one task saves (an adapter, or the trained tensors)
    base_tensors: tuple = ()  # (name, shape, dtype) of the base model's model.safetensors


def traced_components(trace: Trace) -> dict:
    """The estimate's components at the traced peak: the tracer's "parameters" split into the trainable
    weights, the buffers and the rest (frozen weights, quantization state); the other categories by
    TRACER_COMPONENTS. They sum to the traced peak."""
    cats = trace.categories
    parameters = cats.get("parameters", 0)
    trainable = min(trace.trainable_bytes, parameters)
    buffers = min(trace.buffer_bytes, parameters - trainable)
    out = {"weights_frozen": parameters - trainable - buffers, "weights_trainable": trainable, "buffers": buffers}
    for category, component in TRACER_COMPONENTS.items():
        out[component] = out.get(component, 0) + cats.get(category, 0)
    return out


def approximate_step_flops(trace: Trace, t: TrainingSettings, spec, method: str) -> float:
    """FLOPs of one micro-batch without a model of the family (APPROXIMATE_FLOPS): 2 x M x tokens forward; backward
    2 x M x tokens for input gradients (not for 'frozen', whose gradients stop at the head) plus 2 x trainable
    x tokens; attention 4 b s^2 d L forward (d = hidden size, L = layers), twice that backward where input
    gradients flow; with checkpointing the forward once more where they flow."""
    tokens = t.batch_size * t.seq_len
    attention = 4.0 * t.batch_size * t.seq_len ** 2 * spec.hidden_size * spec.num_layers
    forward = 2.0 * trace.matmul_params * tokens + attention
    flows = method != "frozen"
    backward = 2.0 * trace.params_trainable * tokens + (2.0 * trace.matmul_params * tokens + 2 * attention) * flows
    recompute = forward if t.grad_checkpointing and flows else 0.0
    return forward + backward + recompute


def cost_on(flops: float, tokens_per_step: int, t: TrainingSettings, gpu, mfu: float, dataset_tokens: int,
            price: float | None) -> Cost:
    """Time and cost of an epoch on `gpu` from the FLOPs and tokens of an optimizer step (all its micro-batches),
    at `mfu` of the card's dense peak (peftcalc.api's arithmetic, without QLoRA's dequantization time)."""
    step_seconds = flops / (peak_tflops(gpu, t) * 1e12 * mfu)
    steps = ceil(dataset_tokens / tokens_per_step)
    hours = steps * step_seconds / 3600
    per_hour = gpu.price_per_hour if price is None else price
    return Cost(gpu.name, mfu, flops, tokens_per_step, step_seconds, steps, hours, per_hour, hours * per_hour,
                dataset_tokens)


def traced_storage(trace: Trace, method: str, tasks: int) -> StorageInfo:
    """One base plus `tasks` task files, or `tasks` full models for full fine-tuning: the safetensors sizes
    of the traced model's tensors (peftcalc.storage.safetensors_size, metadata {"format": "pt"})."""
    base = safetensors_size(list(trace.base_tensors), {"format": "pt"})
    if method == "full":
        return StorageInfo(base, 0, tasks, tasks * base, tasks * base)
    per_task = safetensors_size(list(trace.task_tensors), {"format": "pt"})
    return StorageInfo(per_task, base, tasks, base + tasks * per_task, tasks * base)


def _memory(trace: Trace) -> Memory:
    reserved = reserved_bytes(trace.peak_bytes)
    return Memory(device="cpu", peak_bytes=trace.peak_bytes, peak_phase=trace.peak_phase,
                  components=traced_components(trace), step1_peak_bytes=trace.step1_peak_bytes,
                  reserved_bytes=reserved,
                  overhead={"cuda_context": CUDA_CONTEXT_BYTES,
                            "allocator_slack": reserved - CUDA_CONTEXT_BYTES - trace.peak_bytes},
                  events=dict(trace.phase_peaks))


def traced_estimate_from(trace: Trace, spec, settings: MethodSettings, t: TrainingSettings, *, cost: Callable,
                         flops_note: str, storage: StorageInfo, gpu: str | None, price: float | None) -> Estimate:
    """The Estimate of a trace (estimated_by "traced"): memory and GPU fit from the trace, time and cost from
    `cost(gpu, price)` (a Cost; `price` None: the card's own), `storage` as given; `trace` in the result says
    how it was traced."""
    memory = _memory(trace)
    fits = []
    for g in gpu_catalog():
        named = gpu is not None and find_gpu(gpu).name == g.name
        c = cost(g, price if named else None)
        fits.append(GpuFit(g.name, g.memory_bytes, memory.reserved_bytes <= g.memory_bytes,
                           g.memory_bytes - memory.reserved_bytes, None, c.step_seconds, c.epoch_hours,
                           c.epoch_cost_usd, c.price_per_hour))
    chosen = _choose_gpu(gpu, fits)
    cost = cost(chosen, price if gpu else None) if chosen else None
    percent = 100.0 * trace.params_trainable / trace.params_total if trace.params_total else 0.0
    return Estimate(
        model=spec.name, architecture=spec.architecture, source=spec.source, method=settings, training=t,
        params=Params(trace.params_total, trace.params_trainable, percent, dict(trace.by_origin)),
        memory=memory, gpus=fits, cost=cost, storage=storage, estimated_by="traced",
        trace={"seconds": round(trace.seconds, 3), "steps": trace.steps, "step_reported": trace.steps,
               "counts": TRACE_NOTE, "flops": flops_note, "max_batch_size": "not traced (one batch size)"},
    )
