"""The training steps of a run and their memory: :func:`train_step` (forward with the loss, backward,
optimizer step, ``zero_grad(set_to_none=True)``) measured phase by phase by a meter -
:class:`TracerMeter` (a :class:`measure.tracer.StorageTracer`: cpu, fake, and one extra traced cuda
step) or :class:`CudaMeter` (the CUDA caching allocator) - and :func:`run_traced` / :func:`run_cuda`,
which run a built model's steps and return its params, measured peaks and timings for the row.

Owns the "loop" part of :func:`measure.run.measure_one`; the model, optimizer and batch come from
:mod:`measure.setup`, the row around the result from :mod:`measure.record`.
"""

from __future__ import annotations

import contextlib
import time

import torch

from measure.build import count_logical_params
from measure.offload import HostOffload
from measure.setup import autocast_context, forward_loss, make_batch, make_optimizer, model_loss, prepare_for_training
from measure.tracer import StorageTracer, gradient_tensors, model_state_tensors, optimizer_state_tensors

__all__ = ["PHASES", "TOP_K", "CudaMeter", "TracerMeter", "paged_state_bytes", "phase_key", "run_cuda", "run_steps",
           "run_traced", "train_step"]

PHASES = ("forward", "backward", "optimizer")
TOP_K = 8


# -- meters -----------------------------------------------------------------------------------


class TracerMeter:
    """Phase and step peaks from a StorageTracer (cpu, fake, and the extra traced cuda step)."""

    source = "tracer"

    def __init__(self, tracer: StorageTracer) -> None:
        self.tracer = tracer
        self.step_peaks: list[tuple[int, str]] = []  # (peak event, phase) per step

    def register(self, model, batch, optimizer=None) -> None:
        self.tracer.mark(model_state_tensors(model), "parameters")
        self.tracer.mark(gradient_tensors(model), "gradients")
        if optimizer is not None:
            self.tracer.mark(optimizer_state_tensors(optimizer), "optimizer_state")
        self.tracer.mark(batch, "inputs")

    def live_bytes(self) -> int:
        return self.tracer.live_bytes

    def start_step(self) -> None:
        self.tracer.reset_peak()
        self._phases: dict[str, dict] = {}
        self._peak = (-1, 0, "", None)

    @contextlib.contextmanager
    def phase(self, name: str, micro_batch: int | None = None):
        key = phase_key(name, micro_batch)
        with self.tracer.phase(name) as stats:
            if name == "forward":
                with self.tracer.saving():
                    yield
            elif name == "backward":  # a checkpoint's recompute saves activations again
                with self.tracer.recomputing():
                    yield
            else:
                yield
        self._phases[key] = {"start_bytes": stats.start_bytes, "end_bytes": stats.end_bytes,
                             "peak_bytes": stats.peak_bytes, "_seq": stats.peak_seq}
        if stats.peak_bytes > self._peak[0]:  # strictly: on a tie the earlier phase is the peak's phase,
            # as in the calculator (peftcalc.memory.peak_event)
            self._peak = (stats.peak_bytes, stats.peak_seq, name, micro_batch)

    def mark_gradients(self, model) -> None:
        self.tracer.mark(gradient_tensors(model), "gradients")

    def mark_optimizer(self, optimizer) -> None:
        self.tracer.mark(optimizer_state_tensors(optimizer), "optimizer_state")

    def end_step(self) -> dict:
        peak, seq, phase, micro_batch = self._peak
        self.step_peaks.append((seq, phase))
        summary = {"peak_bytes": peak, "peak_phase": phase, "phases": self._phases}
        if micro_batch is not None:
            summary["peak_micro_batch"] = micro_batch
        return summary

    def details(self, steps: list[dict]) -> dict:
        """Categories at each step's peak and at each phase peak of the last step; top tensors and
        ops at the last step's peak. Called after the run, once every category is final."""
        t = self.tracer
        last_seq = self.step_peaks[-1][0]
        return {
            "categories_at_peak": t.breakdown(last_seq),
            "step1_categories_at_peak": t.breakdown(self.step_peaks[0][0]),
            "phase_categories": {name: t.breakdown(p["_seq"]) for name, p in steps[-1]["phases"].items()},
            "top_tensors": t.top_tensors(last_seq, TOP_K),
            "top_ops": t.top_ops(last_seq, TOP_K),
        }


