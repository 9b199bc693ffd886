"""How FSDP2 splits each parameter over the ranks, in bytes per rank and per parameter group (a block that
got its own ``fully_shard``, or the root with everything else).

torch/distributed/fsdp/_fully_shard/_fsdp_param.py ``FSDPParam._init_sharded_param``: a parameter of dim 0
``d0`` is cut with ``torch.chunk`` into chunks of ``c = ceil(d0 / N)`` rows (the last ones shorter or empty,
``_chunk_with_empty``); every rank stores a zero-padded ``c x rest`` buffer (``_sharded_param_data``) and
its parameter is a view of its own rows (``padded_sharded_param[:length]``), so the local tensor - what
``zeros_like`` gives the optimizer's states - has ``min(c, max(0, d0 - r c))`` rows on rank r.
_fsdp_collectives.py ``foreach_all_gather``: one flat all-gather output of N times the group's padded
shards; ``foreach_reduce``: one flat reduce-scatter input of the gradients padded to ``c N`` rows
(``_get_dim0_padded_size``) in the reduce dtype, and an output of its N-th part, which the sharded
gradients are views of (``torch.as_strided(reduce_output, ...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

__all__ = ["GroupBytes", "dim0", "local_rows", "padded_rows"]


def dim0(shape: tuple, numel: int) -> tuple[int, int]:
    """(dim 0, elements per dim-0 row) of a parameter."""
    if not shape:
        return numel, 1
    return shape[0], numel // shape[0] if shape[0] else 0


def padded_rows(d0: int, world: int) -> int:
    """Rows of every rank's padded shard: ceil(d0 / world)."""
    return ceil(d0 / world)


def local_rows(d0: int, world: int, rank: int) -> int:
    """Rows of rank `rank`'s unpadded shard (torch.chunk of d0 rows into `world` chunks)."""
    c = padded_rows(d0, world)
    return max(0, min(c, d0 - rank * c))


@dataclass
class GroupBytes:
    """One parameter group's bytes on one rank."""

    sharded_frozen: int = 0  # padded shards of frozen parameters
    sharded_trainable: int = 0  # padded shards of trainable parameters
    unsharded: int = 0  # the unsharded parameters: views of padded (c N rows) buffers, FSDPParam.all_gather_outputs
    all_gather: int = 0  # the flat all-gather output: world x padded shards (all-gather dtype)
    unsharded_grads: int = 0  # autograd's full gradients of the trainable parameters
    sharded_grads: int = 0  # the reduce-scatter output: padded shards of the gradients (reduce dtype)
    reduce_scatter: int = 0  # the flat reduce-scatter input: world x padded shards (reduce dtype)
    optimizer_numel: tuple = ()  # (local numel, storage dtype bytes) of each trainable parameter on this rank
