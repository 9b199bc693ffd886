"""DeepSpeed ZeRO stage 1 and 2 (deepspeed 0.19.8, defaults, a torch optimizer given to
``deepspeed.initialize``: the client optimizer, wrapped by DeepSpeedZeroOptimizer) on one rank: the one-GPU
step's events (peftcalc.memory.step_events) with ZeRO's model states and buffers.

deepspeed/runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer``:

- ``__init__``: the trainable parameters (the optimizer's group; frozen ones stay as they are) are flattened
  into one buffer in the model's dtype, padded to a multiple of 2 x world elements
  (``flatten_dense_tensors_aligned``, ``nccl_start_alignment_factor`` 2; ``parameter_alignment`` off), and
  become views of it; rank r's partition is its r-th of world equal parts (``get_data_parallel_partitions``),
  and the fp32 master weights are a clone of it (``single_partition_of_fp32_groups``: a copy in fp32 too);
- the client optimizer's states are made by its first step over the fp32 partition (AdamW: exp_avg,
  exp_avg_sq, and its step count);
- backward: the first gradient's hook allocates the reduce bucket (``setup_buckets``: reduce_bucket_size,
  5e8 elements by default, in the parameters' dtype; one, overlap_comm off). ZeRO-2 copies every gradient
  into it and frees autograd's (``reduce_independent_p_g_buckets_and_remove_grads``); ZeRO-1 keeps the
  gradients to the end of backward (``reduce_gradients``). The epilogue (``reduce_ipg_grads`` ->
  ``average_tensor``) flattens the bucket's gradients, copies rank r's part into ``grads_in_partition``
  (``copy_grads_in_partition``: every parameter that overlaps the partition, whole), then frees the bucket;
- step: the gradient norm over the partition in fp64 (a partition-sized fp64 copy), the client optimizer's
  step over the fp32 partition (torch AdamW's single-tensor path: two partition-sized temporaries; fused
  AdamW, the HF Trainer's default, none: the Trainer hands its torch optimizer to ``deepspeed.initialize``
  when the DeepSpeed config has no "optimizer" section), the partition copied back and all-gathered into
  the flat buffer in place.

Gradient checkpointing changes the one-GPU step's events only (ZeRO's hooks fire as the recomputed blocks'
gradients arrive), so it needs nothing here.

More trainable elements than reduce_bucket_size: the bucket is flushed before backward ends
(peftcalc.sharding.zero_buckets). gradient_clipping (max_grad_norm) scales the fp32 partition's gradient in
place with a few 0-dim tensors (``unscale_and_clip_grads``: traced, nothing at the peak); gradient accumulation
and the HF Trainer's loop: zero_events.

Modelled: precision fp32, and bf16.enabled (mixed-bf16: the engine casts every parameter to bf16, peft's
adapters included) for full fine-tuning, LoRA, IA3 and bottleneck adapters, AdamW (single-tensor or fused) and
SGD, with or without gradient checkpointing (one bucket), clipping, accumulation, the Trainer's loop; ZeRO-3,
offload, QLoRA, and prompt/prefix tuning and DoRA under bf16.enabled are refused (CombinationError).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from peftcalc.activations import activation_profile
from peftcalc.errors import CombinationError
from peftcalc.memory import accumulating_step_events, gradient_arrival, step_events
from peftcalc.model_states import gradient_free, group_dtype, tied_embedding_addends
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sharding.zero_buckets import block_param_steps, bucket_schedule
from peftcalc.sim.profile import stream_dtypes

__all__ = ["REDUCE_BUCKET_SIZE", "ZERO_COMPONENTS", "ZeroLayout", "check_zero", "zero_events", "zero_layout"]

REDUCE_BUCKET_SIZE = 500_000_000  # deepspeed/runtime/zero/config.py reduce_bucket_size default (elements)
ALIGNMENT = 2  # stage_1_and_2.py nccl_start_alignment_factor
ZERO_COMPONENTS = ("master_weights", "gradient_partition")
# the methods whose steps under bf16.enabled (every parameter cast to bf16 by the engine) are traced; prompt and
# prefix tuning's encoders and DoRA's magnitude are not yet
CAST_METHODS = ("full", "lora", "ia3", "adapter")
# 0-dim fp32 tensors the engine adds: in backward the loss divided by the accumulation steps (engine.py
# ``_scale_loss_by_gas``) and multiplied by the loss scale, also under bf16.enabled (base_optimizer.py
# ``scale_if_loss``: DeepSpeedZeroOptimizer keeps a static loss_scaler of 1.0 then), and under ZeRO-3 alike (stage3.py
# ``backward``; peftcalc.sharding.zero3); from the first step on the
# global gradient norm the optimizer keeps (``_global_grad_norm``)
BACKWARD_SCALARS = 8
NORM_SCALAR = 4
# two 4-byte scalars alive beside the single-tensor AdamW's step at its fullest (traced in every fp32 and bf16
# row: the step phase 8 bytes above the partitions and temporaries)
ADAMW_STEP_SCALARS = 8
GAS_SCALED_LOSS = 4
# trainer_loop: transformers Trainer.training_step holds its 0-dim fp32 loss through accelerate's
# DeepSpeedEngineWrapper.backward, which runs engine.step() at the boundary (traced: 4 bytes more in the step);
# it passes scale_wrt_gas=False, so the engine's loss/gas scalar is not made
TRAINER_LOSS = 4


@dataclass(frozen=True)
class ZeroLayout:
    """The flat buffer of the trainable parameters and rank r's share of it."""

    trainable: int  # elements of the trainable parameters
    padded: int  # the flat buffer's elements (trainable padded to a multiple of 2 x world)
    partition: int  # elements of each rank's partition
    in_partition: int  # elements of the parameters that overlap rank r's partition (grads_in_partition)
    nbytes: int  # the parameters' dtype bytes
    largest_piece: int = 0  # elements of the largest overlap of one parameter with rank r's partition
    pieces: int = 1  # parameters overlapping rank r's partition, and a padding piece where its partition has one


