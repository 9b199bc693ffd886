"""How a training step runs: batch, sequence, precision policy, optimizer, checkpointing, device.

Shared by the calculator and the harness, so both read the same words the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from peftcalc.checks import MAX_TOKENS_PER_STEP, require_bool, require_int, require_number, require_str
from peftcalc.errors import CombinationError, InputError

__all__ = ["ATTENTIONS", "DEFAULT_OPTIMIZER", "DEVICES", "DTYPE_BYTES", "EIGHT_BIT_OPTIMIZERS", "EXPERTS",
           "LOGITLESS_LOSSES", "LOSSES", "OFFLOADS", "ONE_STATE_OPTIMIZERS", "OPTIMIZERS", "PAGED_OPTIMIZERS", "PRECISIONS",
           "ROUTINGS", "SHARDINGS", "TrainingSettings", "check_loss_applies", "check_parallel",
           "check_training"]

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
    # fp32 master weights, bf16 compute under a sharded engine: FSDP2 MixedPrecisionPolicy(param_dtype=bf16,
    # reduce_dtype=fp32) over fp32 parameters, DeepSpeed bf16.enabled (needs a sharding, see check_training)
    "mixed-bf16": ("float32", "bfloat16"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}

OPTIMIZERS = {
    "adamw-fused": "torch.optim.AdamW(fused=True): the HF Trainer's default with torch >= 2.8 (adamw_torch_fused)",
    "adamw": "torch.optim.AdamW, foreach on CUDA (exp_avg, exp_avg_sq in the parameter's dtype)",
    "adamw-8bit": "bitsandbytes.optim.AdamW8bit (8-bit blockwise states, 32-bit for tensors < 4096 elements)",
    "sgd": "torch.optim.SGD with momentum 0.9 (one momentum buffer)",
    "adafactor": "transformers.optimization.Adafactor (factored second moment, no first moment)",
    "paged-adamw-8bit": "bitsandbytes.optim.PagedAdamW8bit (8-bit states in CUDA unified memory)",
    "paged-adamw-32bit": "bitsandbytes.optim.PagedAdamW32bit (fp32 states in CUDA unified memory)",
    # transformers trainer_optimizer.py _get_bitsandbytes_optimizer: lion_8bit, lion_32bit, paged_lion_8bit,
    # paged_lion_32bit are bitsandbytes.optim.Lion(optim_bits=8|32, is_paged=...) (Optimizer1State: one state)
    "lion-8bit": "bitsandbytes.optim.Lion8bit (one 8-bit blockwise state, exp_avg; 32-bit below 4096 elements)",
    "lion-32bit": "bitsandbytes.optim.Lion32bit (one fp32 state, exp_avg)",
    "paged-lion-8bit": "bitsandbytes.optim.PagedLion8bit (one 8-bit state in CUDA unified memory)",
    "paged-lion-32bit": "bitsandbytes.optim.PagedLion (one fp32 state in CUDA unified memory)",
}
# transformers training_args.py TrainingArguments: optim defaults to "adamw_torch_fused" when torch >= 2.8
DEFAULT_OPTIMIZER = "adamw-fused"
# bitsandbytes paged optimizers (optim/optimizer.py Optimizer8bit.get_state_buffer with is_paged: the states
# are cudaMallocManaged buffers, functional.get_paged): CUDA only
PAGED_OPTIMIZERS = ("paged-adamw-8bit", "paged-adamw-32bit", "paged-lion-8bit", "paged-lion-32bit")
# bitsandbytes optimizers whose states are 8-bit (blockwise, from min_8bit_size 4096 elements): they make the
# quantization maps (Optimizer8bit.__init__ with optim_bits=8 -> fill_qmap)
EIGHT_BIT_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit", "lion-8bit", "paged-lion-8bit")
# bitsandbytes Optimizer1State (Lion): one state (state1, the exp_avg), not Optimizer2State's two
ONE_STATE_OPTIMIZERS = ("lion-8bit", "lion-32bit", "paged-lion-8bit", "paged-lion-32bit")
# The loss over the logits: "hf" transformers loss_utils.ForCausalLMLoss; "chunked" torchtune
# modules/loss/ce_chunked_output_loss.py CEWithChunkedOutputLoss (the output split into loss_chunks chunks,
# each upcast to fp32); "liger" Liger Kernel's LigerFusedLinearCrossEntropyLoss; "cce" Apple's Cut
# Cross-Entropy (ml-cross-entropy linear_cross_entropy). liger and cce return no logits.
LOSSES = {
    "hf": "transformers ForCausalLMLoss (logits upcast to fp32, shift, cross-entropy)",
    "chunked": "torchtune CEWithChunkedOutputLoss (lm_head output in chunks, each upcast to fp32)",
    "liger": "Liger Kernel LigerFusedLinearCrossEntropyLoss (lm_head and cross-entropy fused, CUDA)",
    "cce": "Apple Cut Cross-Entropy (lm_head and cross-entropy fused, CUDA)",
    "trl": "TRL SFTTrainer's fused LM head (per-token log-probabilities in tiles, no logits) and its collator's batch",
}
LOGITLESS_LOSSES = ("liger", "cce", "trl")
ATTENTIONS = ("sdpa", "eager")
# How a step is spread over `gpus` data-parallel ranks (peftcalc.sharding models each):
#   none   one GPU; ddp  torch DistributedDataParallel (full replica, gradient buckets);
#   fsdp   torch FSDP2 fully_shard over all ranks; hsdp  FSDP2 sharded within a node, replicated across nodes;
#   zero1/zero2/zero3  DeepSpeed ZeRO stage 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
SHARDINGS = ("none", "ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")
# What lives in host memory: none; optimizer (ZeRO-Offload offload_optimizer); params (ZeRO-3
# offload_param + offload_optimizer, FSDP2 CPUOffloadPolicy: parameters, gradients and the optimizer step)
OFFLOADS = ("none", "optimizer", "params")
# which offloads each sharding runs with
_OFFLOADS_BY_SHARDING = {"fsdp": ("params",), "hsdp": ("params",), "zero1": ("optimizer",),
                         "zero2": ("optimizer",), "zero3": ("optimizer", "params")}
# How a mixture-of-experts router spreads the S = tokens x top_k (token, expert) pairs of a step over the E experts
# (the harness drives the router to exactly this: measure/routing.py). Under transformers' default experts
# implementation (grouped_mm) the bytes do not depend on it: every pair is one row of the same (S, .) tensors (nor under
# batched_mm: every pair gathers its expert's weights); under the eager loop every tensor is one expert's tokens
# (peftcalc.ops.moe_eager.expert_token_counts).
ROUTINGS = {
    "balanced": "pair (t, j) of token t goes to expert (t * top_k + j) mod E: every expert gets S / E pairs",
    "skewed": "even tokens go to experts 0..top_k-1, the u-th odd token to experts (u * top_k + j) mod E: the "
              "first top_k experts get over half the pairs",
    "worst": "every token goes to experts 0..top_k-1: top_k experts get every token, the others none",
}
# The experts implementation a mixture-of-experts model runs (transformers 5.x integrations/moe.py, set by
# from_pretrained(experts_implementation=...) or config._experts_implementation; PreTrainedModel.
# get_correct_experts_implementation makes grouped_mm the default of every experts class decorated with
# @use_experts_implementation: Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss)
EXPERTS = {
    "grouped_mm": "every (token, expert) pair sorted by expert, two torch._grouped_mm over the fused weights "
                  "(the default)",
    "batched_mm": "every pair's expert weights gathered ((S, out, in) copies) and two torch.bmm",
    "eager": "the experts module's own forward: a Python loop over the experts hit, each on its tokens (the bytes "
             "follow the routing)",
}
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
    # data parallelism (peftcalc.sharding): ranks, ranks per node (HSDP's shard group), the strategy, FSDP2's
    # reshard_after_forward, and what is offloaded to host memory
    gpus: int = 1
    gpus_per_node: int = 8
    sharding: str = "none"
    reshard_after_forward: bool = True
    offload: str = "none"
    # mixture-of-experts: how the router spreads tokens over the experts (ROUTINGS)
    routing: str = "balanced"
    experts: str = "grouped_mm"  # the experts implementation (EXPERTS)
    # the model config's output_router_logits: every router's logits are returned and the auxiliary
    # load-balancing loss (load_balancing_loss_func, times router_aux_loss_coef) is added to the loss
    router_aux_loss: bool = False

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


def router_aux_loss_unmodelled(fields: dict) -> str:
    """What of the settings `fields` (TrainingSettings' names; absent: the default) the auxiliary load-balancing
    loss is not modelled with ("" when it is)."""
    f = {**{k: v.default for k, v in TrainingSettings.__dataclass_fields__.items()}, **fields}
    if PRECISIONS.get(f["precision"], (None, None))[1]:
        return f"autocast ({f['precision']})"
    for name, default in (("loss", "hf"), ("checkpoint_every", 1), ("checkpoint_reentrant", False), ("grad_accum", 1),
                          ("keep_outputs", False)):
        if f[name] != default:
            return f"{name} {f[name]}"
    return ""


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
    require_str("routing", t.routing, ROUTINGS)
    require_str("experts", t.experts, EXPERTS)
    require_bool("router_aux_loss", t.router_aux_loss)
    _check_recipe(t)
    require_bool("trainer_loop", t.trainer_loop)
    if not t.grad_checkpointing and (t.checkpoint_every != 1 or t.checkpoint_reentrant):
        name = "checkpoint_every" if t.checkpoint_every != 1 else "checkpoint_reentrant"
        raise CombinationError(f"{name} chooses how gradient checkpointing runs; add grad_checkpointing",
                               names=(name, "grad_checkpointing"))
    if t.router_aux_loss and router_aux_loss_unmodelled(asdict(t)):
        raise CombinationError(f"router_aux_loss with {router_aux_loss_unmodelled(asdict(t))} is not modelled (bf16/fp32 "
                               "weights without autocast, transformers' loss, every block checkpointed non-reentrantly "
                               "or none, one micro-batch, outputs dropped before backward); --trace traces it",
                               names=("router_aux_loss",))
    check_parallel(t)


def check_parallel(t: TrainingSettings) -> None:
    """InputError for data-parallel settings that no engine runs (CombinationError for a pair that clashes):
    gpus < 1, gpus_per_node not dividing gpus (HSDP's replicas are whole nodes), several GPUs without a
    sharding, mixed-bf16 without an engine that keeps fp32 master weights (FSDP2 MixedPrecisionPolicy,
    DeepSpeed bf16), fp16 under DeepSpeed (its fp16 engine keeps fp32 master weights: use mixed-bf16), an
    offload the sharding does not have (FSDP2 CPUOffloadPolicy moves parameters, gradients and the optimizer
    step together; ZeRO-1/2 offload only the optimizer; ZeRO-3 either)."""
    require_int("gpus", t.gpus)
    require_int("gpus_per_node", t.gpus_per_node)
    require_str("sharding", t.sharding, SHARDINGS)
    require_bool("reshard_after_forward", t.reshard_after_forward)
    require_str("offload", t.offload, OFFLOADS)
    if t.gpus % t.gpus_per_node and t.gpus > t.gpus_per_node:
        raise CombinationError(f"gpus_per_node ({t.gpus_per_node}) must divide gpus ({t.gpus})",
                               names=("gpus_per_node", "gpus"))
    if t.gpus > 1 and t.sharding == "none":
        raise CombinationError(f"{t.gpus} gpus need a sharding (ddp, fsdp, hsdp, zero1, zero2 or zero3)",
                               names=("gpus", "sharding"))
    if t.precision == "mixed-bf16" and t.sharding in ("none", "ddp"):
        raise CombinationError("precision mixed-bf16 is FSDP2's or DeepSpeed's mixed precision; add sharding "
                               "fsdp, hsdp or zero1-3 (one GPU or DDP: amp-bf16)", names=("precision", "sharding"))
    if t.sharding.startswith("zero") and t.precision in ("fp16", "amp-fp16", "amp-bf16"):
        raise CombinationError(f"DeepSpeed ZeRO runs fp32, bf16 or mixed-bf16 here, not {t.precision}",
                               names=("precision", "sharding"))
    if t.offload != "none" and t.offload not in _OFFLOADS_BY_SHARDING.get(t.sharding, ()):
        allowed = [s for s, o in _OFFLOADS_BY_SHARDING.items() if t.offload in o]
        raise CombinationError(f"offload {t.offload} needs sharding {' or '.join(allowed)}, not {t.sharding}",
                               names=("offload", "sharding"))
    if not t.reshard_after_forward and t.sharding not in ("fsdp", "hsdp"):
        raise CombinationError("reshard_after_forward is an FSDP2 option; add sharding fsdp or hsdp",
                               names=("reshard_after_forward", "sharding"))


def _check_recipe(t: TrainingSettings) -> None:
    """The recipe fields (grad_accum ... max_grad_norm): InputError in one line."""
    require_int("grad_accum", t.grad_accum)
    require_bool("keep_outputs", t.keep_outputs)
    require_str("loss", t.loss, LOSSES)
    require_int("loss_chunks", t.loss_chunks)
    require_bool("offload_activations", t.offload_activations)
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
    if t.loss == "trl" and spec.final_logit_softcap:
        raise CombinationError("loss trl: TRL's fused LM head with final_logit_softcapping (its tanh per tile) is not "
                               "modelled yet", names=("loss",))
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
