"""The activation profile of BLIP-2 (Blip2ForConditionalGeneration.forward): the frozen EVA tower's working
set, the Q-Former and language projection, then the OPT language model and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from peftcalc.checkpointing import checkpointed_layers
from peftcalc.families import build_layout, dropout_p
from peftcalc.families.blip2 import LANGUAGE_PROJECTION, QFORMER, QUERY_TOKENS, blip2_image_tokens, blip2_parts, blip2_vision_tokens, qformer_layer, qformer_linear
from peftcalc.layout import LINEAR_KINDS
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder
from peftcalc.ops.tensor_ops import cast, dropout
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.autocast_cache import autocast_weight_cache_bytes
from peftcalc.sim.blocks import run_blocks, unwrapped_saved_copies
from peftcalc.methods.sites import trainable_names
from peftcalc.sim.head import head_backward, head_forward
from peftcalc.sim.loss import loss_buffers
from peftcalc.sim.model import block_forward_transient, saved_below_last_frozen_block
from peftcalc.sim.profile import ActivationProfile, make_ctx, stream_dtype
from peftcalc.families import kept_in_fp32
from peftcalc.spec import ModelSpec

__all__ = [
    "QFormerSaves",
    "blip2_forward_outputs",
    "blip2_profile",
    "eva_forward_bytes",
    "qformer_ctx",
    "qformer_saves",
]


@lru_cache(maxsize=1024)
def _training(plan: Plan) -> frozenset:
    """The trainable parameters outside the blocks, by name, and the modules that hold them, by path."""
    names = trainable_names(plan)
    return names | {n.rsplit(".", 1)[0] for n in names}


@dataclass(frozen=True)
class QFormerSaves:
    """What the Q-Former and the language projection keep for backward: everything they save, or under
    gradient checkpointing (Blip2QFormerLayer is a GradientCheckpointingLayer) what the checkpoints keep."""

    saved: int
    checkpointed: int
    unsaved: int  # alive to the end of the forward, saved by no op (see qformer_saves)
    unsaved_image: int  # the image features when no op saves them (the checkpoints keep them)
    unsaved_weight_copies: int  # autocast's cached weight copies that no op saves
    saved_weight_copies: int  # autocast's cached weight copies the projection saves (kept under checkpointing)
    output_rg: bool
    by_tag: tuple
    tower_output: int = 0  # the tower's output when the Q-Former reads an fp32 copy of it (see qformer_ctx)
    unsaved_bias_copies: int = 0  # autocast's cached copies of the trainable Linear biases (in `unsaved`)
    # autocast's cached copies of trainable weights that layers checkpointing leaves unwrapped save (in
    # `checkpointed`, as they are also in the cache memory counts under checkpointing)
    unwrapped_saved_copies: int = 0


def qformer_ctx(plan: Plan, ctx: StepContext) -> StepContext:
    """The Q-Former's StepContext: the language model's (`ctx`), or, where from_pretrained keeps the Q-Former in fp32
    (families.kept_in_fp32: Blip2ForConditionalGeneration._keep_in_fp32_modules under fp16), fp32 weights and
    compute: Blip2QFormerModel.forward casts the query tokens to its layernorm's dtype ("Qformer is kept as
    fp32") and the encoder hidden states to theirs, so every op inside it runs in fp32."""
    if kept_in_fp32(plan.spec, QFORMER, ctx.weight_dtype):
        return replace(ctx, weight_dtype="float32", compute_dtype="float32")
    return ctx


