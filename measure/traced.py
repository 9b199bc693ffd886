"""A traced estimate: ``peftcalc estimate --trace`` (and ``estimate`` of a family peftcalc does not model):
:func:`traced_estimate` takes estimate()'s arguments, runs two training steps of the real model on fake tensors
(the build and loop of :func:`measure.run.measure_one` with device "fake": :func:`trace_model`) and returns a
:class:`peftcalc.api.Estimate` marked ``estimated_by="traced"`` (peftcalc.traced.traced_estimate_from assembles
it). The steady-state (second) step is reported; the figures count what the CPU allocator would
(``--device cpu``), as every fake trace does.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from measure.build import count_logical_params, logical_numel
from measure.generic import GENERIC_METHODS, generic_spec, is_unmodelled
from measure.loop import run_traced
from measure.setup import build_for_device, check_run, precision_policy, transformers_model
from peftcalc.api import (DEFAULT_DATASET_TOKENS, DEFAULT_MODEL, DEFAULT_OPTIMIZER, _check_cost_inputs,
                          _checked_training, _cost_on, check_applies, default_method, method_settings,
                          resolved_settings, traced_status)
from peftcalc.config import load_spec
from peftcalc.errors import InputError
from peftcalc.hardware import DEFAULT_MFU
from peftcalc.methods import PEFT_METHODS, make_plan
from peftcalc.settings import check_loss_applies
from peftcalc.storage import full_model_bytes, storage
from peftcalc.traced import APPROXIMATE_FLOPS, Trace, approximate_step_flops, cost_on, traced_estimate_from, traced_storage
from peftcalc.unmodelled import unmodelled_config

__all__ = ["TRACE_STEPS", "model_facts", "trace_model", "traced_estimate", "traced_spec"]

TRACE_STEPS = 2  # step 1 (no optimizer state before its optimizer step) and the steady state


def traced_spec(model):
    """The spec of `model`: peftcalc's reader for a modelled family, measure.generic.generic_spec otherwise."""
    config = unmodelled_config(model)
    if config is None:
        return load_spec(model)
    name = "" if isinstance(model, dict) else str(model)
    return generic_spec(config, name=name, where=name or "config")


def _settings(spec, method, knobs: dict):
    """The method settings, checked as estimate() checks them (and, unmodelled, against GENERIC_METHODS)."""
    method = method or default_method(spec)
    settings = method_settings(method, **knobs)
    check_applies(method, knobs)
    if is_unmodelled(spec):
        if method not in GENERIC_METHODS:
            raise InputError(f"method '{method}' needs peftcalc's model of the {spec.model_type} blocks; on the "
                             f"traced route of an unmodelled family choose from {', '.join(GENERIC_METHODS)}")
        return settings
    return resolved_settings(spec, settings)


def trace_model(spec, settings, training, steps: int = TRACE_STEPS) -> tuple[dict, object, float]:
    """(run_traced's result, the model, seconds): the fake run of measure.run (its _execute_fake) kept whole."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    policy = precision_policy(training, "fake")
    fake_mode = FakeTensorMode()
    started = time.perf_counter()
    try:
        with _quiet_fake_tensor_log():
            return _run_fake(spec, settings, training, steps, policy, fake_mode, started)
    except InputError:
        raise
    except Exception as exc:  # transformers or peft refusing this model: one line, with a hint where one helps
        message = " ".join(str(exc).split())[:300]
        hint = "; try --attention eager" if "scaled_dot_product_attention" in message else ""
        if isinstance(exc, KeyError) and settings.method in ("prefix", "prompt"):
            hint = " (peft's prompt learning could not read this model's config)"
        if type(exc).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException"):
            hint = " (an op of this model needs a tensor's values, which fake tensors do not have)"
        raise InputError(f"tracing {spec.name} on fake tensors failed: {type(exc).__name__}: {message}{hint}") from None


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """FakeTensorMode logs the traceback of an op whose meta kernel fails (torch/_subclasses/fake_tensor.py,
    at ERROR) before the exception reaches trace_model, which reports it in one line."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_fake(spec, settings, training, steps, policy, fake_mode, started) -> tuple[dict, object, float]:
    from measure.fake import real_cpu_kernel_dtypes, real_input_semantics

    model = build_for_device(spec, settings, training, "fake", policy, fake_mode)
    with real_input_semantics(), real_cpu_kernel_dtypes():
        result = run_traced(model, spec, training, "fake", steps, policy, fake_mode)
    return result, model, time.perf_counter() - started


