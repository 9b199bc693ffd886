"""The activation profile of a model of one stack of blocks (also a vision-language model's language model):
embeddings, blocks, final norm, head and loss, and what the model's forward holds meanwhile.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from peftcalc.families import build_layout, dropout_p, family
from peftcalc.layout import Layout
from peftcalc.methods.sites import HeadSites, layer_trainings, param_trains
from peftcalc.ops.attention import layer_windows, mask_bytes_by_window, model_masks_bytes
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.autocast_cache import autocast_weight_cache_bytes
from peftcalc.sim.blocks import BlockRun, run_blocks, unwrapped_saved_copies
from peftcalc.sim.head import embeddings_forward, final_norm, has_final_norm, head_backward, head_forward, unsaved_model_output
from peftcalc.sim.loss import chunked_loss_buffers, fused_loss_buffers, loss_buffers
from peftcalc.sim.profile import ActivationProfile, input_embeddings_require_grad, make_ctx, stream_dtype
from peftcalc.spec import ModelSpec

__all__ = [
    "block_forward_transient",
    "model_profile",
    "saved_below_last_frozen_block",
    "with_final_norm",
]


@lru_cache(maxsize=4096)
def model_profile(plan: Plan, t: TrainingSettings, checkpointed: tuple) -> ActivationProfile:
    """activation_profile of a model of one stack of blocks (also a VLM's language model), whose blocks
    gradient checkpointing wraps as `checkpointed` says (peftcalc.checkpointing; empty: none)."""
    spec = plan.spec
    layout = build_layout(spec)
    ctx = make_ctx(spec, plan, t)
    rec = Recorder(ctx)
    h, tok = spec.hidden_size, ctx.tokens
    hooked = input_embeddings_require_grad(spec, t)
    input_rg = plan.embedding_trains or plan.settings.method == "prompt" or hooked
    leaf = 0
    if hooked and not plan.embedding_trains and spec.is_vision:
        # the hooked output of the frozen patch embedding (ViTPatchEmbeddings, CLIP's patch_embedding: the
        # conv's output, in autocast's dtype under autocast) is such a leaf too; the class token is
        # concatenated before it and the positions added
        numel = t.batch_size * spec.num_patches * h
        leaf = numel * DTYPE_BYTES[ctx.autocast or ctx.weight_dtype]
        rec.new(numel, ctx.autocast or ctx.weight_dtype, True)
    elif hooked and not plan.embedding_trains and (family(spec).embeddings_add_positions
                                                   or plan.settings.method == "prompt"):
        # the hooked output of the frozen word embeddings is a leaf that requires grad: its
        # AccumulateGrad node holds it to the end of backward, and it is not the tensor the blocks get
        # (positions are added to it, or peft concatenates the prompt before it)
        leaf = t.batch_size * t.seq_len * h * DTYPE_BYTES[ctx.weight_dtype]
        rec.new(t.batch_size * t.seq_len * h, ctx.weight_dtype, True)
    indices = _embedding_indices_saved(spec, plan, layout, ctx)
    for numel, tag in indices:
        rec.save_new(numel, "int64", tag)
    # The embedding output: token embeddings (+ positions) in the weight dtype.
    x = rec.new(tok * h, ctx.weight_dtype, input_rg)
    x = embeddings_forward(rec, spec, plan, layout, x)
    if plan.settings.method in ("prefix", "prompt"):
        # peft PeftModel.get_prompt: self.prompt_tokens[adapter].unsqueeze(0).expand(batch, -1), an int64
        # arange of the virtual tokens peft keeps, is what the prompt encoder's embedding saves
        rec.save_new(plan.settings.num_virtual_tokens, "int64", "prompt_encoder.indices")
    grads_reach_blocks = input_rg or plan.lowest_trainable_layer is not None or plan.settings.method == "prefix"
    saved_types = _rotary_types_saved(spec, plan, layout, input_rg) if grads_reach_blocks else frozenset()
    if family(spec).rotary and saved_types:
        # LlamaRotaryEmbedding's cos and sin (1 x seq x rope_dim, in the hidden states' dtype), shared
        # by every layer (of a type), saved by q * cos and rotate_half(q) * sin
        rec.save_new(2 * ctx.seq * _rotary_dim(spec) * len(saved_types), _rotary_dtype(spec, ctx), "rotary.cos_sin")
    # held while the blocks run: prompt tuning's inputs, the positions and rotary embeddings of the
    # Llama family (what the blocks leave referenced adds up in run_blocks)
    held = _prompt_inputs_held(spec, plan, ctx) + _positions_held(spec, ctx, len(saved_types), any(checkpointed))
    blocks = run_blocks(rec, spec, plan, layout, ctx, x, held, True, checkpointed, t.checkpoint_reentrant)
    mixed = bool(blocks.kept)
    forward_block = with_final_norm(spec, plan, layout, ctx, _as_kept(blocks) if mixed else blocks, rec.saved_total)
    rec.bucket = "post"
    head_start = len(rec.nodes)
    logits_numel, hidden, root = head_forward(rec, spec, plan, layout, blocks.out)
    head = head_backward(rec, head_start, root)
    model_output = unsaved_model_output(rec, hidden)
    by_bucket = rec.bytes_by_bucket()
    tags = blocks.tags
    for tag, nbytes in rec.bytes_by_tag().items():
        tags[tag] = tags.get(tag, 0) + nbytes
    per_layer = blocks.per_layer
    needs_grad_layers = [i for i in range(spec.num_layers) if per_layer[i] > 0 and (not checkpointed or checkpointed[i])]
    ckpt_inputs = len(needs_grad_layers) * tok * h * DTYPE_BYTES[stream_dtype(ctx)]
    chunked = t.loss == "chunked" and spec.task == "causal_lm"
    loss, logits_numel = _loss(spec, plan, layout, ctx, t, logits_numel, root)
    weight_cache = (autocast_weight_cache_bytes(plan, ctx) - rec.saved_cached_copies()
                    - unwrapped_saved_copies(plan, ctx, blocks, checkpointed))
    return ActivationProfile(
        per_layer=per_layer,
        pre=by_bucket.get("pre", 0),
        post=by_bucket.get("post", 0),
        checkpoint_inputs=ckpt_inputs,
        checkpoint_kwargs=0 if not any(checkpointed) else _checkpointed_layer_positions(
            spec, ctx, t, bool(indices) and not family(spec).position_ids_batched),
        input_leaf=leaf,
        forward_checkpoint_inputs=_forward_checkpoint_inputs(spec, ctx, t, per_layer, checkpointed),
        lookup_saved=_lookup_saved(plan, indices),
        logits_bytes=logits_numel * DTYPE_BYTES[ctx.autocast or ctx.compute_dtype],
        loss_saved=loss.saved,
        loss_saved_backward=loss.saved_backward,
        loss_backward_peak=loss.backward_peak,
        loss_forward_peak=loss.forward_peak,
        loss_scalars=loss.scalars,
        forward_transient=block_forward_transient(spec, plan, ctx, per_layer, blocks.unsaved_block_live),
        forward_transient_saved=saved_below_last_frozen_block(per_layer),
        autocast_weight_cache=weight_cache,
        model_output=0 if chunked else model_output,  # a loss outside the model: it has returned
        head_backward=head,
        forward_block_saved=forward_block[0],
        forward_block_live=forward_block[1],
        # and the head's cached weight copies no op saves (a trainable lm_head over frozen blocks: traced,
        # fake tiny-llama frozen amp-bf16 b3 s48, its 512 x 64 bf16 copy alive through the loss)
        forward_leaves=blocks.leaves + rec.unsaved_cached_copies(),
        blocks=blocks.blocks,
        embedding_grad=x.nbytes if x.requires_grad else 0,
        by_tag=tuple(sorted(tags.items())),
        checkpointed=checkpointed,
        reentrant_backward=blocks.reentrant if t.checkpoint_reentrant else (),
        type_releases=_type_releases(spec, ctx, t, saved_types) if any(checkpointed) else (),
        head_replayed=ctx.fused_loss == "trl",
        router_logits=tuple(b.returned for b in blocks.blocks) if ctx.router_aux_loss else (),
        router_grads=tuple(b.returned_grad for b in blocks.blocks) if ctx.router_aux_loss else (),
        **_offloaded(plan, ctx, rec, blocks, any(checkpointed) and ckpt_inputs, logits_numel, hooked and not leaf and x.nbytes),
    )


def _offloaded(plan: Plan, ctx: StepContext, rec: Recorder, blocks: BlockRun, checkpoint_inputs: int, logits_numel: int,
               leaf_input: int) -> dict:
    """The ActivationProfile fields of activation offloading (none without it): host_bytes
    (_offloaded_host_bytes), the first block's checkpointed input a leaf keeps on the device (`leaf_input`: the
    hooked embedding output of a frozen embedding is the first block's input), and the lookup's indices
    EmbeddingBackward unpacks."""
    if not ctx.offload:
        return {}
    return {"host_bytes": _offloaded_host_bytes(plan, ctx, rec, blocks, int(checkpoint_inputs), logits_numel),
            "offload_kept_input": int(leaf_input) if checkpoint_inputs and not plan.embedding_trains else 0,
            "offload_lookup_copy": ctx.tokens * 8 if plan.embedding_trains else 0}


def _offloaded_host_bytes(plan: Plan, ctx: StepContext, rec: Recorder, blocks: BlockRun, checkpoint_inputs: int,
                          logits_numel: int) -> int:
    """Under activation offloading (torch/autograd/graph.py save_on_cpu: pack_to_cpu makes a host copy of every
    saved variable, of its own size, so a tensor two nodes save is copied twice) the host bytes at the end of the
    forward: the copies of the model's forward and the blocks (Recorder.host_bytes: what each recorded node
    saves, the parameters and their views included), under checkpointing the checkpoints' inputs instead of the
    blocks' (torch/utils/checkpoint.py _NoopSaveInputs; inside a block the checkpoint's hooks are innermost), the
    word embedding's indices (EmbeddingBackward saves input_ids, when the embedding trains) and transformers'
    ForCausalLMLoss: log_softmax's fp32 output, saved by log_softmax and by nll_loss, the shifted labels (int64)
    and nll_loss's total_weight (an fp32 scalar)."""
    lookups = ctx.tokens * 8 if plan.embedding_trains else 0
    loss = 2 * logits_numel * 4 + ctx.tokens * 8 + 4
    return rec.host_bytes + sum(b.host for b in blocks.blocks) + checkpoint_inputs + lookups + loss


