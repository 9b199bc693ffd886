"""The blocks of a model: one block simulated and replayed backward (with and without gradient
checkpointing, reentrant or not), and the stack of blocks run one after another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from peftcalc.backward import BackwardPeak, Node, run_backward, run_backward_both
from peftcalc.families import family
from peftcalc.layout import Layout
from peftcalc.methods.sites import BlockSites, LayerTraining, distinct_layer_trainings
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES
from peftcalc.sim.autocast_cache import autocast_cached_by_layer
from peftcalc.sim.profile import stream_dtype
from peftcalc.spec import ModelSpec

__all__ = [
    "BlockRun",
    "BlockSimulation",
    "reentrant_block_peak",
    "run_blocks",
    "simulate_block",
    "unwrapped_saved_copies",
]


@dataclass(frozen=True)
class BlockSimulation:
    """One block: its saved bytes (total and by tag), its output's requires-grad and dtype, the peaks
    inside its forward and its backward (from its output's gradient to its input's), and the same under
    gradient checkpointing (torch.utils.checkpoint, non-reentrant), where the block's input is the
    checkpoint's and counted outside it: its backward, in which the first node that unpacks a saved
    variable recomputes the forward (stopped at the last save, see Recorder; peftcalc.backward)."""

    saved: int
    tags: tuple
    out_rg: bool
    out_dtype: str
    backward: BackwardPeak
    forward_peak: int = 0  # saved + live bytes at the peak of its forward, its input included
    forward_peak_saved: int = 0  # what of it is saved
    saves_input: bool = False
    leaves: int = 0  # unsaved bytes still referenced when it returns, besides its input and output
    checkpointed_backward: BackwardPeak = BackwardPeak()  # recompute and backward's peak, its input not included
    returned: int = 0  # bytes it hands the model's caller besides its output (router logits: ops.moe.drop_router_logits)
    returned_grad: int = 0  # what of them gets a gradient from outside the block (the auxiliary loss's)
    host: int = 0  # under offloading (StepContext.offload): the bytes of the host copies its saves make


@lru_cache(maxsize=4096)
def simulate_block(spec: ModelSpec, plan: Plan, training: LayerTraining, ctx: StepContext, input_rg: bool,
                    input_dtype: str) -> BlockSimulation:
    """One block (the family's Family.block) on an input of `input_rg`, `input_dtype`, replayed backward (peftcalc.backward)
    from its output's gradient; input buffers sum out of place under a TorchDispatchMode (the harness's
    cpu/fake tracer: at::isTensorSubclassLike), in place on plain cuda tensors."""
    rec = Recorder(ctx, bucket=0)
    x = rec.new(ctx.tokens * spec.hidden_size, input_dtype, input_rg)
    out = family(spec).block(rec, spec, BlockSites(spec, plan, training), x)
    saved = rec.device_saved()
    incoming = {out.id: out.nbytes} if out.requires_grad else {}
    # the router logits' gradients from the auxiliary loss, made before the block's backward starts (ops.moe)
    incoming.update({t.id: t.nbytes for t in rec.returned if t.requires_grad})
    in_place = ctx.device == "cuda"
    # under checkpointing the input is the checkpoint's, counted outside the block
    recompute = rec.recompute_peak - x.nbytes if rec.recompute_peak else 0
    # what of it the recompute saves into the checkpoint's frame (autograd holds it for backward)
    recompute_saved = rec.recompute_peak_saved - (x.nbytes if x.id in rec.saved else 0)
    replay, checkpointed = run_backward_both(rec.nodes, saved, incoming, in_place, recompute,
                                             recompute_saved if recompute else 0,
                                             checkpoint_input=x.id if x.id in saved else None,
                                             accumulate=ctx.accumulating)
    leaves = rec.live_bytes - rec.live.get(out.id, 0) - rec.live.get(x.id, 0)
    return BlockSimulation(sum(rec.saved_bytes().values()), tuple(rec.bytes_by_tag().items()), out.requires_grad,
                           out.dtype, replay.peak, rec.forward_peak, rec.forward_peak_saved, x.id in rec.saved, leaves,
                           checkpointed_backward=checkpointed.peak, returned=sum(t.nbytes for t in rec.returned),
                           returned_grad=sum(t.nbytes for t in rec.returned if t.requires_grad), host=rec.host_bytes)


@lru_cache(maxsize=4096)
def reentrant_block_peak(spec: ModelSpec, plan: Plan, training: LayerTraining, ctx: StepContext, input_rg: bool,
                     input_dtype: str) -> BackwardPeak:
    """The peak of one block's backward under reentrant checkpointing (torch/utils/checkpoint.py
    CheckpointFunction.backward, use_reentrant=True), its input (the checkpoint's saved tensor, which
    the recompute's detach_variable copies share) counted outside, as under non-reentrant checkpointing:
    - the recompute runs the whole forward again under torch.enable_grad() (no early stop, unlike the
      non-reentrant _recomputation_hook), with the incoming gradient alive: the block's forward peak;
    - then ``torch.autograd.backward(outputs_with_grad, args_with_grad)`` replays the block's nodes
      (peftcalc.backward) with every recomputed saved tensor held from the start, as without
      checkpointing, while ``outputs`` keeps the recomputed block output referenced and ``args`` the
      incoming gradient, both to the end (the engine passes the incoming gradient on, and sums into it,
      but cannot free it before CheckpointFunction.backward returns). A sentinel node created first (so
      replayed last) holds the incoming gradient (Node.hold on the output's node).
    The detached input is a leaf that requires grad: under autocast the ops that cast it share one cached
    cast (autocast_in), where a forward makes one per op (traced: BERT's query, key and value Linears).
    Autocast's cache of the recompute empties when its autocast context exits, before the backward."""
    rec = Recorder(ctx, bucket=0)
    x = rec.new(ctx.tokens * spec.hidden_size, input_dtype, input_rg)
    if input_rg:  # detach_variable: x.detach() with x's requires_grad, a leaf (autocast caches its casts)
        rec.leaf_casts[x.id] = None
    out = family(spec).block(rec, spec, BlockSites(spec, plan, training), x)
    incoming = out.nbytes if out.requires_grad else 0
    x_saved = x.nbytes if x.id in rec.saved else 0
    recompute = BackwardPeak(rec.forward_peak_saved - x_saved,
                             incoming + rec.forward_peak - rec.forward_peak_saved - (x.nbytes - x_saved))
    saved = rec.saved_bytes()
    if x.id in saved:
        saved[x.id] = 0
    sentinel = rec.next_id + 1
    nodes = [Node(sentinel)] + [Node(*n)._replace(hold=sentinel) if n[0] == out.id else n for n in rec.nodes]
    replay = run_backward(nodes, saved, {out.id: out.nbytes} if out.requires_grad else {}, in_place=ctx.device == "cuda",
                          accumulate=ctx.accumulating)
    output = out.nbytes if (out.base or out).id not in rec.saved else 0
    inner = BackwardPeak(replay.peak.saved, replay.peak.buffers + output, replay.peak.params)
    return inner if inner.total > recompute.total else recompute


@dataclass(frozen=True)
class BlockRun:
    """The blocks of a model run one after another (see run_blocks)."""

    per_layer: tuple  # saved bytes of each block
    blocks: tuple  # each block's BlockSimulation
    forward_block: tuple  # (saved, live unsaved) bytes at the largest peak inside a block's forward
    tags: dict
    out: SymTensor  # the last block's output
    leaves: int  # unsaved bytes the blocks leave referenced to the end of the forward (BlockSimulation.leaves)
    held_after: int = 0  # unsaved bytes the forward holds when the blocks are done, their output aside
    unsaved_block_live: int = 0  # live bytes at the largest forward peak of a block that saves nothing
    # when only some blocks are checkpointed (TrainingSettings.checkpoint_every): what each block keeps
    # for backward (its input if checkpointed and saving, else what it saves), the largest peak inside an
    # unwrapped block's forward on what the blocks below keep, and held_after as it is then
    kept: tuple = ()
    mixed_forward_block: tuple = (0, 0)
    mixed_held_after: int = 0
    reentrant: tuple = ()  # per block: its reentrant checkpoint's backward peak (reentrant_block_peak), or None


def run_blocks(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, ctx: StepContext, x: SymTensor, held: int,
                embedding_held: bool, checkpointed: tuple = (), reentrant: bool = False) -> BlockRun:
    """Each block on the output of the one below (`x`: the first block's input, made by `rec`). Blocks
    with the same trainable set and the same kind of input save the same tensors: each kind is simulated
    once (simulate_block is cached; a 80-block model has two or three kinds). The forward's peak inside
    block i is what the blocks below and the model's forward (`rec`) saved, block i's own forward peak
    (its input included), `held` (tensors the model's caller keeps referenced meanwhile), what the blocks
    below left referenced (BlockSimulation.leaves: prefix tuning's cache, autocast's cached copies) and,
    when `embedding_held` (the model's forward keeps its own reference to the embedding output, e.g.
    LlamaModel.forward's inputs_embeds), the first block's input from the second block on, unless saved.
    A block that saves nothing (below the lowest trainable one) runs the same ops under gradient
    checkpointing: its forward peak on top of what was saved before it is `unsaved_block_live`.

    `checkpointed` (per block, peftcalc.checkpointing) decides what a block keeps when only some are
    checkpointed (_mixed_blocks); `reentrant`: each checkpointed block's reentrant backward peak too."""
    per_layer, peaks = [], []
    forward_block = (0, 0)
    unsaved_block_live = 0
    leaves = 0
    kinds: dict = {}  # id of a block simulation -> [it, how many layers are of its kind]
    below = rec.saved_total
    requires_grad, dtype = x.requires_grad, x.dtype
    first = None
    seen: dict = {}  # (layer kind, input kind) -> its simulation, without hashing the plan or the layer per layer
    trainings, layer_kinds = distinct_layer_trainings(plan, layout)
    reentrant_peaks = []
    # under offloading (StepContext.offload) autograd holds nothing on the device: the blocks below add nothing,
    # and the model's forward holds the first block's input (inputs_embeds) whether or not something saved it
    offloaded = ctx.offload and not any(checkpointed)
    if any(checkpointed):  # inside a checkpointed block the checkpoint's hooks are innermost: nothing is offloaded
        ctx = replace(ctx, offload=False)
    for i, k in enumerate(layer_kinds):
        key = (k, requires_grad, dtype)
        block = seen.get(key)
        if block is None:
            block = seen[key] = simulate_block(spec, plan, trainings[k], ctx, requires_grad, dtype)
        if reentrant and checkpointed[i]:
            reentrant_peaks.append(reentrant_block_peak(spec, plan, trainings[k], ctx, requires_grad, dtype))
        else:
            reentrant_peaks.append(None)
        extra = held
        if first is not None and embedding_held and (offloaded or (x.id not in rec.saved and not first.saves_input)):
            extra += x.nbytes
        if below + block.forward_peak + extra > sum(forward_block):
            forward_block = (below + block.forward_peak_saved, block.forward_peak - block.forward_peak_saved + extra)
        if not block.saved:
            unsaved_block_live = max(unsaved_block_live, block.forward_peak + extra)
        first = first or block
        held += block.leaves
        leaves += block.leaves
        below += 0 if offloaded else block.saved
        per_layer.append(block.saved)
        peaks.append(block)
        kind = kinds.get(id(block))
        if kind is None:
            kinds[id(block)] = [block, 1]
        else:
            kind[1] += 1
        requires_grad, dtype = block.out_rg, block.out_dtype
    tags: dict = {}
    for block, count in kinds.values():
        for tag, nbytes in block.tags:
            tags[tag] = tags.get(tag, 0) + count * nbytes
    held_before = held - leaves
    if first is not None and embedding_held and (offloaded or (x.id not in rec.saved and not first.saves_input)):
        held += x.nbytes
    run = BlockRun(tuple(per_layer), tuple(peaks), forward_block, tags, rec.new(x.numel, dtype, requires_grad), leaves, held,
                   unsaved_block_live, reentrant=tuple(reentrant_peaks))
    if any(checkpointed) and not all(checkpointed):
        run = _mixed_blocks(run, rec, spec, plan, ctx, x, held_before, embedding_held, checkpointed)
    return run


def _mixed_blocks(run: BlockRun, rec: Recorder, spec: ModelSpec, plan: Plan, ctx: StepContext, x: SymTensor, held: int,
                  embedding_held: bool, checkpointed: tuple) -> BlockRun:
    """The forward when only some blocks are checkpointed (transformers activation_checkpointing_enable
    with every_n_layers > 1): a checkpointed block that saves keeps only its input (torch.utils.checkpoint
    saves the checkpoint's tensor arguments: non-reentrant _NoopSaveInputs, reentrant CheckpointFunction's
    save_for_backward), the others keep what they save. The forward's peak inside an unwrapped block is its
    own peak on what the blocks below keep (`rec`'s saves, the model's forward, included) and what the
    forward holds (`held`, as run_blocks counts it; a checkpointed block leaves autocast's cached copies
    of all its trainable weights referenced, autocast_cached_by_layer, its saves being dropped); the first block's
    input is a checkpoint's when the first block is wrapped and saves. The peaks inside the checkpointed
    blocks are the checkpointed forward's (ActivationProfile.forward_transient)."""
    input_bytes = ctx.tokens * spec.hidden_size * DTYPE_BYTES[stream_dtype(ctx)]
    cached = autocast_cached_by_layer(plan, ctx)
    first = run.blocks[0]
    x_extra = (embedding_held and x.id not in rec.saved and not first.saves_input
               and not (checkpointed[0] and first.saved))
    below = rec.saved_total
    forward_block = (0, 0)
    kept = []
    for i, block in enumerate(run.blocks):
        extra = held + (x.nbytes if i and x_extra else 0)
        if checkpointed[i]:
            kept.append(input_bytes if block.saved else 0)
            held += cached[i]
        else:
            if below + block.forward_peak + extra > sum(forward_block):
                forward_block = (below + block.forward_peak_saved, block.forward_peak - block.forward_peak_saved + extra)
            kept.append(block.saved)
            held += block.leaves
        below += kept[-1]
    return replace(run, kept=tuple(kept), mixed_forward_block=forward_block,
                   mixed_held_after=held + (x.nbytes if x_extra else 0))


def unwrapped_saved_copies(plan: Plan, ctx: StepContext, blocks: BlockRun, checkpointed: tuple) -> int:
    """autocast's cached copies of trainable weights that the blocks checkpointing leaves unwrapped save:
    their activations, not the cache's temporaries (an unwrapped block's copies are saved or among its
    leaves, BlockSimulation.leaves). 0 unless only some blocks are checkpointed."""
    if not blocks.kept:
        return 0
    cached = autocast_cached_by_layer(plan, ctx)
    return sum(cached[i] - b.leaves for i, b in enumerate(blocks.blocks) if not checkpointed[i])
