"""Rank 0 of an N-rank DeepSpeed ZeRO-1/2/3 job traced in one CPU process (issue 15): DeepSpeed 0.19's engine
(``deepspeed.initialize`` with a torch optimizer: the client optimizer, here torch.optim.AdamW - fused=True for
adamw-fused, as the HF Trainer hands its own optimizer over when the DeepSpeed config has no "optimizer" section -
or SGD, which ZeRO wraps as its basic optimizer over the flat fp32 partitions) on torch's fake process group
(measure.dist.fake_process_group) and DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``), with fake
tensors, two steps (``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``).

DeepSpeed's defaults: reduce_bucket_size and allgather_bucket_size 5e8 elements, contiguous_gradients on,
overlap_comm off under stages 1/2 and on under stage 3 (deepspeed/runtime/zero/config.py
``overlap_comm_valid``), stage3_param_persistence_threshold 1e5, stage3_prefetch_bucket_size 5e7, no gradient
clipping unless max_grad_norm sets ``gradient_clipping`` (as the HF Trainer's DeepSpeed integration does),
``gradient_accumulation_steps`` from grad_accum. Precision fp32: no DeepSpeed mixed precision; mixed-bf16: ``bf16.enabled`` (the engine casts the
parameters to bf16, the optimizer keeps fp32 master partitions).

What makes the trace run on fake tensors (deepspeed 0.19.8, torch 2.13):

1. the environment a launcher sets (LOCAL_RANK, RANK, WORLD_SIZE: engine.py ``_do_args_sanity_check``);
2. the model is built on meta and materialised fake before the engine sees it (measure.fake.materialize_fake,
   which keeps tied parameters tied; ``to_empty`` would untie them), and the engine's
   ``module.to(device)`` is skipped (the model is on the CPU already; moving fake parameters would swap
   them, which torch refuses for a tensor with weak references);
3. ``.item()`` on a fake scalar answers 0 (:func:`fake_scalars`: DeepSpeed reads overflow flags and norms);
4. ZeRO-3's ``assert_ints_same_as_other_ranks`` (partitioned_param_coordinator.py: an all-reduce of the
   trace's module ids, compared with ``.item()``) is stubbed.

And what keeps the trace a true one under ZeRO-3: the tracer's saved-tensors hook keeps a saved parameter as
itself (:meth:`ZeroTracer.saving`), so a parameter ZeRO-3 releases after its module's forward frees its gathered
storage then, as it does without the hook; and ``torch.nn.functional.linear``, which zero.Init replaces for good,
is put back after the run.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from measure.dist import fake_process_group
from measure.loop import TracerMeter, _common, _drop_private, _measured
from measure.setup import forward_loss, make_batch, make_optimizer
from measure.tracer import StorageTracer, model_state_tensors

__all__ = ["ZERO_STAGES", "ZeroTracer", "deepspeed_config", "fake_scalars", "launcher_environment", "measure_zero",
           "zero_train_step"]

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def deepspeed_config(training) -> dict:
    """The DeepSpeed JSON of a row: the ZeRO stage with DeepSpeed's defaults, bf16.enabled for mixed-bf16,
    the offload as ZeRO-Offload's keys (device cpu)."""
    zero = {"stage": ZERO_STAGES[training.sharding]}
    if training.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if training.offload == "params":
        zero["offload_param"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": training.batch_size, "gradient_accumulation_steps": training.grad_accum,
              "zero_optimization": zero}
    if training.max_grad_norm is not None:  # what the HF Trainer's DeepSpeed config takes from max_grad_norm
        config["gradient_clipping"] = training.max_grad_norm
    if training.precision == "mixed-bf16":
        config["bf16"] = {"enabled": True}
    if training.offload != "none":  # the client torch optimizer over host partitions (not DeepSpeedCPUAdam)
        config["zero_force_ds_cpu_optimizer"] = False
    return config