def _loss(spec: ModelSpec, plan: Plan, layout: Layout, ctx: StepContext, t: TrainingSettings, logits_numel: int,
          root: SymTensor):
    """(the loss's buffers, the logits' numel as the profile counts them) for the loss `t.loss` names: a fused
    loss (its logits never exist whole: the head's incoming gradient stands for them), torchtune's chunked
    cross-entropy on a causal LM, or transformers' loss (sim.loss)."""
    if ctx.fused_loss == "trl":
        from peftcalc.sim.trl_head import trl_loss_buffers

        return trl_loss_buffers(ctx, spec), root.nbytes // 4  # the head's incoming gradient: N fp32
    if ctx.fused_loss:
        tied = layout.head_tied_to_embedding and plan.embedding_trains
        loss = fused_loss_buffers(ctx, spec, param_trains(plan, "lm_head", True) or tied)
        return loss, root.nbytes // DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]  # the head's incoming gradient
    if t.loss == "chunked" and spec.task == "causal_lm":
        return chunked_loss_buffers(ctx, spec.vocab_size, t.loss_chunks), logits_numel
    return loss_buffers(spec, ctx, logits_numel), logits_numel


def _final_norm_peak(spec: ModelSpec, plan: Plan, layout: Layout, ctx: StepContext, out: SymTensor) -> tuple[int, int]:
    """The final norm's forward on the last block's output, simulated alone like a block: (peak, saved at
    it), its input included. It runs inside the base model's forward (LlamaModel.forward's self.norm,
    ViTModel's layernorm, GPT2Model's ln_f), with what the forward holds when the blocks are done
    (BlockRun.held_after: prefix tuning's cache, the positions, the embedding output). Traced
    (tiny-llama-cls prefix amp-bf16, fake): the step's peak is LlamaRMSNorm's x * rsqrt and
    weight * _, with the variance still referenced."""
    rec = Recorder(ctx, bucket="post")
    final_norm(rec, spec, plan, layout, rec.new(out.numel, out.dtype, out.requires_grad))
    return rec.forward_peak, rec.forward_peak_saved


