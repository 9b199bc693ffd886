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

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["BackwardPeak", "GRAD", "Node", "Replay", "run_backward", "run_backward_both"]

GRAD = "g"  # a program's name for the incoming gradient


class Node(NamedTuple):
    """One autograd node.

    steps: ("new", name, bytes) allocates a buffer, ("returned",) marks where the formula returns (the
    steps after it are the engine's validate_outputs, e.g. summing a gradient down to its broadcast
    input's shape; see the module docstring), ("param", bytes) makes a parameter's gradient,
    ("pending", bytes) a gradient of a parameter used again below, held in its AccumulateGrad node's
    input buffer past the end of the replay (see the module docstring), ("free", name) frees a buffer. outputs: (target id, buffer name) pairs, GRAD for the incoming
    gradient itself. saved: ids of the saved tensors the node holds. hold: the id of a later
    node's output until whose node has run the incoming gradient stays alive (0: none). unpacks:
    whether the node reads saved variables (activations in `saved`, or parameters).

    run_backward takes a plain tuple of the same six fields too: what the forward simulator records
    (peftcalc.activations Recorder.node), a few times quicker to make."""

    out: int
    steps: tuple = ()
    outputs: tuple = ()
    saved: tuple = ()
    hold: int = 0
    unpacks: bool = False


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


def run_backward(nodes, saved_bytes: dict, incoming: dict, in_place: bool, recompute: int | None = None,
                 recompute_saved: int = 0, accumulate: bool = False) -> Replay:
    """Replay `nodes` (in creation order) backward from the gradients in `incoming` (id -> bytes),
    with every saved tensor of `saved_bytes` (id -> bytes) held at the start, or, for a checkpointed
    block, made by its recompute (peak `recompute` bytes: `recompute_saved` of them the tensors it has
    saved into the checkpoint's frame, held for backward, the rest its temporaries) when the first node
    unpacks. in_place: whether input buffers accumulate in place (no TorchDispatchMode active, as on
    cuda)."""
    plain, checkpointed = run_backward_both(nodes, saved_bytes, incoming, in_place,
                                            0 if recompute is None else recompute, recompute_saved,
                                            accumulate=accumulate)
    return plain if recompute is None else checkpointed


