"""nn.Linear / transformers Conv1D as a base layer: autocast's weight and bias copies, bitsandbytes'
4-bit matmul (Linear4bit) and its backward's dequantization. Methods that wrap a Linear (LoRA, DoRA,
IA3) add their ops around this one (peftcalc.methods.sites.site_linear).
"""

from __future__ import annotations

from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import autocast_in, autocast_weight_copy, cast
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "linear",
    "matmul",
    "matmul_4bit_backward_steps",
]


def matmul_4bit_backward_steps(ctx: StepContext, in_f: int, out_f: int) -> list:
    """bitsandbytes MatMul4Bit.backward (autograd/_functions.py), before grad_A:
    ``grad_A = torch.matmul(grad_output, F.dequantize_4bit(B, ctx.state).to(grad_output.dtype))``.
    dequantize_4bit first dequantizes a double-quantized absmax (dequantize_blockwise: one fp32 per
    64-weight block), then makes the (out, in) weight in QuantState.dtype, the dtype it was quantized
    from (fp32 when the model was loaded in fp32 for autocast), which ``.to`` copies into the compute
    dtype when they differ; the matmul then allocates grad_A (the caller's step) next to that copy
    ("wc", freed after it). Traced (fake, tiny-vit-cls amp-bf16): dequantize_blockwise (128,) fp32,
    dequantize_4bit (64, 128) fp32, _to_copy (64, 128) bf16, mm (51, 128) bf16."""
    numel = in_f * out_f
    converted = ctx.quant_source != ctx.quant_compute
    name = "w" if converted else "wc"
    steps = []
    if ctx.quant_nested:
        steps.append(("new", "absmax", 4 * ((numel + 63) // 64)))
    steps.append(("new", name, numel * DTYPE_BYTES[ctx.quant_source]))
    if ctx.quant_nested:
        steps.append(("free", "absmax"))
    if converted:
        steps += [("new", "wc", numel * DTYPE_BYTES[ctx.quant_compute]), ("free", "w")]
    return steps


def matmul(rec: Recorder, x: SymTensor, in_f: int, out_f: int, weight_trains: bool, out_dtype: str, saved: list,
           weight: SymTensor | None = None, weight_bytes: int = 0, bias_bytes: int = 0, dequantized: int = 0,
           grad_pending: bool = False, bias_copy: SymTensor | None = None) -> SymTensor:
    """The mm/addmm node of a Linear on x (tokens x in): its backward makes grad_x = grad @ W when x
    needs a gradient, grad_W = grad^T @ x when the weight trains (the .grad itself, or the gradient of
    autocast's weight copy `weight`), and the bias gradient (a sum over tokens). Without a copy, the
    weight a gradient of x needs is the parameter itself (saved, no activation bytes). bitsandbytes
    MatMul4Bit's forward dequantizes the weight (`dequantized` bytes) for F.linear on CUDA; the CPU
    backend runs a fused gemm_4bit (traced); both backwards dequantize it again to compute grad_x (the
    packed weight is in ctx.tensors, not save_for_backward)."""
    ctx = rec.ctx
    tokens = x.numel // in_f
    qdtype = ctx.quant_compute or ctx.compute_dtype
    saves_weight = x.requires_grad and weight is None and not dequantized
    if saves_weight:  # the weight, transposed (a view of the parameter, its whole size)
        rec.save_param(weight_bytes)
    w = rec.new(dequantized // DTYPE_BYTES[qdtype], qdtype, False) if dequantized and ctx.device == "cuda" else None
    out = rec.new(tokens * out_f, out_dtype, x.requires_grad or weight_trains or bias_bytes > 0)
    rec.free(w)
    steps, outputs = [], []
    if dequantized and x.requires_grad:
        steps += matmul_4bit_backward_steps(ctx, in_f, out_f)
    s, o = input_grads(x)
    steps += s
    outputs += o
    if dequantized and x.requires_grad:
        steps.append(("free", "wc"))
    if weight_trains:
        if weight is not None:
            steps.append(("new", "dw", weight.nbytes))
            outputs.append((weight.id, "dw"))
        else:
            steps.append(("pending" if grad_pending else "param", weight_bytes))
    if bias_copy is not None:  # the sum is the gradient of autocast's bias copy (see linear)
        steps += [("returned",), ("new", "db", bias_copy.nbytes)]
        outputs.append((bias_copy.id, "db"))
    elif bias_bytes:  # addmm's formula hands on grad itself; the engine sums it down to the bias's shape
        # once the formula has returned (validate_outputs; peftcalc.backward's "returned")
        steps += [("returned",), ("param", bias_bytes)]
    rec.node(out, steps, outputs, saved, saves_param=saves_weight)
    return out


def linear(rec: Recorder, x: SymTensor, in_f: int, out_f: int, trainable: bool, tag: str, quantized: bool = False,
           bias: bool = False, bias_trains: bool = False, grad_pending: bool = False) -> SymTensor:
    """nn.Linear / Conv1D (addmm): saves the input when the weight trains (grad_W = grad^T x) and the
    weight when the input needs a gradient. Under autocast the weight is cast to the autocast dtype
    (a copy made for every matmul; kept to the end of the forward when the weight trains, see
    autocast_weight_copy), and that copy is what is saved; so is the bias (autocast_mode.cpp casts every
    floating argument of linear/addmm: a frozen bias's copy lives until the matmul has returned). bitsandbytes Linear4bit.forward (nn/modules.py) casts
    the input to bnb_4bit_compute_dtype and returns ``.to(inp_dtype)``. The methods that
    wrap a Linear run their ops around this one (peftcalc.methods.sites.site_linear).
    grad_pending: the weight is used again below (a head tied to the input embedding), so its gradient
    is no .grad until the other use's arrives (peftcalc.backward: a "pending" step)."""
    ctx = rec.ctx
    saved = []
    # under autocast the bias's copy is made before the weight's (traced, cpu and fake: a recompute that
    # stops at fc2's saved weight copy holds the frozen bias's copy already)
    bias_copy = None
    trained_bias_copy = None
    if ctx.autocast and bias_trains:  # addmm's bias copy, kept in autocast's cache (a trainable leaf): its
        # gradient (addmm's, summed down to the bias's shape) comes back in the autocast dtype and its
        # ToCopyBackward makes the .grad
        trained_bias_copy = rec.new(out_f, ctx.autocast, True)
        rec.node(trained_bias_copy, [("param", out_f * DTYPE_BYTES[ctx.weight_dtype])])
    elif ctx.autocast and bias and not quantized:  # a frozen bias's copy, alive until the matmul returns
        bias_copy = rec.new(out_f, ctx.autocast, False)
    weight_copy = None
    if ctx.autocast and not quantized:
        weight_copy = autocast_weight_copy(rec, in_f * out_f, trainable, grad_pending=grad_pending)
        if x.requires_grad:
            saved.append(rec.save(weight_copy, f"{tag}.autocast_weight"))
    # bitsandbytes Linear4bit.forward: x.to(compute_dtype) (not autocast's cast: bnb.matmul_4bit is no
    # autocast op), then .to(inp_dtype); the cast input is its local x until it returns
    quant_cast = quantized and ctx.quant_compute and x.dtype != ctx.quant_compute
    xin = cast(rec, x, ctx.quant_compute) if quant_cast else autocast_in(rec, x)
    if trainable or (ctx.linear_saves_input and x.requires_grad):  # ZeRO-3's linear saves it regardless
        # (LinearFunctionForZeroStage3.setup_context: ctx.save_for_backward(input, weight, bias))
        saved.append(rec.save(xin, f"{tag}.input"))
    wb = DTYPE_BYTES[ctx.weight_dtype]
    out = matmul(rec, xin, in_f, out_f, trainable, ctx.quant_compute if quantized else ctx.autocast or ctx.compute_dtype,
                 saved, weight=weight_copy, weight_bytes=in_f * out_f * wb, bias_bytes=out_f * wb if bias_trains else 0,
                 bias_copy=trained_bias_copy,
                 dequantized=in_f * out_f * DTYPE_BYTES[ctx.quant_compute] if quantized else 0,
                 grad_pending=grad_pending)
    if quant_cast:  # Linear4bit.forward: .to(inp_dtype)
        y = cast(rec, out, x.dtype)
        rec.free(out)
        out = y
    rec.free(bias_copy)
    if xin is not x:
        rec.free(xin)
    if weight_copy is not None and not trainable:  # autocast caches only the copies of trainable leaves
        rec.free(weight_copy)
    return out
