"""Saved activations, simulated op by op.

The forward pass of one block is written out as the sequence of torch ops that the transformers
modeling file runs (modeling_llama.py, modeling_gpt2.py, modeling_bert.py, modeling_vit.py,
modeling_clip.py, modeling_opt.py, modeling_blip_2.py) and peft's layers add (tuners/lora/layer.py
Linear.forward, tuners/ia3/layer.py).
Each op records the tensors autograd saves for backward under the rules of torch's
``tools/autograd/derivatives.yaml`` (an input is saved only when the gradient that needs it is
required), so a frozen Linear saves nothing, a LoRA layer saves its (cast) input, and nothing below
the lowest trainable parameter is saved at all.

Tensors are symbolic: a size, a dtype and a requires-grad flag. Saved tensors are counted once per
storage (an op that saves a tensor another op already saved adds nothing), which is how a storage
tracker and ``max_memory_allocated`` see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from peftcalc.blocktrace import BlockTrace, block_peaks
from peftcalc.errors import InputError
from peftcalc.layout import LANGUAGE_PROJECTION, LINEAR_KINDS, QFORMER, QUERY_TOKENS, Layout, build_layout
from peftcalc.methods import (
    ADAPTER_ATTRIBUTE,
    BLOCK_ADAPTER_DROPOUT,
    Plan,
    resolve_adapter_kind,
    resolve_bottleneck,
)
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.spec import ModelSpec, kept_in_fp32

# Dropout probabilities during training, from the transformers config defaults of each family.
DROPOUT_KEYS = {
    "gpt2": {"embd": ("embd_pdrop", 0.1), "attn": ("attn_pdrop", 0.1), "resid": ("resid_pdrop", 0.1)},
    "bert": {"embd": ("hidden_dropout_prob", 0.1), "attn": ("attention_probs_dropout_prob", 0.1),
             "resid": ("hidden_dropout_prob", 0.1)},
    "roberta": {"embd": ("hidden_dropout_prob", 0.1), "attn": ("attention_probs_dropout_prob", 0.1),
                "resid": ("hidden_dropout_prob", 0.1)},
    "vit": {"embd": ("hidden_dropout_prob", 0.0), "attn": ("attention_probs_dropout_prob", 0.0),
            "resid": ("hidden_dropout_prob", 0.0)},
    "clip_vision_model": {"attn": ("attention_dropout", 0.0)},
    "llama": {"attn": ("attention_dropout", 0.0)},
    "mistral": {"attn": ("attention_dropout", 0.0)},
    "qwen2": {"attn": ("attention_dropout", 0.0)},
    # BLIP-2's three parts (blip2_parts), read from their sub-configs: OPTConfig (dropout after the attention
    # output and after fc2), Blip2QFormerConfig (BERT's), Blip2VisionConfig
    "opt": {"attn": ("attention_dropout", 0.0), "resid": ("dropout", 0.1)},
    "blip_2_qformer": {"embd": ("hidden_dropout_prob", 0.1), "attn": ("attention_probs_dropout_prob", 0.1),
                       "resid": ("hidden_dropout_prob", 0.1)},
    "blip_2_vision_model": {"attn": ("attention_dropout", 0.0)},
}


def dropout_p(spec: ModelSpec, where: str) -> float:
    key = DROPOUT_KEYS[spec.model_type].get(where)
    if key is None:
        return 0.0
    return float(spec.hf_config.get(key[0], key[1]) or 0.0)


@dataclass(slots=True)
class T:
    """A symbolic tensor."""

    numel: int
    dtype: str
    rg: bool
    id: int
    base: object = None  # a view: the tensor whose storage it shares
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Ctx:
    """What the ops need to know about the step."""

    batch: int
    seq: int  # query length (prompt tuning adds its virtual tokens here)
    kv_seq: int  # key length (prefix tuning adds its virtual tokens here)
    compute: str  # dtype activations come out of matmuls in
    weight: str  # dtype of base weights
    autocast: str | None
    adapter: str  # dtype of peft's adapter weights
    device: str
    attention: str
    training_dropout: bool = True
    quant_compute: str = ""  # bnb_4bit_compute_dtype of a QLoRA base ("" without one)
    quant_source: str = ""  # the dtype its NF4 weights were quantized from (the loaded dtype: QuantState.dtype)
    quant_nested: bool = False  # double quantization (QuantState.nested: an 8-bit absmax)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Recorder:
    """Collects saved tensors, each once, by bucket (a layer index, 'pre', 'post'). With a `trace`
    (peftcalc.blocktrace), the ops also record what they allocate and use and their backward nodes."""

    ctx: Ctx
    bucket: object = "pre"
    saved: dict = field(default_factory=dict)  # id -> (bucket, tag, bytes)
    next_id: int = 0
    trace: BlockTrace | None = None
    cached: list = field(default_factory=list)  # autocast's cached weight copies (alive to the region's end)
    saved_cached_copies: int = 0  # bytes of those copies that are also saved (counted once)

    def new(self, numel: int, dtype: str, rg: bool) -> T:
        """A tensor an op allocates."""
        self.next_id += 1
        t = T(numel, dtype, rg, self.next_id)
        if self.trace is not None:
            self.trace.alloc(t)
        return t

    def save(self, t: T, tag: str) -> None:
        t = t.base if t.base is not None else t
        if t.id not in self.saved:
            self.saved[t.id] = (self.bucket, tag, t.nbytes)
        if self.trace is not None:
            self.trace.save(t)

    def save_new(self, numel: int, dtype: str, tag: str) -> T:
        t = self.new(numel, dtype, False)
        self.save(t, tag)
        return t

    def view(self, base: T, numel: int) -> T:
        """A view of `base`'s storage (no allocation; saving or using it keeps the storage)."""
        self.next_id += 1
        return T(numel, base.dtype, base.rg, self.next_id, base)

    def save_param(self) -> None:
        """A parameter saved for backward: no activation bytes, but a recompute stops only after it."""
        if self.trace is not None:
            self.trace.save(None)

    def use(self, *ts) -> None:
        """The ops or Python references that still need these tensors (they die after their last use)."""
        if self.trace is not None:
            self.trace.use(*ts)

    def node(self, out: T, ins=(), saved=(), param_grad: int = 0, temp: int = 0, alias: bool = False,
             unpacks: bool = True) -> None:
        if self.trace is not None:
            self.trace.node(out, ins, saved, param_grad, temp, alias, unpacks)

    def bytes_by_bucket(self) -> dict:
        out: dict = {}
        for bucket, _tag, nbytes in self.saved.values():
            out[bucket] = out.get(bucket, 0) + nbytes
        return out

    def bytes_by_tag(self) -> dict:
        out: dict = {}
        for _bucket, tag, nbytes in self.saved.values():
            out[tag] = out.get(tag, 0) + nbytes
        return out


def _promote(a: str, b: str) -> str:
    """torch type promotion between the dtypes used here: fp32 wins over bf16/fp16."""
    return "float32" if "float32" in (a, b) else a


# ---------------------------------------------------------------- ops
# Each op mirrors the forward of one torch function and saves what its derivative formula needs; it
# records its allocations, uses and backward node for the block timeline (peftcalc.blocktrace).


def cast(rec: Recorder, x: T, dtype: str) -> T:
    """Tensor.to(dtype): a no-op returning the same tensor when the dtype already matches; else a copy
    (ToCopyBackward casts the gradient back)."""
    if x.dtype == dtype:
        return x
    y = rec.new(x.numel, dtype, x.rg)
    rec.use(x)
    rec.node(y, (x,), unpacks=False)
    return y


def autocast_in(rec: Recorder, x: T) -> T:
    """torch.autocast casts the inputs of matmul-like ops to the autocast dtype."""
    return cast(rec, x, rec.ctx.autocast) if rec.ctx.autocast else x


def split(rec: Recorder, x: T, parts: int) -> tuple:
    """Tensor.split into equal parts along the last dim: views of x's storage; SplitBackward
    concatenates the parts' gradients into one of x's size."""
    views = tuple(rec.view(x, x.numel // parts) for _ in range(parts))
    rec.node(views, (x,))
    return views


def add(rec: Recorder, a: T, b: T, dtype: str | None = None) -> T:
    """a + b (a residual connection): AddBackward hands the incoming gradient to both inputs."""
    out = rec.new(a.numel, dtype or _promote(a.dtype, b.dtype), a.rg or b.rg)
    rec.use(a, b)
    rec.node(out, (a, b), alias=True, unpacks=False)
    return out


def _matmul_weight(rec: Recorder, x: T, in_f: int, out_f: int, trainable: bool, tag: str, quantized: bool) -> T | None:
    """The weight operand of a matmul. Under autocast a bf16/fp16 copy of the weight (autocast's cast of
    a trainable leaf is cached until the autocast region exits, torch autocast_mode.cpp cached_cast); it
    is saved when the input needs a gradient. Without autocast the weight itself (a parameter)."""
    ctx = rec.ctx
    if quantized:  # bitsandbytes MatMul4Bit keeps the packed weight in ctx.tensors, not save_for_backward
        return None
    if not ctx.autocast:
        if x.rg:
            rec.save_param()
        return None
    w16 = rec.new(in_f * out_f, ctx.autocast, trainable)
    if trainable:  # ToCopyBackward, then AccumulateGrad of the fp32 weight
        rec.node(w16, (), param_grad=in_f * out_f * DTYPE_BYTES[ctx.weight])
        rec.cached.append(w16)
    if x.rg:
        rec.save(w16, f"{tag}.autocast_weight")
        if trainable:
            rec.saved_cached_copies += w16.nbytes
    return w16


def matmul_4bit_backward_temp(ctx: Ctx, in_f: int, out_f: int, tokens: int) -> int:
    """Bytes bitsandbytes MatMul4Bit.backward (autograd/_functions.py) holds besides grad_A at its peak:
    ``grad_A = torch.matmul(grad_output, F.dequantize_4bit(B, ctx.state).to(grad_output.dtype))``.
    dequantize_4bit first dequantizes a double-quantized absmax (dequantize_blockwise: one fp32 per
    64-weight block), then makes the (out, in) weight in QuantState.dtype, the dtype it was quantized
    from (fp32 when the model was loaded in fp32 for autocast), which ``.to`` copies into the compute
    dtype when they differ; the matmul then allocates grad_A (tokens x in, compute dtype) next to that
    copy. Traced (fake, tiny-vit-cls amp-bf16): dequantize_blockwise (128,) fp32, dequantize_4bit
    (64, 128) fp32, _to_copy (64, 128) bf16, mm (51, 128) bf16."""
    numel = in_f * out_f
    weight = numel * DTYPE_BYTES[ctx.quant_source]
    absmax = 4 * ((numel + 63) // 64) if ctx.quant_nested else 0
    copy = numel * DTYPE_BYTES[ctx.quant_compute] if ctx.quant_source != ctx.quant_compute else 0
    grad_a = tokens * in_f * DTYPE_BYTES[ctx.quant_compute]
    peak = max(absmax + weight, weight + copy, (copy or weight) + grad_a)
    return peak - grad_a


def linear(rec: Recorder, x: T, in_f: int, out_f: int, trainable: bool, tag: str,
           lora_rank: int = 0, dora: bool = False, ia3: str = "", quantized: bool = False,
           bias: bool = False, bias_trains: bool = False) -> T:
    """nn.Linear / Conv1D (addmm): saves the input when the weight trains (grad_W = grad^T x) and the
    weight when the input needs a gradient. Under autocast the weight is cast to the autocast dtype,
    and that copy is what is saved. bitsandbytes Linear4bit.forward casts the input to the compute dtype
    and returns ``.to(inp_dtype)``; its backward dequantizes the weight (F.dequantize_4bit, a weight-sized
    temporary). peft LoRA (tuners/lora/layer.py Linear.forward; lora/bnb.py Linear4bit.forward, which
    clones the base result first) adds lora_B(lora_A(x.to(lora_A.weight.dtype))) * scaling to the base
    result and casts the sum back to its dtype: the cast input and A's output are saved."""
    ctx = rec.ctx
    wb = DTYPE_BYTES[ctx.weight]
    tokens_in = x.numel // in_f
    quant_cast = quantized and ctx.quant_compute and x.dtype != ctx.quant_compute
    # Linear4bit's x.to(compute_dtype) replaces autocast's cast (bnb.matmul_4bit is not an autocast op)
    xin = cast(rec, x, ctx.quant_compute) if quant_cast else autocast_in(rec, x)
    if trainable:
        rec.save(xin, f"{tag}.input")
    if ia3 == "ff":  # peft IA3 Linear.forward, feedforward: (x.to(ia3 dtype) * scaling).to(x dtype), then
        # the frozen linear; the mul saves the cast input and the scaling vector (1 * ia3_l.flatten())
        xc = cast(rec, x, ctx.adapter)
        rec.save(xc, f"{tag}.ia3_input")
        scaling = rec.save_new(in_f, ctx.adapter, f"{tag}.ia3_scaling")
        scaled = rec.new(x.numel, ctx.adapter, True)
        rec.use(xc, scaling)
        # the scaling vector's gradient is (grad * x) summed over tokens: an input-sized product first
        rec.node(scaled, (xc,), saved=(xc, scaling), param_grad=in_f * DTYPE_BYTES[ctx.adapter], temp=xc.nbytes)
        xin = autocast_in(rec, cast(rec, scaled, x.dtype) if x.dtype != ctx.adapter else scaled)
    w16 = _matmul_weight(rec, x, in_f, out_f, trainable, tag, quantized)
    out_dtype = ctx.autocast or ctx.compute
    base_dtype = ctx.quant_compute if quant_cast else out_dtype
    base_rg = xin.rg or trainable or bias_trains
    base = rec.new(tokens_in * out_f, base_dtype, base_rg)
    rec.use(xin, w16)
    param_grad = (in_f * out_f * wb if trainable and not ctx.autocast else 0) + \
                 (out_f * wb if bias and (trainable or bias_trains) else 0)
    dequant = matmul_4bit_backward_temp(ctx, in_f, out_f, tokens_in) if quantized else 0
    rec.node(base, (xin, w16), saved=((xin,) if trainable else ()) + ((w16,) if w16 is not None and x.rg else ()),
             param_grad=param_grad, temp=dequant, unpacks=trainable or not quantized)
    if quant_cast:  # matmul_4bit(...).to(inp_dtype); the cast input is Linear4bit.forward's local x until it returns
        base = cast(rec, base, x.dtype)
        rec.use(xin)
    out = base
    if lora_rank:
        if quantized:  # lora/bnb.py: result = result.clone() ("defensively clone")
            out = rec.new(base.numel, base.dtype, base.rg)
            rec.use(base)
            rec.node(out, (base,))
        # x.to(lora_A.weight.dtype) (peft _cast_input_dtype, skipped under autocast), then autocast's cast
        xa = autocast_in(rec, x) if ctx.autocast else cast(rec, x, ctx.adapter)
        rec.save(xa, f"{tag}.lora_input")
        a16 = b16 = None
        if ctx.autocast:  # autocast copies of lora_A (saved when x needs a gradient) and lora_B (always)
            a16, b16 = rec.new(in_f * lora_rank, ctx.autocast, True), rec.new(out_f * lora_rank, ctx.autocast, True)
            rec.node(a16, (), param_grad=in_f * lora_rank * DTYPE_BYTES[ctx.adapter])
            rec.node(b16, (), param_grad=out_f * lora_rank * DTYPE_BYTES[ctx.adapter])
            rec.cached += [a16, b16]
            rec.save(b16, f"{tag}.lora_autocast_weights")
            if x.rg:
                rec.save(a16, f"{tag}.lora_autocast_weights")
        else:
            rec.save_param()
        a = rec.new(tokens_in * lora_rank, ctx.autocast or ctx.adapter, True)
        rec.use(xa, a16)
        ab = 0 if ctx.autocast else DTYPE_BYTES[ctx.adapter]
        rec.node(a, (xa, a16), saved=(xa, a16 if x.rg else None), param_grad=in_f * lora_rank * ab)
        rec.save(a, f"{tag}.lora_A_out")
        b = rec.new(tokens_in * out_f, a.dtype, True)
        rec.use(a, b16)
        rec.node(b, (a, b16), saved=(a, b16), param_grad=out_f * lora_rank * ab)
        scaled = rec.new(b.numel, b.dtype, True)  # * scaling
        rec.use(b)
        rec.node(scaled, (b,))
        if dora:  # peft tuners/lora/dora.py DoraLinearLayer.forward: (m/||W+BA|| - 1) * base_result +
            # m/||W+BA|| * lora_B(lora_A(x)) * scaling: the muls save the base result (compute dtype),
            # the LoRA result, and the vectors ||W+BA|| (detached, saved by m/||.||) and m/||.||;
            # m/||.|| - 1 only when the base result needs a gradient (x does: the base weight is frozen)
            # (base_result - bias when the layer has one: under autocast that promotes to fp32)
            base_dtype = ctx.weight if (bias and ctx.autocast) else (ctx.autocast or ctx.compute)
            rec.save_new(tokens_in * out_f, base_dtype, f"{tag}.dora_base_out")
            rec.save_new(tokens_in * out_f, ctx.autocast or ctx.adapter, f"{tag}.dora_lora_out")
            rec.save_new((3 if x.rg else 2) * out_f, ctx.adapter, f"{tag}.dora_scale")
        total = add(rec, out, scaled, _promote(out.dtype, scaled.dtype) if not ctx.autocast else out.dtype)
        out = cast(rec, total, out.dtype) if not ctx.autocast else total  # result.to(torch_result_dtype)
    if ia3 == "out":  # IA3 on keys/values: base_layer(x) * scaling, the mul saves both
        rec.save(out, f"{tag}.ia3_out")
        scaling = rec.save_new(out_f, ctx.adapter, f"{tag}.ia3_scaling")
        scaled = rec.new(out.numel, out.dtype, True)
        rec.use(out, scaling)
        rec.node(scaled, (out,), saved=(out, scaling), param_grad=out_f * DTYPE_BYTES[ctx.adapter], temp=out.nbytes)
        out = scaled
    return out


def rms_norm(rec: Recorder, x: T, weight_trainable: bool, tag: str) -> T:
    """LlamaRMSNorm.forward: x.to(fp32); variance = pow(2).mean; x * rsqrt(variance + eps); weight *
    _.to(input dtype). pow and the product save the fp32 input and the rsqrt; weight * y saves y when the
    weight trains. The variance stays referenced until the norm returns."""
    hidden = x.numel // rec.ctx.tokens if rec.ctx.tokens else x.numel
    rows = x.numel // hidden
    rg = x.rg
    x32 = cast(rec, x, "float32")
    if rg:
        rec.save(x32, f"{tag}.input_fp32")
    sq = rec.new(x.numel, "float32", rg)  # pow(2): PowBackward computes 2 * x ** 1 * grad
    rec.use(x32)
    rec.node(sq, (x32,), saved=(x32,), temp=2 * x32.nbytes)
    var = rec.new(rows, "float32", rg)  # mean(-1, keepdim=True): MeanBackward expands the gradient
    rec.use(sq)
    rec.node(var, (sq,))
    shifted = rec.new(rows, "float32", rg)  # + eps
    rec.use(var)
    rec.node(shifted, (var,), alias=True)
    r = rec.new(rows, "float32", rg)  # rsqrt, whose backward uses its own output
    rec.use(shifted)
    if rg:
        rec.save(r, f"{tag}.rsqrt")
    rec.node(r, (shifted,), saved=(r,))
    normed = rec.new(x.numel, "float32", rg)  # x * rsqrt: grad_x = grad * r, grad_r = (grad * x).sum(-1)
    rec.use(x32, r)
    rec.node(normed, (x32, r), saved=(x32, r), temp=x32.nbytes)
    normed = cast(rec, normed, x.dtype)
    if weight_trainable:
        rec.save(normed, f"{tag}.normalized")
    if rg:
        rec.save_param()
    out = rec.new(x.numel, x.dtype, rg or weight_trainable)
    rec.use(normed, var)
    rec.node(out, (normed,), saved=(normed,) if weight_trainable else (),
             param_grad=hidden * DTYPE_BYTES[rec.ctx.weight] if weight_trainable else 0)
    return out


def layer_norm(rec: Recorder, x: T, trainable: bool, hidden: int, tag: str) -> T:
    """nn.LayerNorm (native_layer_norm): saves the input, mean and rstd when any gradient is needed.
    CUDA autocast runs layer_norm in fp32 (it is on the fp32 list of aten/src/ATen/autocast_mode.cpp: the
    cast copy is saved); CPU autocast does not list it, so it runs on the input as it is (a bf16 input
    is saved as it is, mean and rstd are fp32, the output keeps the input's dtype; traced, torch 2.13)."""
    needs = x.rg or trainable
    xin = cast(rec, x, "float32") if rec.ctx.autocast and rec.ctx.device == "cuda" else x
    if needs:
        rec.save(xin, f"{tag}.input")
        if x.rg:
            rec.save_param()
    out = rec.new(x.numel, xin.dtype, needs)
    stats = None
    if needs:
        stats = rec.save_new(2 * (x.numel // hidden), "float32", f"{tag}.mean_rstd")
    rec.use(xin, stats)
    rec.node(out, (xin,), saved=(xin, stats), param_grad=2 * hidden * DTYPE_BYTES[rec.ctx.weight] if trainable else 0)
    return out


def dropout(rec: Recorder, x: T, p: float, tag: str) -> T:
    """F.dropout in training. p == 0 returns the input itself (ATen _dropout). On CUDA p > 0 runs
    native_dropout and saves a bool mask; on CPU (ATen _dropout_impl) an empty_like noise tensor of the
    input's dtype is filled and multiplied in, and the mul saves it."""
    if p <= 0.0 or not rec.ctx.training_dropout:
        return x
    dtype = "uint8" if rec.ctx.device == "cuda" else x.dtype
    noise = rec.new(x.numel, dtype, False)
    if x.rg:
        rec.save(noise, f"{tag}.dropout_mask")
    out = rec.new(x.numel, x.dtype, x.rg)
    rec.use(x, noise)
    rec.node(out, (x,), saved=(noise,))
    return out


def activation(rec: Recorder, x: T, kind: str, tag: str) -> T:
    """The MLP activation. silu/gelu save their input. gelu_new (NewGELUActivation, a Python formula:
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x ** 3)))) runs op by op and saves input, tanh
    output, 0.5*x and 1+tanh; quick_gelu (x * sigmoid(1.702 x)) saves input and sigmoid output;
    relu saves its output (derivatives.yaml: threshold_backward(grad, result, 0))."""
    rg = x.rg
    if kind == "relu":
        out = rec.new(x.numel, x.dtype, rg)
        if rg:
            rec.save(out, f"{tag}.output")
        rec.use(x)
        rec.node(out, (x,), saved=(out,))
        return out
    if kind == "gelu_new":
        half = rec.new(x.numel, x.dtype, rg)  # 0.5 * x
        rec.node(half, (x,))
        if rg:
            rec.save(x, f"{tag}.input")
        cube = rec.new(x.numel, x.dtype, rg)  # torch.pow(x, 3.0)
        rec.node(cube, (x,), saved=(x,), temp=2 * x.nbytes)
        scaled = rec.new(x.numel, x.dtype, rg)  # 0.044715 * _
        rec.use(cube)
        rec.node(scaled, (cube,))
        inner = add(rec, x, scaled)
        arg = rec.new(x.numel, x.dtype, rg)  # sqrt(2 / pi) * _
        rec.use(inner)
        rec.node(arg, (inner,))
        th = rec.new(x.numel, x.dtype, rg)
        rec.use(arg)
        if rg:
            rec.save(th, f"{tag}.tanh")
        rec.node(th, (arg,), saved=(th,))
        one_plus = rec.new(x.numel, x.dtype, rg)  # 1.0 + tanh
        rec.use(th)
        rec.node(one_plus, (th,), alias=True)
        if rg:
            rec.save(half, f"{tag}.half_x")
            rec.save(one_plus, f"{tag}.one_plus_tanh")
        out = rec.new(x.numel, x.dtype, rg)
        rec.use(half, one_plus)
        rec.node(out, (half, one_plus), saved=(half, one_plus))
        return out
    if kind == "quick_gelu":
        scaled = rec.new(x.numel, x.dtype, rg)  # 1.702 * x
        rec.node(scaled, (x,))
        sig = rec.new(x.numel, x.dtype, rg)
        rec.use(scaled)
        rec.node(sig, (scaled,), saved=(sig,))
        if rg:
            rec.save(x, f"{tag}.input")
            rec.save(sig, f"{tag}.sigmoid")
        out = rec.new(x.numel, x.dtype, rg)
        rec.use(x, sig)
        rec.node(out, (x, sig), saved=(x, sig))
        return out
    if rg:
        rec.save(x, f"{tag}.input")
    out = rec.new(x.numel, x.dtype, rg)
    rec.use(x)
    rec.node(out, (x,), saved=(x,))
    return out


def mul(rec: Recorder, a: T, b: T, tag: str) -> T:
    """a * b saves b when a needs a gradient and a when b does."""
    if b.rg:
        rec.save(a, f"{tag}.a")
    if a.rg:
        rec.save(b, f"{tag}.b")
    out = rec.new(max(a.numel, b.numel), a.dtype, a.rg or b.rg)
    rec.use(a, b)
    rec.node(out, (a, b), saved=((a,) if b.rg else ()) + ((b,) if a.rg else ()))
    return out


def rope(rec: Recorder, x: T) -> T:
    """apply_rotary_pos_emb (modeling_llama.py): x * cos + rotate_half(x) * sin, op by op (mul, neg of
    one half, cat, mul, add). The muls save cos and sin (shared by every layer, counted before the
    blocks), nothing of x. The output takes the dtype of cos/sin (the hidden states') when wider."""
    dtype = _promote(x.dtype, rec.ctx.weight)
    by_cos = rec.new(x.numel, dtype, x.rg)
    neg = rec.new(x.numel // 2, x.dtype, x.rg)
    rotated = rec.new(x.numel, x.dtype, x.rg)  # cat
    rec.use(neg)
    by_sin = rec.new(x.numel, dtype, x.rg)
    rec.use(rotated)
    out = rec.new(x.numel, dtype, x.rg)
    rec.use(by_cos, by_sin)
    # RoPE's backward (mul, neg, slice_backward twice, add, accumulate) holds two more of its size
    rec.node(out, (x,), temp=2 * out.nbytes)
    return out


# Families whose eager attention runs softmax in fp32 (modeling_llama.py eager_attention_forward and
# the ViT/CLIP/OPT copies); GPT-2/BERT/RoBERTa and BLIP-2's own eager_attention_forward (Q-Former, vision
# tower) take the softmax in the scores' dtype.
FP32_SOFTMAX_FAMILIES = ("llama", "mistral", "qwen2", "vit", "clip_vision_model", "opt")


def attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, p_drop: float, tag: str, cross: bool = False) -> T:
    """Scaled dot-product attention over heads.

    sdpa (torch.nn.functional.scaled_dot_product_attention): the fused kernels (flash/memory-efficient
    on CUDA, the flash kernel on CPU) save q, k, v, the output and a logsumexp (fp32, batch x heads x
    query length). eager (transformers eager_attention_forward): q @ k^T saves q and k (keys/values
    repeated to all heads for GQA by repeat_kv), softmax in fp32 saves its output, the cast to the
    compute dtype is saved by the matmul with v, and dropout (p > 0) saves its mask.
    `cross`: keys and values come from another sequence of ctx.kv_seq tokens (the BLIP-2 Q-Former's
    cross-attention to the image features), with no mask and no virtual tokens.
    """
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    explicit_mask = kv != s and not cross
    cpu_math = p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout
    if explicit_mask:
        # prefix tuning: the cache update concatenates the trainable past keys/values, and peft passes
        # an attention mask, so transformers (sdpa_attention_forward: use_gqa_in_sdpa is False with a
        # mask) repeats keys/values to every head (repeat_kv) and SDPA saves the float mask it builds
        width = spec.q_dim if spec.num_kv_heads != spec.num_heads else spec.kv_dim
        k2 = rec.new(b * kv * width, k.dtype, True)
        rec.use(k)
        rec.node(k2, (k,))
        v2 = rec.new(b * kv * width, v.dtype, True)
        rec.use(v)
        rec.node(v2, (v,))
        k, v = k2, v2
        if ctx.attention != "eager" and not cpu_math:  # eager and the math path add it to the scores
            rec.save_new(b * s * kv, q.dtype, f"{tag}.attn_mask")
    if ctx.attention != "eager":
        # SDPA is on autocast's lower-precision list: it casts RoPE's wider q, k back, and the q, k, v a
        # QLoRA layer returns in the stream's dtype (bitsandbytes Linear4bit.forward's .to(inp_dtype)),
        # before any kernel (the CPU math path then upcasts the copies)
        q, k, v = autocast_in(rec, q), autocast_in(rec, k), autocast_in(rec, v)
    needs = q.rg or k.rg or v.rg
    out_numel = b * s * spec.q_dim
    if not needs:
        out = rec.new(out_numel, q.dtype, False)
        rec.use(q, k, v)
        return out
    if ctx.attention == "eager":
        return _eager_attention(rec, spec, q, k, v, p_drop, tag, explicit_mask)
    if cpu_math:
        return _math_attention(rec, spec, q, k, v, tag)
    rec.save(q, f"{tag}.q")
    rec.save(k, f"{tag}.k")
    rec.save(v, f"{tag}.v")
    out = rec.new(out_numel, q.dtype, True)
    rec.save(out, f"{tag}.out")
    lse = rec.save_new(b * heads * s, "float32", f"{tag}.logsumexp")
    saved = (q, k, v, out, lse)
    if p_drop > 0 and ctx.device == "cpu":  # CPU flash has no dropout: the math path keeps the probs
        saved += (rec.save_new(b * heads * s * kv, q.dtype, f"{tag}.probs"),)
    rec.use(q, k, v)
    rec.node(out, (q, k, v), saved=saved)
    # The fused kernels lay their output out as (batch, seq, heads, dim): transformers'
    # transpose(1, 2).contiguous() is then a view, and the output projection saves that storage.
    return out


def _eager_attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, p_drop: float, tag: str,
                     explicit_mask: bool) -> T:
    """transformers eager_attention_forward: repeat_kv, q @ k^T * scaling (+ mask), softmax, dropout,
    @ v, transpose(1, 2).contiguous() (a copy)."""
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    groups = 1 if explicit_mask else spec.num_heads // spec.num_kv_heads  # repeat_kv (once)
    k_full, v_full = k, v
    if groups != 1:
        k_full = rec.new(k.numel * groups, k.dtype, k.rg)
        rec.node(k_full, (k,))
        v_full = rec.new(v.numel * groups, v.dtype, v.rg)
        rec.node(v_full, (v,))
    # q @ k^T saves q for k's gradient and k for q's; probs @ v saves v for the probabilities'
    # gradient and the probabilities for v's
    if k.rg:
        rec.save(q, f"{tag}.q")
    if q.rg:
        rec.save(k_full, f"{tag}.k")
    scores = rec.new(b * heads * s * kv, ctx.autocast or q.dtype, q.rg or k.rg)
    rec.use(q, k_full)
    rec.node(scores, (q, k_full), saved=((q,) if k.rg else ()) + ((k_full,) if q.rg else ()))
    if spec.model_type in FP32_SOFTMAX_FAMILIES:  # softmax(..., dtype=float32).to(query.dtype)
        softmax = rec.new(b * heads * s * kv, "float32", True)
    else:  # softmax(attn_weights, dim=-1) in the scores' dtype
        softmax = rec.new(b * heads * s * kv, q.dtype if not ctx.autocast else "float32", True)
    rec.use(scores)
    rec.save(softmax, f"{tag}.softmax_out")
    rec.node(softmax, (scores,), saved=(softmax,))
    probs = softmax
    if probs.dtype != q.dtype and not ctx.autocast:  # .to(query.dtype)
        probs = cast(rec, probs, q.dtype)
    probs = dropout(rec, probs, p_drop, tag)
    probs = autocast_in(rec, probs)  # autocast's matmul casts fp32 probabilities
    if v.rg:
        rec.save(probs, f"{tag}.probs")
    if q.rg or k.rg:
        rec.save(v_full, f"{tag}.v")
    o = rec.new(b * s * spec.q_dim, probs.dtype, True)
    rec.use(probs, v_full)
    rec.node(o, (probs, v_full), saved=((probs,) if v.rg else ()) + ((v_full,) if q.rg or k.rg else ()))
    out = rec.new(b * s * spec.q_dim, q.dtype, True)  # transpose(1, 2).contiguous() copies
    rec.use(o)
    rec.node(out, (o,))
    return out


def _math_attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, tag: str) -> T:
    """CPU has no fused kernel with dropout: torch's _scaled_dot_product_attention_math
    (aten/src/ATen/native/transformers/attention.cpp) runs: q, k, v .to(float) for half types (fp32 kept
    as they are), q * sqrt(scale) (a local, alive until it returns), k^T * sqrt(scale) (a temporary of
    the matmul call), matmul's contiguous copies of both (saved by bmm), the scores, for causal models a
    (seq x seq) float mask built from ones().tril() and added out of place (a dispatch mode makes the
    tensors subclass-like; a storage tracer is one), _safe_softmax (saves its output), dropout's noise and
    product (saved), the tuple (matmul(attn, v).to(dtype), attn.to(dtype)) evaluated right to left (the
    attention weights' cast first, then v's contiguous copy, saved, and the output). transformers'
    transpose(1, 2).contiguous() copies the (batch, heads, seq, dim) output."""
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    up = "float32" if (ctx.autocast or q.dtype) in ("bfloat16", "float16") else q.dtype
    q_rg_k = q.rg or k.rg
    qa, ka, va = cast(rec, q, up), cast(rec, k, up), cast(rec, v, up)
    query = rec.new(b * s * spec.q_dim, up, q.rg)  # query_acc * scaling_factor
    rec.node(query, (qa,))
    kt = rec.new(b * kv * spec.q_dim, up, k.rg)  # key.transpose(-2, -1) * scaling_factor
    rec.node(kt, (ka,))
    qc = rec.new(query.numel, up, q.rg)  # matmul's copies for bmm
    rec.node(qc, (query,))
    kc = rec.new(kt.numel, up, k.rg)
    rec.use(kt)
    rec.node(kc, (kt,))
    if k.rg:
        rec.save(qc, f"{tag}.math_q")
    if q.rg:
        rec.save(kc, f"{tag}.math_k")
    scores = rec.new(b * heads * s * kv, up, q_rg_k)
    rec.use(qc, kc, kt)
    rec.node(scores, (qc, kc), saved=((qc,) if k.rg else ()) + ((kc,) if q.rg else ()))
    mask = None
    if spec.is_decoder:  # is_causal: at::ones({L, S}).tril() as a float mask, added to the scores
        mask = rec.new(s * kv, up, False)
        masked = rec.new(scores.numel, up, q_rg_k)
        rec.use(scores, mask)
        rec.node(masked, (scores,), alias=True)
        scores = masked
    sm = rec.new(scores.numel, up, q_rg_k)
    rec.use(scores)
    if q_rg_k:
        rec.save(sm, f"{tag}.math_softmax_noise")
    rec.node(sm, (scores,), saved=(sm,))
    noise = rec.new(scores.numel, up, False)
    if q_rg_k:
        rec.save(noise, f"{tag}.math_softmax_noise")
    dropped = rec.new(scores.numel, up, q_rg_k)
    rec.use(sm, noise)
    rec.node(dropped, (sm,), saved=(noise,))
    weights = cast(rec, dropped, q.dtype) if up != q.dtype else None  # attn.to(origin_dtype), discarded
    vc = rec.new(b * kv * spec.q_dim, up, v.rg)  # value's contiguous copy for bmm
    rec.node(vc, (va,))
    if v.rg:
        rec.save(dropped, f"{tag}.math_probs")
    if q_rg_k:
        rec.save(vc, f"{tag}.math_v")
    o = rec.new(b * s * spec.q_dim, up, True)
    rec.use(dropped, vc)
    rec.node(o, (dropped, vc), saved=((dropped,) if v.rg else ()) + ((vc,) if q_rg_k else ()))
    o = cast(rec, o, q.dtype)
    rec.use(query, qa, ka, va, weights, mask)  # the kernel's locals die when it returns
    out = rec.new(b * s * spec.q_dim, q.dtype, True)  # transpose(1, 2).contiguous() copies
    rec.use(o)
    rec.node(out, (o,))
    return out


def adapter_block(rec: Recorder, x: T, hidden: int, bottleneck: int, tag: str) -> T:
    """measure.adapters.BottleneckAdapter: x + up(gelu(down(x))), two trainable Linears around a GELU."""
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.adapter.down")
    act = activation(rec, down, "gelu", f"{tag}.adapter.act")
    up = linear(rec, act, bottleneck, hidden, True, f"{tag}.adapter.up")
    return add(rec, x, up, up.dtype if rec.ctx.autocast is None else x.dtype)


# Tags of what seed 001's block adapter saves: it runs outside its encoder layer's checkpointed forward.
BLOCK_ADAPTER_TAG = "block_adapter"


def block_adapter(rec: Recorder, x: T, hidden: int, bottleneck: int, p_drop: float) -> T:
    """measure.adapters.BlockAdapter (seed 001, Example 4): layer_norm(x + dropout(up_proj(dropout(gelu(
    down_proj(x)))))). The trainable Linears save their inputs, GELU its input, each dropout its noise,
    the trainable LayerNorm its input (the sum: fp32 under autocast, x + a bf16 tensor) with mean and rstd."""
    tag = BLOCK_ADAPTER_TAG
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.down_proj")
    act = activation(rec, down, "gelu", f"{tag}.activation")
    act = dropout(rec, act, p_drop, f"{tag}.dropout1")
    up = linear(rec, act, bottleneck, hidden, True, f"{tag}.up_proj")
    up = dropout(rec, up, p_drop, f"{tag}.dropout2")
    total = rec.new(x.numel, up.dtype if rec.ctx.autocast is None else x.dtype, True)
    return layer_norm(rec, total, True, hidden, f"{tag}.layer_norm")


# ---------------------------------------------------------------- blocks


@dataclass(frozen=True)
class LayerTraining:
    """Per-module facts of one block: which weights train, where LoRA/IA3/adapters sit."""

    trainable: frozenset  # module paths (relative names like "q_proj") whose weight trains
    norm_trainable: frozenset
    lora: frozenset
    ia3_out: frozenset
    ia3_ff: frozenset
    adapters: frozenset  # "attn_out", "mlp_out"; "block": after the block (a VLM's vision tower)
    bias_trainable: frozenset = frozenset()  # modules whose bias trains (BitFit): output needs grad


@lru_cache(maxsize=1024)
def _layer_trainings(plan: Plan, layout: Layout) -> list[LayerTraining]:
    """What trains inside each block, from the plan's parameter groups (one pass over them)."""
    n = plan.spec.num_layers
    sets = [dict(trainable=set(), norms=set(), lora=set(), ia3_out=set(), ia3_ff=set(), adapters=set(),
                 biases=set()) for _ in range(n)]
    roles = {m.path: m.role for m in layout.modules if m.layer is not None}
    for g in plan.groups:
        if g.layer is None or not g.trainable:
            continue
        prefix = f"{layout.block_prefix}.{g.layer}."
        rel = g.name[len(prefix):]
        s = sets[g.layer]
        if g.origin == "base":
            module = rel.rsplit(".", 1)[0]
            if roles.get(prefix + module) == "norm":  # LayerNorm saves its input for either parameter
                s["norms"].add(module)
            elif rel.endswith(".weight"):  # a Linear saves its input for the weight's gradient only
                s["trainable"].add(module)
            else:
                s["biases"].add(module)
        elif g.origin in ("lora", "dora"):
            s["lora"].add(rel.split(".lora_", 1)[0])
        elif g.origin == "ia3":
            (s["ia3_ff"] if g.shape[0] == 1 else s["ia3_out"]).add(rel.rsplit(".", 1)[0])
        elif g.origin == "adapter":
            if rel.startswith(ADAPTER_ATTRIBUTE + "."):  # seed 001's adapter on the block's output
                s["adapters"].add("block")
            else:
                s["adapters"].add(roles.get(prefix + rel.split("." + ADAPTER_ATTRIBUTE, 1)[0], ""))
    return [LayerTraining(frozenset(s["trainable"]), frozenset(s["norms"]), frozenset(s["lora"]),
                          frozenset(s["ia3_out"]), frozenset(s["ia3_ff"]), frozenset(s["adapters"]),
                          frozenset(s["biases"])) for s in sets]


def _lin(rec, lt: LayerTraining, x, name, in_f, out_f, plan: Plan):
    """A block's Linear (NF4 under QLoRA: methods._quantizable quantizes every block Linear)."""
    s = plan.settings
    ia3 = "ff" if name in lt.ia3_ff else ("out" if name in lt.ia3_out else "")
    return linear(rec, x, in_f, out_f, name in lt.trainable, name, lora_rank=s.rank if name in lt.lora else 0,
                  dora=s.dora and name in lt.lora, ia3=ia3, quantized=s.method == "qlora",
                  bias=name in _block_biases(build_layout(plan.spec)),
                  bias_trains=name in lt.bias_trainable)


@lru_cache(maxsize=256)
def _block_biases(layout: Layout) -> frozenset:
    """Relative names (as in block 0) of the block's modules that carry a bias."""
    prefix = f"{layout.block_prefix}.0."
    return frozenset(m.path[len(prefix):] for m in layout.blocks(0) if m.bias)


def _maybe_adapter(rec, lt, x, role, spec, plan, tag):
    if role in lt.adapters:
        return adapter_block(rec, x, spec.hidden_size, resolve_bottleneck(spec, plan.settings), tag)
    return x


def llama_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """LlamaDecoderLayer (also Mistral, Qwen2): pre-RMSNorm attention with RoPE, gated SiLU MLP. The
    normed input stays referenced (the layer's hidden_states) until self_attn returns, and so do the
    attention's projections (LlamaAttention locals); the MLP's normed input until the MLP returns."""
    h = spec.hidden_size
    n = rms_norm(rec, x, "input_layernorm" in lt.norm_trainable, "input_layernorm")
    q = _lin(rec, lt, n, "self_attn.q_proj", h, spec.q_dim, plan)
    k = _lin(rec, lt, n, "self_attn.k_proj", h, spec.kv_dim, plan)
    v = _lin(rec, lt, n, "self_attn.v_proj", h, spec.kv_dim, plan)
    q_rot, k_rot = rope(rec, q), rope(rec, k)
    rec.use(q, k)
    a = attention(rec, spec, q_rot, k_rot, v, dropout_p(spec, "attn"), "self_attn.attention")
    o = _lin(rec, lt, a, "self_attn.o_proj", spec.q_dim, h, plan)
    rec.use(q_rot, k_rot, v, n)
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, "self_attn.o_proj")
    x2 = add(rec, x, o, x.dtype)  # residual + hidden_states keeps the residual stream's dtype
    n2 = rms_norm(rec, x2, "post_attention_layernorm" in lt.norm_trainable, "post_attention_layernorm")
    g = _lin(rec, lt, n2, "mlp.gate_proj", h, spec.intermediate_size, plan)
    act = activation(rec, g, "silu", "mlp.act_fn")
    u = _lin(rec, lt, n2, "mlp.up_proj", h, spec.intermediate_size, plan)
    p = mul(rec, act, u, "mlp.act_mul")
    d = _lin(rec, lt, p, "mlp.down_proj", spec.intermediate_size, h, plan)
    rec.use(n2)
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "mlp.down_proj")
    return add(rec, x2, d, x2.dtype)


def gpt2_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """GPT2Block: pre-LayerNorm, fused c_attn (Conv1D) split into q, k, v views, gelu_new MLP, dropout
    on attention and residuals. attn_output stays referenced until the block returns, the normed input
    until the attention returns."""
    h = spec.hidden_size
    n = layer_norm(rec, x, "ln_1" in lt.norm_trainable, h, "ln_1")
    qkv = _lin(rec, lt, n, "attn.c_attn", h, 3 * h, plan)
    q, k, v = split(rec, qkv, 3)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "attn.attention")
    o = _lin(rec, lt, a, "attn.c_proj", h, h, plan)
    o = dropout(rec, o, dropout_p(spec, "resid"), "attn.resid_dropout")
    rec.use(qkv, n)
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, "attn.c_proj")
    x2 = add(rec, o, x, x.dtype)
    n2 = layer_norm(rec, x2, "ln_2" in lt.norm_trainable, h, "ln_2")
    f = _lin(rec, lt, n2, "mlp.c_fc", h, spec.intermediate_size, plan)
    act = activation(rec, f, spec.hidden_act if spec.hidden_act in ("gelu_new", "quick_gelu") else "gelu", "mlp.act")
    d = _lin(rec, lt, act, "mlp.c_proj", spec.intermediate_size, h, plan)
    d = dropout(rec, d, dropout_p(spec, "resid"), "mlp.dropout")
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "mlp.c_proj")
    out = add(rec, x2, d, x2.dtype)
    rec.use(n2, o)
    return out


def bert_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """BertLayer / RobertaLayer: post-LayerNorm; dropout after attention output and FFN output. The
    self-attention's output stays referenced until BertSelfOutput returns, each dropout's output until
    its LayerNorm returns, and the intermediate output and attention_output until the layer returns."""
    ctx = rec.ctx
    h = spec.hidden_size
    q = _lin(rec, lt, x, "attention.self.query", h, h, plan)
    k = _lin(rec, lt, x, "attention.self.key", h, h, plan)
    v = _lin(rec, lt, x, "attention.self.value", h, h, plan)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "attention.self")
    rec.use(q, k, v)
    o = _lin(rec, lt, a, "attention.output.dense", h, h, plan)
    o = dropout(rec, o, dropout_p(spec, "resid"), "attention.output.dropout")
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, "attention.output.dense")
    s1 = add(rec, o, x, o.dtype if ctx.autocast is None else x.dtype)
    n1 = layer_norm(rec, s1, "attention.output.LayerNorm" in lt.norm_trainable, h, "attention.output.LayerNorm")
    rec.use(o, a)
    f = _lin(rec, lt, n1, "intermediate.dense", h, spec.intermediate_size, plan)
    act = activation(rec, f, "gelu", "intermediate.act")
    d = _lin(rec, lt, act, "output.dense", spec.intermediate_size, h, plan)
    d = dropout(rec, d, dropout_p(spec, "resid"), "output.dropout")
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "output.dense")
    s2 = add(rec, d, n1, n1.dtype)
    out = layer_norm(rec, s2, "output.LayerNorm" in lt.norm_trainable, h, "output.LayerNorm")
    rec.use(d, act, n1)
    return out


def vision_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """ViTLayer / CLIPEncoderLayer: pre-LayerNorm attention and MLP (gelu / quick_gelu)."""
    h = spec.hidden_size
    vit = spec.model_type == "vit"
    ln1, ln2 = ("layernorm_before", "layernorm_after") if vit else ("layer_norm1", "layer_norm2")
    att = "attention" if vit else "self_attn"
    out_name = f"{att}.o_proj" if vit else f"{att}.out_proj"
    n = layer_norm(rec, x, ln1 in lt.norm_trainable, h, ln1)
    q = _lin(rec, lt, n, f"{att}.q_proj", h, h, plan)
    k = _lin(rec, lt, n, f"{att}.k_proj", h, h, plan)
    v = _lin(rec, lt, n, f"{att}.v_proj", h, h, plan)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), att)
    o = _lin(rec, lt, a, out_name, h, h, plan)
    rec.use(q, k, v, n)
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, out_name)
    x2 = add(rec, x, o, x.dtype)
    n2 = layer_norm(rec, x2, ln2 in lt.norm_trainable, h, ln2)
    f = _lin(rec, lt, n2, "mlp.fc1", h, spec.intermediate_size, plan)
    act = activation(rec, f, "quick_gelu" if spec.hidden_act == "quick_gelu" else "gelu", "mlp.act")
    d = _lin(rec, lt, act, "mlp.fc2", spec.intermediate_size, h, plan)
    rec.use(n2)
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "mlp.fc2")
    out = add(rec, x2, d, x2.dtype)
    if "block" in lt.adapters:  # seed 001's adapter on the layer's output (a forward hook of the layer)
        out = block_adapter(rec, out, h, resolve_bottleneck(spec, plan.settings), BLOCK_ADAPTER_DROPOUT)
    return out


def opt_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """OPTDecoderLayer (transformers models/opt/modeling_opt.py, do_layer_norm_before=True): LayerNorm,
    q_proj(x) * scaling (a multiply by a Python scalar saves nothing), k_proj, v_proj, attention,
    out_proj, dropout, residual; LayerNorm on the (tokens, hidden) reshape, fc1, ReLU, fc2, dropout,
    residual. With the harness's use_cache the keys and values SDPA saves are the DynamicCache's
    concatenated copies instead of views of the projections: the same bytes."""
    ctx = rec.ctx
    h, tok = spec.hidden_size, ctx.tokens
    p = dropout_p(spec, "resid")
    n = layer_norm(rec, x, "self_attn_layer_norm" in lt.norm_trainable, h, "self_attn_layer_norm")
    q = _lin(rec, lt, n, "self_attn.q_proj", h, h, plan)
    q = rec.new(q.numel, q.dtype, q.rg)
    k = _lin(rec, lt, n, "self_attn.k_proj", h, h, plan)
    v = _lin(rec, lt, n, "self_attn.v_proj", h, h, plan)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "self_attn.attention")
    o = _lin(rec, lt, a, "self_attn.out_proj", h, h, plan)
    o = dropout(rec, o, p, "self_attn.dropout")
    x2 = rec.new(tok * h, x.dtype, x.rg or o.rg)
    n2 = layer_norm(rec, x2, "final_layer_norm" in lt.norm_trainable, h, "final_layer_norm")
    f = _lin(rec, lt, n2, "fc1", h, spec.intermediate_size, plan)
    act = activation(rec, f, spec.hidden_act, "activation_fn")
    d = _lin(rec, lt, act, "fc2", spec.intermediate_size, h, plan)
    d = dropout(rec, d, p, "dropout")
    return rec.new(tok * h, x2.dtype, x2.rg or d.rg)


BLOCKS = {
    "llama": llama_block,
    "mistral": llama_block,
    "qwen2": llama_block,
    "gpt2": gpt2_block,
    "bert": bert_block,
    "roberta": bert_block,
    "vit": vision_block,
    "clip_vision_model": vision_block,
    "opt": opt_block,
}


# ---------------------------------------------------------------- the whole model


@dataclass(frozen=True)
class ActivationProfile:
    """Saved bytes per layer (index -> bytes), before the blocks ('pre') and after them ('post',
    head and final norm, not the loss), the input each checkpointed layer keeps, the loss buffers,
    and the largest transient working set of one layer's backward."""

    per_layer: tuple
    pre: int
    post: int
    checkpoint_inputs: int
    logits_bytes: int  # the model's logits in their dtype
    loss_saved: int  # what the loss saves (log_softmax output, causal LM's shift_labels)
    loss_saved_backward: int  # what of it is still saved at the start-of-backward peak (log_softmax output)
    loss_backward_peak: int  # live loss buffers at the start of backward (saved + grads)
    loss_forward_peak: int  # live loss buffers while the loss is computed
    layer_transient: int  # gradient buffers alive inside one layer's backward
    forward_transient: int = 0  # intermediates alive inside one block's forward that nothing saves
    forward_transient_saved: int = 0  # block activations already saved when that working set peaks
    autocast_weight_cache: int = 0  # autocast's copies of trainable matmul weights, alive to the end of forward
    block_peaks: tuple = ()  # per layer: blocktrace.BlockPeaks (gradient checkpointing's recompute and backward)
    model_output: int = 0  # the base model's last hidden state while the loss runs, when nothing saves it
    loss_scalars: int = 0  # the loss and backward's seed, alive through the backward
    by_tag: tuple = ()

    @property
    def saved_total(self) -> int:
        return sum(self.per_layer) + self.pre + self.post


def make_ctx(spec: ModelSpec, plan: Plan, t: TrainingSettings) -> Ctx:
    seq = spec.vision_seq_len if spec.is_vision else t.seq_len
    kv_seq = seq
    method = plan.settings.method
    if method == "prompt":
        seq += plan.settings.num_virtual_tokens
        kv_seq = seq
    elif method == "prefix":
        kv_seq = seq + plan.settings.num_virtual_tokens
    weight = t.weight_dtype
    compute = t.compute_dtype
    if method == "qlora" and prepare_kbit_upcasts(plan, t):
        weight = compute = "float32"
    adapter = "float32"  # peft autocast_adapter_dtype=True keeps adapters in fp32
    return Ctx(
        batch=t.batch_size,
        seq=seq,
        kv_seq=kv_seq,
        compute=compute,
        weight=weight,
        autocast=t.autocast_dtype,
        adapter=adapter,
        device=t.device,
        attention=t.attention,
        quant_compute=t.compute_dtype if method == "qlora" else "",
        quant_source=t.weight_dtype if method == "qlora" else "",
        quant_nested=method == "qlora" and plan.settings.double_quant,
    )


def input_embeddings_require_grad(spec: ModelSpec, t: TrainingSettings) -> bool:
    """Whether the input embeddings' output requires grad although nothing below it trains: transformers
    5.x PreTrainedModel._activation_checkpointing_enable (what gradient_checkpointing_enable runs) calls
    enable_input_require_grads on models whose main_input_name is input_ids (the text models; ViT and
    CLIP take pixel_values), a forward hook that runs ``output.requires_grad_(True)``. Then the embeddings
    module's own ops save for backward and every block's input needs a gradient."""
    return t.grad_checkpointing and not spec.is_vision


def prepare_kbit_upcasts(plan: Plan, t: TrainingSettings) -> bool:
    """peft utils/other.py prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not
    a bitsandbytes Params4bit (norms, embeddings, lm_head, biases) to fp32. With a bf16/fp16 policy that
    makes the whole activation stream fp32: the embeddings' output is fp32, LlamaRMSNorm returns
    weight (fp32) * x, bitsandbytes Linear4bit.forward casts its input to bnb_4bit_compute_dtype and
    returns ``.to(inp_dtype)`` (fp32), peft's LoRA output is cast back to that fp32 result, and the
    fp32 lm_head gives fp32 logits (ForCausalLMLoss's upcast is then a no-op). Under autocast (and
    with fp32 weights) the parameters are fp32 already and nothing changes."""
    return plan.settings.prepare_kbit and t.autocast_dtype is None and t.weight_dtype != "float32"


@lru_cache(maxsize=4096)
def activation_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """Simulate one forward pass and return what stays saved for backward."""
    spec = plan.spec
    if spec.is_vlm:
        return _vlm_profile(plan, t)
    if spec.model_type == "blip-2":
        return _blip2_profile(plan, t)
    layout = build_layout(spec)
    ctx = make_ctx(spec, plan, t)
    rec = Recorder(ctx)
    h, tok = spec.hidden_size, ctx.tokens
    hooked = input_embeddings_require_grad(spec, t)
    input_rg = plan.embedding_trains or plan.settings.method == "prompt" or hooked
    if hooked and not plan.embedding_trains and (spec.model_type in ("gpt2", "bert", "roberta")
                                                 or plan.settings.method == "prompt"):
        # the hooked output of the frozen word embeddings is a leaf that requires grad: its
        # AccumulateGrad node holds it to the end of backward, and it is not the tensor the blocks get
        # (positions are added to it, or peft concatenates the prompt before it)
        rec.save_new(t.batch_size * t.seq_len * h, ctx.weight, "embeddings.input_require_grads_leaf")
    # The embedding output: token embeddings (+ positions) in the weight dtype.
    x = rec.new(tok * h, ctx.weight, input_rg)
    x = _embeddings(rec, spec, plan, layout, x)
    grads_reach_blocks = input_rg or plan.lowest_trainable_layer is not None or plan.settings.method == "prefix"
    if spec.model_type in ("llama", "mistral", "qwen2") and grads_reach_blocks:
        # LlamaRotaryEmbedding's cos and sin (1 x seq x head_dim, in the hidden states' dtype), shared
        # by every layer, saved by q * cos and rotate_half(q) * sin
        rec.save_new(2 * ctx.seq * spec.head_dim, ctx.weight, "rotary.cos_sin")
    per_layer = []
    peaks = []
    tags: dict = {}
    blocks_seen: dict = {}
    for lt in _layer_trainings(plan, layout):
        # Blocks with the same trainable set and the same kind of input save the same tensors:
        # simulate each kind once (a 80-block model has two or three kinds).
        key = (lt, x.rg, x.dtype)
        if key not in blocks_seen:
            blocks_seen[key] = _simulate_block(spec, plan, lt, ctx, x.rg, x.dtype, t.grad_checkpointing)
        saved, block_tags, out_rg, out_dtype, block_peak = blocks_seen[key]
        per_layer.append(saved)
        peaks.append(block_peak)
        for tag, nbytes in block_tags:
            tags[tag] = tags.get(tag, 0) + nbytes
        x = rec.new(x.numel, out_dtype, out_rg)
    rec.bucket = "post"
    logits_numel, x = _head(rec, spec, plan, layout, x)
    model_output = _unsaved_model_output(rec, x)
    by_bucket = rec.bytes_by_bucket()
    for tag, nbytes in rec.bytes_by_tag().items():
        tags[tag] = tags.get(tag, 0) + nbytes
    per_layer = tuple(per_layer)
    needs_grad_layers = [i for i in range(spec.num_layers) if per_layer[i] > 0]
    ckpt_inputs = len(needs_grad_layers) * tok * h * DTYPE_BYTES[_stream_dtype(ctx)]
    loss = _loss_buffers(spec, ctx, logits_numel)
    return ActivationProfile(
        per_layer=per_layer,
        pre=by_bucket.get("pre", 0),
        post=by_bucket.get("post", 0),
        checkpoint_inputs=ckpt_inputs,
        logits_bytes=logits_numel * DTYPE_BYTES[ctx.autocast or ctx.compute],
        loss_saved=loss.saved,
        loss_saved_backward=loss.saved_backward,
        loss_backward_peak=loss.backward_peak,
        loss_forward_peak=loss.forward_peak,
        loss_scalars=loss.scalars,
        layer_transient=_layer_transient(spec, ctx),
        forward_transient=_forward_transient(spec, plan, ctx, per_layer),
        forward_transient_saved=_saved_before_last_light_block(per_layer),
        autocast_weight_cache=_autocast_weight_cache(plan, ctx) - rec.saved_cached_copies,
        block_peaks=tuple(peaks),
        model_output=model_output,
        by_tag=tuple(sorted(tags.items())),
    )


def _simulate_block(spec: ModelSpec, plan: Plan, lt: LayerTraining, ctx: Ctx, input_rg: bool, input_dtype: str,
                    timeline: bool = False):
    """One block's saved bytes, by tag, its output's requires-grad and dtype, and (with `timeline`, for
    gradient checkpointing) its recompute and backward peaks (peftcalc.blocktrace; the block's input is
    counted outside it), else None."""
    trace = BlockTrace(inplace_accumulate=ctx.device == "cuda") if timeline else None
    rec = Recorder(ctx, bucket=0, trace=trace)
    x = rec.new(ctx.tokens * spec.hidden_size, input_dtype, input_rg)
    out = BLOCKS[spec.model_type](rec, spec, plan, lt, x)
    saved = sum(b for _, _, b in rec.saved.values())
    peaks = None
    if trace is not None:
        trace.external.add(x.id)
        rec.use(*rec.cached)  # autocast's cached weight copies live until the autocast region exits
        peaks = block_peaks(trace, out)
    return saved, tuple(rec.bytes_by_tag().items()), out.rg, out.dtype, peaks


def _stream_dtype(ctx: Ctx) -> str:
    return ctx.weight


@lru_cache(maxsize=1024)
def _trainable_names(plan: Plan) -> frozenset:
    """Names of the trainable parameters outside the blocks (a modules_to_save copy counts as its
    original)."""
    return frozenset(g.name.split("#", 1)[0] for g in plan.groups if g.trainable and g.layer is None)


def _trains(plan: Plan, path: str, weight_only: bool = False) -> bool:
    names = _trainable_names(plan)
    if weight_only:
        return f"{path}.weight" in names or path in names
    return any(n == path or n.startswith(path + ".") for n in names)


def _embeddings(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: T) -> T:
    h = spec.hidden_size
    if spec.model_type == "gpt2":
        return dropout(rec, x, dropout_p(spec, "embd"), "embeddings.dropout")
    if spec.model_type in ("bert", "roberta"):
        norm = f"{layout.embedding_path.rsplit('.', 1)[0]}.LayerNorm"
        x = layer_norm(rec, x, _trains(plan, norm), h, "embeddings.LayerNorm")
        return dropout(rec, x, dropout_p(spec, "embd"), "embeddings.dropout")
    if spec.model_type == "clip_vision_model":
        return layer_norm(rec, x, _trains(plan, "pre_layrnorm"), h, "pre_layrnorm")
    return x


def _head(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: T):
    """Final norm and task head (as each ForXxx class runs them); returns (logits numel, output).
    A classifier on the first token takes x[:, 0], a view: saving it keeps the whole storage. Under
    QLoRA the head's Linears that methods._quantizable quantizes are bitsandbytes Linear4bit."""
    ctx = rec.ctx
    h, tok, b = spec.hidden_size, ctx.tokens, ctx.batch
    nf4 = _quantized_paths(plan)
    if layout.final_norm_path and spec.model_type != "clip_vision_model":  # CLIP norms only the pooled token
        norm_trains = _trains(plan, layout.final_norm_path)
        if spec.model_type in ("llama", "mistral", "qwen2"):
            x = rms_norm(rec, x, norm_trains, "norm")
        else:
            x = layer_norm(rec, x, norm_trains, h, layout.final_norm_path)
    if spec.task == "causal_lm":
        w = _trains(plan, "lm_head", True) or (layout.head_tied_to_embedding and plan.embedding_trains)
        linear(rec, x, h, spec.vocab_size, w, "lm_head")
        return tok * spec.vocab_size, x
    if spec.task == "masked_lm":
        c = "cls.predictions" if spec.model_type == "bert" else "lm_head"
        dense = f"{c}.transform.dense" if spec.model_type == "bert" else f"{c}.dense"
        norm = f"{c}.transform.LayerNorm" if spec.model_type == "bert" else f"{c}.layer_norm"
        d = linear(rec, x, h, h, _trains(plan, dense, True), "mlm.dense", quantized=dense in nf4)
        d = activation(rec, d, "gelu", "mlm.act")
        d = layer_norm(rec, d, _trains(plan, norm), h, "mlm.layer_norm")
        decoder = _trains(plan, f"{c}.decoder", True) or (layout.head_tied_to_embedding and plan.embedding_trains)
        linear(rec, d, h, spec.vocab_size, decoder, "mlm.decoder", quantized=f"{c}.decoder" in nf4)
        return tok * spec.vocab_size, x
    if spec.task == "seq_cls" and spec.is_decoder:  # score on every position, then gather the last
        linear(rec, x, h, spec.num_labels, _trains(plan, "score", True), "score", quantized="score" in nf4)
        return b * spec.num_labels, x
    p = dropout_p(spec, "resid")
    if spec.task == "seq_cls" and spec.model_type == "bert":  # BertPooler, dropout, classifier
        pooled = _first_token_linear(rec, x, b, h, h, _trains(plan, "bert.pooler.dense", True), "pooler.dense",
                                     "bert.pooler.dense" in nf4)
        pooled = _tanh(rec, pooled, "pooler.tanh")
        pooled = dropout(rec, pooled, p, "classifier.dropout")
        linear(rec, pooled, h, spec.num_labels, _trains(plan, "classifier", True), "classifier",
               quantized="classifier" in nf4)
        return b * spec.num_labels, x
    if spec.task == "seq_cls":  # RobertaClassificationHead: dropout, dense, tanh, dropout, out_proj
        d = dropout(rec, rec.new(b * h, x.dtype, x.rg), p, "classifier.dropout")
        d = linear(rec, d, h, h, _trains(plan, "classifier.dense", True), "classifier.dense",
                   quantized="classifier.dense" in nf4)
        d = _tanh(rec, d, "classifier.tanh")
        d = dropout(rec, d, p, "classifier.dropout2")
        linear(rec, d, h, spec.num_labels, _trains(plan, "classifier.out_proj", True), "classifier.out_proj",
               quantized="classifier.out_proj" in nf4)
        return b * spec.num_labels, x
    if spec.task == "image_cls":  # classifier(sequence_output[:, 0, :])
        _first_token_linear(rec, x, b, h, spec.num_labels, _trains(plan, "classifier", True), "classifier",
                            "classifier" in nf4)
        return b * spec.num_labels, x
    # A bare encoder is trained here on last_hidden_state.float().pow(2).mean() (measure.run
    # forward_loss): pow saves its fp32 input.
    if x.rg:
        rec.save(cast(rec, x, "float32"), "loss.pow_input")
    return 0, x


def _unsaved_model_output(rec: Recorder, hidden: T) -> int:
    """The base model's output (last_hidden_state: the final norm's output, or the last block's)
    stays alive until the loss is computed, because the ForXxx forward holds ``outputs`` (e.g.
    LlamaForCausalLM.forward: outputs = self.model(...); logits = self.lm_head(outputs.last_hidden_state);
    loss = self.loss_function(...)). Counted here when no op saved it (a frozen head, or autocast's
    head saving a cast copy); a saved one is already in the saved bytes."""
    storage = hidden.base if hidden.base is not None else hidden
    return 0 if storage.id in rec.saved else storage.nbytes


@lru_cache(maxsize=1024)
def _quantized_paths(plan: Plan) -> frozenset:
    """Module paths whose weight is NF4 (QLoRA)."""
    return frozenset(g.name.rsplit(".", 1)[0] for g in plan.groups if g.quantized)


def _first_token_linear(rec: Recorder, x: T, batch: int, in_f: int, out_f: int, trainable: bool, tag: str,
                        quantized: bool = False) -> T:
    """A Linear on x[:, 0]: the weight's gradient needs the view, which keeps x's whole storage
    (under autocast the cast copy of the view is saved instead). A QLoRA Linear4bit (frozen) runs on
    the view as :func:`linear` does."""
    if quantized:
        return linear(rec, rec.view(x, batch * in_f), in_f, out_f, False, tag, quantized=True)
    if trainable:
        if rec.ctx.autocast:
            rec.save_new(batch * in_f, rec.ctx.autocast, f"{tag}.input")
        else:
            rec.save(x, f"{tag}.input")
    if rec.ctx.autocast and x.rg:
        rec.save_new(in_f * out_f, rec.ctx.autocast, f"{tag}.autocast_weight")
        if trainable:  # the autocast cache's copy (see _autocast_weight_cache)
            rec.saved_cached_copies += in_f * out_f * DTYPE_BYTES[rec.ctx.autocast]
    return rec.new(batch * out_f, rec.ctx.autocast or x.dtype, x.rg or trainable)


def _tanh(rec: Recorder, x: T, tag: str) -> T:
    """tanh saves its output."""
    out = rec.new(x.numel, x.dtype, x.rg)
    if x.rg:
        rec.save(out, f"{tag}.output")
    return out


@dataclass(frozen=True)
class LossBuffers:
    """Bytes of the loss at its two moments: the end of the forward (the logits, their fp32 copy and
    what cross-entropy saves) and the start of backward (the saved log-softmax output and the two
    dense gradients); the loss and backward's seed are two scalars alive through the backward."""

    saved: int  # what the loss saves at the end of the forward
    saved_backward: int  # what is still saved at the start-of-backward peak
    backward_peak: int  # every loss buffer alive at that peak
    forward_peak: int  # every loss buffer alive while the loss is computed
    scalars: int  # the loss and backward's ones_like seed


def _loss_buffers(spec: ModelSpec, ctx: Ctx, logits_numel: int) -> LossBuffers:
    """The loss buffers (see LossBuffers).

    Causal LM (transformers loss_utils.ForCausalLMLoss): logits.float() (a copy unless already fp32),
    shift_labels = pad(labels)[..., 1:].contiguous() (int64), cross_entropy = log_softmax (saves its
    fp32 output) + nll_loss (saves the log-softmax output and shift_labels). At the start of backward
    nll_loss_backward materialises a dense fp32 gradient and releases shift_labels, then
    log_softmax_backward a second gradient while the saved output is still alive: 3 x 4 bytes per
    logit. The model's own logits in the compute dtype are alive during the forward loss computation.
    Masked LM (BertForMaskedLM: CrossEntropyLoss on the logits as they are): the same without upcast
    (the labels are the harness's input tensor). The loss and the seed torch.autograd.backward creates
    (torch/csrc/autograd/autograd.cpp _make_grads: ones_like(loss)) are scalars in the loss dtype.
    A bare encoder's loss (measure.run forward_loss: last_hidden_state.float().pow(2).mean()) is fp32.
    """
    if not logits_numel:
        return LossBuffers(0, 0, 0, 0, 2 * 4)
    logit_dtype = ctx.autocast or ctx.compute
    if spec.task == "causal_lm":
        loss_dtype = "float32"
    else:
        loss_dtype = "float32" if ctx.autocast else logit_dtype  # autocast runs log_softmax in fp32
    lb = DTYPE_BYTES[loss_dtype]
    log_softmax_out = logits_numel * lb
    shift_labels = ctx.tokens * 8 if spec.task == "causal_lm" else 0
    saved = log_softmax_out + shift_labels
    upcast_copy = logits_numel * lb if logit_dtype != loss_dtype else 0
    forward_peak = logits_numel * DTYPE_BYTES[logit_dtype] + upcast_copy + saved
    return LossBuffers(saved=saved, saved_backward=log_softmax_out, backward_peak=3 * logits_numel * lb,
                       forward_peak=forward_peak, scalars=2 * lb)


def _forward_transient(spec: ModelSpec, plan: Plan, ctx: Ctx, per_layer: tuple) -> int:
    """The working set of one block's forward that autograd does not keep: it matters where blocks
    save little (a frozen backbone) and is already inside the saved bytes where they save everything.
    Attention: eager scores, softmax and probabilities (b x heads x s x kv); on CPU with dropout the
    math path's fp32 scores, softmax, noise and dropped probabilities plus its q, k, v copies; fused
    kernels only their q, k, v and output. MLP: the gated MLP's gate, up and activation outputs; GELU's
    input and output (gelu_new's Python formula: four intermediates). DoRA adds B @ A and W + s * BA
    (out x in) and the identity it multiplies (in x in), per layer (peft tuners/lora/dora.py)."""
    tok, b, s, kv = ctx.tokens, ctx.batch, ctx.seq, ctx.kv_seq
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute]
    scores = b * spec.num_heads * s * kv
    if ctx.attention == "eager":
        attn = scores * (4 + 4 + cb)
    elif dropout_p(spec, "attn") > 0 and ctx.device == "cpu":
        attn = 4 * scores * 4 + 3 * tok * spec.q_dim * 4
    else:
        attn = tok * (2 * spec.q_dim + 2 * spec.kv_dim) * cb
    act = {"gelu_new": 4}.get(spec.hidden_act, 2)
    mlp = (3 if spec.gated_mlp else act) * tok * spec.intermediate_size * cb
    dora = 0
    if plan.settings.dora and plan.targets:
        layout = build_layout(spec)
        mods = {m.path: m for m in layout.modules}
        dora = max(((m.in_features ** 2 + 3 * m.in_features * m.out_features) * DTYPE_BYTES[ctx.adapter]
                    for m in (mods[p] for p in plan.targets) if m.kind in ("linear", "conv1d")), default=0)
    saving = [a for a in per_layer if a]
    light = len(saving) < len(per_layer)  # some block saves nothing: its whole working set is transient
    if light:
        # plus the hidden-state tensors the forward holds meanwhile: the embeddings output (referenced
        # by the model's forward until it returns), the block's input, the residual after attention
        # and the normalised input of the sublayer
        stream = 4 * tok * spec.hidden_size * DTYPE_BYTES[ctx.weight]
        return max(attn + stream, mlp + stream, dora)
    # blocks that save their intermediates still hold one unsaved buffer at a time: the raw scores
    # before softmax (eager, CPU math path) or one MLP output
    fused = ctx.attention != "eager" and not (dropout_p(spec, "attn") > 0 and ctx.device == "cpu")
    return max(dora, tok * spec.intermediate_size * cb if fused else scores * 4)


def _autocast_weight_cache(plan: Plan, ctx: Ctx) -> int:
    """torch.autocast caches the lower-precision copy of every leaf weight that requires grad (the
    autocast weight cache, cleared when the autocast region exits), so the copies of all trainable
    matmul weights are alive at the end of the forward even where checkpointing saves none of them.
    (activation_profile subtracts the copies the head saves anyway, which are one tensor with the
    cached ones.)"""
    if not ctx.autocast:
        return 0
    layout = build_layout(plan.spec)
    matmul_weights = {f"{m.path}.weight" for m in layout.modules if m.kind in LINEAR_KINDS}
    numel = sum(g.numel for g in plan.groups if g.trainable and (g.name in matmul_weights or g.origin == "lora"))
    if layout.head_tied_to_embedding and plan.embedding_trains:
        numel += plan.spec.vocab_size * plan.spec.hidden_size
    return numel * DTYPE_BYTES[ctx.autocast]


def _saved_before_last_light_block(per_layer: tuple) -> int:
    """Activations saved by the blocks below the last block that saves nothing (all of them when
    every block saves something)."""
    light = [i for i, a in enumerate(per_layer) if not a]
    return sum(per_layer[: light[-1]]) if light else sum(per_layer)


def _layer_transient(spec: ModelSpec, ctx: Ctx) -> int:
    """Gradient buffers alive at once inside one block's backward: the incoming and outgoing
    hidden-state gradients plus, in the MLP, the gradients of the intermediate activations
    (three for the gated SiLU MLP: of the product, the activation and the up projection)."""
    tok = ctx.tokens
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute]
    mlp = (3 if spec.gated_mlp else 2) * tok * spec.intermediate_size * cb
    hidden = 2 * tok * spec.hidden_size * DTYPE_BYTES[ctx.weight]
    attn = 0
    if ctx.attention == "eager":
        attn = 2 * ctx.batch * spec.num_heads * ctx.seq * ctx.kv_seq * 4
    return hidden + max(mlp, attn)


# ---------------------------------------------------------------- vision-language models (LLaVA)


@lru_cache(maxsize=1024)
def text_plan(plan: Plan) -> Plan:
    """A VLM plan seen from its language model: the LlamaForCausalLM plan with the same trainable
    set (`model.language_model.X` is `model.X` there, `lm_head` is `lm_head`), whose input embeddings
    need a gradient when the VLM's do (a trainable projector: see methods.make_plan)."""
    from peftcalc.layout import LANGUAGE_MODEL

    spec = plan.spec
    old = LANGUAGE_MODEL + "."

    def rename(name: str) -> str | None:
        if name.startswith(old):
            return "model." + name[len(old):]
        return name if name.startswith("lm_head") else None

    groups = tuple(replace(g, name=rename(g.name)) for g in plan.groups if rename(g.name) is not None)
    targets = tuple(rename(p) for p in plan.targets if rename(p) is not None)
    return Plan(spec=spec.text, settings=plan.settings, groups=groups, targets=targets,
                lowest_trainable_layer=plan.lowest_trainable_layer, embedding_trains=plan.embedding_trains)


def vlm_text_training(spec: ModelSpec, t: TrainingSettings) -> TrainingSettings:
    """The language model's sequence: the text tokens plus one image's tokens (576 for LLaVA-1.5)."""
    return replace(t, seq_len=t.seq_len + spec.image_tokens)


@lru_cache(maxsize=1024)
def vision_plan(plan: Plan) -> Plan:
    """A VLM plan seen from its vision tower: the CLIPVisionModel plan (`model.vision_tower.X` is `X`
    there), with the block index of each encoder layer's parameters and adapters. Its settings carry the
    adapter kind and bottleneck the VLM resolves (seed 001's block adapter and its 256 by default)."""
    from peftcalc.methods import vision_layer_of

    prefix = "model.vision_tower."
    groups = tuple(replace(g, name=g.name[len(prefix):], layer=vision_layer_of(g.name))
                   for g in plan.groups if g.name.startswith(prefix) and g.origin in ("base", "adapter"))
    layers = [g.layer for g in groups if g.trainable and g.layer is not None]
    s = plan.settings
    settings = replace(s, adapter_kind=resolve_adapter_kind(plan.spec, s), bottleneck=resolve_bottleneck(plan.spec, s))
    return Plan(spec=plan.spec.vision, settings=settings, groups=groups,
                lowest_trainable_layer=min(layers) if layers else None)


@dataclass(frozen=True)
class VisionSaves:
    """What a VLM's vision tower saves (see _vision_saves)."""

    kept: int = 0  # bytes kept to the end of backward
    dropped: int = 0  # bytes freed when LlavaModel.forward returns (the layers above the feature layer)
    feature_rg: bool = False  # whether the hidden state the projector reads needs a gradient
    cached: int = 0  # autocast weight copies among the kept bytes (also in autocast's cache)
    forward_peak: int = 0  # the tower's live bytes at the peak of its forward (0: nothing saved, see
    # vision_forward_bytes), the language model's token embeddings not included


@lru_cache(maxsize=1024)
def _vision_saves(plan: Plan, t: TrainingSettings) -> VisionSaves:
    """What the vision tower of a VLM with unfrozen layers or adapters saves, and its forward peak. The
    blocks are CLIPEncoderLayers (vision_block, with their adapters); the layers above the feature layer
    run and save too (their input needs a gradient), and so does post_layernorm on the class token of the
    last one (CLIPVisionTransformer: the input it saves is a view of the last layer's output, which it
    keeps whole). Nothing reaches them from the loss: their graph lives as long as the tower's output,
    which LlavaModel.forward holds in mm_encoder_outputs until it returns, so they are dropped before the
    loss (traced without the reference cycle a saved-tensor hook returning its tensor makes, see
    measure.tracer). Under gradient checkpointing (transformers checkpoints CLIP's encoder layers as well)
    each layer whose forward saves keeps its input instead (torch.utils.checkpoint non-reentrant: the
    inputs stay with the saved tensors' frame), and seed 001's block adapter, a forward hook outside the
    checkpointed forward, saves as it does without checkpointing (its autocast weight copies are then both
    saved and in autocast's cache).

    The forward peak is in the top layer's MLP, when fc2's output is made (traced): everything the layers
    below saved, this layer's saves up to its activation, and what its forward holds unsaved, the
    LayerNorm's output, the activation's output and fc2's output; in a layer that saves nothing (its input
    needs no gradient, or it is checkpointed), the working set of vision_forward_bytes. The encoder's input
    (pre_layrnorm's output) is alive throughout; it is among the saves when checkpointing keeps it."""
    from peftcalc.methods import vision_layers_used

    vplan = vision_plan(plan)
    input_rg = t.grad_checkpointing  # see _vision_input_grad_saves
    if vplan.lowest_trainable_layer is None and not input_rg:
        return VisionSaves()
    vspec = vplan.spec
    ctx = make_ctx(vspec, vplan, t)
    used = vision_layers_used(plan.spec)
    tok, h, inter = ctx.tokens, vspec.hidden_size, vspec.intermediate_size
    wb, cb = DTYPE_BYTES[ctx.weight], DTYPE_BYTES[ctx.autocast or ctx.compute]
    x_rg, x_dtype = input_rg, ctx.weight  # pre_layrnorm's output (LayerNorm: fp32 under autocast)
    kept = _vision_input_grad_saves(vspec, ctx) if input_rg else 0
    dropped = cached = peak = 0
    feature_rg = False
    for i, lt in enumerate(_layer_trainings(vplan, build_layout(vspec))):
        saved, tags, x_rg_next, x_dtype_next, _peaks = _simulate_block(vspec, vplan, lt, ctx, x_rg, x_dtype)
        hook = {tag: nbytes for tag, nbytes in tags if tag.startswith(BLOCK_ADAPTER_TAG + ".")}
        after_mlp = sum(nbytes for tag, nbytes in tags if tag.startswith(("mlp.fc2.adapter.", BLOCK_ADAPTER_TAG + ".")))
        if t.grad_checkpointing and saved:
            inside = saved - sum(hook.values())
            saved = (tok * h * DTYPE_BYTES[_stream_dtype(ctx)] if inside else 0) + sum(hook.values())
            cached += sum(nbytes for tag, nbytes in hook.items() if tag.endswith(".autocast_weight"))
        before = kept + dropped
        if saved - after_mlp and not t.grad_checkpointing:  # LayerNorm output, activation output, fc2 output
            peak = max(peak, before + saved - after_mlp + tok * h * wb + tok * inter * cb + tok * h * cb)
        else:  # the layer's input (unless kept as a checkpoint's or it is the encoder input), x2, working set
            own_input = tok * h * wb if i and not (t.grad_checkpointing and saved - sum(hook.values())) else 0
            peak = max(peak, before + saved - after_mlp + own_input + _frozen_layer_working_set(vspec, ctx))
        if i < used:
            kept += saved
        else:
            dropped += saved
        x_rg, x_dtype = x_rg_next, x_dtype_next
        if i == used - 1:
            feature_rg = x_rg
    if x_rg:  # post_layernorm(last_hidden_state[:, 0, :]): the whole output through the view, mean and rstd
        dropped += tok * h * DTYPE_BYTES[x_dtype] + 2 * ctx.batch * 4
    encoder_input = 0 if t.grad_checkpointing else tok * h * wb
    return VisionSaves(kept, dropped, feature_rg, cached, encoder_input + peak)


def _frozen_layer_working_set(vspec: ModelSpec, ctx: Ctx) -> int:
    """What a CLIP encoder layer that saves nothing holds at its forward's peak besides its input (the
    per-layer part of vision_forward_bytes): the residual after attention, the MLP's LayerNorm output and
    the activation's intermediates, or, in the attention half, the LayerNorm output, q, k, v and the output."""
    tok, h = ctx.batch * vspec.vision_seq_len, vspec.hidden_size
    wb, cb = DTYPE_BYTES[ctx.weight], DTYPE_BYTES[ctx.autocast or ctx.compute]
    intermediates = 3 if vspec.hidden_act == "quick_gelu" else 2
    return max(2 * tok * h * wb + intermediates * tok * vspec.intermediate_size * cb, tok * h * wb + 4 * tok * h * cb)


def _vision_input_grad_saves(vspec: ModelSpec, ctx: Ctx) -> int:
    """Gradient checkpointing makes the vision tower's input need a gradient: transformers'
    PreTrainedModel.gradient_checkpointing_enable calls enable_input_require_grads for a model whose
    main input is input_ids (LLaVA), and that hooks the input embeddings of every PreTrainedModel inside,
    the CLIPVisionModel's patch_embedding too (its output.requires_grad_(True): a leaf the graph holds,
    b x patches x hidden in the conv's dtype, autocast's under autocast). CLIPVisionEmbeddings' cat with
    the class embedding and the position add save nothing; pre_layrnorm saves its input (b x 577 x hidden,
    fp32 under autocast: the cat promotes to the fp32 class embedding) with mean and rstd, and every
    encoder layer saves (its checkpointed input). Its .grad, written at the end of backward, is not counted."""
    v = vspec
    tok = ctx.batch * v.vision_seq_len
    conv = ctx.batch * v.num_patches * v.hidden_size * DTYPE_BYTES[ctx.autocast or ctx.weight]
    return conv + tok * v.hidden_size * DTYPE_BYTES[ctx.weight] + 2 * tok * 4


def _vlm_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """LlavaForConditionalGeneration.forward: the vision tower (frozen, it saves nothing; with unfrozen
    layers, see _vision_saves), the projector on the selected hidden state, masked_scatter of the image
    features into the token embeddings, then the language model and the loss over text + image tokens,
    which is the Llama profile at seq_len + image_tokens (the blocks' input needs a gradient whenever the
    projector trains, so a frozen language model still saves its activations in stage 1)."""
    from peftcalc.layout import PROJECTOR

    spec = plan.spec
    t_text = vlm_text_training(spec, t)
    text = activation_profile(text_plan(plan), t_text)
    ctx = make_ctx(spec.text, text_plan(plan), t_text)
    rec = Recorder(ctx)
    b, itok = ctx.batch, spec.image_tokens
    hv, h = spec.vision.hidden_size, spec.hidden_size
    vseq = spec.vision.vision_seq_len
    vs = _vision_saves(plan, t)
    vision_kept, vision_dropped, feature_rg, vision_cached_saved = vs.kept, vs.dropped, vs.feature_rg, vs.cached
    trains = _trains(plan, f"{PROJECTOR}.linear_1", True)
    # hidden_states[vision_feature_layer][:, 1:]: a view of the tower's (b, 577, hv) output in the
    # weight dtype (CLIP's residual stream); linear_1 saves it (under autocast, its cast copy, and the
    # cast weight when the features need a gradient)
    if trains:
        if ctx.autocast:
            rec.save_new(b * itok * hv, ctx.autocast, "projector.linear_1.input")
        elif feature_rg:  # traced: a contiguous copy of the [:, 1:] view (its storage is saved by the next layer)
            rec.save_new(b * itok * hv, ctx.weight, "projector.linear_1.input")
        else:
            rec.save_new(b * vseq * hv, ctx.weight, "projector.linear_1.input")
    if ctx.autocast and feature_rg:
        rec.save_new(hv * h, ctx.autocast, "projector.linear_1.autocast_weight")
    p1 = rec.new(b * itok * h, ctx.autocast or ctx.compute, trains or feature_rg)
    act = activation(rec, p1, "gelu", "projector.act")
    linear(rec, act, h, h, _trains(plan, f"{PROJECTOR}.linear_2", True), "projector.linear_2")
    if plan.embedding_trains:  # masked_scatter saves the image-token mask (bool, b x seq, expanded view)
        rec.save_new(ctx.tokens, "uint8", "masked_scatter.mask")
    if input_embeddings_require_grad(spec, t) and not _trains(plan, build_layout(spec).embedding_path):
        # the hooked output of the frozen token embeddings is a leaf held to the end of backward
        # (masked_scatter makes the tensor the language model gets)
        rec.save_new(ctx.tokens * h, ctx.weight, "embeddings.input_require_grads_leaf")
    extra = rec.bytes_by_bucket().get("pre", 0) + vision_kept
    tags = dict(text.by_tag)
    for tag, nbytes in rec.bytes_by_tag().items():
        tags[tag] = tags.get(tag, 0) + nbytes
    if vision_kept:
        tags["vision_tower.layers"] = vision_kept
    # LlavaModel.forward keeps the image features (torch.cat of the projector's outputs, cast to the
    # embeddings' dtype) to the end of forward and returns them as image_hidden_states: alive through
    # the language model and the loss, dropped with the outputs before backward
    features = b * itok * h * DTYPE_BYTES[ctx.weight]
    # The forward:block event (memory._step_events: pre + saved + transient) is the larger of a language
    # model block's working set and the vision tower's forward, which runs before the language model
    # saves anything (with unfrozen layers, the tower's own saved tensors are alive by its last layer)
    vision_ws = ctx.tokens * h * DTYPE_BYTES[ctx.weight] + vs.forward_peak if vs.forward_peak \
        else vision_forward_bytes(spec, ctx)
    # the saved tensors of the vision layers above the feature layer live through the language model's forward
    transient, transient_saved = text.forward_transient + features + vision_dropped, text.forward_transient_saved
    if vision_ws > text.pre + extra + transient_saved + transient:
        transient, transient_saved = vision_ws - text.pre - extra, 0
    weight_cache = text.autocast_weight_cache
    if ctx.autocast:  # autocast caches the cast copies of trainable leaf weights: projector, vision linears
        # and adapters (less the block adapters' copies, which are saved and counted as kept)
        vision_linears = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
        adapter_linears = ("down", "up", "down_proj", "up_proj")
        weight_cache += DTYPE_BYTES[ctx.autocast] * sum(
            g.numel for g in vision_plan(plan).groups
            if g.trainable and g.name.endswith(".weight") and g.name.rsplit(".", 2)[-2] in
            (adapter_linears if g.origin == "adapter" else vision_linears)) - vision_cached_saved
        if trains:
            weight_cache += (hv * h + h * h) * DTYPE_BYTES[ctx.autocast]
    return replace(text, pre=text.pre + extra, forward_transient=transient, forward_transient_saved=transient_saved,
                   loss_forward_peak=text.loss_forward_peak + features,
                   autocast_weight_cache=weight_cache, by_tag=tuple(sorted(tags.items())))


def vision_forward_bytes(spec: ModelSpec, ctx: Ctx) -> int:
    """Live bytes while a frozen CLIP vision tower runs its forward (traced, transformers 5.x: the
    hidden states are not all kept; each layer's output dies in the next layer, only the selected one
    survives). LlavaModel.forward has already embedded the tokens (b x seq x hidden, `ctx` is the
    language model's); CLIPVisionTransformer holds the encoder's input (the pre_layrnorm output); a
    layer holds its input, the residual after attention and the normalised input of the MLP, whose fc1
    output and activation intermediates peak together (quick_gelu, x * sigmoid(1.702 x): fc1's output,
    1.702 x and the sigmoid; GELU: fc1's output and its own). The attention half (input, LayerNorm output,
    q, k, v, output) is smaller for CLIP's 4x MLP but is taken when larger."""
    v = spec.vision
    tok = ctx.batch * v.vision_seq_len
    wb = DTYPE_BYTES[ctx.weight]
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute]
    intermediates = 3 if v.hidden_act == "quick_gelu" else 2
    mlp = 4 * tok * v.hidden_size * wb + intermediates * tok * v.intermediate_size * cb
    attn = 3 * tok * v.hidden_size * wb + 4 * tok * v.hidden_size * cb
    return ctx.tokens * spec.hidden_size * wb + max(mlp, attn)


# ---------------------------------------------------------------- BLIP-2 (EVA tower, Q-Former, OPT)


@lru_cache(maxsize=256)
def blip2_parts(spec: ModelSpec) -> tuple[ModelSpec, ModelSpec, ModelSpec]:
    """The three models inside Blip2ForConditionalGeneration as specs the simulator reads: the EVA vision
    tower (Blip2VisionModel), the Q-Former (Blip2QFormerModel) and the language model (OPTForCausalLM),
    each with its sub-config (for dropouts and activations; configuration_blip_2.py, configuration_opt.py)."""
    b = dict(spec.blip2)
    cfg = spec.hf_config

    def part(prefix: str, model_type: str, arch: str, sub: dict, act_key: str, **extra) -> ModelSpec:
        hidden, heads = b[f"{prefix}_hidden_size"], b[f"{prefix}_num_attention_heads"]
        return ModelSpec(name=f"{spec.name}/{model_type}", model_type=model_type, task="base", architecture=arch,
                         hidden_size=hidden, num_layers=b[f"{prefix}_num_hidden_layers"], num_heads=heads,
                         num_kv_heads=heads, head_dim=hidden // heads,
                         intermediate_size=b[f"{prefix}_intermediate_size"], hidden_act=str(sub.get(act_key, "gelu")),
                         hf_config=sub, **extra)

    vision = part("vision", "blip_2_vision_model", "Blip2VisionModel", cfg.get("vision_config") or {}, "hidden_act",
                  image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.num_channels)
    qformer = part("qformer", "blip_2_qformer", "Blip2QFormerModel", cfg.get("qformer_config") or {}, "hidden_act")
    text_cfg = cfg.get("text_config") or {}
    text = replace(spec, name=f"{spec.name}/opt", model_type="opt", task="causal_lm", architecture="OPTForCausalLM",
                   hidden_act=str(text_cfg.get("activation_function", "relu")), blip2=(), hf_config=text_cfg)
    return vision, qformer, text


def blip2_image_tokens(spec: ModelSpec) -> int:
    """The query tokens the language model sees before the text (num_query_tokens, 32 for BLIP-2 OPT)."""
    return dict(spec.blip2)["num_query_tokens"]