def check_zero(plan: Plan, t: TrainingSettings) -> None:
    """CombinationError for what this model of ZeRO does not cover yet (module docstring)."""
    unsupported = [what for what, bad in (
        (f"offload {t.offload}", t.offload != "none"),
        (f"precision {t.precision}", t.precision not in ("fp32", "mixed-bf16")),
        (f"{_method_name(plan)} under mixed-bf16", t.precision == "mixed-bf16" and _method_name(plan) not in CAST_METHODS),
        (f"optimizer {t.optimizer}", t.optimizer not in ("adamw", "adamw-fused", "sgd")),
        ("qlora", plan.settings.method == "qlora")) if bad]
    if unsupported:
        raise CombinationError(f"the DeepSpeed ZeRO model does not cover {unsupported[0]} yet (zero1 and zero2, "
                               "fp32, or mixed-bf16 for full fine-tuning, LoRA, IA3 and bottleneck adapters, AdamW, "
                               "fused AdamW or SGD are)", names=("sharding",))
    if gradient_free(plan):
        raise CombinationError("DeepSpeed ZeRO needs a gradient for every trainable parameter; "
                               f"{sorted(gradient_free(plan))[0]} gets none", names=("sharding",))
    zero_events(plan, t, 0)  # several buckets: what zero_buckets does not model is refused there


def _method_name(plan: Plan) -> str:
    return "dora" if plan.settings.method == "lora" and plan.settings.dora else plan.settings.method