class CudaMeter:
    """Phase and step peaks from the CUDA caching allocator: ``reset_peak_memory_stats`` at each
    phase start, ``max_memory_allocated`` / ``max_memory_reserved`` at its end."""

    source = "cuda_allocator"

    def register(self, model, batch, optimizer=None) -> None:
        pass

    def live_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def start_step(self) -> None:
        self._phases = {}

    @contextlib.contextmanager
    def phase(self, name: str, micro_batch: int | None = None):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        self._phases[phase_key(name, micro_batch)] = {
            "start_bytes": start, "end_bytes": torch.cuda.memory_allocated(),
            "peak_bytes": torch.cuda.max_memory_allocated(), "reserved_peak_bytes": torch.cuda.max_memory_reserved()}

    def mark_gradients(self, model) -> None:
        pass

    def mark_optimizer(self, optimizer) -> None:
        pass

    def end_step(self) -> dict:
        # max() keeps the first of equal peaks: the earlier phase, as peftcalc.memory.peak_event does
        key, peak = max(self._phases.items(), key=lambda kv: kv[1]["peak_bytes"])
        reserved = max(p["reserved_peak_bytes"] for p in self._phases.values())
        name, _, micro_batch = key.partition("@")
        summary = {"peak_bytes": peak["peak_bytes"], "peak_phase": name, "reserved_peak_bytes": reserved,
                   "phases": self._phases}
        if micro_batch:
            summary["peak_micro_batch"] = int(micro_batch)
        return summary


def phase_key(name: str, micro_batch: int | None) -> str:
    """A phase's key among a step's phases: its name, 'forward@2' for micro-batch 2 of a gradient-accumulation
    step (micro_batch None: one micro-batch, or the optimizer step)."""
    return name if micro_batch is None else f"{name}@{micro_batch}"


# -- the step -------------------------------------------------------------------------------


def train_step(model, spec, batch, optimizer, policy, device, meter, scaler=None, recipe=None) -> dict:
    """One optimizer step in phases: `recipe.grad_accum` micro-batches of forward (+loss) and backward
    (each adds into the .grad the micro-batch before left: AccumulateGrad), then the optimizer step and
    zero_grad(set_to_none=True), as the HF Trainer's _inner_training_loop runs them. The micro-batches reuse
    one batch (memory depends on its shapes only). keep_outputs: the model outputs stay referenced until
    backward returns (``outputs = model(**batch); outputs.loss.backward()``)."""
    accum = recipe.grad_accum if recipe is not None else 1
    keep = recipe is not None and recipe.keep_outputs
    offload = getattr(meter, "offload", None)  # offload_activations: save_on_cpu around the forward (measure.offload)
    meter.start_step()
    if offload is not None:
        offload.reset_peak()
    start = time.perf_counter()
    for k in range(1, accum + 1):
        micro_batch = k if accum > 1 else None
        with _unsynced(model, k < accum), meter.phase("forward", micro_batch):
            with autocast_context(policy, device), offload.hooks() if offload is not None else contextlib.nullcontext():
                if recipe is not None and (keep or recipe.loss != "hf"):
                    loss, outputs = model_loss(model, spec, batch, recipe.loss, recipe.loss_chunks)
                    outputs = outputs if keep else None
                else:
                    loss, outputs = forward_loss(model, spec, batch), None
        with _unsynced(model, k < accum), meter.phase("backward", micro_batch):
            if recipe is not None and recipe.trainer_loop:
                trainer_backward(loss, accum)
            else:
                (scaler.scale(loss) if scaler is not None else loss).backward()
            del loss, outputs
        meter.mark_gradients(model)
    with meter.phase("optimizer"):
        grad_norm = None
        if recipe is not None and recipe.max_grad_norm is not None:
            if scaler is not None:  # the gradients are clipped unscaled (torch.amp GradScaler docs)
                scaler.unscale_(optimizer)
            # transformers Trainer._inner_training_loop: grad_norm = self._clip_grad_norm(model) ->
            # accelerator.clip_grad_norm_ -> torch.nn.utils.clip_grad_norm_; the norm it returns is kept
            # through optimizer.step()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        meter.mark_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        del grad_norm
    if device == "cuda":
        torch.cuda.synchronize()
    summary = meter.end_step()
    if offload is not None:  # the host copies' largest sum in the step (freed by its end)
        summary["host_peak_bytes"] = offload.peak
    summary["time_s"] = round(time.perf_counter() - start, 6)
    return summary