@contextlib.contextmanager
def launcher_environment(world_size: int):
    """LOCAL_RANK, RANK, WORLD_SIZE as torchrun sets them for rank 0, and DeepSpeed's CPU accelerator."""
    keys = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fake_scalars():
    """``Tensor.item()`` on a fake tensor: a flag (bool, uint8: ZeRO's overflow check, stage_1_and_2.py
    ``has_overflow``, whose fake tensor can carry a wrong constant) answers no overflow; a number answers its
    value where the fake tensor has one (AdamW's step count), else 0.0 (norms): no value read changes an
    allocation."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

    original = torch.Tensor.item

    def item(self):
        if isinstance(self, FakeTensor) and self.dtype in (torch.bool, torch.uint8):
            return False if self.dtype == torch.bool else 0
        try:
            return original(self)
        except DataDependentOutputException:
            if not isinstance(self, FakeTensor):
                raise
            return 0.0 if self.is_floating_point() else 0

    torch.Tensor.item = item
    try:
        yield
    finally:
        torch.Tensor.item = original


class ZeroTracer(StorageTracer):
    """A StorageTracer that leaves tensors on the meta device out: ZeRO keeps ``zeros_like(param,
    device="meta")`` copies of every parameter's shape (stage_1_and_2.py ``round_robin_bit16_meta``),
    which hold no memory; and whose saved parameters are the parameters (:meth:`saving`)."""

    def track(self, t, op, category="other"):
        return None if t.device.type == "meta" else super().track(t, op, category)

    @contextlib.contextmanager
    def saving(self):
        """StorageTracer.saving, but a parameter saved for backward is kept as itself, not as a ``detach()`` alias
        of its storage: ZeRO-3 releases a gathered parameter by swapping its ``.data`` for an empty tensor
        (partition_parameters.py ``free_param``) while ZeRO-3's linear has saved it (``LinearFunctionForZeroStage3``:
        ``ctx.save_for_backward(input, weight, bias)``), and autograd, with no hook, keeps the parameter, not its
        storage (saved_variable.cpp: a leaf is saved as itself), so the storage is freed at the release; an alias
        would hold it to backward. Other parameters' storages are alive anyway, so nothing else changes."""

        def pack(t):
            self.mark(t, "activations")
            return t if isinstance(t, torch.nn.Parameter) else t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


@contextlib.contextmanager
def _stage3_stubs():
    """ZeRO-3's cross-rank check of the traced module order, which reads values (module docstring, 4); and
    ``torch.nn.functional.linear`` put back afterwards: zero.Init replaces it for good with
    ``zero3_linear_wrap`` (partition_parameters.py ``_enable_mem_efficient_linear``: "This will persist unless
    manually reset"), which saves every Linear's input, and the rows a matrix runs after this one must not
    inherit it."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    original = ppc.assert_ints_same_as_other_ranks
    linear = torch.nn.functional.linear
    ppc.assert_ints_same_as_other_ranks = lambda ints: None
    try:
        yield
    finally:
        ppc.assert_ints_same_as_other_ranks = original
        torch.nn.functional.linear = linear


@contextlib.contextmanager
def _fresh_deepspeed_groups():
    """Restore DeepSpeed's module-level process-group caches after a run (deepspeed/comm/comm.py ``cdb``,
    deepspeed/utils/groups.py ``_WORLD_GROUP``, ``_DATA_PARALLEL_GROUP``, ...), which would otherwise name the
    destroyed fake group in the next run of the same process (a matrix)."""
    import copy

    from deepspeed.comm import comm
    from deepspeed.utils import groups

    saved = {k: copy.copy(v) for k, v in vars(groups).items()
             if k.startswith("_") and k[1:2].isupper() and isinstance(v, (dict, list, int, type(None)))}
    try:
        yield
    finally:
        comm.cdb = None
        for k, v in saved.items():
            setattr(groups, k, v)


@contextlib.contextmanager
def _kept_on_device(model):
    """Skip the engine's ``module.to(device)`` (module docstring, 2)."""
    model.to = lambda *args, **kwargs: model
    try:
        yield
    finally:
        del model.to