def run_backward_both(nodes, saved_bytes: dict, incoming: dict, in_place: bool, recompute: int,
                      recompute_saved: int = 0, checkpoint_input: int | None = None,
                      accumulate: bool = False) -> tuple[Replay, Replay]:
    """A block's two replays (run_backward) in one walk over its nodes: with every saved tensor held
    from the start, and checkpointed (recompute peak `recompute`, `recompute_saved` of it saved; the
    saved tensor `checkpoint_input`, the block's input when it saves it, counted outside: 0 bytes).
    Only the saved tensors differ between the two: the same nodes run, and the gradient buffers and
    parameter gradients go the same way, so one pass keeps one set of buffers and two saved sums and
    peaks.

    Plain locals throughout (a sweep replays thousands of blocks): a gradient buffer's storage is a
    two-item list [bytes, references] (how many buffers or formulas refer to it; freed at 0); `live` is
    the bytes of the gradient buffers alive, `params` of the parameter gradients made, `saved_live` and
    `ck_saved_live` of the saved tensors still held in each replay; a peak is taken after every
    allocation and parameter gradient (and when a checkpoint's recompute runs), the first time a sum
    exceeds the largest so far.

    accumulate: a micro-batch after the first of a gradient-accumulation step. Each parameter has its
    .grad from the micro-batches before (counted outside the replay), so the gradient a node makes is a
    buffer: AccumulateGrad (torch/csrc/autograd/functions/accumulate_grad.h accumulateGrad, grad mode off)
    runs ``variable_grad += new_grad`` in place and the new gradient is freed. Its node has the highest
    sequence number (UINT64_MAX), so the engine runs it as soon as the node that made the gradient has
    returned and handed its outputs on (engine.cpp ReadyQueue): the gradient is alive to then."""
    saved_refs: dict = {}  # id -> how many nodes still hold each saved tensor
    for node in nodes:
        for sid in node[3]:  # Node.saved
            saved_refs[sid] = saved_refs.get(sid, 0) + 1
    # saved tensors no node holds (an op saved them for a node that never runs) are held all along
    for sid in saved_bytes:
        if sid not in saved_refs:
            saved_refs[sid] = 1 << 30
    saved_live = sum(saved_bytes.values())
    ck_saved_live = 0  # the checkpointed block's saved tensors do not exist until its recompute
    ck_saved_total = saved_live - saved_bytes.get(checkpoint_input, 0)  # and then they all do
    pending_recompute: int | None = recompute
    buffers: dict = {}  # target id -> [bytes, references] of the gradient buffer waiting for it
    live = 0
    for tid, nbytes in incoming.items():
        buffers[tid] = [nbytes, 1]
        live += nbytes
    params = 0
    peak_total = ck_peak_total = 0
    peak = ck_peak = (0, 0, 0)  # (saved, buffers, params) at each replay's peak
    if saved_live + live > peak_total:
        peak_total, peak = saved_live + live, (saved_live, live, 0)
    if live > ck_peak_total:
        ck_peak_total, ck_peak = live, (0, live, 0)
    holds: dict = {}  # node out id -> the storages held until that node has run

    def release(node_saved) -> tuple[int, int]:
        """A node drops its saved tensors: the bytes freed in the plain and in the checkpointed replay
        (the checkpoint's input is not the recompute's)."""
        released = ck_released = 0
        for sid in node_saved:
            refs = saved_refs[sid] - 1
            saved_refs[sid] = refs
            if not refs:
                released += saved_bytes[sid]
                if sid != checkpoint_input:
                    ck_released += saved_bytes[sid]
        return released, ck_released

    for out, steps, outputs, node_saved, hold, unpacks in reversed(nodes):  # Node's fields
        g = buffers.pop(out, None)
        if g is not None:  # else no gradient reached this node's output: it does not run
            if pending_recompute is not None and unpacks:  # the checkpoint's forward runs again now
                total = live + params + pending_recompute
                if total > ck_peak_total:
                    ck_peak_total = total
                    ck_peak = (recompute_saved, live + pending_recompute - recompute_saved, params)
                pending_recompute = None
                ck_saved_live = ck_saved_total
                total = ck_saved_live + live + params
                if total > ck_peak_total:
                    ck_peak_total, ck_peak = total, (ck_saved_live, live, params)
            local = {GRAD: g}
            added = 0  # accumulate: the parameter gradients this node makes, freed once it is done
            released = None  # bytes the plain replay releases when the node is done, once the checkpointed one has
            for step in steps:
                kind = step[0]
                if kind == "new":
                    nbytes = step[2]
                    live += nbytes
                    local[step[1]] = [nbytes, 1]
                elif kind == "free":
                    s = local.pop(step[1])
                    s[1] -= 1
                    if not s[1]:
                        live -= s[0]
                    continue
                elif kind == "param":
                    if accumulate:
                        live += step[1]
                        added += step[1]
                    else:
                        params += step[1]
                elif kind == "pending":  # never dropped here: AccumulateGrad runs after the replay
                    live += step[1]
                elif kind == "returned":  # a checkpoint's recomputed tensors go with the formula's locals
                    released, ck_released = release(node_saved)
                    ck_saved_live -= ck_released
                    continue
                else:
                    continue
                total = saved_live + live + params
                if total > peak_total:
                    peak_total, peak = total, (saved_live, live, params)
                total = ck_saved_live + live + params
                if total > ck_peak_total:
                    ck_peak_total, ck_peak = total, (ck_saved_live, live, params)
            if hold:
                g[1] += 1
                holds.setdefault(hold, []).append(g)
            delivered = []
            for target, name in outputs:
                s = local[name]
                s[1] += 1
                delivered.append((target, s))
            for s in local.values():  # the formula returns: its temporaries and the incoming gradient go
                s[1] -= 1
                if not s[1]:
                    live -= s[0]
            if released is None:  # then its saved tensors are released (release_variables)
                released, ck_released = release(node_saved)
                ck_saved_live -= ck_released
            saved_live -= released
            for target, s in delivered:  # each output is added to its target's input buffer
                old = buffers.get(target)
                if old is None:
                    buffers[target] = s
                elif in_place and (old[1] == 1 or s[1] == 1):
                    keep, other = (old, s) if old[1] == 1 else (s, old)
                    other[1] -= 1
                    if not other[1]:
                        live -= other[0]
                    buffers[target] = keep
                else:
                    nbytes = old[0] if old[0] > s[0] else s[0]
                    live += nbytes
                    total = saved_live + live + params
                    if total > peak_total:
                        peak_total, peak = total, (saved_live, live, params)
                    total = ck_saved_live + live + params
                    if total > ck_peak_total:
                        ck_peak_total, ck_peak = total, (ck_saved_live, live, params)
                    old[1] -= 1
                    if not old[1]:
                        live -= old[0]
                    s[1] -= 1
                    if not s[1]:
                        live -= s[0]
                    buffers[target] = [nbytes, 1]
            live -= added
        if holds:
            for s in holds.pop(out, ()):
                s[1] -= 1
                if not s[1]:
                    live -= s[0]
    outgoing = tuple((tid, s[0]) for tid, s in buffers.items())
    return (Replay(peak=BackwardPeak(*peak), outgoing=outgoing, params=params),
            Replay(peak=BackwardPeak(*ck_peak), outgoing=outgoing, params=params))