@lru_cache(maxsize=4096)
def qformer_saves(plan: Plan, ctx: StepContext, wrapped: tuple = ()) -> QFormerSaves:
    """Blip2ForConditionalGeneration.get_image_features after the frozen tower: query_tokens.expand(b),
    Blip2QFormerModel (layernorm on the query tokens, whose input is a view of the parameter and no
    activation; dropout; the layers, with the tower's post_layernorm output as encoder_hidden_states, in
    the weight dtype), then language_projection on the last hidden state. `ctx` is the Q-Former's: the
    language model's with seq and kv_seq num_query_tokens. Under checkpointing each layer keeps its input,
    and every layer keeps a reference to the image features; the layernorm, dropout and projection are not
    checkpointed (under autocast the projection saves autocast's cached copy of its weight:
    `saved_weight_copies`). A Q-Former kept in fp32 (qformer_ctx) reads an fp32 copy of the image features
    (``encoder_hidden_states.to(query_embeds.dtype)``: what its cross-attention keys and values save, and the
    checkpoints keep), and get_image_features casts its output back to the image features' dtype
    (``query_output.to(image_embeds.dtype)``) before the projection, which saves that cast; the tower's
    output and the fp32 last hidden state stay alive, unsaved, in the returned outputs.
    `wrapped` (peftcalc.checkpointing, per layer; empty: every layer) says which layers checkpointing
    wraps: the others keep what they save, and the image features are the checkpoints' only while a
    wrapped layer saves (unless an unwrapped layer's cross-attention saved them already).
    Alive until the forward returns and saved by no op: the image features and the Q-Former's last hidden
    state when only cast copies of them are saved (autocast), and autocast's cached copies (torch.autocast
    caches the cast of every leaf that requires grad) of the trainable Linear biases (addmm's bias gradient
    needs nothing saved) and of the cross-attention keys' and values' weights (their input, the image
    features, needs no gradient, so the matmul saves no weight)."""
    spec = plan.spec
    vspec, qspec, _ = blip2_parts(spec)
    trains = _training(plan)
    qctx = qformer_ctx(plan, ctx)
    rec = Recorder(qctx, bucket="pre")
    hq, n, batch = qspec.hidden_size, ctx.seq, ctx.batch
    tower_out = rec.new(batch * blip2_vision_tokens(spec) * vspec.hidden_size, ctx.weight_dtype, False)
    queries_rg = QUERY_TOKENS in trains
    norm_trains = f"{QFORMER}.layernorm" in trains
    if queries_rg or norm_trains:  # native_layer_norm saves mean and rstd (the input is the parameter):
        # fp32, but in the input's dtype on the CPU when input and weight are both half (see layer_norm;
        # traced: 2 x b x queries bf16 on cpu tiny-blip2-wide-vision bf16 b4 s4)
        half = qctx.device == "cpu" and qctx.weight_dtype != "float32" and not ctx.autocast
        rec.save_new(2 * batch * n, qctx.weight_dtype if half else "float32", f"{QFORMER}.layernorm.mean_rstd")
    x = rec.new(batch * n * hq, "float32" if ctx.autocast else qctx.weight_dtype, queries_rg or norm_trains)
    image = cast(rec, tower_out, qctx.weight_dtype)
    x = dropout(rec, x, dropout_p(qspec, "embd"), f"{QFORMER}.dropout")
    kept = unwrapped = 0
    wrapped = wrapped or (True,) * qspec.num_layers
    for i in range(qspec.num_layers):
        rec.bucket = i
        before = set(rec.saved)
        x_in = x
        x = qformer_layer(rec, spec, trains, i, x, image)
        layer_saved = sum(rec.saved[k][2] for k in set(rec.saved) - before)
        if not wrapped[i]:
            unwrapped += layer_saved
        elif layer_saved:
            kept += x_in.nbytes
    rec.bucket = "post"
    rec.ctx = ctx
    out = qformer_linear(rec, trains, cast(rec, x, tower_out.dtype), hq, spec.hidden_size, LANGUAGE_PROJECTION)
    buckets = rec.bytes_by_bucket()
    layers = sum(v for k, v in buckets.items() if isinstance(k, int))
    cached = sum(n for bucket, tag, n in rec.saved.values() if bucket == "post" and tag.endswith(".autocast_weight"))
    image_bucket = rec.saved.get(image.id, (None,))[0]
    image_unwrapped = isinstance(image_bucket, int) and not wrapped[image_bucket]
    checkpointed = (buckets.get("pre", 0) + buckets.get("post", 0) + kept + unwrapped
                    + (image.nbytes if kept and not image_unwrapped else 0))
    unwrapped_copies = sum(c.nbytes for c in rec.cached if c.id in rec.saved and isinstance(rec.saved[c.id][0], int)
                           and not wrapped[rec.saved[c.id][0]])
    unsaved = x.nbytes if x.id not in rec.saved else 0
    weight_copies = bias_copies = 0
    if ctx.autocast:
        bias_copies = DTYPE_BYTES[ctx.autocast] * _trainable_linear_numel(plan, ".bias")
        unsaved += bias_copies
        weight_copies = DTYPE_BYTES[ctx.autocast] * _trainable_linear_numel(
            plan, ".weight", ".crossattention.attention.key", ".crossattention.attention.value")
    return QFormerSaves(saved=buckets.get("pre", 0) + layers + buckets.get("post", 0), checkpointed=checkpointed,
                        unsaved=unsaved, unsaved_image=0 if image.id in rec.saved else image.nbytes,
                        unsaved_weight_copies=weight_copies, saved_weight_copies=cached, output_rg=out.requires_grad,
                        by_tag=tuple(rec.bytes_by_tag().items()),
                        tower_output=tower_out.nbytes if image is not tower_out else 0,
                        unsaved_bias_copies=bias_copies, unwrapped_saved_copies=unwrapped_copies)


