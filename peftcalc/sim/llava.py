"""The activation profile of LLaVA (LlavaForConditionalGeneration.forward): the vision tower (frozen, or
with unfrozen layers and adapters), the projector, the language model and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from peftcalc.checkpointing import checkpointed_layers
from peftcalc.families import build_layout
from peftcalc.families.llava import LANGUAGE_MODEL, PROJECTOR
from peftcalc.methods.adapter import BLOCK_ADAPTER_TAG, resolve_adapter_kind, resolve_bottleneck
from peftcalc.methods.sites import layer_trainings
from peftcalc.methods.vlm import vision_layer_of, vision_layers_used
from peftcalc.ops.context import StepContext
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm_stats_dtype
from peftcalc.ops.recorder import Recorder
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.blocks import simulate_block
from peftcalc.methods.sites import param_trains
from peftcalc.sim.model import model_profile
from peftcalc.sim.profile import ActivationProfile, input_embeddings_require_grad, make_ctx, stream_dtype
from peftcalc.spec import ModelSpec

__all__ = [
    "VisionSaves",
    "llava_profile",
    "projector_input_numel",
    "text_plan",
    "vision_forward_bytes",
    "vision_plan",
    "vision_saves",
    "vlm_text_training",
]


@lru_cache(maxsize=1024)
def text_plan(plan: Plan) -> Plan:
    """A VLM plan seen from its language model: the LlamaForCausalLM plan with the same trainable
    set (`model.language_model.X` is `model.X` there, `lm_head` is `lm_head`), whose input embeddings
    need a gradient when the VLM's do (a trainable projector: see methods.make_plan)."""
    spec = plan.spec
    old = LANGUAGE_MODEL + "."

    def rename(name: str) -> str | None:
        if name.startswith(old):
            return "model." + name[len(old):]
        return name if name.startswith("lm_head") else None

    groups = tuple(replace(g, name=rename(g.name)) for g in plan.groups if rename(g.name) is not None)
    targets = tuple(rename(p) for p in plan.targets if rename(p) is not None)
    return Plan(spec=spec.text, settings=plan.settings, groups=groups, targets=targets,
                lowest_trainable_layer=plan.lowest_trainable_layer, embedding_trains=plan.embedding_trains,
                adapter_dtype=plan.adapter_dtype)


def vlm_text_training(spec: ModelSpec, t: TrainingSettings) -> TrainingSettings:
    """The language model's sequence: the text tokens plus one image's tokens (576 for LLaVA-1.5)."""
    return replace(t, seq_len=t.seq_len + spec.image_tokens)


@lru_cache(maxsize=1024)
def vision_plan(plan: Plan) -> Plan:
    """A VLM plan seen from its vision tower: the CLIPVisionModel plan (`model.vision_tower.X` is `X`
    there), with the block index of each encoder layer's parameters and adapters. Its settings carry the
    adapter kind and bottleneck the VLM resolves (the block adapter and its bottleneck of 256 by default)."""
    prefix = "model.vision_tower."
    groups = tuple(replace(g, name=g.name[len(prefix):], layer=vision_layer_of(g.name))
                   for g in plan.groups if g.name.startswith(prefix) and g.origin in ("base", "adapter"))
    layers = [g.layer for g in groups if g.trainable and g.layer is not None]
    s = plan.settings
    settings = replace(s, adapter_kind=resolve_adapter_kind(plan.spec, s), bottleneck=resolve_bottleneck(plan.spec, s))
    return Plan(spec=plan.spec.vision, settings=settings, groups=groups,
                lowest_trainable_layer=min(layers) if layers else None, adapter_dtype=plan.adapter_dtype)


@dataclass(frozen=True)
class VisionSaves:
    """What a VLM's vision tower saves (see vision_saves)."""

    kept: int = 0  # bytes kept to the end of backward
    dropped: int = 0  # bytes freed when LlavaModel.forward returns (the layers above the feature layer)
    feature_rg: bool = False  # whether the hidden state the projector reads needs a gradient
    cached: int = 0  # autocast weight copies among the kept bytes (also in autocast's cache)
    forward_peak: int = 0  # the tower's live bytes at the peak of its forward (0: nothing saved, see
    # vision_forward_bytes), the language model's token embeddings not included
    input_leaf: int = 0  # the hooked patch_embedding output (not among `kept`; _vision_input_leaf_bytes)