def zero_layout(plan: Plan, t: TrainingSettings, rank: int) -> ZeroLayout:
    """The flat buffer (stage_1_and_2.py ``flatten_dense_tensors_aligned``), the partitions
    (``get_data_parallel_partitions``) and the parameters overlapping rank `rank`'s (``params_in_partition``,
    ``copy_grads_in_partition``'s total_size)."""
    weight_dtype = "bfloat16" if t.precision == "mixed-bf16" else stream_dtypes(plan, t)[0]
    sizes = [g.numel for g in plan.groups if g.trainable]
    cast = t.precision == "mixed-bf16"  # the engine's cast (zero_events), adapters included
    nbytes = {DTYPE_BYTES[group_dtype(plan, g.origin, weight_dtype, g.name, cast)] for g in plan.groups if g.trainable}
    total = sum(sizes)
    padded = ceil(total / (ALIGNMENT * t.gpus)) * ALIGNMENT * t.gpus
    partition = padded // t.gpus
    lo, hi = rank * partition, (rank + 1) * partition
    start = in_partition = largest = pieces = 0
    for n in sizes:
        if start < hi and start + n > lo:
            in_partition += n
            pieces += 1
            largest = max(largest, min(hi, start + n) - max(lo, start))
        start += n
    pieces += 1 if hi > total else 0  # the last partition's padding (``flatten_dense_tensors_aligned``)
    return ZeroLayout(total, padded, partition, in_partition, max(nbytes, default=4), largest, pieces)


def _states(layout: ZeroLayout, t: TrainingSettings) -> int:
    """The client optimizer's states over the fp32 partition: AdamW's exp_avg and exp_avg_sq and its step
    (torch/optim/adamw.py ``_init_group``: a 4-byte tensor on the cpu device, on the partition's device when
    fused), SGD's momentum buffer."""
    if t.optimizer in ("adamw", "adamw-fused"):
        return 2 * 4 * layout.partition + (4 if t.device == "cpu" or t.optimizer == "adamw-fused" else 0)
    return 4 * layout.partition


def zero_events(plan: Plan, t: TrainingSettings, rank: int = 0) -> list:
    """The step's events on `rank` as (phase, bytes, parts), the one-GPU events rewritten (module docstring;
    several buckets: peftcalc.sharding.zero_buckets). Under gradient accumulation micro-batch 1's events, then
    those of micro-batches 2..N, the optimizer's last: ZeRO-2 reduces every micro-batch into grads_in_partition,
    which is held from micro-batch 2 on (traced: every later event is micro-batch 1's plus it); ZeRO-1 reduces at
    the boundary only (engine.py ``allreduce_gradients``), so autograd's gradients accumulate as on one GPU
    (peftcalc.memory.accumulating_step_events) and the bucket micro-batch 1's first hook made stays."""
    # bf16.enabled: the engine casts every parameter to bf16, peft's adapters included (engine.py
    # ``_cast_module_mixed_precision``), so the step computes as a bf16 model whose adapters are bf16 too
    # (peftcalc.sim.profile.engine_cast: precision bf16 under the ZeRO sharding)
    one_gpu = replace(t, gpus=1, gpus_per_node=8, offload="none", max_grad_norm=None, grad_accum=1, trainer_loop=False,
                      precision="bf16" if t.precision == "mixed-bf16" else t.precision)
    first = _micro_batch_events(plan, t, one_gpu, rank, step_events(plan, one_gpu), boundary=t.grad_accum == 1)
    if t.grad_accum == 1:
        return first
    k = next(i for i, (name, _, _) in enumerate(first) if name.startswith("optimizer"))
    if t.sharding == "zero2":
        partition = zero_layout(plan, t, rank).in_partition * zero_layout(plan, t, rank).nbytes
        later = [_event(n, dict(p, gradient_partition=partition)) for n, _, p in first[:k]]
    else:
        later = _micro_batch_events(plan, t, one_gpu, rank, accumulating_step_events(plan, replace(one_gpu, grad_accum=2)),
                                    boundary=True, bucket_live=True)
    return first[:k] + later + first[k:]


