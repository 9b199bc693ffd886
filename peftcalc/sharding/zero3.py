"""DeepSpeed ZeRO stage 3 (deepspeed 0.19.8, defaults, a torch optimizer given to ``deepspeed.initialize``) on one
rank: the one-GPU step's events (peftcalc.memory.step_events) with ZeRO-3's partitions, persistent parameters and
buffers, in the steady state (step 2 on).

deepspeed/runtime/zero/partition_parameters.py ``Init`` (run by the engine over a model built outside it,
stage3.py ``DeepSpeedZeRoOffload`` -> ``_convert_to_zero_parameters``): every parameter, frozen or trainable, gets
its partition ``ds_tensor`` of ``_aligned_size // world`` elements (its numel padded to a multiple of the ranks,
``_padding_size``), in the parameter's dtype; a parameter of at most ``stage3_param_persistence_threshold``
elements (1e5) is persistent (``_convert_to_deepspeed_param``: ``ds_persist``): once all-gathered it stays whole
on every rank (partitioned_param_coordinator.py ``release_sub_module`` skips it, ``__params_to_release``).

stage3.py ``DeepSpeedZeroOptimizer_Stage3``:

- ``_create_fp16_partitions_with_defragmentation``: the trainable parameters' partitions are moved into one
  flat buffer in their dtype (``fp16_partitioned_groups_flat``, one sub-group under the default
  sub_group_size 1e9), and ``_setup_for_real_optimizer`` clones it to fp32 (``fp32_partitioned_groups_flat``,
  the master weights); the client optimizer's states are made by its first step over it;
- ``__init__``: the reduce bucket (``ipg_buckets[dtype].buffer``: reduce_bucket_size elements, 5e8, of the
  communication dtype, allocated up front as contiguous_gradients is on), the gradient partitions
  (``grad_partitions_flat_buffer``: the trainable partitions, in the gradient accumulation dtype, zeros) and
  ``inf_or_nan_tracker`` (one bool);
- backward: each gradient's hook copies it into the bucket and points ``param.grad`` there
  (``__add_grad_to_ipg_bucket``), so autograd's gradient is freed as it is made; the epilogue
  (``__reduce_and_partition_ipg_grads``) reduce-scatters the bucket into the partitions, a flat copy of the
  bucket's gradients made on the way;
- step (``_pre_step``, ``_optimizer_step``, ``_post_step``): the persistent parameters are partitioned (their
  whole copies freed), the norm over the partitions (an fp64 copy of one parameter's partition at a time,
  ``get_grad_norm_direct``), the partitions' gradients flattened (``self.flatten(self.averaged_gradients)``,
  fp32), the client optimizer's step on the fp32 partition (torch AdamW's single-tensor path: two
  partition-sized temporaries; fused: none), and the persistent parameters all-gathered again
  (``persistent_parameters[0].all_gather``): whole at the start of the next step, as the forward leaves them.

zero.Init also replaces ``torch.nn.functional.linear`` for good (partition_parameters.py
``_enable_mem_efficient_linear``: deepspeed/runtime/zero/linear.py ``LinearFunctionForZeroStage3``), which saves
every Linear's input, a frozen one's too: the one-GPU step is simulated with that Linear
(peftcalc.ops.context.StepContext.linear_saves_input), which changes LoRA's activations (full fine-tuning's
Linears save their input anyway).

Modelled: every parameter at most stage3_param_persistence_threshold elements (all persistent: forward and
backward then run on whole parameters, as on one GPU), one bucket, full fine-tuning in fp32 or bf16.enabled
(mixed-bf16), LoRA in fp32, AdamW (single-tensor or fused) and SGD, gradient checkpointing on or off. Refused
(CombinationError): larger parameters (all-gathered module by module with prefetch and released after use),
several buckets, offload, QLoRA, LoRA under bf16.enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from peftcalc.activations import activation_profile
from peftcalc.errors import CombinationError
from peftcalc.memory import gradient_arrival, step_events
from peftcalc.model_states import gradient_free, group_dtype
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sharding.zero import BACKWARD_SCALARS, GAS_SCALED_LOSS, REDUCE_BUCKET_SIZE, _event
from peftcalc.sim.profile import stream_dtypes

__all__ = ["PERSISTENCE_THRESHOLD", "Zero3Layout", "check_zero3", "padded_gradients", "zero3_events", "zero3_layout"]

PERSISTENCE_THRESHOLD = 100_000  # deepspeed/runtime/zero/config.py stage3_param_persistence_threshold default
INF_OR_NAN_TRACKER = 1  # stage3.py __init__: torch.zeros(1, dtype=torch.bool)
NORM_SCALAR = 8  # the global gradient norm kept from the step before (fp64, stage3.py ``_global_grad_norm``)
# the step's end, beside the norm kept from the step before: the new norm and two fp64 scalars of the overflow check
# (stage3.py ``unscale_and_clip_grads``, ``_has_inf_or_nan``; traced)
STEP_END_SCALARS = 24


@dataclass(frozen=True)
class Zero3Layout:
    """The partitions of rank r (the same size on every rank: each parameter's padding is in its last rank's)."""

    trainable: int  # elements of the trainable parameters
    trainable_partition: int  # elements of the flat partition of the trainable parameters (padded per parameter)
    frozen_partition_bytes: int  # bytes of the frozen parameters' partitions (ds_tensor), each padded
    nbytes: int  # the trainable parameters' dtype bytes
    largest_partition: int  # elements of the largest one parameter's partition (the norm's fp64 copy)
    gathered_bytes: int  # bytes of every parameter whole, each padded to world partitions (its all-gather output)


def zero3_layout(plan: Plan, t: TrainingSettings) -> Zero3Layout:
    """Each parameter's partition (partition_parameters.py ``_aligned_size`` // world), the trainable ones
    flattened (stage3.py ``fp16_partitioned_groups_flat``)."""
    weight_dtype = "bfloat16" if t.precision == "mixed-bf16" else stream_dtypes(plan, t)[0]
    trainable = partition = frozen = largest = gathered = 0
    nbytes = set()
    for g in plan.groups:
        part = ceil(g.numel / t.gpus)
        size = DTYPE_BYTES[group_dtype(plan, g.origin, weight_dtype, g.name)]
        gathered += t.gpus * part * size
        if g.trainable:
            trainable += g.numel
            partition += part
            largest = max(largest, part)
            nbytes.add(size)
        else:
            frozen += part * size
    return Zero3Layout(trainable, partition, frozen, max(nbytes, default=4), largest, gathered)


def check_zero3(plan: Plan, t: TrainingSettings) -> None:
    """CombinationError for what this model of ZeRO-3 does not cover yet (module docstring)."""
    unsupported = [what for what, bad in (
        (f"offload {t.offload}", t.offload != "none"), (f"precision {t.precision}", t.precision not in ("fp32", "mixed-bf16")),
        (f"optimizer {t.optimizer}", t.optimizer not in ("adamw", "adamw-fused", "sgd")),
        (f"method {plan.settings.method}", plan.settings.method not in ("full", "lora")),
        (f"{plan.settings.method} under mixed-bf16", t.precision == "mixed-bf16" and plan.settings.method != "full")) if bad]
    if unsupported:
        raise CombinationError(f"the DeepSpeed ZeRO-3 model does not cover {unsupported[0]} yet (full fine-tuning "
                               "in fp32 or mixed-bf16, LoRA in fp32, AdamW, fused AdamW or SGD are)", names=("sharding",))
    if gradient_free(plan):
        raise CombinationError("DeepSpeed ZeRO needs a gradient for every trainable parameter; "
                               f"{sorted(gradient_free(plan))[0]} gets none", names=("sharding",))
    largest = max(plan.groups, key=lambda g: g.numel)
    if largest.numel > PERSISTENCE_THRESHOLD:
        raise CombinationError(f"ZeRO-3 with parameters above stage3_param_persistence_threshold ({PERSISTENCE_THRESHOLD:,} "
                               f"elements; {largest.name} has {largest.numel:,}), all-gathered module by module with "
                               "prefetch, is not modelled yet", names=("sharding",))
    if zero3_layout(plan, t).trainable > REDUCE_BUCKET_SIZE:
        raise CombinationError(f"more trainable elements than one ZeRO reduce bucket ({REDUCE_BUCKET_SIZE:,}); "
                               "several buckets are not modelled yet", names=("sharding",))


def _states(layout: Zero3Layout, t: TrainingSettings) -> int:
    """The client optimizer's states over the fp32 partition (peftcalc.sharding.zero._states)."""
    p = layout.trainable_partition
    if t.optimizer in ("adamw", "adamw-fused"):
        return 2 * 4 * p + (4 if t.device == "cpu" or t.optimizer == "adamw-fused" else 0)
    return 4 * p


