"""Bytes one rank sends per step in its collectives, and how long they take.

Ring collectives (NCCL's ring algorithm; Patarasuk and Yuan 2009): over N ranks an all-gather or a
reduce-scatter of a buffer of B bytes has each rank send (N - 1) / N x B, an all-reduce twice that.

- FSDP2 (peftcalc.sharding.fsdp): one all-gather of each group's padded all-gather output in forward and, when
  the group is resharded after forward, another in backward; one reduce-scatter of its reduce-scatter
  input in backward; under grad_accum, in every micro-batch. HSDP: those within the shard group of
  gpus_per_node ranks, and an all-reduce of the reduce-scatter output across the replicas.
- DDP (peftcalc.sharding.ddp): one all-reduce of every bucket (the trainable parameters' gradient bytes).
- ZeRO-1/2 (peftcalc.sharding.zero): the flat gradients reduced to their partitions' owners (a reduce-scatter's
  bytes, stage_1_and_2.py ``average_tensor``) and the updated flat buffer all-gathered after the step
  (``all_gather_dp_groups``).
- ZeRO-3 (peftcalc.sharding.zero3): the trainable parameters' gradients reduce-scattered from the bucket, each
  padded to whole partitions (stage3.py ``__avg_scatter_grads`` -> ``reduce_scatter_coalesced``), and every
  parameter, frozen ones too, all-gathered. The parameters it models are all persistent (at most stage3_param_persistence_threshold
  elements), gathered once a step, after the optimizer (``_post_step``), and whole through forward and backward;
  larger ones, which ZeRO-3 all-gathers in forward and again in backward, are refused.

Time: the bytes over the card's one-way bandwidth per GPU, NVLink (or PCIe) inside a node when the job fits
in one (gpus <= gpus_per_node), else the inter-node network (peftcalc/data/gpus.json: intra_node_gbps,
inter_node_gbps). Overlap rule: both engines issue their collectives while compute runs (FSDP2 prefetches
the next group's all-gather and reduce-scatters on a side stream; DDP all-reduces each bucket as soon as
its gradients are ready), so a step takes the longer of its compute and its communication.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.plan import Plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding.ddp import bucket_bytes
from peftcalc.sharding.fsdp import group_bytes, shard_world
from peftcalc.sharding.zero import zero_layout
from peftcalc.sharding.zero3 import padded_gradients, zero3_layout

__all__ = ["Communication", "communication", "step_seconds_with_comm"]


@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends in one step, by collective."""

    all_gather: int = 0
    reduce_scatter: int = 0
    all_reduce: int = 0

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter + self.all_reduce


def communication(plan: Plan, t: TrainingSettings) -> Communication:
    """The bytes rank 0 sends per step (module docstring); nothing on one GPU."""
    n = t.gpus
    if n == 1 or t.sharding == "none":
        return Communication()
    if t.sharding == "ddp":
        return Communication(all_reduce=2 * (n - 1) * bucket_bytes(plan, t) // n)
    if t.sharding in ("zero1", "zero2"):
        flat = zero_layout(plan, t, 0)
        return Communication(all_gather=(n - 1) * flat.padded * flat.nbytes // n,
                             reduce_scatter=(n - 1) * flat.padded * flat.nbytes // n)
    if t.sharding == "zero3":
        layout = zero3_layout(plan, t)
        return Communication(all_gather=(n - 1) * layout.gathered_bytes // n,
                             reduce_scatter=(n - 1) * padded_gradients(layout, t) // n)
    shard = shard_world(t)
    replicas = n // shard
    groups = group_bytes(plan, t, shard, 0).values()
    gathers = 2 if t.reshard_after_forward else 1
    micro = t.grad_accum  # every micro-batch gathers and reduce-scatters (peftcalc.sharding.fsdp._accumulated)
    return Communication(all_gather=micro * gathers * (shard - 1) * sum(g.all_gather for g in groups) // shard,
                         reduce_scatter=micro * (shard - 1) * sum(g.reduce_scatter for g in groups) // shard,
                         all_reduce=micro * 2 * (replicas - 1) * sum(g.sharded_grads for g in groups) // replicas)


def step_seconds_with_comm(compute_seconds: float, comm: Communication, gpu, t: TrainingSettings) -> tuple[float, float]:
    """(step seconds, communication seconds): the longer of compute and communication (module docstring)."""
    gbps = gpu.intra_node_gbps if t.gpus <= t.gpus_per_node else gpu.inter_node_gbps
    comm_seconds = comm.total / (gbps * 1e9) if comm.total and gbps else 0.0
    return max(compute_seconds, comm_seconds), comm_seconds