def _trainable_linear_numel(plan: Plan, suffix: str, *modules: str) -> int:
    """Elements of the trainable `suffix` parameters (".weight", ".bias") of the Linears outside the blocks
    (those whose path ends with one of `modules`, when given)."""
    linears = {m.path for m in build_layout(plan.spec).modules if m.kind in LINEAR_KINDS and m.layer is None}
    total = 0
    for g in plan.groups:
        path = g.name[: -len(suffix)] if g.name.endswith(suffix) else None
        if g.trainable and path in linears and (not modules or path.endswith(modules)):
            total += g.numel
    return total


def eva_forward_bytes(spec: ModelSpec, ctx: StepContext) -> int:
    """Live bytes while the frozen EVA tower (Blip2VisionModel) runs its forward, the first thing
    Blip2ForConditionalGeneration.forward does (traced, transformers 5.x: nothing is saved and each layer's
    output dies in the next layer): the embeddings output (held by Blip2VisionModel.forward), a
    Blip2EncoderLayer's input, its residual after attention and layer_norm2's output, with fc1's output and
    the activation's (GELU: two intermediates; quick_gelu three) at the MLP's peak; the attention half holds
    the input, the embeddings, layer_norm1's output, the fused qkv output, the attention output and the
    projection's, which is taken when larger. `ctx` is the language model's."""
    vspec = blip2_parts(spec)[0]
    tok = ctx.batch * blip2_vision_tokens(spec)
    wb = DTYPE_BYTES[ctx.weight_dtype]
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]
    intermediates = 3 if vspec.hidden_act == "quick_gelu" else 2
    mlp = 4 * tok * vspec.hidden_size * wb + intermediates * tok * vspec.intermediate_size * cb
    attn = 3 * tok * vspec.hidden_size * wb + 5 * tok * vspec.hidden_size * cb
    return max(mlp, attn)


def blip2_forward_outputs(spec: ModelSpec, ctx: StepContext, q: QFormerSaves, checkpointing: bool) -> int:
    """Tensors Blip2ForConditionalGeneration.forward holds while its language model and loss run, none of
    them saved: the token embeddings after masked_scatter (inputs_embeds, b x seq x hidden, weight dtype),
    the language projection's output (the image output's pooler_output; under autocast also its cast to the
    embeddings' dtype), the tower's pooled output (b x vision hidden) and attention_mask =
    torch.ones_like(input_ids) (int64), and what the Q-Former leaves alive unsaved (QFormerSaves: under
    checkpointing the image features are the checkpoints' and the weight copies autocast_weight_cache_bytes's;
    the tower's output of which an fp32 Q-Former read a copy is alive either way).
    `ctx` is the language model's."""
    vspec = blip2_parts(spec)[0]
    b, n, h = ctx.batch, blip2_image_tokens(spec), spec.hidden_size
    wb = DTYPE_BYTES[ctx.weight_dtype]
    projected = b * n * h * DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]
    if ctx.autocast:
        projected += b * n * h * wb
    qformer = q.unsaved + q.tower_output + (0 if checkpointing else q.unsaved_image + q.unsaved_weight_copies)
    return ctx.tokens * h * wb + projected + b * vspec.hidden_size * wb + ctx.tokens * 8 + qformer


