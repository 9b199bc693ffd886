"""Live-storage tracing: what `torch.cuda.max_memory_allocated` would count, on any device.

:class:`StorageTracer` is a ``TorchDispatchMode`` (``torch.utils._python_dispatch``). Every tensor an
op returns is keyed by its *storage* (``untyped_storage()``; views share it, so they are counted
once) and its ``nbytes`` are added to the live total; a ``weakref`` finalizer on the storage object
subtracts them when the storage is freed. This is the bookkeeping of
``torch.distributed._tools.mem_tracker.MemTracker``, reduced to what a training step needs, and it
works the same for real tensors and for ``FakeTensorMode`` tensors (fake storages report the
``nbytes`` the real ones would have).

Every storage gets a record (bytes, producing op, phase, category, birth and death sequence
numbers), so what was live at any moment - in particular at a peak - is computed afterwards with
the categories as they were finally decided:

==================  ====================================================================
parameters          parameters and buffers of the model (registered before tracing), and
                    bitsandbytes quantization state (absmax, code tables)
gradients           ``.grad`` of parameters (marked after backward)
optimizer_state     tensors held in ``optimizer.state`` (marked after the optimizer step)
inputs              the batch (input ids, labels, pixel values)
activations         tensors autograd saved for backward
                    (``torch.autograd.graph.saved_tensors_hooks`` pack hook), and the tensors a
                    gradient checkpoint's recompute saves (into its frame, or, reentrant, into
                    the graph it rebuilds: ``recomputing()``)
other               everything else: temporaries, model outputs, the loss
==================  ====================================================================

Known differences from the CUDA caching allocator: no rounding to 512-byte blocks, no cuBLAS/cuDNN
workspaces, and buffers an op allocates and frees *inside* its kernel are not seen (only op
outputs are).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CATEGORIES", "REGISTERED", "FakeScalars", "PhaseStats", "StorageRecord", "StorageTracer",
    "gradient_tensors", "model_state_tensors", "optimizer_state_tensors", "placeholder_scalar",
]

CATEGORIES = ("parameters", "gradients", "optimizer_state", "inputs", "activations", "other")
# A storage marked twice keeps the stronger category (a weight saved for backward stays a parameter).
_PRIORITY = {name: rank for rank, name in enumerate(reversed(CATEGORIES))}
REGISTERED = "<registered>"


@dataclass
class StorageRecord:
    """One storage the tracer has seen."""

    nbytes: int
    op: str
    phase: str
    category: str
    born: int
    died: int | None = None
    shape: tuple = ()
    dtype: str = ""

    def live_at(self, seq: int) -> bool:
        return self.born <= seq and (self.died is None or self.died > seq)


@dataclass
class PhaseStats:
    """Live bytes at the start and end of a phase, and its peak, with the event numbers of the peak
    and of the end (for :meth:`StorageTracer.breakdown`)."""

    name: str
    start_bytes: int
    end_bytes: int = 0
    peak_bytes: int = 0
    peak_seq: int = 0
    end_seq: int = 0


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def placeholder_scalar(t: torch.Tensor):
    """A stand-in for ``t.item()`` on a fake tensor, which has no value
    (``FakeTensor`` raises ``DataDependentOutputException`` on ``aten._local_scalar_dense``).
    Used where only control flow depends on the value, never an allocation size: Adafactor's
    ``max(eps, RMS)``, bitsandbytes' ``create_dynamic_map().tolist()``."""
    if t.dtype == torch.bool:
        return False
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return 1.0
    return 1