def zero3_events(plan: Plan, t: TrainingSettings, rank: int = 0) -> list:
    """The step's events on `rank` as (phase, bytes, parts), the one-GPU events rewritten (module docstring)."""
    layout = zero3_layout(plan, t)
    # bf16.enabled: the engine casts every parameter to bf16 (engine.py ``_cast_module_mixed_precision``), so the
    # step computes as a bf16 model does
    # (sharding kept: the step's Linears are ZeRO-3's, peftcalc.ops.context.StepContext.linear_saves_input)
    one_gpu = replace(t, gpus=1, gpus_per_node=8, offload="none",
                      precision="bf16" if t.precision == "mixed-bf16" else t.precision)
    act = activation_profile(plan, one_gpu)
    arrival = gradient_arrival(plan, one_gpu)
    p_t = layout.trainable_partition
    fixed = {"master_weights": 4 * p_t, "gradient_partition": layout.nbytes * p_t,
             "gradient_buckets": REDUCE_BUCKET_SIZE * layout.nbytes, "optimizer_states": _states(layout, t)}
    events = []
    for name, _, parts in step_events(plan, one_gpu):
        p = dict(parts, **fixed)
        # the whole persistent parameters are all-gather outputs, each of its padded numel (world partitions,
        # partition_parameters.py ``_allgather_params_coalesced``: the parameter a view of its first numel
        # elements); the rank's own are its partitions
        p["all_gather_buffers"] = layout.gathered_bytes
        p["weights_trainable"] = p_t * layout.nbytes
        p["weights_frozen"] = layout.frozen_partition_bytes
        p["temporaries"] = p.get("temporaries", 0) + INF_OR_NAN_TRACKER + NORM_SCALAR + (
            BACKWARD_SCALARS if name.startswith("backward") else 0)
        if name.startswith("backward:layer") or name == "backward:end":
            # every gradient so far copied into the bucket and autograd's freed; at the embeddings' backward
            # theirs is made and not yet copied
            p["gradients"] = arrival.input_side if name == "backward:end" else 0
        if name == "optimizer":
            events.extend(_step_events(p, layout, t))
            continue
        events.append(_event(name, p))
        if name == "backward:end":
            events.append(_reduce_event(p, layout, t, act.loss_scalars))
    return events