@lru_cache(maxsize=1024)
def vision_saves(plan: Plan, t: TrainingSettings) -> VisionSaves:
    """What the vision tower of a VLM with unfrozen layers or adapters saves, and its forward peak. The
    blocks are CLIPEncoderLayers (vision_block, with their adapters); the layers above the feature layer
    run and save too (their input needs a gradient), and so does post_layernorm on the class token of the
    last one (CLIPVisionTransformer: the input it saves is a view of the last layer's output, which it
    keeps whole). Nothing reaches them from the loss: their graph lives as long as the tower's output,
    which LlavaModel.forward holds in mm_encoder_outputs until it returns, so they are dropped before the
    loss (traced without the reference cycle a saved-tensor hook returning its tensor makes, see
    measure.tracer). Under gradient checkpointing (transformers checkpoints CLIP's encoder layers as well)
    each layer whose forward saves keeps its input instead (torch.utils.checkpoint non-reentrant: the
    inputs stay with the saved tensors' frame), and the block adapter, a forward hook outside the
    checkpointed forward, saves as it does without checkpointing (its autocast weight copies are then both
    saved and in autocast's cache).

    The forward peak is in the top layer's MLP, when fc2's output is made (traced): everything the layers
    below saved, this layer's saves up to its activation, and what its forward holds unsaved, the
    LayerNorm's output, the activation's output and fc2's output; in a layer that saves nothing (its input
    needs no gradient, or it is checkpointed), the working set of vision_forward_bytes. The encoder's input
    (pre_layrnorm's output) is alive throughout; it is among the saves when checkpointing keeps it.
    With checkpoint_every > 1 only the layers peftcalc.checkpointing names are checkpointed; the others
    save as without checkpointing (their input still needs a gradient: the hook is on)."""
    vplan = vision_plan(plan)
    input_rg = t.grad_checkpointing  # see _vision_input_grad_saves
    wrapped = checkpointed_layers(plan.spec, t, "vision") or (False,) * plan.spec.vision.num_layers
    if vplan.lowest_trainable_layer is None and not input_rg:
        return VisionSaves()
    vspec = vplan.spec
    ctx = make_ctx(vspec, vplan, t)
    used = vision_layers_used(plan.spec)
    tok, h, inter = ctx.tokens, vspec.hidden_size, vspec.intermediate_size
    wb, cb = DTYPE_BYTES[ctx.weight_dtype], DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]
    x_rg, x_dtype = input_rg, ctx.weight_dtype  # pre_layrnorm's output (LayerNorm: fp32 under autocast)
    leaf = _vision_input_leaf_bytes(vspec, ctx) if input_rg else 0
    kept = leaf + _vision_input_grad_saves(vspec, ctx) if input_rg else 0
    dropped = cached = peak = 0
    feature_rg = False
    for i, training in enumerate(layer_trainings(vplan, build_layout(vspec))):
        block = simulate_block(vspec, vplan, training, ctx, x_rg, x_dtype)
        saved, tags, x_rg_next, x_dtype_next = block.saved, block.tags, block.out_rg, block.out_dtype
        hook = {tag: nbytes for tag, nbytes in tags if tag.startswith(BLOCK_ADAPTER_TAG + ".")}
        after_mlp = sum(nbytes for tag, nbytes in tags if tag.startswith(("mlp.fc2.adapter.", BLOCK_ADAPTER_TAG + ".")))
        if wrapped[i] and saved:
            inside = saved - sum(hook.values())
            saved = (tok * h * DTYPE_BYTES[stream_dtype(ctx)] if inside else 0) + sum(hook.values())
            cached += sum(nbytes for tag, nbytes in hook.items() if tag.endswith(".autocast_weight"))
        before = kept + dropped
        if saved - after_mlp and not wrapped[i]:  # LayerNorm output, activation output, fc2 output
            peak = max(peak, before + saved - after_mlp + tok * h * wb + tok * inter * cb + tok * h * cb)
        else:  # the layer's input (unless kept as a checkpoint's or it is the encoder input), x2, working set
            own_input = tok * h * wb if i and not (wrapped[i] and saved - sum(hook.values())) else 0
            peak = max(peak, before + saved - after_mlp + own_input + _frozen_layer_working_set(vspec, ctx))
        if i < used:
            kept += saved
        else:
            dropped += saved
        x_rg, x_dtype = x_rg_next, x_dtype_next
        if i == used - 1:
            feature_rg = x_rg
    if x_rg:  # post_layernorm(last_hidden_state[:, 0, :]): the whole output through the view, mean and rstd
        dropped += tok * h * DTYPE_BYTES[x_dtype] + 2 * ctx.batch * DTYPE_BYTES[layer_norm_stats_dtype(ctx, x_dtype)]
    encoder_input = 0 if t.grad_checkpointing else tok * h * wb
    return VisionSaves(kept - leaf, dropped, feature_rg, cached, encoder_input + peak, leaf)


