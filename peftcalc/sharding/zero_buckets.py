"""Several reduce buckets under DeepSpeed ZeRO-1/2 (deepspeed 0.19.8 stage_1_and_2.py): where the bucket of
reduce_bucket_size elements is flushed before it is full, and what each flush holds.

``reduce_independent_p_g_buckets_and_remove_grads`` (a parameter's gradient hook under ZeRO-2; under ZeRO-1
``reduce_gradients`` after backward, over the parameters in their group's order) flushes the bucket when
``bucket.elements + param.numel() > reduce_bucket_size``: ``reduce_ipg_grads`` -> ``average_tensor`` ->
``allreduce_and_scatter`` flattens the bucket's gradients (``allreduce_bucket``: one copy of its elements in
the gradients' dtype, freed when it returns), then ``copy_grads_in_partition`` copies the parameters that
overlap the rank's partition into ``grads_in_partition`` (allocated, partition-sized, by the first such copy, and
kept to the step), and the bucket starts again from its first element with the gradient of the parameter that
overflowed it. Under ZeRO-2 the flush runs in that parameter's hook, right after the backward node that made
its gradient; under ZeRO-1 autograd's gradients of the parameters not yet copied are still alive.

Modelled: the head's gradients (lm_head, final norm) in the first bucket, flushes inside blocks (the block's
backward replayed up to the hook: peftcalc.backward.run_backward) and at the input embedding's hook, without
gradient checkpointing; a parameter larger than the bucket (DeepSpeed's ``extra_large_param_to_reduce``) is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.errors import CombinationError
from peftcalc.plan import Plan
from peftcalc.settings import TrainingSettings

__all__ = ["Flush", "Schedule", "bucket_schedule", "flush_state"]

SENTINEL = 1 << 60  # a transient larger than any step's bytes: the replay's peak falls at the hook


@dataclass(frozen=True)
class Flush:
    """One flush of the reduce bucket before the epilogue."""

    where: str  # "layer" (ZeRO-2, in block `layer`'s backward), "end" (ZeRO-2, the input side's hook),
    # "reduce" (ZeRO-1, reduce_gradients after backward)
    elements: int  # the bucket's elements flushed (flattened)
    layer: int = -1
    step: int = -1  # the block's parameter gradient (in backward order) whose hook flushes
    held: int = 0  # bytes of autograd's gradients alive at the flush (ZeRO-2: the overflowing one's; ZeRO-1: those
    # not yet copied into the bucket)
    partition_before: bool = False  # grads_in_partition already allocated by an earlier flush


@dataclass(frozen=True)
class Schedule:
    flushes: tuple  # Flush, in the order they run
    last: int  # elements the epilogue (reduce_ipg_grads after backward) flushes
    partition_before_epilogue: bool  # grads_in_partition allocated by a flush before the epilogue


def _regions(plan: Plan) -> list:
    """The trainable parameters in the flat buffer's order (model.parameters()) as (region, elements): region
    "input" before the first block, the block index, "head" after the last block."""
    out, seen_layer = [], False
    for g in plan.groups:
        if not g.trainable:
            continue
        if g.layer is not None:
            seen_layer = True
        out.append((g.layer if g.layer is not None else ("head" if seen_layer else "input"), g.numel))
    return out


def _touched(plan: Plan, lo: int, hi: int) -> frozenset:
    """The regions with a parameter overlapping the partition [lo, hi) (``params_in_partition``)."""
    start, hit = 0, set()
    for region, n in _regions(plan):
        if start < hi and start + n > lo:
            hit.add(region)
        start += n
    return frozenset(hit)


def block_param_steps(nodes) -> list:
    """Bytes of the parameter gradients a block's backward makes, in the order it makes them."""
    return [step[1] for node in reversed(nodes) for step in node[1] if step[0] == "param"]