def _micro_batch_events(plan: Plan, t: TrainingSettings, one_gpu: TrainingSettings, rank: int, one_gpu_events,
                        boundary: bool, bucket_live: bool = False) -> list:
    """One micro-batch's events (and the optimizer step's, for the events of a whole step) rewritten for `rank`.
    boundary: ZeRO-1's reduce_gradients runs after it; bucket_live: the bucket exists from its start (ZeRO-1's
    micro-batches after the first)."""
    layout = zero_layout(plan, t, rank)
    stage2 = t.sharding == "zero2"
    act = activation_profile(plan, one_gpu)
    arrival = gradient_arrival(plan, one_gpu)
    bucket = REDUCE_BUCKET_SIZE * layout.nbytes
    records = {}

    def record(i):
        if i not in records:
            records[i] = _block_record(plan, one_gpu, act, i)
        return records[i]

    schedule = bucket_schedule(plan, one_gpu, layout, rank, stage2, arrival,
                               lambda i: block_param_steps(record(i)[0]), REDUCE_BUCKET_SIZE)
    partition = layout.in_partition * layout.nbytes
    states = _states(layout, t)
    master = 4 * layout.partition
    backward_scalars = BACKWARD_SCALARS - (GAS_SCALED_LOSS if t.trainer_loop else 0)
    events = []
    bucket_made = bucket_live
    held_partition = 0  # grads_in_partition once a flush before the epilogue has made it
    for name, _, parts in one_gpu_events:
        p = dict(parts, weights_trainable=layout.padded * layout.nbytes, master_weights=master)
        p["optimizer_states"] = states
        p["temporaries"] = p.get("temporaries", 0) + NORM_SCALAR + (backward_scalars if name.startswith("backward") else 0)
        if bucket_live and not name.startswith("optimizer"):
            p["gradient_buckets"] = bucket
        if held_partition and name.startswith("backward"):
            p["gradient_partition"] = held_partition
        if name == "backward:head" and arrival.head and not bucket_live:
            # the head's gradient made, the loss's buffers gone, then the bucket for it (its first gradient)
            events.append(_event(name, p))
            name, p = "backward:bucket", dict(p, logits_loss=act.loss_scalars, gradient_buckets=bucket)
            bucket_made = True
        elif name.startswith("backward:layer") and not bucket_made and not arrival.head:
            # the block whose backward makes the first gradient (LoRA's top block): the bucket from then on
            i = int(name.removeprefix("backward:layer"))
            p.update(_first_gradient_block(plan, one_gpu, act, arrival, i, bucket, stage2, dict(p)))
            bucket_made = True
        elif name.startswith("backward:layer") or name == "backward:end":
            p["gradient_buckets"] = bucket
            if stage2:  # every gradient so far copied into the bucket and autograd's freed; at the embeddings'
                # backward theirs is made and not yet copied
                p["gradients"] = arrival.input_side if name == "backward:end" else 0
        elif name == "optimizer":
            p["gradients"] = 0
            p["gradient_partition"] = partition
            p["temporaries"] = _step_temporaries(layout, t) + NORM_SCALAR + (TRAINER_LOSS if t.trainer_loop else 0)
            p.pop("_other", None)
        events.append(_event(name, p))
        for f in schedule.flushes:
            if stage2 and ((f.where == "layer" and name == f"backward:layer{f.layer}") or (f.where == "end" and name == "backward:end")):
                events.append(_flush_event(plan, p, f, layout, act, record, one_gpu, held_partition))
                held_partition = partition if _allocates(schedule, f) else held_partition
        if name == "backward:end" and (stage2 or boundary):
            gas = 0 if t.trainer_loop else GAS_SCALED_LOSS
            for f in schedule.flushes if not stage2 else ():
                events.append(_reduce_event(p, layout, bucket, act.loss_scalars, f.elements, f.held,
                                            partition if f.partition_before else 0, gas))
            events.append(_reduce_event(p, layout, bucket, act.loss_scalars, schedule.last, 0,
                                        partition if schedule.partition_before_epilogue else 0, gas))
    return events


def _allocates(schedule, f) -> bool:
    """Whether flush `f` makes grads_in_partition: the next flush (or the epilogue) finds it made."""
    later = schedule.flushes[schedule.flushes.index(f) + 1:]
    return later[0].partition_before if later else schedule.partition_before_epilogue