def with_final_norm(spec: ModelSpec, plan: Plan, layout: Layout, ctx: StepContext, blocks: BlockRun,
                     below: int) -> tuple:
    """BlockRun.forward_block, or the final norm's peak (_final_norm_peak) where it is larger, on what
    the model's forward (`below`) and the blocks saved."""
    if not has_final_norm(spec, layout):
        return blocks.forward_block
    peak, peak_saved = _final_norm_peak(spec, plan, layout, ctx, blocks.out)
    below += 0 if ctx.offload else sum(blocks.per_layer)  # offloaded: nothing saved stays on the device
    if below + peak + blocks.held_after > sum(blocks.forward_block):
        return below + peak_saved, peak - peak_saved + blocks.held_after
    return blocks.forward_block


def _as_kept(blocks: BlockRun) -> BlockRun:
    """A BlockRun whose blocks save what they keep when only some are checkpointed (_mixed_blocks), for
    with_final_norm."""
    return replace(blocks, per_layer=blocks.kept, forward_block=blocks.mixed_forward_block,
                   held_after=blocks.mixed_held_after)


def _positions_held(spec: ModelSpec, ctx: StepContext, rotary_saved: int, checkpointed: bool = False) -> int:
    """LlamaModel.forward (Mistral, Qwen2) holds cache_position (int64, one per token of the sequence)
    and the rotary position embeddings (cos, sin: 1 x seq x rope_dim each, in the hidden states' dtype)
    while the layers run; cos and sin count as saved where the layers need gradients (activation_profile
    saves them then). With prefix tuning's past keys the causal mask cannot be skipped, nor a sliding
    window's once the keys reach it: masking_utils builds a (1, 1, seq, past + seq) bool mask per mask type,
    held too (ops.attention.model_masks_bytes; traced)."""
    if not family(spec).rotary:
        return 0
    if ctx.offload and not checkpointed:  # offloaded, the saved cos/sin are the forward's, not autograd's
        rotary_saved = 0
    rotary = 2 * ctx.seq * _rotary_dim(spec) * DTYPE_BYTES[_rotary_dtype(spec, ctx)] * (_rotary_sets(spec) - rotary_saved)
    return ctx.seq * 8 + rotary + model_masks_bytes(spec, ctx)


