"""The loss's buffers: the logits' upcast, what cross-entropy saves, and its backward's dense gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.ops.context import StepContext
from peftcalc.settings import DTYPE_BYTES
from peftcalc.spec import ModelSpec

__all__ = [
    "LossBuffers",
    "loss_buffers",
]


@dataclass(frozen=True)
class LossBuffers:
    """Bytes of the loss at its two moments: the end of the forward (the logits, their fp32 copy and
    what cross-entropy saves) and the start of backward (the saved log-softmax output and the two
    dense gradients); the loss and the backward's ones_like(loss) gradient are two scalars alive through the backward."""

    saved: int  # what the loss saves at the end of the forward
    saved_backward: int  # what is still saved at the start-of-backward peak
    backward_peak: int  # every loss buffer alive at that peak
    forward_peak: int  # every loss buffer alive while the loss is computed
    scalars: int  # the loss and backward's ones_like seed


def loss_buffers(spec: ModelSpec, ctx: StepContext, logits_numel: int) -> LossBuffers:
    """The loss buffers (see LossBuffers).

    Causal LM (transformers loss_utils.ForCausalLMLoss): logits.float() (a copy unless already fp32),
    shift_labels = pad(labels)[..., 1:].contiguous() (int64), cross_entropy = log_softmax (saves its
    fp32 output) + nll_loss (saves the log-softmax output and shift_labels). At the start of backward
    nll_loss_backward materialises a dense fp32 gradient and releases shift_labels, then
    log_softmax_backward a second gradient while the saved output is still alive: 3 x 4 bytes per
    logit. The model's own logits in the compute dtype are alive during the forward loss computation.
    Masked LM (BertForMaskedLM: CrossEntropyLoss on the logits as they are): the same without upcast
    (the labels are the harness's input tensor). The loss and the initial gradient torch.autograd.backward creates
    (torch/csrc/autograd/autograd.cpp _make_grads: ones_like(loss)) are scalars in the loss dtype.
    A bare encoder's loss (measure.setup forward_loss: last_hidden_state.float().pow(2).mean()) is fp32.
    The forward's peak is nll_loss_forward's return (aten nll_loss_forward: the loss and total_weight,
    two scalars in the loss dtype; NllLossBackward0 saves total_weight), while ForCausalLMLoss still holds
    the padded labels its shift_labels were cut from (``labels = pad(labels, (0, 1))``: b x (seq + 1) int64);
    traced on tiny-blip2 amp-bf16 b2 s16 (tests/peftcalc/test_memory.py).
    """
    if not logits_numel:
        return LossBuffers(0, 0, 0, 0, 2 * 4)
    logit_dtype = ctx.autocast or ctx.compute_dtype
    if spec.task == "causal_lm":
        loss_dtype = "float32"
    else:
        loss_dtype = "float32" if ctx.autocast else logit_dtype  # autocast runs log_softmax in fp32
    lb = DTYPE_BYTES[loss_dtype]
    log_softmax_out = logits_numel * lb
    shift_labels = ctx.tokens * 8 if spec.task == "causal_lm" else 0
    padded_labels = (ctx.tokens + ctx.batch) * 8 if spec.task == "causal_lm" else 0
    total_weight = lb
    saved = log_softmax_out + shift_labels + total_weight
    upcast_copy = logits_numel * lb if logit_dtype != loss_dtype else 0
    forward_peak = logits_numel * DTYPE_BYTES[logit_dtype] + upcast_copy + saved + padded_labels + lb
    return LossBuffers(saved=saved, saved_backward=log_softmax_out, backward_peak=3 * logits_numel * lb,
                       forward_peak=forward_peak, scalars=2 * lb)