def _origin(name: str, method: str) -> str:
    """What added a parameter (peftcalc.api.Params.by_origin's keys), by peft's names."""
    if "lora_magnitude_vector" in name:
        return "dora"
    if "lora_" in name:
        return "lora"
    if "ia3_l" in name:
        return "ia3"
    if "prompt_encoder" in name:
        return method
    if "modules_to_save" in name:
        return "head_copy"
    return "base"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _task_tensors(model, settings) -> tuple:
    """(name, shape, dtype) of what one task saves: peft's adapter state dict (what save_pretrained writes,
    peft utils/save_and_load.py get_peft_model_state_dict), else the trainable parameters."""
    if settings.method in PEFT_METHODS:
        from peft import get_peft_model_state_dict

        # the tensors themselves, not model.state_dict(): a bitsandbytes 4-bit layer's _save_to_state_dict reads
        # its quantization state's values (QuantState.as_dict: .item()), which fake tensors do not have
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        tensors = get_peft_model_state_dict(model, state_dict=state).items()
    else:
        tensors = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return tuple((n, tuple(t.shape), _dtype_name(t)) for n, t in tensors)


def _base_tensors(model, compute_dtype: str) -> tuple:
    """(name, shape, dtype) of the base model's model.safetensors: its own parameters (a 4-bit weight at its
    logical shape in the compute dtype, as peftcalc stores a QLoRA base), tied weights once."""
    out = []
    for name, p in transformers_model(model).named_parameters():
        if _origin(name, "") != "base":
            continue
        state = getattr(p, "quant_state", None)
        shape = tuple(state.shape) if state is not None else tuple(p.shape)
        out.append((name.replace(".base_layer.", "."), shape, compute_dtype if state is not None else _dtype_name(p)))
    return tuple(out)


def model_facts(model, settings) -> dict:
    """What the Trace needs of the built model: counts by origin, trainable and buffer storage, matmul parameters."""
    by_origin: dict = {}
    trainable_bytes = 0
    for name, p in model.named_parameters():
        row = by_origin.setdefault(_origin(name, settings.method), {"total": 0, "trainable": 0})
        row["total"] += logical_numel(p)
        if p.requires_grad:
            row["trainable"] += logical_numel(p)
            trainable_bytes += p.untyped_storage().nbytes()
    inner = transformers_model(model)
    embedding = inner.get_input_embeddings()
    output = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    emb_weight = getattr(embedding, "weight", None)
    lookups = emb_weight.numel() if emb_weight is not None else 0
    tied = output is not None and getattr(output, "weight", None) is emb_weight
    total = sum(r["total"] for r in by_origin.values())
    return {"by_origin": by_origin, "trainable_bytes": trainable_bytes,
            "buffer_bytes": sum(b.untyped_storage().nbytes() for b in model.buffers()),
            "matmul_params": total - lookups + (lookups if tied else 0)}