def blip2_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """Blip2ForConditionalGeneration.forward (transformers models/blip_2/modeling_blip_2.py) with labels:
    the frozen EVA tower (nothing saved: nothing below it trains; its forward working set counts, see
    eva_forward_bytes), the Q-Former and language projection (qformer_saves), masked_scatter of the projected
    queries into the token embeddings (it saves the b x seq bool mask), then OPTForCausalLM on num_query_tokens
    + text tokens (models/opt/modeling_opt.py: opt_block per layer, final_layer_norm, the lm_head tied to
    embed_tokens) and ForCausalLMLoss over every position. The gradient reaches the projection through the
    whole frozen language model, so every OPT block saves its activations, as LLaVA's stage 1 does."""
    spec = plan.spec
    layout = build_layout(spec)
    tspec = blip2_parts(spec)[2]
    t_text = replace(t, seq_len=t.seq_len + blip2_image_tokens(spec))
    ctx = make_ctx(tspec, plan, t_text)
    h, tok = spec.hidden_size, ctx.tokens
    q = qformer_saves(plan, replace(ctx, seq=blip2_image_tokens(spec), kv_seq=blip2_image_tokens(spec)),
                      checkpointed_layers(spec, t, "qformer"))
    wrapped = checkpointed_layers(spec, t, "text")
    rec = Recorder(ctx)
    if q.output_rg:  # masked_scatter saves its (b, seq, 1) bool mask for the gradients of both inputs
        rec.save_new(tok, "uint8", "masked_scatter.mask")
    x = rec.new(tok * h, ctx.weight_dtype, q.output_rg)  # inputs_embeds + embed_positions(...)
    outputs = blip2_forward_outputs(spec, ctx, q, t.grad_checkpointing)
    # OPTDecoder.forward rebinds hidden_states: the blocks' first input is not held (inputs_embeds is,
    # among `outputs`)
    blocks = run_blocks(rec, tspec, plan, layout, ctx, x, outputs, False, wrapped, t.checkpoint_reentrant)
    rec.bucket = "post"
    head_start = len(rec.nodes)
    logits_numel, x, root = head_forward(rec, tspec, plan, layout, blocks.out)
    head = head_backward(rec, head_start, root)
    tags = dict(q.by_tag)
    for tag, nbytes in list(blocks.tags.items()) + list(rec.bytes_by_tag().items()):
        tags[tag] = tags.get(tag, 0) + nbytes
    by_bucket = rec.bytes_by_bucket()
    per_layer = blocks.per_layer
    saving = [a for i, a in enumerate(per_layer) if a and (not wrapped or wrapped[i])]
    # OPTDecoder's position_ids (b x seq, int64) are an input of every checkpointed layer
    ckpt_inputs = len(saving) * tok * h * DTYPE_BYTES[stream_dtype(ctx)] + (tok * 8 if saving else 0)
    qformer = q.checkpointed if t.grad_checkpointing else q.saved
    pre = by_bucket.get("pre", 0) + qformer
    loss = loss_buffers(tspec, ctx, logits_numel)
    transient = block_forward_transient(tspec, plan, ctx, per_layer) + outputs
    transient_saved = saved_below_last_frozen_block(per_layer)
    forward_block = blocks.mixed_forward_block if blocks.kept else blocks.forward_block
    block_saved, block_live = forward_block[0] + qformer, forward_block[1]
    vision = eva_forward_bytes(spec, ctx)  # runs before anything is saved
    if vision > pre + (0 if t.grad_checkpointing else transient_saved) + transient:
        transient, transient_saved = vision - pre, 0
    if vision > block_saved + block_live:  # the tower's forward: the Q-Former has saved nothing yet
        block_saved, block_live = 0, vision
    return ActivationProfile(
        per_layer=per_layer,
        pre=pre,
        post=by_bucket.get("post", 0),
        checkpoint_inputs=ckpt_inputs,
        logits_bytes=logits_numel * DTYPE_BYTES[ctx.autocast or ctx.compute_dtype],
        loss_saved=loss.saved,
        loss_saved_backward=loss.saved_backward,
        loss_backward_peak=loss.backward_peak,
        loss_forward_peak=loss.forward_peak + outputs,
        loss_scalars=loss.scalars,
        forward_transient=transient,
        forward_transient_saved=transient_saved,
        # the projection's saved weight copy is the cache's own, already in `pre`; the biases' copies are
        # among the forward's outputs (blip2_forward_outputs: QFormerSaves.unsaved)
        autocast_weight_cache=autocast_weight_cache_bytes(plan, ctx) - q.saved_weight_copies - q.unsaved_bias_copies
        - q.unwrapped_saved_copies - unwrapped_saved_copies(plan, ctx, blocks, wrapped),
        # Blip2ForConditionalGeneration.forward computes the loss itself, after OPTForCausalLM.forward has
        # returned CausalLMOutputWithPast (logits and past_key_values): the decoder's last hidden state
        # died with OPTForCausalLM's `outputs`, so no model_output is alive while the loss runs (traced)
        model_output=0,
        head_backward=head,
        forward_block_saved=block_saved,
        forward_block_live=block_live,
        forward_leaves=blocks.leaves,
        blocks=blocks.blocks,
        by_tag=tuple(sorted(tags.items())),
        checkpointed=wrapped,
        reentrant_backward=blocks.reentrant if t.checkpoint_reentrant else (),
    )
