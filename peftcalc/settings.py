"""How a training step runs: batch, sequence, precision policy, optimizer, checkpointing, device.

Shared by the calculator and the harness, so both read the same words the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.checks import MAX_TOKENS_PER_STEP, require_bool, require_int, require_number, require_str
from peftcalc.errors import CombinationError, InputError

__all__ = ["ATTENTIONS", "DEFAULT_OPTIMIZER", "DEVICES", "DTYPE_BYTES", "LOGITLESS_LOSSES", "LOSSES", "OPTIMIZERS",
           "PAGED_OPTIMIZERS", "PRECISIONS", "TrainingSettings", "check_loss_applies", "check_training"]

# Precision policies: (storage dtype of the base weights, autocast compute dtype or None).
#   fp32      everything fp32
#   bf16      weights, activations, gradients and optimizer states of base parameters in bf16;
#             peft's adapters stay fp32 (peft autocast_adapter_dtype=True)
#   amp-bf16  fp32 weights, torch.autocast(dtype=bfloat16) around forward and loss
#   fp16      like bf16 with float16
#   amp-fp16  fp32 weights, autocast float16 and a GradScaler
PRECISIONS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "amp-bf16": ("float32", "bfloat16"),
    "fp16": ("float16", None),
    "amp-fp16": ("float32", "float16"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int64": 8}

OPTIMIZERS = {
    "adamw-fused": "torch.optim.AdamW(fused=True): the HF Trainer's default with torch >= 2.8 (adamw_torch_fused)",
    "adamw": "torch.optim.AdamW, foreach on CUDA (exp_avg, exp_avg_sq in the parameter's dtype)",
    "adamw-8bit": "bitsandbytes.optim.AdamW8bit (8-bit blockwise states, 32-bit for tensors < 4096 elements)",
    "sgd": "torch.optim.SGD with momentum 0.9 (one momentum buffer)",
    "adafactor": "transformers.optimization.Adafactor (factored second moment, no first moment)",
    "paged-adamw-8bit": "bitsandbytes.optim.PagedAdamW8bit (8-bit states in CUDA unified memory)",
    "paged-adamw-32bit": "bitsandbytes.optim.PagedAdamW32bit (fp32 states in CUDA unified memory)",
}
# transformers training_args.py TrainingArguments: optim defaults to "adamw_torch_fused" when torch >= 2.8
DEFAULT_OPTIMIZER = "adamw-fused"
# bitsandbytes paged optimizers (optim/optimizer.py Optimizer8bit.get_state_buffer with is_paged: the states
# are cudaMallocManaged buffers, functional.get_paged): CUDA only
PAGED_OPTIMIZERS = ("paged-adamw-8bit", "paged-adamw-32bit")
# The loss over the logits: "hf" transformers loss_utils.ForCausalLMLoss; "chunked" torchtune
# modules/loss/ce_chunked_output_loss.py CEWithChunkedOutputLoss (the output split into loss_chunks chunks,
# each upcast to fp32); "liger" Liger Kernel's LigerFusedLinearCrossEntropyLoss; "cce" Apple's Cut
# Cross-Entropy (ml-cross-entropy linear_cross_entropy). liger and cce return no logits.
LOSSES = {
    "hf": "transformers ForCausalLMLoss (logits upcast to fp32, shift, cross-entropy)",
    "chunked": "torchtune CEWithChunkedOutputLoss (lm_head output in chunks, each upcast to fp32)",
    "liger": "Liger Kernel LigerFusedLinearCrossEntropyLoss (lm_head and cross-entropy fused, CUDA)",
    "cce": "Apple Cut Cross-Entropy (lm_head and cross-entropy fused, CUDA)",
}
LOGITLESS_LOSSES = ("liger", "cce")
ATTENTIONS = ("sdpa", "eager")
# cuda: predict torch.cuda.max_memory_allocated; cpu: the CPU allocator's figure, which is also what the harness's
# fake-tensor trace counts, so "fake" is taken as a name for "cpu" (peftcalc measure --device fake)
DEVICES = ("cuda", "cpu", "fake")


@dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = 1
    seq_len: int = 512
    precision: str = "bf16"
    optimizer: str = DEFAULT_OPTIMIZER
    grad_checkpointing: bool = False
    attention: str = "sdpa"
    device: str = "cuda"
    # which blocks gradient checkpointing wraps, and how: transformers 5.x
    # PreTrainedModel.activation_checkpointing_enable(every_n_layers=N) checkpoints the
    # GradientCheckpointingLayer modules whose index (over every such module in model.modules() order)
    # is a multiple of N (_set_gradient_checkpointing); {"use_reentrant": True} (what
    # peft.prepare_model_for_kbit_training's default {} gets from torch.utils.checkpoint) runs
    # CheckpointFunction instead of the non-reentrant saved-tensor hooks
    checkpoint_every: int = 1
    checkpoint_reentrant: bool = False
    # the recipe around the step (issue 13): micro-batches per optimizer step (each backward adds into the
    # .grad of the one before); the loop keeps the model outputs (logits) referenced through backward; the
    # loss; saved tensors offloaded to host memory (torch.autograd.graph.save_on_cpu); gradient clipping
    # (torch.nn.utils.clip_grad_norm_) before the optimizer step
    grad_accum: int = 1
    keep_outputs: bool = False
    loss: str = "hf"
    loss_chunks: int = 8  # torchtune CEWithChunkedOutputLoss(num_output_chunks=8)
    offload_activations: bool = False
    max_grad_norm: float | None = None
    # the step is transformers Trainer.training_step's (issue 14: configs of the tools that run it, and
    # peftcalc.integrations.transformers.MemoryCallback): accelerate's Accelerator.backward divides the loss by
    # the accumulation steps (accelerate/accelerator.py), so one more loss scalar is alive through backward
    trainer_loop: bool = False

    def __post_init__(self):
        if self.device == "fake":  # the fake-tensor trace counts what the CPU allocator would (DEVICES)
            object.__setattr__(self, "device", "cpu")

    @property
    def weight_dtype(self) -> str:
        return PRECISIONS[self.precision][0]

    @property
    def autocast_dtype(self) -> str | None:
        return PRECISIONS[self.precision][1]

    @property
    def compute_dtype(self) -> str:
        """The dtype activations are computed in."""
        return self.autocast_dtype or self.weight_dtype


def check_training(t: TrainingSettings) -> None:
    """InputError, in one line naming the parameter, unless every field of `t` is a value the calculator takes
    (CombinationError for checkpointing options without --grad-checkpointing)."""
    require_int("batch_size", t.batch_size)
    require_int("seq_len", t.seq_len)
    if t.batch_size * t.seq_len > MAX_TOKENS_PER_STEP:
        raise InputError(f"batch_size x seq_len must be at most {MAX_TOKENS_PER_STEP:,} tokens per step (2**31), "
                         f"got {t.batch_size:,} x {t.seq_len:,}", names=("batch_size", "seq_len"))
    require_str("precision", t.precision, PRECISIONS)
    require_str("optimizer", t.optimizer, OPTIMIZERS)
    require_str("attention", t.attention, ATTENTIONS)
    require_str("device", t.device, DEVICES)
    require_bool("grad_checkpointing", t.grad_checkpointing)
    require_int("checkpoint_every", t.checkpoint_every)
    require_bool("checkpoint_reentrant", t.checkpoint_reentrant)
    _check_recipe(t)
    require_bool("trainer_loop", t.trainer_loop)
    if not t.grad_checkpointing and (t.checkpoint_every != 1 or t.checkpoint_reentrant):
        name = "checkpoint_every" if t.checkpoint_every != 1 else "checkpoint_reentrant"
        raise CombinationError(f"{name} chooses how gradient checkpointing runs; add grad_checkpointing",
                               names=(name, "grad_checkpointing"))


def _check_recipe(t: TrainingSettings) -> None:
    """The recipe fields (grad_accum ... max_grad_norm): InputError in one line."""
    require_int("grad_accum", t.grad_accum)
    require_bool("keep_outputs", t.keep_outputs)
    require_str("loss", t.loss, LOSSES)
    require_int("loss_chunks", t.loss_chunks)
    require_bool("offload_activations", t.offload_activations)
    if t.offload_activations:
        raise InputError("offload_activations (torch.autograd.graph.save_on_cpu) is not modelled yet",
                         names=("offload_activations",))
    if t.max_grad_norm is not None:
        require_number("max_grad_norm", t.max_grad_norm, 0, low_open=True, what="a finite number > 0")
    if t.optimizer in PAGED_OPTIMIZERS and t.device == "cpu":
        raise CombinationError(f"optimizer {t.optimizer} pages its states through CUDA unified memory "
                               "(bitsandbytes): paging is CUDA-only (device cuda)", names=("optimizer", "device"))
    if t.keep_outputs and t.loss in LOGITLESS_LOSSES:
        raise CombinationError(f"keep_outputs keeps the logits, but loss {t.loss} returns none", names=("keep_outputs", "loss"))


def check_loss_applies(spec, t: TrainingSettings, compute_dtype: str = "") -> None:
    """CombinationError unless the loss `t.loss` takes the place of this model's: a loss other than the
    model's own (chunked, liger, cce) replaces a causal language model's ForCausalLMLoss (a vision-language
    model's too is not modelled); liger and cce are modelled without autocast (under torch.autocast their
    matmuls cast the weight per chunk), and Cut Cross-Entropy's backward needs bf16/fp16 hidden states and
    weights (cce_backward.py asserts it; `compute_dtype`: the activation stream's, fp32 under QLoRA's
    prepare_model_for_kbit_training)."""
    if t.loss in LOGITLESS_LOSSES and t.autocast_dtype:
        raise CombinationError(f"loss {t.loss} under autocast ({t.precision}) is not modelled; use bf16 or fp16",
                               names=("loss", "precision"))
    if t.loss == "cce" and (compute_dtype or t.compute_dtype) == "float32":
        raise CombinationError("loss cce: Cut Cross-Entropy's backward needs bf16 or fp16 hidden states and weights "
                               "(fp32 here)", names=("loss", "precision"))
    if t.keep_outputs and spec.is_blip2:
        raise CombinationError("keep_outputs on BLIP-2 (its outputs hold the vision, Q-Former and language model "
                               "outputs) is not modelled", names=("keep_outputs",))
    if t.loss != "hf" and (spec.task != "causal_lm" or spec.is_vlm or spec.is_blip2):
        raise CombinationError(f"loss {t.loss} replaces a causal language model's cross-entropy; "
                               f"{spec.name} is {spec.task}{' (vision-language)' if spec.is_vlm or spec.is_blip2 else ''}",
                               names=("loss",))
