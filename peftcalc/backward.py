"""Autograd's backward through one block (or the head), node by node: the live bytes inside it.

The forward simulator (peftcalc.activations) records, next to what each op saves, a :class:`Node`
for each autograd node the op creates: which gradient it consumes, what its backward formula
allocates and frees (torch ``tools/autograd/derivatives.yaml``, in the order the formulas run), which
gradients it hands on, and which saved tensors it holds. :func:`run_backward` replays the nodes the
way torch's engine runs them (torch/csrc/autograd/engine.cpp):

- nodes run in reverse order of creation (the ready queue is ordered by sequence number, and on one
  device every consumer of a tensor was created after it), once their output's gradient exists;
- a node's formula allocates its outputs (and temporaries, freed when it returns); the engine then
  checks its outputs (engine.cpp call_function: validate_outputs sums a gradient down to its input's
  shape where the input was broadcast, InputMetadata::reduce_grad); then the incoming gradient is
  dropped, then the node's saved tensors are released (``release_variables``), then each output is
  added to its target's input buffer. A checkpoint's recomputed tensors are released earlier: its
  unpack hook hands each one over and drops its own reference (torch/utils/checkpoint.py "Rule 4",
  ``holder.handles[gid] = None``), so the formula's unpacked locals hold the last one, freed when
  it returns, before validate_outputs;
- a parameter's gradient becomes its ``.grad`` as soon as it is made (AccumulateGrad steals it),
  unless the parameter is used again below (a head tied to the input embedding): then its
  AccumulateGrad node waits for that use's gradient too (engine.cpp ``Engine::evaluate_function``
  keeps the first one in the graph task's ``not_ready`` InputBuffer until every dependency has
  arrived), and until then the gradient is a buffer, not a ``.grad`` (a "pending" step);
- when a buffer already holds a gradient, the two are summed (``InputBuffer::accumulate``): in place
  into a tensor nobody else holds, unless a TorchDispatchMode is active (the harness's tracer on
  ``cpu``/``fake``: ``at::isTensorSubclassLike`` is then true for every tensor and the sum is out of
  place: a new buffer, then both addends are freed);
- pass-through formulas (add, views) hand on the incoming gradient itself, shared by every target.

Under gradient checkpointing (torch.utils.checkpoint, non-reentrant) a block's saved tensors do not
exist when its backward starts: the first node that unpacks a saved variable (an activation or a
parameter: ``_checkpoint_hook``'s unpack_hook) triggers the recompute of the block's forward, whose own
peak (`recompute`) is reached while the gradient buffers of that moment are alive; from then on every
recomputed saved tensor is held. A node that keeps its tensors outside save_for_backward (bitsandbytes
MatMul4Bit's ctx.tensors) unpacks nothing and runs before the recompute.

The peak of a replay is the largest sum of the saved tensors still held, the gradient buffers alive,
and the parameter gradients made so far. Tensors are counted once per storage, as a storage tracker
and ``max_memory_allocated`` count them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GRAD = "g"  # a program's name for the incoming gradient


@dataclass(frozen=True)
class Node:
    """One autograd node.

    steps: ("new", name, bytes) allocates a buffer, ("returned",) marks where the formula returns (the
    steps after it are the engine's validate_outputs, e.g. summing a gradient down to its broadcast
    input's shape; see the module docstring), ("param", bytes) makes a parameter's gradient,
    ("pending", bytes) a gradient of a parameter used again below, held in its AccumulateGrad node's
    input buffer past the end of the replay (see the module docstring), ("free", name) frees a buffer. outputs: (target id, buffer name) pairs, GRAD for the incoming
    gradient itself. saved: ids of the saved tensors the node holds. hold: the id of a later
    node's output until whose node has run the incoming gradient stays alive (0: none). unpacks:
    whether the node reads saved variables (activations in `saved`, or parameters)."""

    out: int
    steps: tuple = ()
    outputs: tuple = ()
    saved: tuple = ()
    hold: int = 0
    unpacks: bool = False


class _Storage:
    """A gradient buffer's storage: its bytes and how many buffers or formulas refer to it."""

    __slots__ = ("nbytes", "refs")

    def __init__(self, nbytes: int, refs: int = 1) -> None:
        self.nbytes, self.refs = nbytes, refs


@dataclass(frozen=True)
class BackwardPeak:
    """Bytes at the peak of a replay: saved tensors still held, gradient buffers (incoming, outgoing
    and temporaries), parameter gradients made since the replay started."""

    saved: int = 0
    buffers: int = 0
    params: int = 0

    @property
    def total(self) -> int:
        return self.saved + self.buffers + self.params


@dataclass(frozen=True)
class Replay:
    peak: BackwardPeak
    outgoing: tuple  # (id, bytes) of the gradient buffers left when the replay ends
    params: int  # parameter gradients made in the replay


@dataclass
class _Engine:
    saved_bytes: dict  # id -> bytes of each saved storage
    in_place: bool
    saved_refs: dict = field(default_factory=dict)
    saved_live: int = 0
    buffers: dict = field(default_factory=dict)  # target id -> _Storage
    live: int = 0
    params: int = 0
    peak: BackwardPeak = BackwardPeak()
    peak_total: int = 0
    holds: dict = field(default_factory=dict)  # node out id -> [_Storage]
    recompute: int | None = None  # a checkpoint's recompute peak, while its saved tensors do not exist yet
    recompute_saved: int = 0  # what of that peak the recompute has saved into the checkpoint's frame
    checkpointed: bool = False  # the saved tensors are a checkpoint's recomputed ones

    def note(self) -> None:
        total = self.saved_live + self.live + self.params
        if total > self.peak_total:
            self.peak_total = total
            self.peak = BackwardPeak(self.saved_live, self.live, self.params)

    def alloc(self, nbytes: int) -> _Storage:
        self.live += nbytes
        if self.saved_live + self.live + self.params > self.peak_total:
            self.note()
        return _Storage(nbytes)

    def drop(self, s: _Storage) -> None:
        s.refs -= 1
        if s.refs == 0:
            self.live -= s.nbytes

    def run(self, node: Node) -> None:
        g = self.buffers.pop(node.out, None)
        if g is not None:  # else no gradient reached this node's output: it does not run
            self.call(node, g)
        for s in self.holds.pop(node.out, ()):
            self.drop(s)

    def call(self, node: Node, g: _Storage) -> None:
        if self.recompute is not None and node.unpacks:  # the checkpoint's forward runs again now
            if self.live + self.params + self.recompute > self.peak_total:
                self.peak_total = self.live + self.params + self.recompute
                self.peak = BackwardPeak(self.recompute_saved, self.live + self.recompute - self.recompute_saved,
                                         self.params)
            self.recompute = None
            self.saved_live = sum(self.saved_bytes.values())
            self.note()
        local = {GRAD: g}
        released = False
        for step in node.steps:
            kind = step[0]
            if kind == "returned":  # the formula has returned; a checkpoint's recomputed tensors go with it
                if self.checkpointed:
                    self.release_saved(node)
                    released = True
            elif kind == "new":
                local[step[1]] = self.alloc(step[2])
            elif kind == "param":
                self.params += step[1]
                self.note()
            elif kind == "pending":  # never dropped here: AccumulateGrad runs after the replay
                self.alloc(step[1])
            elif kind == "free":
                self.drop(local.pop(step[1]))
        if node.hold:
            g.refs += 1
            self.holds.setdefault(node.hold, []).append(g)
        delivered = []
        for target, name in node.outputs:
            s = local[name]
            s.refs += 1
            delivered.append((target, s))
        for s in local.values():  # the formula returns: its temporaries and the incoming gradient go
            self.drop(s)
        if not released:
            self.release_saved(node)
        for target, s in delivered:
            self.deliver(target, s)

    def release_saved(self, node: Node) -> None:
        for sid in node.saved:
            self.saved_refs[sid] -= 1
            if self.saved_refs[sid] == 0:
                self.saved_live -= self.saved_bytes[sid]

    def deliver(self, target: int, s: _Storage) -> None:
        old = self.buffers.get(target)
        if old is None:
            self.buffers[target] = s
            return
        if self.in_place and (old.refs == 1 or s.refs == 1):
            keep, other = (old, s) if old.refs == 1 else (s, old)
            self.drop(other)
            self.buffers[target] = keep
            return
        total = self.alloc(max(old.nbytes, s.nbytes))
        self.drop(old)
        self.drop(s)
        self.buffers[target] = total


def run_backward(nodes, saved_bytes: dict, incoming: dict, in_place: bool, recompute: int | None = None,
                 recompute_saved: int = 0) -> Replay:
    """Replay `nodes` (in creation order) backward from the gradients in `incoming` (id -> bytes),
    with every saved tensor of `saved_bytes` (id -> bytes) held at the start, or, for a checkpointed
    block, made by its recompute (peak `recompute` bytes: `recompute_saved` of them the tensors it has
    saved into the checkpoint's frame, held for backward, the rest its temporaries) when the first node
    unpacks. in_place: whether input buffers accumulate in place (no TorchDispatchMode active, as on
    cuda)."""
    e = _Engine(saved_bytes=dict(saved_bytes), in_place=in_place, recompute=recompute,
                recompute_saved=recompute_saved, checkpointed=recompute is not None)
    for node in nodes:
        for sid in node.saved:
            e.saved_refs[sid] = e.saved_refs.get(sid, 0) + 1
    # saved tensors no node holds (an op saved them for a node that never runs) are held all along
    e.saved_live = sum(saved_bytes.values()) if recompute is None else 0
    for sid in saved_bytes:
        e.saved_refs.setdefault(sid, 1 << 30)
    for tid, nbytes in incoming.items():
        e.buffers[tid] = _Storage(nbytes)
        e.live += nbytes
    e.note()
    for node in reversed(nodes):
        e.run(node)
    outgoing = tuple((tid, s.nbytes) for tid, s in e.buffers.items())
    return Replay(peak=e.peak, outgoing=outgoing, params=e.params)