class FakeScalars(TorchDispatchMode):
    """Answers ``.item()``/``.tolist()`` on fake tensors with :func:`placeholder_scalar`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return placeholder_scalar(args[0])
        return func(*args, **kwargs)


class StorageTracer(FakeScalars):
    """Counts the bytes of every live tensor storage; see the module docstring.

    Use as a context manager around the traced code. Inside, ``phase(name)`` labels allocations,
    ``reset_peak()`` starts a new peak (like ``torch.cuda.reset_peak_memory_stats``), and
    ``saving()`` marks the tensors autograd saves as activations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, StorageRecord] = {}  # live storages, by StorageImpl address
        self.history: list[StorageRecord] = []  # every storage ever seen, live or dead
        self._refs: dict[int, weakref.ref] = {}
        self._lock = threading.RLock()
        self.seq = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_seq = 0
        self.current_phase = "setup"
        self.phases: list[PhaseStats] = []
        self._phase: PhaseStats | None = None
        self._paused = 0

    # -- storage bookkeeping ------------------------------------------------------------------

    def track(self, t: torch.Tensor, op: str, category: str = "other") -> StorageRecord | None:
        """Count `t`'s storage if it is new (or re-size it if it grew); returns its record."""
        storage = t.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        with self._lock:
            record = self.records.get(key)
            if record is not None:
                if record.nbytes != nbytes:  # resize_ / set_ changed an existing storage
                    self._add(nbytes - record.nbytes)
                    record.nbytes = nbytes
                return record
            if nbytes == 0:
                return None
            record = StorageRecord(nbytes, op, self.current_phase, category, self.seq + 1,
                                   shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""))
            self.records[key] = record
            self.history.append(record)
            self._refs[key] = weakref.ref(storage, self._finalizer(key, record))
            self._add(nbytes)
            return record

    def _finalizer(self, key: int, record: StorageRecord):
        def freed(_ref) -> None:
            with self._lock:
                if self.records.get(key) is record:
                    del self.records[key]
                    del self._refs[key]
                    self._add(-record.nbytes)
                    record.died = self.seq

        return freed

    def _add(self, delta: int) -> None:
        self.seq += 1
        self.live_bytes += delta
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_seq = self.live_bytes, self.seq
        phase = self._phase
        if phase is not None and self.live_bytes > phase.peak_bytes:
            phase.peak_bytes, phase.peak_seq = self.live_bytes, self.seq

    def mark(self, tensors, category: str) -> None:
        """Give the storages of `tensors` (any pytree) `category`, unless they already have a
        stronger one (see CATEGORIES); untracked storages are registered on the way."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}")
        for t in tree_flatten(tensors)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            record = self.track(t, REGISTERED, category)
            if record is not None and _PRIORITY[category] > _PRIORITY[record.category]:
                record.category = category

    # -- dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops.prim.device.default:  # fake tensors route `.device` through dispatch
            return out
        if self._paused:  # host memory (measure.offload): not the device's
            return out
        name = str(getattr(func, "overloadpacket", func))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, name)
        return out

    # -- peaks and phases -------------------------------------------------------------------

    def reset_peak(self) -> None:
        """Like ``torch.cuda.reset_peak_memory_stats``: the peak restarts from what is live now."""
        with self._lock:
            self.peak_bytes, self.peak_seq = self.live_bytes, self.seq

    @contextlib.contextmanager
    def phase(self, name: str):
        """Label allocations with `name` and record the phase's start, end and peak."""
        with self._lock:
            stats = PhaseStats(name, self.live_bytes, peak_bytes=self.live_bytes, peak_seq=self.seq)
            previous, self._phase, self.current_phase = self.current_phase, stats, name
        try:
            yield stats
        finally:
            with self._lock:
                stats.end_bytes, stats.end_seq = self.live_bytes, self.seq
                self.phases.append(stats)
                self._phase, self.current_phase = None, previous

    @contextlib.contextmanager
    def paused(self):
        """Tensors made inside are not counted: what stands for host memory on a device that is its own host
        (measure.offload.HostOffload's copies, on cpu and fake)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def saving(self):
        """Mark every tensor autograd saves for backward as an activation
        (``torch.autograd.graph.saved_tensors_hooks``). The pack hook returns ``t.detach()``: the
        same storage, so what is kept alive is unchanged, but without ``t``'s ``grad_fn``. Returning
        ``t`` itself would make a reference cycle for every tensor a node saves of its own output
        (node -> packed tensor -> grad_fn -> node; torch/csrc/autograd/saved_variable.cpp saves an
        output without its grad_fn for that reason only when no hooks are set). Backward breaks the
        cycle when it releases the node's saved variables, but a node backward never runs keeps its
        saved tensors forever: peft's DoRA weight norm on a Conv1D layer (dora.py get_weight_norm
        of ``transpose(weight)``, an nn.Parameter that requires grad, later detached) leaked one
        weight-sized tensor per layer and step that way."""

        def pack(t):
            self.mark(t, "activations")
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    @contextlib.contextmanager
    def recomputing(self):
        """Mark the tensors torch.utils.checkpoint's non-reentrant recompute saves as activations.
        In backward, ``_checkpoint_hook.unpack_hook`` (torch/utils/checkpoint.py) reruns the block's
        forward under ``_recomputation_hook``, its own saved_tensors_hooks and the innermost, whose
        pack_hook stores each saved tensor in ``frame.recomputed`` until the backward node unpacks it:
        autograd holds them for backward exactly as the forward's saved tensors, but no hook of ours
        is active there (``saving()`` covers the forward; inside a checkpoint's forward
        ``_checkpoint_hook`` shadows it). The module global ``_recomputation_hook`` is looked up when
        the unpack hook runs, so while this context is active it is a subclass whose pack hook marks
        its tensor first.

        A reentrant checkpoint (``CheckpointFunction.backward``) reruns the block's forward under
        ``torch.enable_grad()`` with no hook of its own, so autograd saves into the recomputed graph as
        in any forward: ``saving()``'s hook, active through backward too, marks those tensors. Nothing
        else saves for backward during backward (the engine runs the nodes' formulas with grad mode off),
        and a non-reentrant recompute's own hooks are innermost, so it marks nothing else."""
        import torch.utils.checkpoint as checkpoint

        original = checkpoint._recomputation_hook
        tracer = self

        class _MarkingRecomputationHook(original):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                pack = self.pack_hook

                def marking_pack(x):
                    tracer.mark(x, "activations")
                    return pack(x)

                self.pack_hook = marking_pack

        checkpoint._recomputation_hook = _MarkingRecomputationHook
        try:
            with self.saving():
                yield
        finally:
            checkpoint._recomputation_hook = original

    # -- queries ----------------------------------------------------------------------------

    def live_records(self, seq: int) -> list[StorageRecord]:
        """The storages that were live right after event `seq`."""
        return [r for r in self.history if r.live_at(seq)]

    def breakdown(self, seq: int) -> dict[str, int]:
        """Live bytes by category right after event `seq` (categories as finally decided)."""
        totals = dict.fromkeys(CATEGORIES, 0)
        for r in self.live_records(seq):
            totals[r.category] += r.nbytes
        return totals

    def top_tensors(self, seq: int, k: int = 8) -> list[dict]:
        """The `k` largest storages live right after event `seq`, with the op that made them."""
        live = sorted(self.live_records(seq), key=lambda r: r.nbytes, reverse=True)[:k]
        return [
            {"op": r.op, "bytes": r.nbytes, "category": r.category, "phase": r.phase,
             "shape": list(r.shape), "dtype": r.dtype}
            for r in live
        ]

    def top_ops(self, seq: int, k: int = 8) -> list[dict]:
        """Live bytes right after event `seq` grouped by (producing op, category, phase), largest first."""
        groups: dict[tuple, list[int]] = {}
        for r in self.live_records(seq):
            g = groups.setdefault((r.op, r.category, r.phase), [0, 0])
            g[0] += r.nbytes
            g[1] += 1
        ranked = sorted(groups.items(), key=lambda kv: kv[1][0], reverse=True)[:k]
        return [{"op": op, "category": cat, "phase": ph, "bytes": b, "count": n}
                for (op, cat, ph), (b, n) in ranked]


def model_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes quantization state (``weight.quant_state``: absmax,
    code, nested state2) of `model`."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors.extend(_quant_state_tensors(state))
    return tensors


def _quant_state_tensors(state) -> list[torch.Tensor]:
    found = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found.extend(_quant_state_tensors(nested))
    return found


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor held in ``optimizer.state`` (torch optimizers, bitsandbytes, Adafactor)."""
    return [t for state in optimizer.state.values() for t in tree_flatten(dict(state))[0]
            if isinstance(t, torch.Tensor)]


def gradient_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]
