"""Symbolic tensors and the Recorder of one simulated forward.

Tensors are symbolic: a size, a dtype and a requires-grad flag. Saved tensors are counted once per
storage (an op that saves a tensor another op already saved adds nothing), which is how a storage
tracker and ``max_memory_allocated`` see them. One record serves every timeline: each op allocates
its outputs, frees what the modeling code drops (a block's forward peak), and records the autograd
node it creates with its backward formula's allocations (peftcalc.backward.Node), which
peftcalc.backward replays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftcalc.ops.context import StepContext
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "Recorder",
    "SymTensor",
    "first_node_since",
    "input_grads",
    "unpacked_steps",
]


@dataclass(slots=True)
class SymTensor:
    """A symbolic tensor; a view has the tensor whose storage it shares as its base."""

    numel: int
    dtype: str
    requires_grad: bool
    id: int
    base: "SymTensor | None" = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.numel * DTYPE_BYTES[self.dtype]


@dataclass
class Recorder:
    """What the ops of a forward record: the saved tensors, each once, by bucket (a layer index, 'pre',
    'post'); the autograd nodes they create (peftcalc.backward.Node), in creation order; and the
    forward's live bytes: every op output is allocated when it is made and freed when the modeling code
    drops its last reference (free), unless autograd saved it. `forward_peak` is the largest saved + live
    sum (`forward_peak_saved` what of it is saved); `recompute_peak` that largest sum up to the last
    save (torch.utils.checkpoint's non-reentrant recompute stops when the last saved tensor is packed:
    ``_recomputation_hook.pack_hook`` raises ``_StopRecomputationError`` with ``early_stop=True``;
    autograd packs an op's inputs before the op runs and its outputs after, as the generated
    VariableType code does, and the ops record them in that order), `recompute_peak_saved` what of it
    the recompute saves into the checkpoint's frame by the time it stops: the tensors live at its peak
    that are saved then or later (a storage's category is what it becomes, as the harness's tracer
    decides it: an op's output is saved a moment after it is made)."""

    ctx: StepContext
    bucket: object = "pre"
    saved: dict = field(default_factory=dict)  # id -> (bucket, tag, bytes)
    next_id: int = 0
    nodes: list = field(default_factory=list)  # each a Node's fields as a plain tuple
    live: dict = field(default_factory=dict)  # id -> bytes of the unsaved tensors the forward still holds
    live_bytes: int = 0
    saved_total: int = 0
    forward_peak: int = 0
    forward_peak_saved: int = 0
    forward_peak_id: int = 0  # the newest tensor at the forward's peak
    recompute_peak: int = 0
    recompute_peak_saved: int = 0
    cached: list = field(default_factory=list)  # autocast's cached copies of trainable weights (see autocast_weight_copy)
    # leaves that require grad besides the parameters (a reentrant checkpoint's detached input): id -> the
    # autocast cast autocast caches of it (None until made; see autocast_in), which no free() releases
    leaf_casts: dict = field(default_factory=dict)
    # tensors the model returns to its caller besides its output, whose gradient comes from outside the block:
    # a mixture-of-experts router's logits under output_router_logits (ops.moe.drop_router_logits)
    returned: list = field(default_factory=list)
    # activation offloading (StepContext.offload: torch.autograd.graph.save_on_cpu): the bytes of the host
    # copies made (one per saved variable, a view its own size, parameters included), each saved storage's
    # variable size (id -> bytes), and what the next node unpacks besides its saved activations
    host_bytes: int = 0
    save_sizes: dict = field(default_factory=dict)
    unpacked: int = 0

    def new(self, numel: int, dtype: str, requires_grad: bool) -> SymTensor:
        """A new tensor (an allocation of the forward)."""
        self.next_id += 1
        t = SymTensor(numel, dtype, requires_grad, self.next_id)
        self.live[t.id] = t.nbytes
        self.live_bytes += t.nbytes
        if self.saved_total + self.live_bytes > self.forward_peak:
            self.forward_peak, self.forward_peak_saved = self.saved_total + self.live_bytes, self.saved_total
            self.forward_peak_id = t.id
        return t

    def free(self, *ts: SymTensor) -> None:
        """The forward drops its reference to each tensor: an unsaved one is freed (views and
        tensors already freed or saved are left as they are)."""
        for t in ts:
            if t is not None and t.base is None and t.id in self.live:
                if self.leaf_casts and t.id in self._cached_casts():
                    continue
                self.live_bytes -= self.live.pop(t.id)

    def _cached_casts(self) -> set:
        return {c.id for c in self.leaf_casts.values() if c is not None}

    def view(self, x: SymTensor, numel: int) -> SymTensor:
        """A view of x (same storage, its own shape and autograd node)."""
        self.next_id += 1
        return SymTensor(numel, x.dtype, x.requires_grad, self.next_id, x.base or x)

    def save(self, t: SymTensor, tag: str) -> int:
        """Save t for backward, counted once per storage (a view saves its base's whole storage). A
        tensor that was alive at the forward's peak (still alive now, and made no later than the peak)
        counts among the peak's saved bytes: the harness's tracer (measure/tracer.py) gives a storage
        its category as finally decided, so a tensor autograd saves after the peak is an activation
        there too (peft DoRA's cast input, made before the weight norm and saved by lora_A after it).
        Under offloading (StepContext.offload) the pack hook copies the saved variable to the host and
        autograd holds no device tensor: it stays the forward's until the forward drops it (free)."""
        size = t.nbytes
        t = t.base or t
        if self.ctx.offload:
            self.saved.setdefault(t.id, (self.bucket, tag, t.nbytes))
            self.save_sizes[t.id] = size
            self._recompute_stops_here()
            return t.id
        if t.id not in self.saved:
            self.saved[t.id] = (self.bucket, tag, t.nbytes)
            self.saved_total += t.nbytes
            if t.id in self.live:  # held by autograd from now on
                self.live_bytes -= self.live.pop(t.id)
                if t.id <= self.forward_peak_id:
                    self.forward_peak_saved += t.nbytes
        self._recompute_stops_here()
        return t.id

    def _recompute_stops_here(self) -> None:
        """A save: a recompute runs at least this far, so its peak is the forward's so far."""
        self.recompute_peak = self.forward_peak
        self.recompute_peak_saved = self.forward_peak_saved  # tensors alive at it and saved since included

    def save_new(self, numel: int, dtype: str, tag: str) -> int:
        """A tensor made to be saved, which nothing but autograd holds (under offloading: freed once packed)."""
        t = self.new(numel, dtype, False)
        tid = self.save(t, tag)
        if self.ctx.offload:
            self.free(t)
        return tid

    def release(self, *ts: SymTensor) -> None:
        """Autograd frees what a graph saved once nothing references the graph: a graph whose output
        is only used detached (peft DoRA's lora_weight, see dora_weight_norm) dies with its last
        reference, and its saved tensors with it. Each of `ts` is dropped from the saved tensors."""
        for t in ts:
            entry = self.saved.pop((t.base or t).id, None)
            if entry is not None:
                self.saved_total -= entry[2]

    def save_param(self, nbytes: int = 0) -> None:
        """A parameter (or a view of one: Linear's weight.t(), `nbytes` its size) saved for backward: no
        activation bytes, but a recompute stops only after it; under offloading the pack hook copies it to
        the host like any saved variable, and the node unpacks it (save_on_cpu packs whatever autograd saves)."""
        self._recompute_stops_here()
        self.shared_saved(nbytes)

    def shared_saved(self, nbytes: int) -> None:
        """The next node saves a tensor counted elsewhere (a parameter; RoPE's cos and sin, saved once per
        model): under offloading one more host copy, and one more device copy when the node unpacks."""
        if self.ctx.offload:
            self.unpacked += nbytes

    def node(self, out: SymTensor, steps=(), outputs=(), saved=(), hold: int = 0, saves_param: bool = False) -> None:
        """The autograd node that made `out` (none when `out` needs no gradient): its backward
        formula's allocations, the gradients it hands on and the saved tensors it holds (and whether it
        holds a parameter too: it unpacks saved variables either way)."""
        unpacked, self.unpacked = self.unpacked, 0
        if not out.requires_grad:
            return
        unpacks = bool(saved) or saves_param
        if self.ctx.offload:
            unpacked += sum(self.save_sizes[s] for s in saved)
            self.host_bytes += unpacked
            steps, saved = unpacked_steps(steps, unpacked), ()
        # a Node's fields as a plain tuple (see Node)
        self.nodes.append((out.id, tuple(steps), tuple(outputs), tuple(saved), hold, unpacks))

    def device_saved(self) -> dict:
        """saved_bytes as the device holds them: none under offloading (the host copies are not the device's)."""
        return {} if self.ctx.offload else self.saved_bytes()

    def saved_bytes(self) -> dict:
        return {tid: nbytes for tid, (_b, _t, nbytes) in self.saved.items()}

    def saved_cached_copies(self) -> int:
        """Bytes of autocast's cached weight copies that are also saved (one tensor, counted once)."""
        return sum(t.nbytes for t in self.cached if t.id in self.saved)

    def unsaved_cached_copies(self) -> int:
        """Bytes of autocast's cached weight copies no op saved: alive in the cache to the end of the forward."""
        return sum(t.nbytes for t in self.cached if t.id not in self.saved)

    def bytes_by_bucket(self) -> dict:
        out: dict = {}
        for bucket, _tag, nbytes in self.saved.values():
            out[bucket] = out.get(bucket, 0) + nbytes
        return out

    def bytes_by_tag(self) -> dict:
        out: dict = {}
        for _bucket, tag, nbytes in self.saved.values():
            out[tag] = out.get(tag, 0) + nbytes
        return out


def unpacked_steps(steps, nbytes: int) -> tuple:
    """A node's steps under offloading: save_on_cpu's unpack_from_cpu (``tensor.to(device)``, torch/autograd/graph.py)
    makes a device copy of each saved variable when the node's formula starts (the generated backward unpacks its
    SavedVariables first), freed when the formula returns (its locals), before the engine's checks ("returned")."""
    if not nbytes:
        return tuple(steps)
    steps = list(steps)
    end = next((i for i, s in enumerate(steps) if s[0] == "returned"), len(steps))
    return tuple([("new", "unpacked", nbytes)] + steps[:end] + [("free", "unpacked")] + steps[end:])


def input_grads(*inputs: SymTensor) -> tuple[list, list]:
    """A formula that allocates one new gradient, like its input, for each input that needs one:
    (steps, outputs) for Recorder.node."""
    steps, outputs = [], []
    for i, t in enumerate(inputs):
        if t is not None and t.requires_grad:
            steps.append(("new", f"d{i}", t.nbytes))
            outputs.append((t.id, f"d{i}"))
    return steps, outputs


def first_node_since(rec: Recorder, mark: int) -> int:
    """The output id of the first node recorded since `mark` (0: none)."""
    return rec.nodes[mark][0] if len(rec.nodes) > mark else 0  # Node.out
