"""ActivationProfile, what the simulation of one forward hands the memory model, and the step context
(ops.context.StepContext) of a plan under training settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.backward import BackwardPeak
from peftcalc.families import attention_for
from peftcalc.ops.context import StepContext
from peftcalc.plan import Plan
from peftcalc.settings import TrainingSettings
from peftcalc.spec import ModelSpec

__all__ = [
    "ActivationProfile",
    "input_embeddings_require_grad",
    "make_ctx",
    "prepare_kbit_upcasts",
    "stream_dtype",
    "stream_dtypes",
]


@dataclass(frozen=True)
class ActivationProfile:
    """Saved bytes per layer (index -> bytes), before the blocks ('pre') and after them ('post',
    head and final norm, not the loss), the input each checkpointed layer keeps, the loss buffers,
    the peaks inside each block's forward and backward and inside the head's backward."""

    per_layer: tuple
    pre: int
    post: int
    checkpoint_inputs: int
    logits_bytes: int  # the model's logits in their dtype
    loss_saved: int  # what the loss saves (log_softmax output, causal LM's shift_labels)
    loss_saved_backward: int  # what of it is still saved at the start-of-backward peak (log_softmax output)
    loss_backward_peak: int  # live loss buffers at the start of backward (saved + grads)
    loss_forward_peak: int  # live loss buffers while the loss is computed
    forward_transient: int = 0  # intermediates alive inside one block's forward that nothing saves (checkpointing)
    forward_transient_saved: int = 0  # block activations already saved when that working set peaks
    autocast_weight_cache: int = 0  # autocast's copies of trainable matmul weights, alive to the end of forward
    model_output: int = 0  # the base model's last hidden state while the loss runs, when nothing saves it
    loss_scalars: int = 0  # the loss and backward's ones_like(loss) gradient, alive through the backward
    embedding_grad: int = 0  # the embedding output's gradient, alive while the embeddings' parameters get theirs
    head_backward: BackwardPeak = BackwardPeak()  # the peak inside the head's backward (peftcalc.backward)
    forward_block_saved: int = 0  # saved bytes at the largest peak inside a block's forward (the blocks
    forward_block_live: int = 0  # below and what the block saved so far) and the live unsaved bytes then
    forward_leaves: int = 0  # unsaved bytes the blocks (and the head) leave referenced to the end of the
    # forward (prefix tuning's cache, autocast's cached weight copies no op saves)
    blocks: tuple = ()  # per layer: its BlockSimulation (the peaks inside its forward and its backward,
    # with and without gradient checkpointing)
    by_tag: tuple = ()
    checkpoint_kwargs: int = 0  # what the checkpointed layers' keyword arguments hold until block 0's backward
    # the hooked embedding output (enable_input_require_grads under checkpointing), a leaf that requires
    # grad: its AccumulateGrad node holds it to the end of backward, though nothing saves it
    input_leaf: int = 0
    forward_checkpoint_inputs: int = 0  # of forward_transient: hidden states a checkpoint's input saver saved
    # what of `pre` is still saved when the embeddings' backward runs (None: all of it); see _lookup_saved
    lookup_saved: int | None = None
    checkpointed: tuple = ()  # per layer: whether gradient checkpointing wraps it (peftcalc.checkpointing)
    reentrant_backward: tuple = ()  # per layer: the peak of its reentrant checkpoint's backward (reentrant_block_peak)
    # under checkpointing, what a layer type's keyword arguments hold (its RoPE cos/sin, counted in `pre`, and its
    # mask, in checkpoint_kwargs) goes once the lowest layer of that type is done: (layer, pre bytes, kwargs bytes)
    type_releases: tuple = ()
    # the head's backward peaks as its replay (head_backward) says also under checkpointing: TRL's fused LM head
    # (sim.trl_head), whose tiles are the peak, not a logits-sized gradient
    head_replayed: bool = False
    # per layer: the router logits the model returns under output_router_logits (held from the layer's forward to
    # the end of the model's), and their gradient from the auxiliary loss (held from the loss's backward to the
    # layer's): sim.blocks.BlockSimulation.returned, returned_grad
    router_logits: tuple = ()
    router_grads: tuple = ()
    # activation offloading (torch.autograd.graph.save_on_cpu): the host copies' sum at the end of the forward
    # (one per saved variable), the checkpointed first block's input a leaf keeps on the device (the hooked
    # embedding output, held by its AccumulateGrad node), the lookup's indices its backward unpacks (int64)
    host_bytes: int = 0
    offload_kept_input: int = 0
    offload_lookup_copy: int = 0

    @property
    def saved_total(self) -> int:
        return sum(self.per_layer) + self.pre + self.post


def stream_dtypes(plan: Plan, t: TrainingSettings) -> tuple[str, str]:
    """(weight dtype, compute dtype) of the step's base weights and activation stream: the training
    settings', or fp32 for both where peft's prepare_model_for_kbit_training upcasts a QLoRA model
    (prepare_kbit_upcasts)."""
    if plan.settings.method == "qlora" and prepare_kbit_upcasts(plan, t):
        return "float32", "float32"
    return t.weight_dtype, t.compute_dtype


def engine_cast(t: TrainingSettings) -> bool:
    """Whether the step runs on a model a DeepSpeed engine has cast to its precision's dtype, adapters included:
    under bf16.enabled deepspeed/runtime/engine.py ``_configure_distributed_model`` ->
    ``_cast_module_mixed_precision`` casts every floating parameter to bf16 (``p.data = p.data.to(param_dtype)``),
    peft's fp32 adapters too. peftcalc.sharding.zero runs such a rank's one-GPU step as precision bf16 under its
    ZeRO sharding (a bf16 model without bf16.enabled is refused there)."""
    return t.precision == "bf16" and t.sharding in ("zero1", "zero2", "zero3")


def adapter_dtype(plan: Plan, t: TrainingSettings) -> str:
    """The dtype of peft's adapters (LoRA, DoRA, IA3, prompt encoders): Plan.adapter_dtype (fp32: peft
    autocast_adapter_dtype=True upcasts bf16/fp16 adapters; bf16 where FSDP2's MixedPrecisionPolicy casts them),
    or the model's where a DeepSpeed engine cast it (engine_cast)."""
    return t.weight_dtype if engine_cast(t) else plan.adapter_dtype