def _flush_event(plan: Plan, p: dict, f, layout: ZeroLayout, act, record, t: TrainingSettings,
                 held_partition: int) -> tuple:
    """A ZeRO-2 flush in backward (zero_buckets): in block f.layer at its f.step-th gradient's hook (the block's
    replay up to it: zero_buckets.flush_state) or at the input side's hook (the end of backward's state), with
    the flattened bucket and the overflowing gradient, not yet copied."""
    from peftcalc.sharding.zero_buckets import flush_state

    q = dict(p)
    flat = f.elements * layout.nbytes
    if f.where == "layer":
        nodes, saved, incoming = record(f.layer)
        state = flush_state(nodes, saved, incoming, f.step, in_place=t.device == "cuda")
        block = act.blocks[f.layer].backward
        q["activations"] = p["activations"] - block.saved + state.saved
        q["temporaries"] = p["temporaries"] - block.buffers + state.buffers + flat
        q["gradients"] = f.held
    else:  # the input side's hook: the lookup's backward has returned, so its incoming gradient is gone; a tied
        # embedding's two addends are summed into its .grad (memory.tied_embedding_addends), which is held
        addends = tied_embedding_addends(plan, t)
        gone = addends or t.batch_size * t.seq_len * plan.spec.hidden_size * DTYPE_BYTES[t.compute_dtype]
        q["temporaries"] = p["temporaries"] - gone + flat
        q["gradients"] = addends // 2 + p.get("gradients", 0)
    if held_partition:
        q["gradient_partition"] = held_partition
    return _event("backward:flush", q)


def _block_record(plan: Plan, t: TrainingSettings, act, i: int) -> tuple:
    """Block `i`'s autograd nodes as the forward simulator records them (peftcalc.sim.blocks.simulate_block),
    its saved bytes and the gradient it receives: (nodes, saved_bytes, incoming)."""
    from peftcalc.families import build_layout, family
    from peftcalc.methods.sites import BlockSites, distinct_layer_trainings
    from peftcalc.ops.recorder import Recorder
    from peftcalc.sim.profile import make_ctx

    spec = plan.spec
    ctx = make_ctx(spec, plan, t)
    trainings, kinds = distinct_layer_trainings(plan, build_layout(spec))
    below = act.blocks[i - 1] if i else None
    rec = Recorder(ctx, bucket=0)
    x = rec.new(ctx.tokens * spec.hidden_size, below.out_dtype if below else ctx.weight_dtype,
                below.out_rg if below else True)
    out = family(spec).block(rec, spec, BlockSites(spec, plan, trainings[kinds[i]]), x)
    return list(rec.nodes), rec.saved_bytes(), {out.id: out.nbytes} if out.requires_grad else {}


def _first_gradient_block(plan: Plan, t: TrainingSettings, act, arrival, i: int, bucket: int, stage2: bool,
                          parts: dict) -> dict:
    """Block `i`'s backward event when it makes the step's first gradient: its backward replayed
    (peftcalc.backward.run_backward over the block's recorded nodes, as peftcalc.sim.blocks.simulate_block
    replays it) with the bucket a buffer from its first parameter gradient on (stage_1_and_2.py
    ``setup_buckets`` runs in that gradient's hook), so the peak is the larger of the block's peak before it
    and its peak after it plus the bucket. ZeRO-2 moves each gradient into the bucket as it is made
    (autograd's is freed), so only ZeRO-1 keeps the block's gradients."""
    from peftcalc.backward import run_backward

    record, saved, incoming = _block_record(plan, t, act, i)
    nodes, placed = [], False
    for node in reversed(record):  # backward order: the bucket before the first parameter gradient
        steps = node[1]
        k = next((j for j, step in enumerate(steps) if step[0] == "param"), None)
        if k is not None and not placed:
            steps, placed = steps[:k] + (("pending", bucket),) + steps[k:], True
        nodes.append((node[0], steps) + tuple(node[2:]))
    replay = run_backward(list(reversed(nodes)), saved, incoming, in_place=t.device == "cuda")
    peak = replay.peak
    with_bucket = peak.buffers >= bucket
    below_saved = parts["activations"] - act.blocks[i].backward.saved
    return {"activations": below_saved + peak.saved,
            "gradients": 0 if stage2 else min(peak.params, arrival.per_layer[i]),
            "temporaries": parts["temporaries"] - act.blocks[i].backward.buffers + peak.buffers - (bucket if with_bucket else 0),
            "gradient_buckets": bucket if with_bucket else 0}


