"""The memory timeline of one block, op by op: its forward (as gradient checkpointing re-runs it inside
backward) and its backward, as torch's autograd engine runs them.

The op functions of :mod:`peftcalc.activations` describe a block once. While they run they record, on a
:class:`BlockTrace`, what each op allocates, which tensors it uses (a tensor the Python code holds no
longer dies after its last use), what autograd saves, and one backward :class:`Node` per op that records
a gradient function. Two walks over that record give:

forward (recompute)  live bytes while the block's forward runs: the tensors allocated and not yet dead,
    plus everything saved so far (kernels' locals are allocations too). torch.utils.checkpoint
    (non-reentrant, ``early_stop=True``) stops the recompute when the last saved tensor is packed
    (``_recomputation_hook.pack_hook`` raises ``_StopRecomputationError``), and autograd packs an op's
    inputs before the op runs and its outputs after (the generated VariableType code), so the recompute
    ends at the last save event.
backward  the nodes in reverse order of creation (the engine's ready queue runs the node with the highest
    sequence number first). A node allocates its inputs' gradients (and its parameters' gradients, which
    AccumulateGrad keeps), then releases its saved tensors (``release_variables``) and the incoming
    gradient; a gradient that arrives for a tensor that already has one is summed
    (``InputBuffer::accumulate``: out of place under a dispatch mode, the sum allocated while both exist;
    in place on plain CUDA tensors whose buffer has no other reference). AddBackward hands the incoming
    gradient itself to both inputs (no allocation), unless an input has another dtype (it gets a cast copy).

Bytes are symbolic (numel x dtype size) and each storage counts once, as a storage tracer and
``max_memory_allocated`` count them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _storage(t):
    """The tensor whose storage `t` uses (a view's base)."""
    return t.base if getattr(t, "base", None) is not None else t


@dataclass
class Node:
    """One backward function: it consumes the gradients of `outs` (the op's outputs), produces gradients
    for `ins` (tensors whose gradient it computes) and `param_grad` bytes of parameter gradients, holds
    `temp` bytes while it runs, and releases the storages in `saved` when done. `alias`: the inputs'
    gradients are the incoming one (AddBackward). `unpacks`: its backward reads a saved tensor (an
    activation or a parameter), which under checkpointing triggers the recompute; a node that reads none
    runs before it (bitsandbytes MatMul4Bit keeps the packed weight in ``ctx.tensors``, not
    ``save_for_backward``)."""

    outs: tuple
    ins: tuple
    saved: tuple = ()
    param_grad: int = 0
    temp: int = 0
    alias: bool = False
    unpacks: bool = True


@dataclass
class BlockTrace:
    """What the ops of one block recorded (see the module docstring). Tensors are activations.T; ids
    in `external` (the block's input, parameters) are alive throughout and counted elsewhere."""

    events: list = field(default_factory=list)  # ("alloc", T) | ("use", T) | ("save", T | None)
    nodes: list = field(default_factory=list)
    external: set = field(default_factory=set)
    # InputBuffer::accumulate sums in place when it holds the buffer's last reference and the tensor is
    # not "subclass-like"; any active TorchDispatchMode (a storage tracer: the cpu/fake predictions)
    # makes every tensor subclass-like (ATen isTensorSubclassLike), so there it always sums out of place
    inplace_accumulate: bool = False
    last_use: dict = field(default_factory=dict)  # storage id -> index of its last event
    saves: int = 0  # index after the last save event

    def alloc(self, t) -> None:
        self.last_use[t.id] = len(self.events)
        self.events.append(("alloc", t))

    def use(self, *ts) -> None:
        for t in ts:
            if t is not None:
                t = _storage(t)
                self.last_use[t.id] = len(self.events)
                self.events.append(("use", t))

    def save(self, t) -> None:
        """An activation (T) or a parameter (None: no bytes, but it counts for where the recompute stops)."""
        if t is not None:
            t = _storage(t)
            self.last_use[t.id] = len(self.events)
        self.events.append(("save", t))
        self.saves = len(self.events)

    def node(self, out, ins=(), saved=(), param_grad: int = 0, temp: int = 0, alias: bool = False,
             unpacks: bool = True) -> None:
        """`out`: the op's output, or a tuple of them (a split)."""
        ins = tuple([t for t in ins if t is not None and t.rg])
        if ins or param_grad:
            outs = out if type(out) is tuple else (out,)
            saved_ids = tuple([_storage(s).id for s in saved if s is not None])
            self.nodes.append(Node(outs, ins, saved_ids, param_grad, temp, alias, unpacks))


@dataclass(frozen=True)
class BlockPeaks:
    """Peak bytes of a block, over what is live when it starts (its input and everything outside it are
    not included). forward: the recompute's peak (the incoming gradient is not included either);
    backward: the peak of its backward (incoming gradient included), of which `backward_param_grads`
    are parameter gradients and `backward_saved` saved activations still held."""

    forward: int
    backward: int
    backward_param_grads: int
    backward_saved: int
    grad_out: int = 0  # the gradients alive during the recompute: the incoming one (of the block's output),
    # or what the nodes that run before it (see Node.unpacks) left


def forward_peak(trace: BlockTrace, stop_at_last_save: bool = True) -> tuple[int, dict]:
    """(peak live bytes, saved tensors by id at the end) of the block's forward, stopped at the last save
    when `stop_at_last_save` (the checkpoint recompute). A tensor dies after its last use unless saved;
    what a later op of the block still uses is alive where the recompute stops."""
    events = trace.events
    end = trace.saves if stop_at_last_save else len(events)
    last_use, external = trace.last_use, trace.external
    live: dict = {}  # id -> bytes, not saved
    saved: dict = {}
    total = peak = 0
    for i in range(end):
        kind, t = events[i]
        if kind == "alloc":
            nb = 0 if t.id in external else t.nbytes
            live[t.id] = nb
            total += nb
            if total > peak:
                peak = total
        elif kind == "save":
            if t is not None and t.id not in saved:  # never allocated here: external
                saved[t.id] = live.pop(t.id, 0)
            continue
        # tensors whose last use this was (and not saved) die now
        if last_use[t.id] == i and t.id in live:
            total -= live.pop(t.id)
    return peak, saved


def backward_peak(trace: BlockTrace, saved: dict, grad_out) -> tuple[int, int, int, int]:
    """Walk the nodes from the last one, starting with the incoming gradient of `grad_out` (the block's
    output) and `saved` (id -> bytes) alive from the first node that unpacks a saved tensor (under
    checkpointing the recompute makes them there: torch.utils.checkpoint's unpack hook). Returns (peak,
    parameter gradients in it, saved activations in it, gradient bytes alive when the recompute starts)."""
    holders: dict = {}
    for node in trace.nodes:
        for sid in node.saved:
            holders[sid] = holders.get(sid, 0) + 1
    pending, saved = dict(saved), {}
    live_saved = 0
    at_recompute = None
    bufs: dict = {}  # buffer id -> bytes, alive while referenced
    refs: dict = {}  # buffer id -> references (tensors whose gradient it is, and holds)
    grad_of: dict = {}  # tensor id -> buffer id
    state = {"n": 0, "grads": 0}  # buffers made, bytes of the live ones
    params = 0
    best = [0, 0, 0]

    def new_buf(nbytes: int) -> int:
        state["n"] += 1
        bufs[state["n"]], refs[state["n"]] = nbytes, 0
        state["grads"] += nbytes
        return state["n"]

    def ref(buf: int, n: int) -> None:
        refs[buf] += n
        if refs[buf] == 0:
            state["grads"] -= bufs.pop(buf)
            del refs[buf]

    def consider(extra: int) -> None:
        total = live_saved + state["grads"] + params + extra
        if total > best[0]:
            best[:] = [total, params, live_saved]

    grad_of[grad_out.id] = new_buf(grad_out.nbytes)
    ref(grad_of[grad_out.id], 1)
    consider(0)
    for node in reversed(trace.nodes):
        arrived = [o for o in node.outs if o.id in grad_of]
        if not arrived:  # no gradient reaches it: autograd never runs it
            continue
        if at_recompute is None and node.unpacks:
            at_recompute = state["grads"] + params
            saved = pending
            live_saved = sum(saved.values())
        incoming = grad_of[arrived[0].id]
        outs = []
        for t in node.ins:
            buf = incoming if node.alias and t.dtype == arrived[0].dtype else new_buf(t.nbytes)
            ref(buf, 1)  # held until handed to the input's buffer
            outs.append((t, buf))
        params += node.param_grad
        consider(node.temp)
        for sid in node.saved:  # release_variables
            holders[sid] -= 1
            if holders[sid] == 0:
                live_saved -= saved.pop(sid, 0)
        for o in arrived:  # the incoming gradients are dropped
            ref(grad_of.pop(o.id), -1)
        for t, buf in outs:
            old = grad_of.get(t.id)
            if old is not None and trace.inplace_accumulate and refs[old] == 1:
                pass  # old.add_(new): the buffer holds its last reference (the new one is dropped below)
            elif old is not None:  # a second gradient for t: old + new, out of place
                consider(t.nbytes)
                total = new_buf(t.nbytes)
                ref(total, 1)
                grad_of[t.id] = total
                ref(old, -1)
            else:
                grad_of[t.id] = buf
                ref(buf, 1)
            ref(buf, -1)
    if at_recompute is None:  # no node reads a saved tensor (nothing is recomputed)
        at_recompute = state["grads"] + params
    return best[0], best[1], best[2], at_recompute


def block_peaks(trace: BlockTrace, out) -> BlockPeaks:
    """The block's recompute and backward peaks (see BlockPeaks), `out` being its output."""
    fwd, saved = forward_peak(trace)
    return BlockPeaks(fwd, *backward_peak(trace, saved, out))