def bucket_schedule(plan: Plan, t: TrainingSettings, layout, rank: int, stage2: bool, arrival, block_steps,
                    bucket_elements: int) -> Schedule:
    """The flushes of `rank`'s step (module docstring). `block_steps(i)`: block i's parameter gradient bytes in
    backward order; `arrival`: peftcalc.memory.GradientArrival of the one-GPU step."""
    if layout.trainable <= bucket_elements:
        return Schedule((), layout.trainable, False)
    if plan.spec.is_vision or plan.spec.is_vlm or plan.spec.task != "causal_lm":
        raise CombinationError("several ZeRO reduce buckets are modelled for causal language models only",
                               names=("sharding",))
    if t.grad_checkpointing:
        raise CombinationError("several ZeRO reduce buckets with gradient checkpointing are not modelled yet",
                               names=("sharding", "grad_checkpointing"))
    regions = _regions(plan)
    if max(n for _, n in regions) > bucket_elements:
        raise CombinationError("a parameter larger than the ZeRO reduce bucket (DeepSpeed's extra_large_param_to_reduce) "
                               "is not modelled yet", names=("sharding",))
    touched = _touched(plan, rank * layout.partition, (rank + 1) * layout.partition)
    nb = layout.nbytes
    if not stage2:
        return _reduce_gradients_schedule(regions, touched, nb, bucket_elements)
    if arrival.head_accumulated and not any(r == "head" for r, _ in regions):
        raise CombinationError("several ZeRO reduce buckets with the head's gradient on the input side are not "
                               "modelled yet", names=("sharding",))
    if sum(1 for r, _ in regions if r == "input") > 1 or not arrival.head_accumulated:
        raise CombinationError("several ZeRO reduce buckets with more than one input-side parameter or a frozen head "
                               "are not modelled yet", names=("sharding",))
    flushes, in_bucket = [], set()
    elements = arrival.head_accumulated // nb
    in_bucket.add("head")
    if elements > bucket_elements:
        raise CombinationError("a ZeRO reduce bucket flush among the head's gradients is not modelled yet",
                               names=("sharding",))
    allocated = False

    def flush(**kw):
        nonlocal elements, allocated
        flushes.append(Flush(elements=elements, partition_before=allocated, **kw))
        allocated = allocated or bool(in_bucket & touched)
        elements = 0
        in_bucket.clear()

    for i in reversed(range(plan.spec.num_layers)):
        if sum(block_steps(i)) != arrival.per_layer[i]:  # a block whose gradients are not one per parameter
            raise CombinationError(f"several ZeRO reduce buckets for {plan.spec.model_type}'s blocks are not modelled yet",
                                   names=("sharding",))
        for k, nbytes in enumerate(block_steps(i)):
            if elements + nbytes // nb > bucket_elements:
                flush(where="layer", layer=i, step=k, held=nbytes)
            elements += nbytes // nb
            in_bucket.add(i)
    end = (arrival.head_pending + arrival.input_side) // nb
    if elements + end > bucket_elements:
        flush(where="end", held=end * nb)
    in_bucket.add("input")
    return Schedule(tuple(flushes), elements + end, allocated)


def _reduce_gradients_schedule(regions: list, touched: frozenset, nb: int, bucket_elements: int) -> Schedule:
    """ZeRO-1: ``reduce_gradients`` walks the parameters in the flat buffer's order after backward; each copied
    into the bucket frees autograd's gradient (``grad_reduc.data`` becomes the bucket's view)."""
    flushes, elements, allocated, in_bucket = [], 0, False, set()
    remaining = sum(n for _, n in regions) * nb
    for region, n in regions:
        if elements + n > bucket_elements:
            flushes.append(Flush("reduce", elements, held=remaining, partition_before=allocated))
            allocated = allocated or bool(in_bucket & touched)
            elements, in_bucket = 0, set()
        elements += n
        remaining -= n * nb
        in_bucket.add(region)
    return Schedule(tuple(flushes), elements, allocated)


def flush_state(nodes, saved: dict, incoming: dict, step: int, in_place: bool):
    """Block state at the hook of its `step`-th parameter gradient: its backward replayed
    (peftcalc.backward.run_backward) with a SENTINEL-byte transient at the start of the first node that runs
    after the one making that gradient (the engine runs the gradient's AccumulateGrad node, and so the hook,
    as soon as that node has delivered its outputs). The BackwardPeak less the sentinel."""
    from peftcalc.backward import BackwardPeak, run_backward

    order = list(reversed(nodes))
    seen, ready, k = 0, set(incoming), None
    for j, node in enumerate(order):
        if k is not None and node[0] in ready:
            steps = (("new", "_hook", SENTINEL), ("free", "_hook")) + tuple(node[1])
            order[j] = (node[0], steps) + tuple(node[2:])
            break
        if node[0] in ready:
            ready.update(target for target, _ in node[2])
            for s in node[1]:
                if s[0] == "param":
                    if seen == step:
                        k = j
                    seen += 1
    else:
        raise CombinationError("a ZeRO reduce bucket flush at a block's last gradient is not modelled yet",
                               names=("sharding",))
    peak = run_backward(list(reversed(order)), saved, incoming, in_place=in_place).peak
    return BackwardPeak(peak.saved, peak.buffers - SENTINEL, peak.params)

