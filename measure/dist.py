"""Rank 0 of an N-rank data-parallel job, traced in one CPU process: torch's fake process group
(``dist.init_process_group("fake", rank=0, world_size=N, store=FakeStore())``, collectives that return at
once and move nothing), a CPU device mesh and fake tensors, so a 1,024-rank job of a real model's shape
runs in seconds. FSDP2 (``torch.distributed.fsdp.fully_shard``, sharding ``fsdp`` and ``hsdp``) runs as
the real thing on it; :func:`measure_dist` is :func:`measure.run.measure_one`'s path for those rows. DDP
(:func:`measure_ddp`) runs on it with real CPU tensors (its C++ reducer reads tensor data, which fake tensors
lack) and a communication hook that completes each bucket's all-reduce at once.

Four things make the trace equal what rank 0 of a real job allocates (torch 2.13):

1. the model is built and given its method on the meta device outside any fake mode
   (:func:`measure.fake.build_meta_model`);
2. ``fully_shard`` runs on the meta model, which ``to_empty(device="cpu")`` then materialises under
   ``FakeTensorMode(allow_non_fake_inputs=True)`` (FSDP2 re-creates each sharded parameter there,
   ``FSDPParam.reset_sharded_param``);
3. DTensor's sharding propagation gets a fake mode of its own (:func:`own_propagation_mode`): torch's
   ``ShardingPropagator._propagate_tensor_meta_non_cached`` runs each op on fake global-shape arguments
   under ``detect_fake_mode()``, which finds the outer mode, so a tracer would count full-size shadow
   tensors while gradients are clipped and the optimizer steps;
4. :class:`DistTracer` counts ``UntypedStorage.resize_`` (FSDP2 frees an unsharded parameter by resizing
   its storage to 0 and re-allocates it the same way, torch/distributed/fsdp/_fully_shard/_fsdp_param.py
   ``free_storage`` / ``alloc_storage``), and hands every op on a DTensor back (``NotImplemented``) so that
   only the local tensors its implementation makes are counted.

QLoRA (:func:`_sharded_qlora`) is quantized on fake tensors with its NF4 codes packed in the model's dtype
(``bnb_4bit_quant_storage``), then sharded there; bitsandbytes' re-wrap of FSDP2's unsharded parameter as a
Params4bit, which fake tensors refuse, is replaced by setting its quant_state (:func:`_module_quant_states`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref

import torch

from measure.loop import TracerMeter, _common, _drop_private, _measured, traced_steps
from measure.tracer import FakeScalars, StorageRecord, StorageTracer

__all__ = ["DistTracer", "fake_process_group", "measure_ddp", "measure_dist", "own_propagation_mode",
           "passthrough_allreduce", "shard_fsdp2", "sharded_blocks"]


def _local(t):
    """A DTensor's local shard (what rank 0 holds), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