def _step_temporaries(layout: ZeroLayout, t: TrainingSettings) -> int:
    """What the step adds beside grads_in_partition at its fullest (stage_1_and_2.py ``step``): the norm's fp64
    copy of the partition's gradients (``get_grad_norm_direct``: ``g.data.to(get_norm_dtype())`` for each of
    ``averaged_gradients``, the parameters' overlaps with the partition: the whole partition when one parameter
    covers it, whose ``flatten`` is then a view); with several pieces or with bf16 gradients their fp32 copy for the
    partition (``single_partition_of_fp32_groups[i].grad``, made after the norm; grads_in_partition is released
    before the optimizer runs: ``free_grad_in_param_list``), beside AdamW's single-tensor temporaries
    (denominator and step, two fp32 partitions)."""
    p = layout.partition
    if t.optimizer == "adamw-fused":
        return _fused_step_temporaries(layout)
    adam = 2 * 4 * p if t.optimizer == "adamw" else 0
    scalars = ADAMW_STEP_SCALARS if t.optimizer == "adamw" else 0
    if layout.nbytes == 4 and layout.pieces == 1:  # the fp32 gradients are the partition's gradient (``flatten`` of
        # one piece: a view of grads_in_partition)
        return max(8 * p, adam) + scalars
    # several pieces: the norm's fp64 copy is one piece's at a time; the flattened partition (a copy, and its fp32
    # copy for bf16 gradients) is the fp32 gradient, and grads_in_partition is released before the optimizer runs
    flat = layout.nbytes * p + (4 * p if layout.nbytes != 4 else 0)
    return max(8 * layout.largest_piece, flat, 4 * p + adam - layout.in_partition * layout.nbytes) + scalars


def _fused_step_temporaries(layout: ZeroLayout) -> int:
    """The step's temporaries under fused AdamW (torch/optim/adamw.py ``_fused_adamw``: one kernel over the
    fp32 partition, no temporaries of its own), beside grads_in_partition: the larger of the norm's fp64 copy
    of one gradient piece at a time (``get_grad_norm_direct``: ``g.data.to(get_norm_dtype())`` for each of
    ``averaged_gradients``, the parameters' overlaps with the partition) and the flattened partition
    (``self.flatten(self.averaged_gradients[i])``, in the gradients' dtype) with, for bf16 gradients, its fp32
    copy (``.to(single_partition_of_fp32_groups[i].dtype)``), made before the flat one is deleted; plus two
    4-byte scalars of the norm (traced)."""
    p = layout.partition
    flat = layout.nbytes * p + (4 * p if layout.nbytes != 4 else 0)
    return max(8 * layout.largest_piece, flat) + 8


def _reduce_event(end: dict, layout: ZeroLayout, bucket: int, loss_scalars: int, elements: int, held: int = 0,
                  partition: int = 0, gas: int = GAS_SCALED_LOSS) -> tuple:
    """A flush after autograd's backward (engine.py ``backward`` runs ``average_tensor`` once it returns: the
    epilogue, and under ZeRO-1 ``reduce_gradients``' flushes before it, zero_buckets): activations gone, the
    bucket's `elements` gradients flattened beside the bucket, autograd's gradients not yet copied (`held`),
    grads_in_partition when an earlier flush made it; the loss the training loop holds and the engine's loss
    divided by the accumulation steps (``_scale_loss_by_gas``, 4 bytes) still live."""
    p = {k: v for k, v in end.items() if k in ("weights_frozen", "weights_trainable", "buffers", "inputs",
                                                  "optimizer_states", "master_weights")}
    p.update(gradient_buckets=bucket, logits_loss=loss_scalars, gradients=held, gradient_partition=partition,
             temporaries=elements * layout.nbytes + NORM_SCALAR + gas)
    return _event("backward:reduce", p)


def _event(name: str, parts: dict) -> tuple:
    """An event with autograd's gradients named as the data-parallel buffers they are under ZeRO: full
    gradients not yet in the bucket or the partition (``unsharded_gradients``, as FSDP2's before their
    reduce-scatter); no parameter keeps a ``.grad`` past backward."""
    parts = dict(parts)
    held = parts.pop("gradients", 0)
    if held:
        parts["unsharded_gradients"] = held
    return name, sum(parts.values()), parts