def make_ctx(spec: ModelSpec, plan: Plan, t: TrainingSettings) -> StepContext:
    """The StepContext of `plan` under `t`, for the model `spec` (a part's inside LLaVA or BLIP-2): its
    sequence (a vision model's patches; prompt tuning's virtual tokens added to the queries, prefix
    tuning's to the keys), dtypes and a QLoRA base's quantization."""
    seq = spec.vision_seq_len if spec.is_vision else t.seq_len
    kv_seq = seq
    method = plan.settings.method
    if method == "prompt":
        seq += plan.settings.num_virtual_tokens
        kv_seq = seq
    elif method == "prefix":
        kv_seq = seq + plan.settings.num_virtual_tokens
    weight, compute = stream_dtypes(plan, t)
    adapter = adapter_dtype(plan, t)
    return StepContext(
        batch=t.batch_size,
        seq=seq,
        kv_seq=kv_seq,
        compute_dtype=compute,
        weight_dtype=weight,
        autocast=t.autocast_dtype,
        adapter_dtype=adapter,
        device=t.device,
        attention=attention_for(spec, t.attention),
        quant_compute=t.compute_dtype if method == "qlora" else "",
        quant_source=t.weight_dtype if method == "qlora" else "",
        quant_nested=method == "qlora" and plan.settings.double_quant,
        accumulating=t.grad_accum > 1,
        fused_loss=t.loss if t.loss in ("liger", "cce", "trl") and spec.task == "causal_lm" else "",
        experts=t.experts,
        routing=t.routing,
        router_aux_loss=t.router_aux_loss,
        offload=t.offload_activations,
        linear_saves_input=t.sharding == "zero3",
    )


def input_embeddings_require_grad(spec: ModelSpec, t: TrainingSettings) -> bool:
    """Whether the input embeddings' output requires grad although nothing below it trains: transformers
    5.x PreTrainedModel._activation_checkpointing_enable (what gradient_checkpointing_enable runs) calls
    enable_input_require_grads on models whose main_input_name is input_ids (the text models; ViT and
    CLIP take pixel_values), a forward hook that runs ``output.requires_grad_(True)``. Then the embeddings
    module's own ops save for backward and every block's input needs a gradient. Under reentrant
    checkpointing a vision model gets the hook too (measure.setup.prepare_for_training: CheckpointFunction
    runs the block under no_grad, so without an input that requires grad no gradient reaches the
    adapters; peft's PeftModel._prepare_model_for_gradient_checkpointing does the same)."""
    return t.grad_checkpointing and (not spec.is_vision or t.checkpoint_reentrant)


def prepare_kbit_upcasts(plan: Plan, t: TrainingSettings) -> bool:
    """peft utils/other.py prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not
    a bitsandbytes Params4bit (norms, embeddings, lm_head, biases) to fp32. With a bf16/fp16 policy that
    makes the whole activation stream fp32: the embeddings' output is fp32, LlamaRMSNorm returns
    weight (fp32) * x, bitsandbytes Linear4bit.forward casts its input to bnb_4bit_compute_dtype and
    returns ``.to(inp_dtype)`` (fp32), peft's LoRA output is cast back to that fp32 result, and the
    fp32 lm_head gives fp32 logits (ForCausalLMLoss's upcast is then a no-op). Under autocast (and
    with fp32 weights) the parameters are fp32 already and nothing changes."""
    return plan.settings.prepare_kbit and t.autocast_dtype is None and t.weight_dtype != "float32"


def stream_dtype(ctx: StepContext) -> str:
    return ctx.weight_dtype