def traced_estimate(
    model=DEFAULT_MODEL, *, method: str | None = None, rank=None, alpha=None, targets=None, dora=None,
    double_quant=None, bottleneck=None, adapter_kind=None, num_virtual_tokens=None, trainable_layers=None,
    vision_layers=None, prepare_kbit=None, batch_size: int = 1, seq_len: int = 512, precision: str = "bf16",
    optimizer: str = DEFAULT_OPTIMIZER, grad_checkpointing: bool = False, attention: str = "sdpa",
    device: str = "cpu", checkpoint_every: int = 1, checkpoint_reentrant: bool = False, grad_accum: int = 1,
    keep_outputs: bool = False, loss: str = "hf", loss_chunks: int = 8, offload_activations: bool = False,
    max_grad_norm: float | None = None, gpu: str | None = None, price: float | None = None, tasks: int = 1,
    dataset_tokens: int = DEFAULT_DATASET_TOKENS, mfu: float = DEFAULT_MFU, trainer_loop: bool = False,
    gpus=1, gpus_per_node: int = 8, sharding: str = "none", reshard_after_forward: bool = True,
    offload: str = "none", routing: str = "balanced", experts: str = "grouped_mm", router_aux_loss: bool = False,
):
    """estimate()'s figures from a trace of the real model on fake tensors (any transformers model); `device`
    is accepted for estimate()'s signature, and the trace always counts as --device cpu does. `trainer_loop`
    (the Trainer's step, which a --config file sets) is refused: the harness runs its own loop. A trace is one
    GPU's step: data parallelism (`gpus`, `sharding`: peftcalc's sharded model, or `peftcalc measure --gpus N
    --sharding ...` on a fake process group) is refused; `routing` drives a mixture-of-experts router, `experts`
    picks its experts implementation."""
    if gpus != 1 or sharding != "none" or offload != "none":
        raise InputError("a trace runs one GPU's step: drop --trace to have peftcalc model gpus and sharding, or "
                         "trace them with peftcalc measure on a fake process group", names=("gpus", "sharding"))
    if trainer_loop:
        raise InputError("trainer_loop: a trace runs the harness's own loop, not the Trainer's (one loss scalar "
                         "less through backward); leave trainer_loop out to trace", names=("trainer_loop",))
    spec = traced_spec(model)
    knobs = dict(rank=rank, alpha=alpha, targets=targets, dora=dora, double_quant=double_quant, bottleneck=bottleneck,
                 adapter_kind=adapter_kind, num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers,
                 vision_layers=vision_layers, prepare_kbit=prepare_kbit)
    settings = _settings(spec, method, knobs)
    training = dict(batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
                    grad_checkpointing=grad_checkpointing, attention=attention, checkpoint_every=checkpoint_every,
                    checkpoint_reentrant=checkpoint_reentrant, grad_accum=grad_accum, keep_outputs=keep_outputs,
                    loss=loss, loss_chunks=loss_chunks, offload_activations=offload_activations,
                    max_grad_norm=max_grad_norm, gpus_per_node=gpus_per_node,
                    reshard_after_forward=reshard_after_forward, routing=routing, experts=experts,
                    router_aux_loss=router_aux_loss)
    _checked_training({**training, "device": device})
    t = _checked_training({**training, "device": "cpu"})
    if traced_status(t) != "traced":
        raise InputError(f"loss {t.loss} and optimizer {t.optimizer}: a trace cannot run this recipe (Triton "
                         "kernels, or CUDA unified memory, run on CUDA only); drop --trace for peftcalc's model of it",
                         names=("loss", "optimizer"))
    _check_cost_inputs(gpu, price, tasks, dataset_tokens, mfu)
    if is_unmodelled(spec):
        check_loss_applies(spec, t)
    else:  # the harness's own checks of a fake run
        check_run(spec, settings, t, "fake", TRACE_STEPS)
    result, built, seconds = trace_model(spec, settings, t)
    trace = _trace(result, built, settings, t, seconds)
    if is_unmodelled(spec):
        flops = t.grad_accum * approximate_step_flops(trace, t, spec, settings.method)
        tokens = t.grad_accum * t.batch_size * t.seq_len
        note, st = APPROXIMATE_FLOPS, traced_storage(trace, settings.method, tasks)
        cost = lambda g, p: cost_on(flops, tokens, t, g, mfu, dataset_tokens, p)  # noqa: E731
    else:
        plan = make_plan(spec, settings)
        note, st = "modelled (peftcalc.hardware.step_flops)", _modelled_storage(plan, settings, t, tasks)
        cost = lambda g, p: _cost_on(plan, t, g, mfu, dataset_tokens, p)  # noqa: E731
    return traced_estimate_from(trace, spec, settings, t, cost=cost, flops_note=note, storage=st, gpu=gpu,
                                price=price)


def _trace(result: dict, built, settings, t, seconds: float) -> Trace:
    measured = result["measured"]
    facts = model_facts(built, settings)
    compute = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[t.compute_dtype]
    total, trainable = count_logical_params(built)
    return Trace(
        seconds=seconds, steps=len(measured["steps"]), peak_bytes=measured["peak_bytes"],
        peak_phase=measured["peak_phase"], step1_peak_bytes=measured["step1_peak_bytes"],
        categories=dict(measured["categories_at_peak"]),
        phase_peaks={k: v["peak_bytes"] for k, v in measured["steps"][-1]["phases"].items()},
        params_total=total, params_trainable=trainable, by_origin=facts["by_origin"],
        trainable_bytes=facts["trainable_bytes"], buffer_bytes=facts["buffer_bytes"],
        matmul_params=facts["matmul_params"], task_tensors=_task_tensors(built, settings),
        base_tensors=_base_tensors(built, compute),
    )


def _modelled_storage(plan, settings, t, tasks: int):
    """Storage as peftcalc.api.estimate computes it (a modelled family)."""
    from peftcalc.api import StorageInfo

    weight_dtype = t.weight_dtype if settings.method != "qlora" else t.compute_dtype
    st = storage(plan, weight_dtype, tasks)
    return StorageInfo(st.per_task_bytes, st.base_bytes, tasks, st.total_bytes,
                       tasks * full_model_bytes(plan, weight_dtype))