def _frozen_layer_working_set(vspec: ModelSpec, ctx: StepContext) -> int:
    """What a CLIP encoder layer that saves nothing holds at its forward's peak besides its input (the
    per-layer part of vision_forward_bytes): the residual after attention, the MLP's LayerNorm output and
    the activation's intermediates, or, in the attention half, the LayerNorm output, q, k, v and the output."""
    tok, h = ctx.batch * vspec.vision_seq_len, vspec.hidden_size
    wb, cb = DTYPE_BYTES[ctx.weight_dtype], DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]
    intermediates = 3 if vspec.hidden_act == "quick_gelu" else 2
    return max(2 * tok * h * wb + intermediates * tok * vspec.intermediate_size * cb, tok * h * wb + 4 * tok * h * cb)


def _vision_input_leaf_bytes(vspec: ModelSpec, ctx: StepContext) -> int:
    """Gradient checkpointing makes the vision tower's input need a gradient: transformers'
    PreTrainedModel.gradient_checkpointing_enable calls enable_input_require_grads for a model whose
    main input is input_ids (LLaVA), and that hooks the input embeddings of every PreTrainedModel inside,
    the CLIPVisionModel's patch_embedding too (its output.requires_grad_(True)): a leaf, b x patches x
    hidden in the conv's dtype (autocast's under autocast), that no op saves (CLIPVisionEmbeddings' cat
    with the class embedding saves nothing) but its AccumulateGrad node holds to the end of backward, as
    the language model's hooked token embeddings (ActivationProfile.input_leaf; the tracer counts it
    as 'other'). Its .grad, written at the end of backward, is not counted."""
    return ctx.batch * vspec.num_patches * vspec.hidden_size * DTYPE_BYTES[ctx.autocast or ctx.weight_dtype]


def _vision_input_grad_saves(vspec: ModelSpec, ctx: StepContext) -> int:
    """What the vision tower saves because its input needs a gradient (_vision_input_leaf_bytes): the
    position add saves nothing; pre_layrnorm saves its input (b x 577 x hidden, fp32 under autocast: the
    cat promotes to the fp32 class embedding) with mean and rstd, and every encoder layer saves (its
    checkpointed input)."""
    v = vspec
    tok = ctx.batch * v.vision_seq_len
    # pre_layrnorm's input: the weight dtype, or fp32 under autocast (the cat's promotion), as its weights
    stats = layer_norm_stats_dtype(ctx, "float32" if ctx.autocast else ctx.weight_dtype)
    return tok * v.hidden_size * DTYPE_BYTES[ctx.weight_dtype] + 2 * tok * DTYPE_BYTES[stats]