def _type_releases(spec: ModelSpec, ctx: StepContext, t: TrainingSettings, rotary_saved: frozenset) -> tuple:
    """ActivationProfile.type_releases: for each layer type but block 0's, the lowest layer of that type and
    what only layers of that type hold through their checkpoints' keyword arguments (modeling_layers.py
    GradientCheckpointingLayer: ``partial(forward, **kwargs)``, kept by the frame until the layer's backward):
    its RoPE cos/sin (Gemma 3's position_embeddings[layer_type], when saved) and its mask
    (attention_mask=causal_mask_mapping[layer_type], when the checkpoints hold kwargs)."""
    windows = layer_windows(spec)
    masks = mask_bytes_by_window(spec, ctx) if _checkpointed_layer_positions(spec, ctx, t) else {}
    rotary = 2 * ctx.seq * _rotary_dim(spec) * DTYPE_BYTES[_rotary_dtype(spec, ctx)] if family(spec).rotary_per_layer_type else 0
    out = []
    for w in set(windows) - {windows[0]}:
        out.append((windows.index(w), rotary if w in rotary_saved else 0, masks.get(w, 0)))
    return tuple(out)


_QK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.q_norm", "self_attn.k_norm")


def _rotary_types_saved(spec: ModelSpec, plan: Plan, layout: Layout, input_rg: bool) -> frozenset:
    """The layer types (their windows) whose RoPE cos/sin some layer saves: RoPE's q * cos saves cos where q (or
    k) needs a gradient, i.e. where the block's input does (input_rg, above the lowest trainable block, above
    block 0 with prefix tuning's keys) or its query/key projections or norms train (LoRA, IA3, weights).
    One set for the families with a single RoPE (saved as soon as gradients reach the blocks), unless some layers
    apply none (ModelSpec.rope_layers, SmolLM3's NoPE layers): then only a layer that applies it saves it (traced:
    tiny-smollm3 with adapters or prefix tuning, whose only layer above the lowest trainable one is NoPE, saves
    no cos/sin)."""
    windows = layer_windows(spec)
    rope = spec.rope_layers or (True,) * spec.num_layers
    per_type = family(spec).rotary_per_layer_type
    if not per_type and all(rope):
        return frozenset({windows[0]})
    low = plan.lowest_trainable_layer
    saved = set()
    for i, training in enumerate(layer_trainings(plan, layout)):
        own = training.trainable | training.lora | training.ia3_out | training.norm_trainable
        if rope[i] and (input_rg or (low is not None and i > low) or (plan.settings.method == "prefix" and i > 0)
                        or any(n in own for n in _QK)):
            saved.add(windows[i] if per_type else windows[0])
    return frozenset(saved)