def zero_train_step(engine, spec, batch, meter, training) -> dict:
    """One DeepSpeed optimizer step in the harness's phases: `training.grad_accum` micro-batches of forward
    with the loss and ``engine.backward(loss)`` (ZeRO's gradient hooks reduce into partitions; ZeRO-2 every
    micro-batch, ZeRO-1 at the boundary), then ``engine.step()`` (the optimizer over the partitions, then the
    updated parameters all-gathered; ZeRO clears the gradients itself). DeepSpeed's own loop calls
    ``engine.step()`` after every micro-batch (off the boundary it only counts it: engine.py ``step``).

    trainer_loop: the HF Trainer's step (transformers Trainer.training_step -> accelerate Accelerator.backward ->
    DeepSpeedEngineWrapper.backward): ``engine.set_gradient_accumulation_boundary``, ``engine.backward(loss,
    scale_wrt_gas=False)`` (the Trainer turns DeepSpeed's division by the accumulation steps off) and, at the
    boundary, ``engine.step()`` inside the same call, while training_step still holds its loss."""
    accum = training.grad_accum
    meter.start_step()
    start = time.perf_counter()
    for k in range(1, accum + 1):
        micro_batch = k if accum > 1 else None
        with meter.phase("forward", micro_batch):
            loss = forward_loss(engine, spec, batch)
        with meter.phase("backward", micro_batch):
            if training.trainer_loop:
                engine.set_gradient_accumulation_boundary(k == accum)
                engine.backward(loss, scale_wrt_gas=False)
            else:
                engine.backward(loss)
                del loss
                if k < accum:
                    engine.step()
    with meter.phase("optimizer"):
        engine.step()
        meter.mark_optimizer(engine.optimizer)
        if training.trainer_loop:
            del loss
    summary = meter.end_step()
    summary["time_s"] = round(time.perf_counter() - start, 6)
    return summary


def measure_zero(spec, method, training, steps, policy) -> dict:
    """Rank 0's trace of `steps` DeepSpeed steps (module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from measure.fake import build_meta_model, materialize_fake, real_cpu_kernel_dtypes, real_input_semantics

    if training.offload != "none":
        # the engine runs (the client torch optimizer over the host partitions, zero_force_ds_cpu_optimizer false),
        # but on DeepSpeed's CPU accelerator its device and its pinned host copies are the same kind of CPU tensor
        raise NotImplementedError(f"offload {training.offload}: on DeepSpeed's CPU accelerator the device is the CPU, so "
                                  "the trace cannot tell the partitions ZeRO-Offload keeps in host memory from device memory")
    t0 = time.perf_counter()
    with launcher_environment(training.gpus), fake_process_group(training.gpus), _fresh_deepspeed_groups():
        import deepspeed

        model = build_meta_model(spec, method, policy.dtype, policy.compute, training.attention)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        materialize_fake(model, fake_mode)  # not to_empty: tied embeddings stay one parameter
        notes, params = _common(model, spec, training)
        tracer = ZeroTracer()
        meter = TracerMeter(tracer)
        stubs = _stage3_stubs() if training.sharding == "zero3" else contextlib.nullcontext()
        with real_input_semantics(), real_cpu_kernel_dtypes(), fake_mode, fake_scalars(), stubs, tracer:
            tracer.mark(model_state_tensors(model), "parameters")
            model_bytes = tracer.live_bytes
            optimizer = make_optimizer(training.optimizer, [p for p in model.parameters() if p.requires_grad])
            with _kept_on_device(model):
                engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(training))
            build_s = time.perf_counter() - t0
            batch = make_batch(spec, training, "cpu", torch.float32 if policy.dtype == torch.float32 else policy.dtype)
            meter.register(model, batch)
            load_bytes = tracer.live_bytes
            t1 = time.perf_counter()
            step_rows = [{"step": i + 1, **zero_train_step(engine, spec, batch, meter, training)} for i in range(steps)]
        measured = _measured(step_rows, meter.source, model_bytes, load_bytes)
        measured.update(meter.details(step_rows))
        _drop_private(step_rows)
        engine.destroy()
    notes = dict(notes, rank=0, engine=f"deepspeed {deepspeed.__version__}", client_optimizer=type(optimizer).__name__,
                 zero_optimizer=type(engine.optimizer).__name__)
    return {"params": params, "measured": measured, "harness_notes": notes,
            "timing": {"build_s": round(build_s, 3), "steps_s": round(time.perf_counter() - t1, 3),
                       "step_time_s": [s["time_s"] for s in step_rows]}}
