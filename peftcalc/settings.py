"""How a training step runs: batch, sequence, precision policy, optimizer, checkpointing, device.

Shared by the calculator and the harness, so both read the same words the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.checks import MAX_TOKENS_PER_STEP, require_bool, require_int, require_str
from peftcalc.errors import CombinationError, InputError

__all__ = ["ATTENTIONS", "DEVICES", "DTYPE_BYTES", "OPTIMIZERS", "PRECISIONS", "ROUTINGS", "TrainingSettings",
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
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}

OPTIMIZERS = {
    "adamw": "torch.optim.AdamW (exp_avg, exp_avg_sq in the parameter's dtype)",
    "adamw-8bit": "bitsandbytes.optim.AdamW8bit (8-bit blockwise states, 32-bit for tensors < 4096 elements)",
    "sgd": "torch.optim.SGD with momentum 0.9 (one momentum buffer)",
    "adafactor": "transformers.optimization.Adafactor (factored second moment, no first moment)",
}
ATTENTIONS = ("sdpa", "eager")
# How a mixture-of-experts router spreads the S = tokens x top_k (token, expert) pairs of a step over the E experts
# (the harness drives the router to exactly this: measure/routing.py). Under transformers' default experts
# implementation (grouped_mm) the bytes do not depend on it: every pair is one row of the same (S, .) tensors.
ROUTINGS = {
    "balanced": "pair (t, j) of token t goes to expert (t * top_k + j) mod E: every expert gets S / E pairs",
    "skewed": "even tokens go to experts 0..top_k-1, the u-th odd token to experts (u * top_k + j) mod E: the "
              "first top_k experts get over half the pairs",
    "worst": "every token goes to experts 0..top_k-1: top_k experts get every token, the others none",
}
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = 1
    seq_len: int = 512
    precision: str = "bf16"
    optimizer: str = "adamw"
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
    # mixture-of-experts: how the router spreads tokens over the experts (ROUTINGS)
    routing: str = "balanced"

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
    require_str("routing", t.routing, ROUTINGS)
    if not t.grad_checkpointing and (t.checkpoint_every != 1 or t.checkpoint_reentrant):
        name = "checkpoint_every" if t.checkpoint_every != 1 else "checkpoint_reentrant"
        raise CombinationError(f"{name} chooses how gradient checkpointing runs; add grad_checkpointing",
                               names=(name, "grad_checkpointing"))