def _rotary_sets(spec: ModelSpec) -> int:
    """How many RoPE cos/sin pairs the model's forward makes: one, or one per layer type where each type has
    its own base (Family.rotary_per_layer_type; Gemma3TextModel.forward: ``for layer_type in
    set(self.config.layer_types)``)."""
    return len(set(layer_windows(spec))) if family(spec).rotary_per_layer_type else 1


def _rotary_dim(spec: ModelSpec) -> int:
    """The width of the rotary cos and sin: the rotated dims (ModelSpec.rope_dim: head_dim, or Phi's partial rotary
    share; LlamaRotaryEmbedding concatenates the frequencies twice), half of it where the family applies them to
    each half of a head (Family.rotary_half: GptOssRotaryEmbedding)."""
    return spec.rope_dim // 2 if family(spec).rotary_half else spec.rope_dim


def _rotary_dtype(spec: ModelSpec, ctx: StepContext) -> str:
    """The dtype of the rotary cos and sin: the hidden states' (LlamaRotaryEmbedding.forward returns
    ``cos.to(dtype=x.dtype)``), fp32 where the family keeps them so (Family.rotary_fp32: Olmo2RotaryEmbedding)."""
    return "float32" if family(spec).rotary_fp32 else ctx.weight_dtype


def _embedding_indices_saved(spec: ModelSpec, plan: Plan, layout: Layout, ctx: StepContext) -> list:
    """(numel, tag) of the int64 indices the model's forward makes for its position or token-type
    embeddings, which their EmbeddingBackward saves when the embedding trains (derivatives.yaml
    embedding: indices): the family's (Family.embedding_indices: GPT-2's position_ids, BERT's and
    RoBERTa's token types and RoBERTa's positions)."""
    hook = family(spec).embedding_indices
    return hook(spec, layout, ctx, HeadSites(plan)) if hook else []


def _lookup_saved(plan: Plan, indices: list) -> int:
    """What the model's forward saved before the blocks ('pre') that is still saved when the embeddings'
    backward runs, last in the backward (torch's engine runs nodes in reverse creation order): only what
    the lookups' own EmbeddingBackward nodes hold, the int64 indices (_embedding_indices_saved; peft's
    prompt encoder's virtual-token indices). Everything else in 'pre' has been released by then by the
    node that saved it: the embeddings' LayerNorm input and statistics and dropout mask (BERT, RoBERTa,
    GPT-2's drop), the rotary cos and sin of the Llama family, whose last holder is block 0's q * cos
    (traced, fake tensors: bert-base frozen bf16 b1 s128, no activations left at the tied embedding's
    gradient sum; llama-3.2-1b full bf16 b4 s128, the cos/sin, 2 x 128 x 64 x 2 bytes, freed in block 0)."""
    prompt = plan.settings.num_virtual_tokens * 8 if plan.settings.method in ("prefix", "prompt") else 0
    return sum(numel * 8 for numel, _tag in indices) + prompt


def _forward_checkpoint_inputs(spec: ModelSpec, ctx: StepContext, t: TrainingSettings, per_layer: tuple,
                               checkpointed: tuple = ()) -> int:
    """Under checkpointing, the hidden states held by the forward of a block that saves nothing (one below
    the lowest trainable block; block_forward_transient: the embeddings output and the block's input) were each a checkpoint's input, which torch saves for
    backward whether or not anything below needs a gradient (torch/utils/checkpoint.py
    _checkpoint_without_reentrant_generator: ``_NoopSaveInputs.apply(dummy, kwargs, *args)``, a
    save_for_backward of every tensor argument): two of them from the second block on, the first and
    the second block's inputs, each where its block is checkpointed."""
    if not t.grad_checkpointing or all(per_layer):
        return 0
    wrapped = min(2, spec.num_layers) if all(checkpointed) else sum(checkpointed[:2])
    return wrapped * ctx.tokens * spec.hidden_size * DTYPE_BYTES[ctx.weight_dtype]