class DistTracer(StorageTracer):
    """A StorageTracer for one rank of a sharded job: DTensor ops are handed back to DTensor (which
    runs them on the local tensors, counted then), marks go to the local tensors, and storages that
    ``resize_`` frees or re-allocates are counted as freed or born (op ``resize_``, category parameters:
    FSDP2's unsharded parameters, which a Linear saves for backward as it saves any weight)."""

    def __enter__(self):
        original = torch.UntypedStorage.resize_
        tracer = self

        def resize_(storage, size):
            out = original(storage, size)
            tracer.resized(storage)
            return out

        self._original_resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def resized(self, storage) -> None:
        """Count a storage `resize_` changed: freed at 0 bytes, born again when it grows from 0."""
        key, nbytes = storage._cdata, storage.nbytes()
        with self._lock:
            record = self.records.get(key)
            if record is not None and nbytes == 0:
                del self.records[key]
                self._refs.pop(key, None)
                self._add(-record.nbytes)
                record.died = self.seq
            elif record is not None:
                self._add(nbytes - record.nbytes)
                record.nbytes = nbytes
            elif nbytes:
                # an unsharded parameter (FSDP2 alloc_storage): a parameter, whatever saves it for backward
                record = StorageRecord(nbytes, "resize_", self.current_phase, "parameters", self.seq + 1)
                self.records[key] = record
                self.history.append(record)
                self._refs[key] = weakref.ref(storage, self._finalizer(key, record))
                self._add(nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        if getattr(_PROPAGATING, "depth", 0):  # DTensor's global-shape fake arguments: no rank allocates them
            return FakeScalars.__torch_dispatch__(self, func, types, args, kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def mark(self, tensors, category: str) -> None:
        from torch.utils._pytree import tree_flatten

        super().mark([_local(t) for t in tree_flatten(tensors)[0]], category)


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """This process as rank 0 of `world_size` on torch's fake process group (collectives do nothing)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


_PROPAGATING = threading.local()
_PROPAGATING.depth = 0


@contextlib.contextmanager
def own_propagation_mode():
    """Give DTensor's sharding propagation a FakeTensorMode of its own (see the module docstring, 3), and
    hide what it runs from :class:`DistTracer`: ``_propagate_tensor_meta_non_cached`` builds fake arguments
    of the global shapes (``OpSchema.gen_fake_args``) and runs the op on them once per new op schema, which
    no rank allocates (on a GPU they are fake too); a list op such as fused AdamW's ``_fused_adamw_`` builds
    them for every parameter, gradient and state at once, in step 1."""
    import torch.distributed.tensor._sharding_prop as sharding_prop
    from torch._subclasses.fake_tensor import FakeTensorMode

    original = sharding_prop.detect_fake_mode
    propagator = sharding_prop.ShardingPropagator
    original_meta = propagator._propagate_tensor_meta_non_cached
    mode = FakeTensorMode()

    def hidden_meta(self, op_schema):
        _PROPAGATING.depth = getattr(_PROPAGATING, "depth", 0) + 1
        try:
            return original_meta(self, op_schema)
        finally:
            _PROPAGATING.depth -= 1

    sharding_prop.detect_fake_mode = lambda *args, **kwargs: mode
    propagator._propagate_tensor_meta_non_cached = hidden_meta
    try:
        yield
    finally:
        sharding_prop.detect_fake_mode = original
        propagator._propagate_tensor_meta_non_cached = original_meta


def sharded_blocks(model) -> list:
    """The modules each get their own ``fully_shard`` (one FSDP2 parameter group each): transformers'
    decoder and encoder layers (``GradientCheckpointingLayer``), as torchtitan, TRL and accelerate's
    ``fsdp_auto_wrap_policy`` TRANSFORMER_BASED_WRAP over ``_no_split_modules`` do."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def device_mesh(training):
    """FSDP: one dimension of `gpus` ranks; HSDP: (replicas, shard) with `gpus_per_node` ranks per shard group."""
    from torch.distributed.device_mesh import init_device_mesh

    if training.sharding == "hsdp" and training.gpus > training.gpus_per_node:
        return init_device_mesh("cpu", (training.gpus // training.gpus_per_node, training.gpus_per_node),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (training.gpus,))


def shard_fsdp2(model, training, mesh=None) -> None:
    """``fully_shard`` every block, then the root (which takes the rest: embeddings, final norm, head); under
    mixed-bf16 with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``; on `mesh` (made
    outside any fake mode: init_device_mesh reads a tensor's value), or :func:`device_mesh`'s."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh or device_mesh(training)
    kwargs = {"mesh": mesh, "reshard_after_forward": training.reshard_after_forward}
    if training.precision == "mixed-bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in sharded_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def measure_dist(spec, method, training, steps, policy) -> dict:
    """Rank 0's trace of `steps` steps under FSDP2 on the fake process group (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from measure.fake import build_meta_model, real_cpu_kernel_dtypes, real_input_semantics

    if training.sharding not in ("fsdp", "hsdp") or training.offload != "none":
        raise NotImplementedError(f"the harness traces FSDP2 (fsdp, hsdp) without offload, not {training.sharding}"
                                  f"{' offload ' + training.offload if training.offload != 'none' else ''}")
    t0 = time.perf_counter()
    with fake_process_group(training.gpus), own_propagation_mode():
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        if method.method == "qlora":
            model, counted = _sharded_qlora(spec, method, training, policy, fake_mode)
        else:
            model = build_meta_model(spec, method, policy.dtype, policy.compute, training.attention)
            shard_fsdp2(model, training)
            with fake_mode:
                model.to_empty(device="cpu")
        build_s = time.perf_counter() - t0
        notes, params = _common(model, spec, training)
        if method.method == "qlora":
            params = counted
        tracer = DistTracer()
        meter = TracerMeter(tracer)
        t1 = time.perf_counter()
        quantized = _module_quant_states() if method.method == "qlora" else contextlib.nullcontext()
        with real_input_semantics(), real_cpu_kernel_dtypes(), fake_mode, quantized, tracer:
            tracer.mark(quant_state_tensors(model), "parameters")
            step_rows, model_bytes, load_bytes = traced_steps(tracer, meter, model, spec, training, policy, "fake",
                                                              steps)
    return _rank0_result(step_rows, meter, model_bytes, load_bytes, params, notes, build_s, t1)


def _sharded_qlora(spec, method, training, policy, fake_mode):
    """QLoRA under FSDP2, built as TRL and axolotl build it: NF4 weights packed in the model's dtype
    (``bnb_4bit_quant_storage``), so that fully_shard shards each packed (numel / 2 bytes, 1) weight on dim 0 as
    an ordinary tensor, and LoRA on top; quantized on fake tensors (:func:`measure.fake.quantize_fake_nf4`), then
    sharded there (meta weights cannot be quantized). The Linear4bit layers are made in the model's dtype, as
    from_pretrained(dtype=...) makes them, so a bias (Qwen2's q, k, v) is sharded in it. (model, its logical
    parameter counts before sharding)."""
    from measure.build import apply_method, build_base_model, count_logical_params
    from measure.fake import materialize_fake, quantize_fake_nf4, replace_with_nf4

    model = build_base_model(spec, dtype=policy.dtype, device="meta", attention=training.attention)
    default = torch.get_default_dtype()
    torch.set_default_dtype(policy.dtype)  # from_pretrained's dtype: a Linear4bit's bias in it, as loaded
    try:
        model = replace_with_nf4(model, method, policy.compute, quant_storage=policy.dtype)
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        model = apply_method(model, spec, method)
    materialize_fake(model, fake_mode)
    quantize_fake_nf4(model, fake_mode, policy.dtype)
    total, trainable = count_logical_params(model)
    mesh = device_mesh(training)
    with fake_mode:
        shard_fsdp2(model, training, mesh)
    return model, {"total": total, "trainable": trainable}


def quant_state_tensors(model) -> list:
    """The bitsandbytes quantization states FSDP2 leaves whole on every rank: fully_shard replaces each
    Params4bit by a plain sharded parameter, and the QuantState (absmax, code, nested state2) stays on the
    Linear4bit module (``module.quant_state``)."""
    from measure.tracer import _quant_state_tensors

    return [t for m in model.modules() if getattr(m, "quant_state", None) is not None
            for t in _quant_state_tensors(m.quant_state)]


@contextlib.contextmanager
def _module_quant_states():
    """bitsandbytes Linear4bit.forward first runs ``fix_4bit_weight_quant_state_from_module``, which wraps
    FSDP2's unsharded parameter (a plain Parameter: the quant state "got lost ... for example for fsdp") in a
    Params4bit through ``Tensor._make_subclass``, sharing its storage, and gives it the module's quant_state;
    fake tensors refuse that subclassing, so here the quant_state is set on the parameter itself (no bytes
    either way). Without bitsandbytes: nothing."""
    try:
        import bitsandbytes.nn.modules as modules
    except ImportError:
        yield
        return
    original = modules.fix_4bit_weight_quant_state_from_module

    def attach(module):
        if getattr(module.weight, "quant_state", None) is None:
            module.weight.quant_state = module.quant_state

    modules.fix_4bit_weight_quant_state_from_module = attach
    try:
        yield
    finally:
        modules.fix_4bit_weight_quant_state_from_module = original


def _rank0_result(step_rows, meter, model_bytes, load_bytes, params, notes, build_s, steps_started) -> dict:
    """The harness's result of rank 0's traced steps (measured peaks and their details, params, notes, timing),
    the same for an FSDP2 and a DDP run."""
    measured = _measured(step_rows, meter.source, model_bytes, load_bytes)
    measured.update(meter.details(step_rows))
    _drop_private(step_rows)
    return {"params": params, "measured": measured, "harness_notes": dict(notes, rank=0),
            "timing": {"build_s": round(build_s, 3), "steps_s": round(time.perf_counter() - steps_started, 3),
                       "step_time_s": [s["time_s"] for s in step_rows]}}


def passthrough_allreduce(world_size: int):
    """A DDP communication hook that does what the default all-reduce hook does to memory, in place on the
    bucket (``bucket.buffer().div_(world_size)``; torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py
    ``allreduce_hook``), and completes at once: the fake process group's future carries no tensor, which the
    reducer refuses (c10d/comm.cpp "expected the hook result is either a Tensor or a TensorList")."""

    def hook(state, bucket):
        future = torch.futures.Future()
        future.set_result(bucket.buffer().div_(world_size))
        return future

    return hook


def measure_ddp(spec, method, training, steps, policy, workdir: str) -> dict:
    """Rank 0's trace of `steps` steps under DistributedDataParallel (defaults) on the fake process group,
    real CPU tensors: the buckets are allocated when DDP is built, counted from then on."""
    from torch.nn.parallel import DistributedDataParallel

    from measure.setup import build_for_device

    t0 = time.perf_counter()
    with fake_process_group(training.gpus):
        model = build_for_device(spec, method, training, "cpu", policy, workdir=workdir)
        build_s = time.perf_counter() - t0
        notes, params = _common(model, spec, training)
        tracer = StorageTracer()
        meter = TracerMeter(tracer)
        t1 = time.perf_counter()
        def ddp_wrapped(module):
            ddp = DistributedDataParallel(module)
            ddp.register_comm_hook(None, passthrough_allreduce(training.gpus))
            return ddp

        with tracer:
            step_rows, model_bytes, load_bytes = traced_steps(tracer, meter, model, spec, training, policy, "cpu",
                                                              steps, wrap=ddp_wrapped)
    return _rank0_result(step_rows, meter, model_bytes, load_bytes, params, notes, build_s, t1)
