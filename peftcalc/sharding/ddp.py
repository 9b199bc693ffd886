"""DDP (torch.nn.parallel.DistributedDataParallel, defaults: bucket_cap_mb 25, gradient_as_bucket_view False)
on one rank: the one-GPU step plus the reducer's gradient buckets.

torch/csrc/distributed/c10d/reducer.cpp ``Reducer::initialize_buckets``: every parameter that requires grad
gets a slot in a flat bucket tensor of its dtype (buckets of at most bucket_cap_mb, the first of 1 MiB,
torch/nn/parallel/distributed.py ``_DEFAULT_FIRST_BUCKET_BYTES``); the buckets are allocated when DDP is
built and live as long as it does. Each gradient autograd makes is copied into its slot
(``mark_variable_ready_dense``) and, after the all-reduce, copied back into ``.grad`` in place
(``finalize_bucket_dense``), so the step holds the one-GPU step's bytes plus one gradient-sized buffer per
trainable parameter: sum over them of numel x dtype bytes, whatever the bucket boundaries.
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.errors import CombinationError
from peftcalc.memory import loop_events
from peftcalc.model_states import gradient_free, group_dtype
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.profile import stream_dtypes

__all__ = ["bucket_bytes", "check_ddp", "ddp_events"]


def check_ddp(plan: Plan, t: TrainingSettings) -> None:
    """CombinationError where DDP's defaults do not run: a trainable parameter the loss never reaches (DDP
    raises unless find_unused_parameters=True; a bare encoder's pooler), QLoRA's packed weights (not
    modelled yet)."""
    if gradient_free(plan):
        raise CombinationError("DDP (find_unused_parameters=False) needs every trainable parameter in the loss; "
                               f"{sorted(gradient_free(plan))[0]} is not", names=("sharding",))
    if plan.settings.method == "qlora":
        raise CombinationError("the DDP model does not cover qlora yet", names=("sharding",))


def bucket_bytes(plan: Plan, t: TrainingSettings) -> int:
    """The reducer's buckets: one slot per trainable parameter, in its dtype."""
    weight_dtype = stream_dtypes(plan, t)[0]
    return sum(g.numel * DTYPE_BYTES[group_dtype(plan, g.origin, weight_dtype, g.name)]
               for g in plan.groups if g.trainable)


def ddp_events(plan: Plan, t: TrainingSettings, rank: int = 0) -> list:
    """The one-GPU events of the whole loop (peftcalc.memory.loop_events: gradient accumulation, clipping, the
    outputs kept through backward) with the buckets added (the same on every rank). Under grad_accum the HF
    Trainer (accelerate ``Accelerator.accumulate``) runs every micro-batch but the last under
    ``DistributedDataParallel.no_sync``, where the reducer's autograd hooks do nothing (reducer.cpp
    ``autograd_hook``: ``expect_autograd_hooks_`` is false without ``prepare_for_backward``) and the
    gradients accumulate in ``.grad`` as on one GPU; the last micro-batch's hooks copy each accumulated
    ``.grad`` into its bucket slot, which exists all along: the same bytes at every event as a loop that
    reduces every micro-batch. max_grad_norm: ``clip_grad_norm_`` on the all-reduced ``.grad``, as on one GPU."""
    one_gpu = replace(t, gpus=1, gpus_per_node=8, sharding="none", reshard_after_forward=True, offload="none")
    buckets = bucket_bytes(plan, t)
    return [(name, total + buckets, dict(parts, gradient_buckets=buckets))
            for name, total, parts in loop_events(plan, one_gpu)[0]]