def _checkpointed_layer_positions(spec: ModelSpec, ctx: StepContext, t: TrainingSettings, indices_saved: bool = False) -> int:
    """Under gradient checkpointing transformers' GradientCheckpointingLayer (modeling_layers.py)
    checkpoints ``partial(forward, self, **kwargs)``, and torch.utils.checkpoint's frame keeps that
    function to recompute the layer (``_CheckpointFrame.recompute_fn``) until the layer's backward has
    released its saved tensors: what a layer gets as a keyword argument outlives the model's forward. The
    decoders pass every layer the same int64 positions, GPT2Model.forward's and LlamaModel.forward's
    (Mistral, Qwen2) ``position_ids = arange(seq).unsqueeze(0)``, 1 x seq, held until block 0's
    backward (traced: seq x 8 bytes, 'other', at the checkpointed decoders' backward peaks; GPT-2's
    wpe, when it trains, saves them anyway). OPTDecoder.forward's are b x seq (``cumsum`` of the attention
    mask), and the table saves ``position_ids + offset``, a tensor of its own (Family.position_ids_batched).
    So do the masks the layers get (attention_mask: LlamaModel's causal_mask_mapping,
    ops.attention.model_masks_bytes; traced, mistral-7b LoRA bf16 1 x 4,096 on fake tensors: the sliding
    window's 4,096 x 4,096 bool mask, 'other', at backward:layer31's peak)."""
    if not t.grad_checkpointing or not family(spec).passes_position_ids:
        return 0
    # (where an embedding saves its indices, GPT-2's wpe, the positions are counted there; the masks are not:
    # traced, fake tiny-gpt2 full eager with checkpointing, the (2, 1, 32, 32) float mask at the peak)
    positions = 0 if indices_saved else (ctx.tokens if family(spec).position_ids_batched else ctx.seq) * 8
    return positions + model_masks_bytes(spec, ctx)


def _prompt_inputs_held(spec: ModelSpec, plan: Plan, ctx: StepContext) -> int:
    """Prompt tuning: peft's PeftModel.forward keeps `prompts` (the prompt encoder's output repeated
    over the batch) and inputs_embeds = cat(prompts, word embeddings) referenced while the base model
    runs; where the model's embeddings make a new tensor from inputs_embeds (BERT/RoBERTa add positions
    and token types, GPT-2 positions) the concatenation is held besides the embedding output."""
    if plan.settings.method != "prompt":
        return 0
    wb = DTYPE_BYTES[ctx.weight_dtype]
    prompts = ctx.batch * plan.settings.num_virtual_tokens * spec.hidden_size * wb
    concatenated = ctx.tokens * spec.hidden_size * wb if family(spec).embeddings_add_positions else 0
    return prompts + concatenated


def block_forward_transient(spec: ModelSpec, plan: Plan, ctx: StepContext, per_layer: tuple, unsaved_block_live: int = 0) -> int:
    """The working set of one block's forward that autograd does not keep (what the forward:block event
    adds under gradient checkpointing). Where some block saves nothing (it is below the lowest trainable
    one) it is that block's forward as simulated op by op (`unsaved_block_live`, see run_blocks: a block
    whose ops save nothing runs the same ops under checkpointing), the hidden states the model holds
    meanwhile, autocast's weight copies and cast inputs included (traced: fake tiny-vit-cls frozen
    amp-bf16 b3 s48 ckpt). Blocks that save their intermediates still hold one unsaved buffer at a time:
    the raw scores before softmax (eager, CPU math path) or one MLP output; DoRA adds B @ A and
    W + s * BA (out x in) and the identity it multiplies (in x in), per layer (peft tuners/lora/dora.py)."""
    if any(not a for a in per_layer):
        return unsaved_block_live
    tok, b, s, kv = ctx.tokens, ctx.batch, ctx.seq, ctx.kv_seq
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute_dtype]
    scores = b * spec.num_heads * s * kv
    dora = 0
    if plan.settings.dora and plan.targets:
        layout = build_layout(spec)
        mods = {m.path: m for m in layout.modules}
        dora = max(((m.in_features ** 2 + 3 * m.in_features * m.out_features) * DTYPE_BYTES[ctx.adapter_dtype]
                    for m in (mods[p] for p in plan.targets) if m.kind in ("linear", "conv1d")), default=0)
    fused = ctx.attention != "eager" and not (dropout_p(spec, "attn") > 0 and ctx.device == "cpu")
    return max(dora, tok * spec.intermediate_size * cb if fused else scores * 4)


def saved_below_last_frozen_block(per_layer: tuple) -> int:
    """Activations saved by the blocks below the last block that saves nothing (all of them when
    every block saves something)."""
    light = [i for i, a in enumerate(per_layer) if not a]
    return sum(per_layer[: light[-1]]) if light else sum(per_layer)
