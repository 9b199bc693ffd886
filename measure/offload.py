"""Activation offloading as ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` runs it (torch/autograd/graph.py),
the semantics peftcalc models for ``offload_activations``, with the host bytes counted.

save_on_cpu is a ``saved_tensors_hooks`` pair around the forward (the loss included; backward runs outside it,
as in its docstring's example and in torchtune's and TRL's recipes). Its pack hook runs for every tensor autograd
saves, parameters and views of them included (``torch.empty(tensor.size(), dtype, layout, pin_memory=True)``, then
``copy_(tensor, non_blocking=True)``: a contiguous host copy of the saved tensor's own size, one per saved
variable, so a tensor two nodes save is copied twice), and the device tensor is freed once nothing else holds it.
Its unpack hook, ``tensor.to(device, non_blocking=True)``, makes a new device copy each time a node unpacks the
saved variable in backward; it lives while the backward formula holds it. Under torch.utils.checkpoint
(non-reentrant) the checkpoint's own hooks are the innermost inside a checkpointed block, so only what autograd
saves outside the blocks, and the checkpoints' inputs (``_NoopSaveInputs``'s save_for_backward, or reentrant
``CheckpointFunction``'s), go to the host; the recompute unpacks its inputs through save_on_cpu's hook.

torchtune's ``OffloadActivations`` (training/_activation_offload.py; TRL's models/activation_offloading.py is its
copy, used by ``activation_offloading=True``) differs: it keeps on the device what is smaller than 1024 bytes, the
parameters, and a storage it has already offloaded (and keeps up to 5 offloaded tensors alive on a second CUDA
stream until their copy is done), and offloads nothing on a CPU device. peftcalc models save_on_cpu.

On ``cuda`` :class:`HostOffload` is save_on_cpu itself (pinned host copies outside the caching allocator). On
``cpu``/``fake`` the device is its own host, so the copies are made with the tracer paused (not device memory,
counted as host bytes) and the unpack makes the copy ``.to(device)`` would make on a GPU, traced.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

__all__ = ["HostOffload"]


class HostOffload:
    """save_on_cpu(pin_memory=True)'s hooks, counting the bytes of the host copies alive (`live`) and their
    largest sum since :meth:`reset_peak` (`peak`)."""

    def __init__(self, tracer=None, own_host: bool = False) -> None:
        self.tracer = tracer  # the StorageTracer to keep the host copies from (None: the CUDA allocator's run)
        self.own_host = own_host  # cpu / fake: the device is its own host
        self.pin = not own_host and torch.cuda.is_available()
        self.live = 0
        self.peak = 0
        self.copies = 0  # host copies made since reset_peak

    def reset_peak(self) -> None:
        self.peak, self.copies = self.live, 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        """save_on_cpu's pack_to_cpu: a host tensor of the saved tensor's size, dtype and layout, the data copied."""
        paused = self.tracer.paused() if self.tracer is not None else contextlib.nullcontext()
        with paused:
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=self.pin)
            packed.copy_(tensor, non_blocking=self.pin)
        self._count(packed)
        return tensor.device, packed

    def unpack(self, packed) -> torch.Tensor:
        """save_on_cpu's unpack_from_cpu: ``tensor.to(device, non_blocking=True)``, a new device tensor; on a
        device that is its own host, the copy it would be on a GPU (an activation of the backward)."""
        device, tensor = packed
        copy = tensor.clone() if self.own_host else tensor.to(device, non_blocking=self.pin)
        if self.tracer is not None:
            self.tracer.mark(copy, "activations")
        return copy

    def _count(self, packed: torch.Tensor) -> None:
        nbytes = packed.untyped_storage().nbytes()
        self.live += nbytes
        self.copies += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(packed.untyped_storage(), self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes
