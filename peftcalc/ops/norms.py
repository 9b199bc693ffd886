"""RMSNorm (LlamaRMSNorm's formula) and LayerNorm (native_layer_norm).
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import cast
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "gemma_rms_norm",
    "layer_norm",
    "layer_norm_stats_dtype",
    "rms_norm",
]


def _normalized(rec: Recorder, x: SymTensor, tag: str, rows: int, keep_mean: bool) -> tuple[SymTensor, SymTensor | None]:
    """The fp32 normalization both RMSNorms run, ``x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) +
    eps)`` over `rows` rows, with its autograd nodes (pow and the product save the fp32 input, rsqrt its result):
    (the normalized fp32 tensor, the mean). `keep_mean`: LlamaRMSNorm names the variance, so it stays referenced
    until the norm returns (the caller frees it); Gemma's one expression drops it once ``+ eps`` is made (None)."""
    x32 = cast(rec, x, "float32")
    full, small = x.numel * 4, rows * 4
    xs = rec.save(x32, f"{tag}.input_fp32") if x.requires_grad else 0
    p = rec.new(x.numel, "float32", x.requires_grad)  # x.pow(2)
    m = rec.new(rows, "float32", x.requires_grad)  # .mean(-1, keepdim=True): grad.expand() / n
    rec.free(p)
    ve = rec.new(rows, "float32", x.requires_grad)  # variance + eps: AddBackward hands the gradient on
    if not keep_mean:
        rec.free(m)
    r = rec.new(rows, "float32", x.requires_grad)  # rsqrt, saves its result
    rec.free(ve)
    h = rec.new(x.numel, "float32", x.requires_grad)  # x * rsqrt
    if x.requires_grad:
        rec.node(p, [("new", "t", full), ("new", "u", full), ("new", "d", full), ("free", "t"), ("free", "u")],
                 [(x32.id, "d")], [xs])
        rec.node(m, [("new", "d", full)], [(p.id, "d")])
        rec.node(ve, outputs=[(m.id, GRAD)])
        rid = rec.save(r, f"{tag}.rsqrt")
        rec.node(r, [("new", "t", small), ("new", "u", small), ("new", "d", small), ("free", "t"), ("free", "u")],
                 [(ve.id, "d")], [rid])
        rec.node(h, [("new", "dx", full), ("new", "t", full), ("new", "dr", small), ("free", "t")],
                 [(x32.id, "dx"), (r.id, "dr")], [xs, rid])
    rec.free(r)
    if x32 is not x:
        rec.free(x32)
    return h, (m if keep_mean else None)


def rms_norm(rec: Recorder, x: SymTensor, weight_trainable: bool, tag: str, dim: int = 0,
             weight_fp32: bool = False) -> SymTensor:
    """LlamaRMSNorm.forward: x.to(fp32); variance = pow(2).mean; x * rsqrt(variance + eps); weight *
    _.to(input dtype). pow and the product save the fp32 input and the rsqrt; weight * y saves y when the
    weight trains, and the weight (a parameter) when y needs a gradient. The variance stays referenced
    until the norm returns. Backward: the weight product (grad * weight, and (grad * y).sum for the
    weight), the product's grad * rsqrt and (grad * x).sum, rsqrt's -0.5 grad r^3, mean's expanded
    grad / n, pow's grad * 2 x (x.pow(1) and 2 * _ as temporaries). `dim`: the size of the normalized last
    dimension where it is not a token's whole width (Qwen3's q_norm/k_norm over head_dim: one row per token
    and head). `weight_fp32`: Olmo2RMSNorm.forward's ``(self.weight * x).to(input_dtype)``, the weight product
    on the fp32 normalized values (promoted to fp32, saving them when the weight trains), then the cast back."""
    ctx = rec.ctx
    hidden = dim or (x.numel // ctx.tokens if ctx.tokens else x.numel)
    rows = x.numel // hidden
    h, m = _normalized(rec, x, tag, rows, keep_mean=True)
    normed = h if weight_fp32 else cast(rec, h, x.dtype)
    saved = []
    steps, outputs = [], []
    if normed.requires_grad:
        rec.save_param(hidden * DTYPE_BYTES[ctx.weight_dtype])
        steps.append(("new", "d", normed.nbytes))
        outputs.append((normed.id, "d"))
    if weight_trainable:
        saved.append(rec.save(normed, f"{tag}.normalized"))
        steps += [("new", "t", normed.nbytes), ("param", hidden * DTYPE_BYTES[ctx.weight_dtype]), ("free", "t")]
    product = rec.new(x.numel, normed.dtype, x.requires_grad or weight_trainable)
    rec.node(product, steps, outputs, saved, saves_param=normed.requires_grad)
    out = cast(rec, product, x.dtype)
    if out is not product:
        rec.free(product)
    rec.free(normed, h, m)
    return out


def gemma_rms_norm(rec: Recorder, x: SymTensor, weight_trainable: bool, tag: str, dim: int) -> SymTensor:
    """Gemma2RMSNorm / Gemma3RMSNorm.forward (modeling_gemma2.py, modeling_gemma3.py) over the last `dim`
    values: ``output = self._norm(x.float()); output = output * (1.0 + self.weight.float());
    return output.type_as(x)``, with ``_norm(x) = x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)`` one
    expression (each temporary dropped as the next op is made, unlike LlamaRMSNorm's named variance). The
    product runs in fp32: it saves the normalized fp32 tensor when the weight trains and the fp32
    (1 + weight) (a `dim` vector) when the input needs a gradient, and the cast back to x's dtype copies it.
    Backward: the cast's fp32 gradient, grad * (1 + w) for the input and (grad * h) summed to `dim` for the
    weight, then the normalization's nodes as rms_norm's."""
    ctx = rec.ctx
    rows = x.numel // dim
    h, _ = _normalized(rec, x, tag, rows, keep_mean=False)
    full = x.numel * 4
    # self.weight.float() (a copy unless the weight is fp32), then 1.0 + _ (a new fp32 vector)
    w_bytes = DTYPE_BYTES[ctx.weight_dtype]
    w32 = rec.new(dim, "float32", weight_trainable) if w_bytes != 4 else None
    one_plus = rec.new(dim, "float32", weight_trainable)
    rec.free(w32)
    saved, steps, outputs = [], [], []
    if h.requires_grad:
        saved.append(rec.save(one_plus, f"{tag}.one_plus_weight"))
        steps.append(("new", "d", full))
        outputs.append((h.id, "d"))
    if weight_trainable:
        saved.append(rec.save(h, f"{tag}.normalized"))
        steps += [("new", "t", full), ("new", "w", dim * 4), ("free", "t")]
        steps += [("param", dim * w_bytes), ("free", "w")] if w_bytes != 4 else [("param", dim * 4)]
    prod = rec.new(x.numel, "float32", h.requires_grad or weight_trainable)
    rec.node(prod, steps, outputs, saved)
    rec.free(one_plus, h)
    out = cast(rec, prod, x.dtype)
    if out is not prod:
        rec.free(prod)
    return out


def layer_norm_stats_dtype(ctx: StepContext, input_dtype: str) -> str:
    """The dtype of the mean and rstd native_layer_norm returns (and saves): fp32, except on the CPU
    with half input and weights alike (ATen/native/layer_norm.cpp layer_norm_cpu: mixed_type only when
    input and weight dtypes differ, else the input's dtype; traced: 2 x (4, 17, 1) bf16 for CLIP's
    pre_layrnorm on cpu tiny-llava bf16 b4 ckpt)."""
    half = ctx.device == "cpu" and input_dtype == ctx.weight_dtype and input_dtype != "float32"
    return input_dtype if half else "float32"


def layer_norm(rec: Recorder, x: SymTensor, trainable: bool, hidden: int, tag: str, params: int = 2) -> SymTensor:
    """nn.LayerNorm (native_layer_norm): saves the input (and the weight), mean and rstd when any
    gradient is needed; its backward makes the input's gradient and, when they train, the weight's and
    bias's. CUDA autocast runs layer_norm in fp32 (it is on the fp32 list of
    aten/src/ATen/autocast_mode.cpp: the cast copy is saved); CPU autocast does not list it, so it runs
    on the input as it is (a bf16 input is saved as it is, mean and rstd are fp32, the output keeps the
    input's dtype; traced, torch 2.13). `params`: how many of its weight and bias train (BitFit: the bias)."""
    needs = x.requires_grad or trainable
    xin = cast(rec, x, "float32") if rec.ctx.autocast and rec.ctx.device == "cuda" else x
    saved = []
    if needs:
        saved.append(rec.save(xin, f"{tag}.input"))
        rec.save_param(2 * hidden * DTYPE_BYTES[rec.ctx.weight_dtype])  # native_layer_norm saves weight and bias
    out = rec.new(x.numel, xin.dtype, needs)
    # mean and rstd: fp32, except on the CPU with half input and weights alike, where native_layer_norm
    # returns them in the input's dtype (a half input with fp32 weights gets fp32 ones)
    stats = rec.new(2 * (x.numel // hidden), layer_norm_stats_dtype(rec.ctx, xin.dtype), False)
    if needs:
        saved.append(rec.save(stats, f"{tag}.mean_rstd"))
        steps, outputs = input_grads(xin)
        if trainable:
            steps += [("param", hidden * DTYPE_BYTES[rec.ctx.weight_dtype])] * params
        rec.node(out, steps, outputs, saved)
    rec.free(stats)
    if xin is not x:
        rec.free(xin)
    return out