def blip2_vision_tokens(spec: ModelSpec) -> int:
    """Tokens of the EVA tower: the patches plus the class token (Blip2VisionEmbeddings: 257 at 224 px, patch 14)."""
    return (spec.image_size // spec.patch_size) ** 2 + 1


@lru_cache(maxsize=1024)
def _training(plan: Plan) -> frozenset:
    """The trainable parameters outside the blocks, by name, and the modules that hold them, by path."""
    names = _trainable_names(plan)
    return names | {n.rsplit(".", 1)[0] for n in names}


def _qformer_linear(rec: Recorder, trains: frozenset, x: T, in_f: int, out_f: int, path: str) -> T:
    weight, bias = f"{path}.weight" in trains, f"{path}.bias" in trains
    return linear(rec, x, in_f, out_f, weight, path, bias=True, bias_trains=bias)


def qformer_attention(rec: Recorder, qspec: ModelSpec, trains: frozenset, path: str, x: T, kv: T, kv_in: int,
                      kv_tokens: int) -> T:
    """Blip2QFormerAttention: query/key/value Linears (keys and values from `kv`: the hidden states, or the
    image features in a cross-attention), attention with attention_probs_dropout_prob (Blip2QFormer-
    MultiHeadAttention), then Blip2QFormerSelfOutput: dense, dropout, LayerNorm(dense + input). Post-LayerNorm
    like BertLayer: under autocast the residual sum and the LayerNorm are fp32."""
    ctx = rec.ctx
    hq = qspec.hidden_size
    q = _qformer_linear(rec, trains, x, hq, hq, f"{path}.attention.query")
    k = _qformer_linear(rec, trains, kv, kv_in, hq, f"{path}.attention.key")
    v = _qformer_linear(rec, trains, kv, kv_in, hq, f"{path}.attention.value")
    rec.ctx = replace(ctx, kv_seq=kv_tokens)
    a = attention(rec, qspec, q, k, v, dropout_p(qspec, "attn"), f"{path}.attention", cross=kv is not x)
    rec.ctx = ctx
    o = _qformer_linear(rec, trains, a, hq, hq, f"{path}.output.dense")
    o = dropout(rec, o, dropout_p(qspec, "resid"), f"{path}.output.dropout")
    s = rec.new(x.numel, o.dtype if ctx.autocast is None else x.dtype, x.rg or o.rg)
    return layer_norm(rec, s, f"{path}.output.LayerNorm" in trains, hq, f"{path}.output.LayerNorm")


def qformer_layer(rec: Recorder, spec: ModelSpec, trains: frozenset, i: int, x: T, image: T) -> T:
    """Blip2QFormerLayer.forward with query_length = the whole sequence (no text input): self-attention,
    the cross-attention to the image features in layers i % cross_attention_frequency == 0, then
    feed_forward_chunk_query: intermediate_query (dense, activation), output_query (dense, dropout,
    LayerNorm(dense + input)). `spec` is the BLIP-2 model's."""
    ctx = rec.ctx
    vspec, qspec, _ = blip2_parts(spec)
    hq, iq = qspec.hidden_size, qspec.intermediate_size
    p = f"{QFORMER}.encoder.layer.{i}"
    x = qformer_attention(rec, qspec, trains, f"{p}.attention", x, x, hq, ctx.seq)
    if i % dict(spec.blip2)["qformer_cross_attention_frequency"] == 0:
        x = qformer_attention(rec, qspec, trains, f"{p}.crossattention", x, image, vspec.hidden_size,
                              blip2_vision_tokens(spec))
    f = _qformer_linear(rec, trains, x, hq, iq, f"{p}.intermediate_query.dense")
    f = activation(rec, f, qspec.hidden_act, f"{p}.intermediate_query.intermediate_act_fn")
    d = _qformer_linear(rec, trains, f, iq, hq, f"{p}.output_query.dense")
    d = dropout(rec, d, dropout_p(qspec, "resid"), f"{p}.output_query.dropout")
    s = rec.new(x.numel, d.dtype if ctx.autocast is None else x.dtype, x.rg or d.rg)
    return layer_norm(rec, s, f"{p}.output_query.LayerNorm" in trains, hq, f"{p}.output_query.LayerNorm")


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


def qformer_ctx(plan: Plan, ctx: Ctx) -> Ctx:
    """The Q-Former's Ctx: the language model's (`ctx`), or, where from_pretrained keeps the Q-Former in fp32
    (spec.kept_in_fp32: Blip2ForConditionalGeneration._keep_in_fp32_modules under fp16), fp32 weights and
    compute: Blip2QFormerModel.forward casts the query tokens to its layernorm's dtype ("Qformer is kept as
    fp32") and the encoder hidden states to theirs, so every op inside it runs in fp32."""
    if kept_in_fp32(plan.spec, QFORMER, ctx.weight):
        return replace(ctx, weight="float32", compute="float32")
    return ctx


@lru_cache(maxsize=4096)
def qformer_saves(plan: Plan, ctx: Ctx) -> QFormerSaves:
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
    tower_out = rec.new(batch * blip2_vision_tokens(spec) * vspec.hidden_size, ctx.weight, False)
    queries_rg = QUERY_TOKENS in trains
    norm_trains = f"{QFORMER}.layernorm" in trains
    if queries_rg or norm_trains:  # native_layer_norm saves mean and rstd (the input is the parameter)
        rec.save_new(2 * batch * n, "float32", f"{QFORMER}.layernorm.mean_rstd")
    x = rec.new(batch * n * hq, "float32" if ctx.autocast else qctx.weight, queries_rg or norm_trains)
    image = cast(rec, tower_out, qctx.weight)
    x = dropout(rec, x, dropout_p(qspec, "embd"), f"{QFORMER}.dropout")
    kept = 0
    for i in range(qspec.num_layers):
        rec.bucket = i
        before = set(rec.saved)
        x_in = x
        x = qformer_layer(rec, spec, trains, i, x, image)
        if any(rec.saved[k][2] for k in set(rec.saved) - before):
            kept += x_in.nbytes
    rec.bucket = "post"
    rec.ctx = ctx
    out = _qformer_linear(rec, trains, cast(rec, x, tower_out.dtype), hq, spec.hidden_size, LANGUAGE_PROJECTION)
    buckets = rec.bytes_by_bucket()
    layers = sum(v for k, v in buckets.items() if isinstance(k, int))
    cached = sum(n for bucket, tag, n in rec.saved.values() if bucket == "post" and tag.endswith(".autocast_weight"))
    checkpointed = buckets.get("pre", 0) + buckets.get("post", 0) + kept + (image.nbytes if kept else 0)
    unsaved = x.nbytes if x.id not in rec.saved else 0
    weight_copies = 0
    if ctx.autocast:
        unsaved += DTYPE_BYTES[ctx.autocast] * _trainable_linear_numel(plan, ".bias")
        weight_copies = DTYPE_BYTES[ctx.autocast] * _trainable_linear_numel(
            plan, ".weight", ".crossattention.attention.key", ".crossattention.attention.value")
    return QFormerSaves(saved=buckets.get("pre", 0) + layers + buckets.get("post", 0), checkpointed=checkpointed,
                        unsaved=unsaved, unsaved_image=0 if image.id in rec.saved else image.nbytes,
                        unsaved_weight_copies=weight_copies, saved_weight_copies=cached, output_rg=out.rg,
                        by_tag=tuple(rec.bytes_by_tag().items()),
                        tower_output=tower_out.nbytes if image is not tower_out else 0)


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


def eva_forward_bytes(spec: ModelSpec, ctx: Ctx) -> int:
    """Live bytes while the frozen EVA tower (Blip2VisionModel) runs its forward, the first thing
    Blip2ForConditionalGeneration.forward does (traced, transformers 5.x: nothing is saved and each layer's
    output dies in the next layer): the embeddings output (held by Blip2VisionModel.forward), a
    Blip2EncoderLayer's input, its residual after attention and layer_norm2's output, with fc1's output and
    the activation's (GELU: two intermediates; quick_gelu three) at the MLP's peak; the attention half holds
    the input, the embeddings, layer_norm1's output, the fused qkv output, the attention output and the
    projection's, which is taken when larger. `ctx` is the language model's."""
    vspec = blip2_parts(spec)[0]
    tok = ctx.batch * blip2_vision_tokens(spec)
    wb = DTYPE_BYTES[ctx.weight]
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute]
    intermediates = 3 if vspec.hidden_act == "quick_gelu" else 2
    mlp = 4 * tok * vspec.hidden_size * wb + intermediates * tok * vspec.intermediate_size * cb
    attn = 3 * tok * vspec.hidden_size * wb + 5 * tok * vspec.hidden_size * cb
    return max(mlp, attn)


def blip2_forward_outputs(spec: ModelSpec, ctx: Ctx, q: QFormerSaves, checkpointing: bool) -> int:
    """Tensors Blip2ForConditionalGeneration.forward holds while its language model and loss run, none of
    them saved: the token embeddings after masked_scatter (inputs_embeds, b x seq x hidden, weight dtype),
    the language projection's output (the image output's pooler_output; under autocast also its cast to the
    embeddings' dtype), the tower's pooled output (b x vision hidden) and attention_mask =
    torch.ones_like(input_ids) (int64), and what the Q-Former leaves alive unsaved (QFormerSaves: under
    checkpointing the image features are the checkpoints' and the weight copies _autocast_weight_cache's;
    the tower's output of which an fp32 Q-Former read a copy is alive either way).
    `ctx` is the language model's."""
    vspec = blip2_parts(spec)[0]
    b, n, h = ctx.batch, blip2_image_tokens(spec), spec.hidden_size
    wb = DTYPE_BYTES[ctx.weight]
    projected = b * n * h * DTYPE_BYTES[ctx.autocast or ctx.compute]
    if ctx.autocast:
        projected += b * n * h * wb
    qformer = q.unsaved + q.tower_output + (0 if checkpointing else q.unsaved_image + q.unsaved_weight_copies)
    return ctx.tokens * h * wb + projected + b * vspec.hidden_size * wb + ctx.tokens * 8 + qformer


def _blip2_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
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
    q = qformer_saves(plan, replace(ctx, seq=blip2_image_tokens(spec), kv_seq=blip2_image_tokens(spec)))
    rec = Recorder(ctx)
    if q.output_rg:  # masked_scatter saves its (b, seq, 1) bool mask for the gradients of both inputs
        rec.save_new(tok, "uint8", "masked_scatter.mask")
    x = rec.new(tok * h, ctx.weight, q.output_rg)  # inputs_embeds + embed_positions(...)
    per_layer, peaks, tags, seen = [], [], dict(q.by_tag), {}
    for lt in _layer_trainings(plan, layout):
        key = (lt, x.rg, x.dtype)
        if key not in seen:
            seen[key] = _simulate_block(tspec, plan, lt, ctx, x.rg, x.dtype, t.grad_checkpointing)
        saved, block_tags, out_rg, out_dtype, block_peak = seen[key]
        per_layer.append(saved)
        peaks.append(block_peak)
        for tag, nbytes in block_tags:
            tags[tag] = tags.get(tag, 0) + nbytes
        x = rec.new(x.numel, out_dtype, out_rg)
    rec.bucket = "post"
    logits_numel, x = _head(rec, tspec, plan, layout, x)
    model_output = _unsaved_model_output(rec, x)
    for tag, nbytes in rec.bytes_by_tag().items():
        tags[tag] = tags.get(tag, 0) + nbytes
    by_bucket = rec.bytes_by_bucket()
    per_layer = tuple(per_layer)
    saving = [a for a in per_layer if a]
    # OPTDecoder's position_ids (b x seq, int64) are an input of every checkpointed layer
    ckpt_inputs = len(saving) * tok * h * DTYPE_BYTES[_stream_dtype(ctx)] + (tok * 8 if saving else 0)
    qformer = q.checkpointed if t.grad_checkpointing else q.saved
    pre = by_bucket.get("pre", 0) + qformer
    outputs = blip2_forward_outputs(spec, ctx, q, t.grad_checkpointing)
    loss = _loss_buffers(tspec, ctx, logits_numel)
    transient = _forward_transient(tspec, plan, ctx, per_layer) + outputs
    transient_saved = _saved_before_last_light_block(per_layer)
    vision = eva_forward_bytes(spec, ctx)  # runs before anything is saved
    if vision > pre + (0 if t.grad_checkpointing else transient_saved) + transient:
        transient, transient_saved = vision - pre, 0
    return ActivationProfile(
        per_layer=per_layer,
        pre=pre,
        post=by_bucket.get("post", 0),
        checkpoint_inputs=ckpt_inputs,
        logits_bytes=logits_numel * DTYPE_BYTES[ctx.autocast or ctx.compute],
        loss_saved=loss.saved,
        loss_saved_backward=loss.saved_backward,
        loss_backward_peak=loss.backward_peak,
        loss_forward_peak=loss.forward_peak + outputs,
        loss_scalars=loss.scalars,
        layer_transient=_layer_transient(tspec, ctx),
        forward_transient=transient,
        forward_transient_saved=transient_saved,
        # the projection's saved weight copy is the cache's own, already in `pre`
        autocast_weight_cache=_autocast_weight_cache(plan, ctx) - q.saved_weight_copies,
        block_peaks=tuple(peaks),
        model_output=model_output,
        by_tag=tuple(sorted(tags.items())),
    )