def _reduce_event(end: dict, layout: Zero3Layout, t: TrainingSettings, loss_scalars: int) -> tuple:
    """The epilogue (``__reduce_and_partition_ipg_grads``, after autograd's backward returns): activations and
    autograd's gradients gone, the bucket's gradients flattened for the reduce-scatter (``__avg_scatter_grads``
    -> deepspeed/runtime/comm/coalesced_collectives.py ``reduce_scatter_coalesced``: each gradient's world
    partitions, padded, in one buffer, ``torch.cat`` of the partitions and of a ``torch.empty`` for each padding,
    which the list holds until the cat is done); the loss the training loop holds and the engine's loss divided
    by the accumulation steps still live (as peftcalc.sharding.zero._reduce_event)."""
    p = {k: v for k, v in end.items() if k not in ("activations", "gradients", "temporaries", "logits_loss", "_other")}
    padded = padded_gradients(layout, t)
    padding = padded - layout.trainable * layout.nbytes
    p.update(logits_loss=loss_scalars,
             temporaries=padded + padding + INF_OR_NAN_TRACKER + NORM_SCALAR + GAS_SCALED_LOSS)
    return _event("backward:reduce", p)


def padded_gradients(layout: Zero3Layout, t: TrainingSettings) -> int:
    """Bytes of the trainable parameters padded to whole partitions (each parameter to a multiple of the ranks):
    the reduce-scatter's flat input (``reduce_scatter_coalesced``), and the all-gather outputs of the whole
    parameters (partition_parameters.py ``_allgather_params_coalesced``)."""
    return t.gpus * layout.trainable_partition * layout.nbytes


def _step_events(parts: dict, layout: Zero3Layout, t: TrainingSettings) -> list:
    """The step (module docstring): with the persistent parameters partitioned, the norm's fp64 copy of the
    largest partition of one parameter, then the flattened fp32 gradients with AdamW's single-tensor
    temporaries (two fp32 partitions; fused AdamW and SGD none); then the parameters all-gathered again with the
    step's scalars."""
    p_t = layout.trainable_partition
    base = {k: v for k, v in parts.items() if k not in ("temporaries", "gradients", "_other", "all_gather_buffers",
                                                       "activations", "logits_loss")}
    adam = 2 * 4 * p_t if t.optimizer == "adamw" else 0
    scalars = INF_OR_NAN_TRACKER + NORM_SCALAR + STEP_END_SCALARS
    step = dict(base, temporaries=scalars + max(8 * layout.largest_partition, 4 * p_t + adam))
    end = dict(base, all_gather_buffers=parts.get("all_gather_buffers", 0),
               temporaries=scalars)
    return [_event("optimizer", step), _event("optimizer:gather", end)]