def projector_input_numel(spec: ModelSpec, batch: int) -> int:
    """Elements of the storage LlavaMultiModalProjector.linear_1 saves for its weight's gradient when it
    reads the selected hidden state as it is (no autocast copy). F.linear on a 3-D input (aten::matmul,
    ATen/native/LinearAlgebra.cpp _matmul_impl) folds it with ``reshape(-1, hv)``: the "default"
    strategy's ``[:, 1:]`` view of the (b, 577, hv) hidden state cannot be folded in place when b > 1
    (the row stride skips the class token), so reshape makes a contiguous (b x 576 x hv) copy and mm
    saves it (traced: aten.clone (2, 16, 32) fp32, 4,096 B, on cpu tiny-llava projector fp32 b2 s32);
    with one image, or the "full" strategy, the fold is a view and mm saves the hidden state's own
    (b x 577 x hv) storage."""
    vseq = spec.vision.vision_seq_len
    if batch > 1 and spec.image_tokens != vseq:
        return batch * spec.image_tokens * spec.vision.hidden_size
    return batch * vseq * spec.vision.hidden_size


def llava_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """LlavaForConditionalGeneration.forward: the vision tower (frozen, it saves nothing; with unfrozen
    layers, see vision_saves), the projector on the selected hidden state, masked_scatter of the image
    features into the token embeddings, then the language model and the loss over text + image tokens,
    which is the Llama profile at seq_len + image_tokens (the blocks' input needs a gradient whenever the
    projector trains, so a frozen language model still saves its activations in stage 1)."""
    spec = plan.spec
    t_text = vlm_text_training(spec, t)
    # the language model's layers come after the vision tower's in model.modules() (peftcalc.checkpointing)
    text = model_profile(text_plan(plan), t_text, checkpointed_layers(spec, t, "text"))
    ctx = make_ctx(spec.text, text_plan(plan), t_text)
    rec = Recorder(ctx)
    b, itok = ctx.batch, spec.image_tokens
    hv, h = spec.vision.hidden_size, spec.hidden_size
    vs = vision_saves(plan, t)
    vision_kept, vision_dropped, feature_rg, vision_cached_saved = vs.kept, vs.dropped, vs.feature_rg, vs.cached
    trains = param_trains(plan, f"{PROJECTOR}.linear_1", True)
    # hidden_states[vision_feature_layer][:, 1:]: a view of the tower's (b, 577, hv) output in the
    # weight dtype (CLIP's residual stream); linear_1 saves it (under autocast, its cast copy, and the
    # cast weight when the features need a gradient)
    if trains:
        if ctx.autocast:
            rec.save_new(b * itok * hv, ctx.autocast, "projector.linear_1.input")
        elif feature_rg:  # traced: a contiguous copy of the [:, 1:] view (its storage is saved by the next layer)
            rec.save_new(b * itok * hv, ctx.weight_dtype, "projector.linear_1.input")
        else:
            rec.save_new(projector_input_numel(spec, b), ctx.weight_dtype, "projector.linear_1.input")
    if ctx.autocast and feature_rg:
        rec.save_new(hv * h, ctx.autocast, "projector.linear_1.autocast_weight")
    p1 = rec.new(b * itok * h, ctx.autocast or ctx.compute_dtype, trains or feature_rg)
    act = activation(rec, p1, "gelu", "projector.act")
    linear(rec, act, h, h, param_trains(plan, f"{PROJECTOR}.linear_2", True), "projector.linear_2")
    if plan.embedding_trains:  # masked_scatter saves the image-token mask (bool, b x seq, expanded view)
        rec.save_new(ctx.tokens, "uint8", "masked_scatter.mask")
    leaf = 0
    if input_embeddings_require_grad(spec, t) and not param_trains(plan, build_layout(spec).embedding_path):
        # the hooked output of the frozen token embeddings is a leaf held to the end of backward
        # (masked_scatter makes the tensor the language model gets; ActivationProfile.input_leaf)
        leaf = ctx.tokens * h * DTYPE_BYTES[ctx.weight_dtype]
    extra = rec.bytes_by_bucket().get("pre", 0) + vision_kept
    tags = dict(text.by_tag)
    for tag, nbytes in rec.bytes_by_tag().items():
        tags[tag] = tags.get(tag, 0) + nbytes
    if vision_kept:
        tags["vision_tower.layers"] = vision_kept
    # LlavaModel.forward keeps the image features (torch.cat of the projector's outputs, cast to the
    # embeddings' dtype) to the end of forward and returns them as image_hidden_states: alive through
    # the language model and the loss, dropped with the outputs before backward
    features = b * itok * h * DTYPE_BYTES[ctx.weight_dtype]
    # The forward:block event (memory._step_events: pre + saved + transient) is the larger of a language
    # model block's working set and the vision tower's forward, which runs before the language model
    # saves anything (with unfrozen layers, the tower's own saved tensors are alive by its last layer)
    vision_ws = ctx.tokens * h * DTYPE_BYTES[ctx.weight_dtype] + vs.forward_peak if vs.forward_peak \
        else vision_forward_bytes(spec, ctx)
    # the saved tensors of the vision layers above the feature layer live through the language model's forward
    transient, transient_saved = text.forward_transient + features + vision_dropped, text.forward_transient_saved
    if vision_ws > text.pre + extra + leaf + transient_saved + transient:
        transient, transient_saved = vision_ws - text.pre - extra - leaf, 0
    # without checkpointing, the language model's block forward peak (ActivationProfile.forward_block_*)
    # with the vision tower's kept saves and the image features, or the vision tower's forward
    block_saved, block_live = text.forward_block_saved + extra, text.forward_block_live + features + vision_dropped
    if vision_ws > block_saved + block_live:
        block_saved, block_live = 0, vision_ws
    weight_cache = text.autocast_weight_cache
    if ctx.autocast:  # autocast caches the cast copies of trainable leaf weights: projector, vision linears
        # and adapters (less the block adapters' copies, which are saved and counted as kept)
        vision_linears = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
        adapter_linears = ("down", "up", "down_proj", "up_proj")
        weight_cache += DTYPE_BYTES[ctx.autocast] * sum(
            g.numel for g in vision_plan(plan).groups
            if g.trainable and g.name.endswith(".weight") and g.name.rsplit(".", 2)[-2] in
            (adapter_linears if g.origin == "adapter" else vision_linears)) - vision_cached_saved
        if trains:
            weight_cache += (hv * h + h * h) * DTYPE_BYTES[ctx.autocast]
    return replace(text, pre=text.pre + extra, input_leaf=text.input_leaf + leaf + vs.input_leaf,
                   forward_transient=transient, forward_transient_saved=transient_saved,
                   forward_block_saved=block_saved, forward_block_live=block_live,
                   loss_forward_peak=text.loss_forward_peak + features,
                   autocast_weight_cache=weight_cache, by_tag=tuple(sorted(tags.items())))


def vision_forward_bytes(spec: ModelSpec, ctx: StepContext) -> int:
    """Live bytes while a frozen CLIP vision tower runs its forward (traced, transformers 5.x: the
    hidden states are not all kept; each layer's output dies in the next layer, only the selected one
    survives). LlavaModel.forward has already embedded the tokens (b x seq x hidden, `ctx` is the
    language model's); CLIPVisionTransformer holds the encoder's input (the pre_layrnorm output); a
    layer holds its input, the residual after attention and the normalised input of the MLP, whose fc1
    output and activation intermediates peak together (quick_gelu, x * sigmoid(1.702 x): fc1's output,
    1.702 x and the sigmoid; GELU: fc1's output and its own). The attention half (input, LayerNorm output,
    q, k, v, output) is smaller for CLIP's 4x MLP but is taken when larger."""
    v = spec.vision
    tok = ctx.batch * v.vision_seq_len
    wb = DTYPE_BYTES[ctx.weight_dtype]
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]
    intermediates = 3 if v.hidden_act == "quick_gelu" else 2
    mlp = 4 * tok * v.hidden_size * wb + intermediates * tok * v.intermediate_size * cb
    attn = 3 * tok * v.hidden_size * wb + 4 * tok * v.hidden_size * cb
    return ctx.tokens * spec.hidden_size * wb + max(mlp, attn)
