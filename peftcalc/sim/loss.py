"""The loss's buffers: the logits' upcast, what cross-entropy saves, and its backward's dense gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.ops.context import StepContext
from peftcalc.settings import DTYPE_BYTES
from peftcalc.spec import ModelSpec

__all__ = [
    "LossBuffers",
    "chunk_sizes",
    "chunked_loss_buffers",
    "fused_loss_buffers",
    "liger_chunk_tokens",
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


def chunk_sizes(n: int, chunks: int) -> list[int]:
    """torch.chunk's pieces of `n` rows into `chunks`: ceil(n / chunks) each, the last what is left (fewer
    pieces when n is small)."""
    size = -(-n // chunks)
    return [min(size, n - start) for start in range(0, n, size)]


def chunked_loss_buffers(ctx: StepContext, vocab: int, chunks: int) -> LossBuffers:
    """torchtune's chunked cross-entropy on the model's logits (measure.losses.chunked_cross_entropy:
    torchtune modules/loss/ce_chunked_output_loss.py CEWithChunkedOutputLoss, over the flattened tokens'
    chunks; the model runs without labels, so no ForCausalLMLoss buffers and no last hidden state held).
    t tokens in chunks t_i, V vocab, L = t V bytes of the logits (compute dtype), c_i = t_i V 4 bytes.

    Forward, the logits alive throughout (the caller drops them after the loss): the shifted labels (torchtune
    _loss_step's hstack: 8 t bytes, saved by every nll_loss through its chunk view; its (b, 1) ignore column
    a temporary) and ``(labels != -100).sum()`` (a t-byte mask, then an int64 count that DivBackward0 saves);
    per chunk ``.float()`` (a copy c_i unless the logits are fp32, dropped after cross_entropy), log_softmax's
    output c_i (saved) and nll_loss's two fp32 scalars (the loss, and total_weight, saved); the running sum, a
    scalar. Largest at the nll_loss of the chunk where the saved outputs so far plus its copy are largest.

    Backward (the engine runs the chunks' nodes from the last made): the gradient of the running sum (a
    scalar) reaches each chunk; nll_loss_backward's dense c_i gradient, log_softmax_backward's c_i beside it
    while the chunk's saved output is alive, then ToCopyBackward0's chunk gradient in the logits' dtype (the
    fp32 one freed), held in SplitBackward0's input buffer until every chunk's has come; at chunk i the
    unprocessed chunks' outputs and total_weights and the labels are still saved. SplitBackward0 then cats
    the chunks' gradients into the logits' gradient (L beside the chunks' L), from which the head's backward
    runs (sim.head.head_backward)."""
    t, ld, f = ctx.tokens, DTYPE_BYTES[ctx.autocast or ctx.compute_dtype], 4
    sizes = chunk_sizes(t, chunks)
    n = len(sizes)
    c = [ti * vocab * f for ti in sizes]
    g = [ti * vocab * ld for ti in sizes]
    logits = t * vocab * ld
    labels = t * 8
    upcast = ld != f
    total_saved = sum(c) + labels + 4 * n + 8  # outputs, labels, total_weights, the count
    forward_peak = max(logits + labels + 8 * ctx.batch, logits + labels + t + 8)
    prefix = 0
    for i, ci in enumerate(c):
        prefix += ci
        at_nll = logits + labels + 8 + prefix + (ci if upcast else 0) + 4 + 4 * (i + 1) + (4 if i else 0)
        forward_peak = max(forward_peak, at_nll)
    # backward: chunk i (from the last): saved outputs j <= i, chunk gradients j > i, two c_i, the labels,
    # total_weights j < i, the running sum's gradient
    peak, peak_saved = 0, 0
    for i in reversed(range(n)):
        saved = sum(c[: i + 1]) + labels + 4 * i
        live = saved + sum(g[i + 1:]) + 2 * c[i] + 4
        if live > peak:
            peak, peak_saved = live, saved
    cat = 2 * logits  # the last chunk's nll_loss_backward has dropped the running sum's gradient
    if cat > peak:
        peak, peak_saved = cat, 0
    return LossBuffers(saved=total_saved, saved_backward=peak_saved, backward_peak=peak, forward_peak=forward_peak,
                       scalars=2 * f)


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's token chunk (ops/fused_linear_cross_entropy.py, chunk_mem_const 1): inc_factor =
    cdiv(V, H), chunk = next_power_of_2(cdiv(tokens, inc_factor)), at most the tokens: transient logits of
    about tokens x H elements."""
    inc = -(-vocab // hidden)
    chunk = 1 << max(0, (-(-tokens // inc) - 1).bit_length())
    return min(chunk, tokens)


def fused_loss_buffers(ctx: StepContext, spec: ModelSpec, weight_trains: bool) -> LossBuffers:
    """The loss buffers of a fused lm_head + cross-entropy (sim.head.fused_loss_head has the sources; t
    tokens, V vocab, H hidden, c the compute dtype's bytes).
    liger: Liger's LigerForCausalLMLoss (transformers/model/loss_utils.py) pads the labels ((t + b) int64)
    and makes shift_labels contiguous (t int64), both alive through the Function; its forward makes
    grad_input (t H c), grad_weight (V H in the weight's dtype, when the weight trains), loss_1d (t fp32),
    the target mask (t bool) and one chunk of logits (torch.empty((chunk, V)): the mm out= buffer it
    reuses on CUDA); with fp32 operands the weight gradient takes the legacy path, a V x H fp32 product per
    chunk (``grad_weight += torch.mm(...).float()``). grad_input and grad_weight are saved.
    cce: what it saves is counted with the head (sim.head.fused_loss_head); the forward's transients are the
    valid-index build ((targets[..., 1:] != -100).nonzero(): bool, int64 (n, 2), its int32 copy: 24 bytes
    per valid token n at most) and neg_dot (n fp32) beside the saved lse, valids and logit_avg."""
    t, h, vocab = ctx.tokens, spec.hidden_size, spec.vocab_size
    c = DTYPE_BYTES[ctx.compute_dtype]
    if ctx.fused_loss == "cce":
        valid = t - ctx.batch
        transient = max(24 * valid - 12 * valid - 4 * vocab, 4 * valid + 4)
        return LossBuffers(saved=0, saved_backward=0, backward_peak=0, forward_peak=transient, scalars=2 * 4)
    grads = t * h * c + (vocab * h * DTYPE_BYTES[ctx.weight_dtype] if weight_trains else 0)
    fallback = vocab * h * 4 if weight_trains and c == 4 else 0
    forward_peak = ((t + ctx.batch) * 8 + t * 8 + t + grads + t * 4
                    + liger_chunk_tokens(t, vocab, h) * vocab * c + fallback)
    return LossBuffers(saved=grads, saved_backward=grads, backward_peak=grads, forward_peak=forward_peak, scalars=2 * 4)