def _unsynced(model, skip: bool):
    """DistributedDataParallel.no_sync() around a micro-batch's forward and its backward when `skip` (every
    micro-batch of an accumulation but the last), as the HF Trainer runs them (accelerate Accelerator.accumulate ->
    Accelerator.no_sync -> ``model.no_sync()``): the reducer's hooks do nothing and the gradients accumulate in
    .grad; the last micro-batch reduces. Any other model: nothing."""
    from torch.nn.parallel import DistributedDataParallel

    return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def trainer_backward(loss, accum: int) -> None:
    """TrainingSettings.trainer_loop: transformers Trainer.training_step calls ``self.accelerator.backward(loss)``
    and holds its own `loss` until it returns; accelerate/accelerator.py Accelerator.backward runs
    ``loss = loss / self.gradient_accumulation_steps`` (even for 1 step) and backward on that new scalar."""
    scaled = loss / accum
    scaled.backward()
    del scaled


def run_steps(model, spec, batch, optimizer, policy, device, meter, steps: int, scaler=None, recipe=None) -> list[dict]:
    results = []
    for i in range(steps):
        summary = train_step(model, spec, batch, optimizer, policy, device, meter, scaler, recipe)
        results.append({"step": i + 1, **summary})
    return results


# -- a built model's run --------------------------------------------------------------------


def _common(model, spec, training) -> tuple[dict, dict]:
    notes = prepare_for_training(model, spec, training)
    total, trainable = count_logical_params(model)
    return notes, {"total": total, "trainable": trainable}


def traced_steps(tracer, meter, model, spec, training, policy, device, steps: int, wrap=None):
    """Inside the active `tracer`: the model's tensors marked as parameters, the batch, the optimizer over the
    trainable parameters, then `steps` steps of ``wrap(model)`` (a wrapper made once the parameters are counted,
    such as DDP's; the model itself without one). (step rows, bytes after the model, bytes after the batch)."""
    tracer.mark(model_state_tensors(model), "parameters")
    model_bytes = tracer.live_bytes
    stepped = wrap(model) if wrap else model
    batch = make_batch(spec, training, "cpu", policy.dtype if policy.autocast is None else torch.float32)
    meter.register(model, batch)
    load_bytes = tracer.live_bytes
    optimizer = make_optimizer(training.optimizer, [p for p in model.parameters() if p.requires_grad])
    step_rows = run_steps(stepped, spec, batch, optimizer, policy, device, meter, steps, recipe=training)
    return step_rows, model_bytes, load_bytes


def run_traced(model, spec, training, device, steps, policy, mode_ctx) -> dict:
    """Run the steps under a StorageTracer (inside `mode_ctx`: the FakeTensorMode for fake)."""
    notes, params = _common(model, spec, training)
    tracer = StorageTracer()
    meter = TracerMeter(tracer)
    if training.offload_activations:
        meter.offload = HostOffload(tracer, own_host=True)
    t0 = time.perf_counter()
    with mode_ctx, tracer:
        step_rows, model_bytes, load_bytes = traced_steps(tracer, meter, model, spec, training, policy, device, steps)
    measured = _measured(step_rows, meter.source, model_bytes, load_bytes)
    measured.update(meter.details(step_rows))
    _drop_private(step_rows)
    return {"params": params, "measured": measured, "harness_notes": notes,
            "timing": {"steps_s": round(time.perf_counter() - t0, 3),
                       "step_time_s": [s["time_s"] for s in step_rows]}}


def run_cuda(model, spec, training, steps, policy, trace_cuda) -> dict:
    """Run the steps measured by the CUDA allocator; then one more step traced for the breakdown."""
    notes, params = _common(model, spec, training)
    meter = CudaMeter()
    if training.offload_activations:
        meter.offload = HostOffload()
    model_bytes = meter.live_bytes()
    batch = make_batch(spec, training, "cuda", policy.dtype if policy.autocast is None else torch.float32)
    load_bytes = meter.live_bytes()
    optimizer = make_optimizer(training.optimizer, [p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cuda") if policy.grad_scaler else None
    t0 = time.perf_counter()
    step_rows = run_steps(model, spec, batch, optimizer, policy, "cuda", meter, steps, scaler, training)
    measured = _measured(step_rows, meter.source, model_bytes, load_bytes)
    measured["reserved_peak_bytes"] = step_rows[-1]["reserved_peak_bytes"]
    paged = paged_state_bytes(optimizer)
    if paged:  # bitsandbytes paged optimizers: outside the caching allocator (peftcalc Memory.paged_bytes)
        measured["paged_bytes"] = paged
    measured["step1_reserved_peak_bytes"] = step_rows[0]["reserved_peak_bytes"]
    timing = {"steps_s": round(time.perf_counter() - t0, 3), "step_time_s": [s["time_s"] for s in step_rows]}
    if trace_cuda:
        measured["tracer"] = _trace_one_cuda_step(model, spec, batch, optimizer, policy, scaler, training)
    return {"params": params, "measured": measured, "harness_notes": notes, "timing": timing}


def _trace_one_cuda_step(model, spec, batch, optimizer, policy, scaler, training) -> dict:
    tracer = StorageTracer()
    meter = TracerMeter(tracer)
    if training.offload_activations:
        meter.offload = HostOffload(tracer)
    with tracer:
        meter.register(model, batch, optimizer)
        rows = run_steps(model, spec, batch, optimizer, policy, "cuda", meter, 1, scaler, training)
    details = meter.details(rows)
    details.pop("step1_categories_at_peak")
    _drop_private(rows)
    return {"peak_bytes": rows[0]["peak_bytes"], "peak_phase": rows[0]["peak_phase"],
            "phases": rows[0]["phases"], **details}


def paged_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors in CUDA unified memory: bitsandbytes functional.get_paged
    marks each buffer it makes with ``is_paged = True`` (optim/optimizer.py get_state_buffer)."""
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False))


def _measured(step_rows: list[dict], source: str, model_bytes: int, load_bytes: int) -> dict:
    first, last = step_rows[0], step_rows[-1]
    measured = {
        "source": source,
        "peak_bytes": last["peak_bytes"],
        "peak_phase": last["peak_phase"],
        "step1_peak_bytes": first["peak_bytes"],
        "step1_peak_phase": first["peak_phase"],
        "model_bytes": model_bytes,
        "load_bytes": load_bytes,
        "steps": step_rows,
    }
    if "peak_micro_batch" in last:  # gradient accumulation: the micro-batch of the steady-state peak
        measured["peak_micro_batch"] = last["peak_micro_batch"]
    if "host_peak_bytes" in last:  # offload_activations: host copies (pinned on CUDA), not in peak_bytes
        measured["host_peak_bytes"] = last["host_peak_bytes"]
    return measured


def _drop_private(step_rows: list[dict]) -> None:
    for row in step_rows:
        for phase in row["phases"].values():
            phase.pop("_seq", None)

