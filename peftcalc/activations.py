"""Saved activations, simulated op by op.

The forward pass of one block is written out as the sequence of torch ops that the transformers
modeling file runs (modeling_llama.py, modeling_gpt2.py, modeling_bert.py, modeling_vit.py,
modeling_clip.py) and peft's layers add (tuners/lora/layer.py Linear.forward, tuners/ia3/layer.py).
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

from peftcalc.errors import InputError, MemoryNotModelled
from peftcalc.layout import LINEAR_KINDS, Layout, build_layout
from peftcalc.methods import (
    ADAPTER_ATTRIBUTE,
    BLOCK_ADAPTER_DROPOUT,
    Plan,
    resolve_adapter_kind,
    resolve_bottleneck,
)
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.spec import COUNTS_ONLY_FAMILIES, ModelSpec

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
}


def dropout_p(spec: ModelSpec, where: str) -> float:
    key = DROPOUT_KEYS[spec.model_type].get(where)
    if key is None:
        return 0.0
    return float(spec.hf_config.get(key[0], key[1]) or 0.0)


@dataclass
class T:
    """A symbolic tensor."""

    numel: int
    dtype: str
    rg: bool
    id: int

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


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

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Recorder:
    """Collects saved tensors, each once, by bucket (a layer index, 'pre', 'post')."""

    ctx: Ctx
    bucket: object = "pre"
    saved: dict = field(default_factory=dict)  # id -> (bucket, tag, bytes)
    next_id: int = 0

    def new(self, numel: int, dtype: str, rg: bool) -> T:
        self.next_id += 1
        return T(numel, dtype, rg, self.next_id)

    def save(self, t: T, tag: str) -> None:
        if t.id not in self.saved:
            self.saved[t.id] = (self.bucket, tag, t.nbytes)

    def save_new(self, numel: int, dtype: str, tag: str) -> None:
        self.save(self.new(numel, dtype, False), tag)

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


# ---------------------------------------------------------------- ops
# Each op mirrors the forward of one torch function and saves what its derivative formula needs.


def cast(rec: Recorder, x: T, dtype: str) -> T:
    """Tensor.to(dtype): a no-op returning the same tensor when the dtype already matches."""
    return x if x.dtype == dtype else rec.new(x.numel, dtype, x.rg)


def autocast_in(rec: Recorder, x: T) -> T:
    """torch.autocast casts the inputs of matmul-like ops to the autocast dtype."""
    return cast(rec, x, rec.ctx.autocast) if rec.ctx.autocast else x


def linear(rec: Recorder, x: T, in_f: int, out_f: int, trainable: bool, tag: str,
           lora_rank: int = 0, dora: bool = False, ia3: str = "", quantized: bool = False,
           conv1d: bool = False, bias: bool = False, bias_trains: bool = False) -> T:
    """nn.Linear / Conv1D (addmm): saves the input when the weight trains (grad_W = grad^T x) and the
    weight when the input needs a gradient. Under autocast the weight is cast to the autocast dtype,
    and that copy is what is saved. peft LoRA (tuners/lora/layer.py Linear.forward) adds
    lora_B(lora_A(x.to(lora_A.weight.dtype))): the cast input and A's output are saved."""
    ctx = rec.ctx
    xin = autocast_in(rec, x)
    tokens_in = x.numel // in_f
    if trainable:
        rec.save(xin, f"{tag}.input")
    if ctx.autocast and x.rg and not quantized:
        rec.save_new(in_f * out_f, ctx.autocast, f"{tag}.autocast_weight")
    if ia3 == "ff":  # peft IA3 Linear.forward, feedforward: (x.to(ia3 dtype) * scaling).to(x dtype), then
        # the frozen linear; the mul saves the cast input and the scaling vector (1 * ia3_l.flatten())
        xc = cast(rec, x, ctx.adapter)
        rec.save(xc, f"{tag}.ia3_input")
        rec.save_new(in_f, ctx.adapter, f"{tag}.ia3_scaling")
        xin = autocast_in(rec, rec.new(x.numel, x.dtype, True))
    out_dtype = ctx.autocast or (ctx.compute if not quantized else ctx.compute)
    out = rec.new(tokens_in * out_f, out_dtype, x.rg or trainable or bias_trains or bool(lora_rank) or bool(ia3))
    if lora_rank:
        # x.to(lora_A.weight.dtype) (peft _cast_input_dtype), then autocast's own cast for the matmul
        xa = autocast_in(rec, cast(rec, x, ctx.adapter))
        rec.save(xa, f"{tag}.lora_input")
        if ctx.autocast:  # autocast copies of lora_B (always needed) and lora_A (when x needs a gradient)
            rec.save_new(out_f * lora_rank + (in_f * lora_rank if x.rg else 0), ctx.autocast,
                         f"{tag}.lora_autocast_weights")
        a = rec.new(tokens_in * lora_rank, ctx.autocast or ctx.adapter, True)
        rec.save(a, f"{tag}.lora_A_out")
        if dora:  # peft tuners/lora/dora.py DoraLinearLayer.forward: (m/||W+BA|| - 1) * base_result +
            # m/||W+BA|| * lora_B(lora_A(x)) * scaling: the muls save the base result (compute dtype),
            # the LoRA result, and the vectors ||W+BA|| (detached), m/||.|| and m/||.|| - 1
            # (base_result - bias when the layer has one: under autocast that promotes to fp32)
            base_dtype = ctx.weight if (bias and ctx.autocast) else (ctx.autocast or ctx.compute)
            rec.save_new(tokens_in * out_f, base_dtype, f"{tag}.dora_base_out")
            rec.save_new(tokens_in * out_f, ctx.autocast or ctx.adapter, f"{tag}.dora_lora_out")
            rec.save_new(3 * out_f, ctx.adapter, f"{tag}.dora_scale")
            if conv1d and ctx.weight == ctx.adapter:
                # traced (peft 0.21, transformers Conv1D): with fp32 base weights the W + s*BA of the
                # weight norm is saved, one weight-sized fp32 tensor per DoRA layer
                rec.save_new(in_f * out_f, ctx.adapter, f"{tag}.dora_weight")
        out = rec.new(tokens_in * out_f, out.dtype, True)
    if ia3 == "out":  # IA3 on keys/values: base_layer(x) * scaling, the mul saves both
        rec.save(out, f"{tag}.ia3_out")
        rec.save_new(out_f, ctx.adapter, f"{tag}.ia3_scaling")
        out = rec.new(out.numel, out.dtype, True)
    return out


def rms_norm(rec: Recorder, x: T, weight_trainable: bool, tag: str) -> T:
    """LlamaRMSNorm.forward: x.to(fp32); pow(2).mean; rsqrt; x * rsqrt; weight * _.to(input dtype).
    pow and the product save the fp32 input and the rsqrt; weight * y saves y when the weight trains."""
    hidden = x.numel // rec.ctx.tokens if rec.ctx.tokens else x.numel
    x32 = cast(rec, x, "float32")
    if x.rg:
        rec.save(x32, f"{tag}.input_fp32")
        rec.save_new(x.numel // hidden, "float32", f"{tag}.rsqrt")
    normed = rec.new(x.numel, x.dtype, x.rg)
    if weight_trainable:
        rec.save(normed, f"{tag}.normalized")
    return rec.new(x.numel, x.dtype, x.rg or weight_trainable)


def layer_norm(rec: Recorder, x: T, trainable: bool, hidden: int, tag: str) -> T:
    """nn.LayerNorm (native_layer_norm): saves the input, mean and rstd when any gradient is needed.
    Autocast runs layer_norm in fp32."""
    needs = x.rg or trainable
    xin = cast(rec, x, "float32") if rec.ctx.autocast else x
    if needs:
        rec.save(xin, f"{tag}.input")
        rec.save_new(2 * (x.numel // hidden), "float32", f"{tag}.mean_rstd")
    return rec.new(x.numel, xin.dtype, needs)


def dropout(rec: Recorder, x: T, p: float, tag: str) -> T:
    """F.dropout in training. p == 0 returns the input itself (ATen _dropout). On CUDA p > 0 runs
    native_dropout and saves a bool mask; on CPU it saves a noise tensor of the input's dtype."""
    if p <= 0.0 or not rec.ctx.training_dropout:
        return x
    if x.rg:
        dtype = "uint8" if rec.ctx.device == "cuda" else x.dtype
        rec.save_new(x.numel, dtype, f"{tag}.dropout_mask")
    return rec.new(x.numel, x.dtype, x.rg)


def activation(rec: Recorder, x: T, kind: str, tag: str) -> T:
    """The MLP activation. silu/gelu save their input; gelu_new (NewGELUActivation, a Python
    formula) saves input, tanh output, 0.5*x and 1+tanh; quick_gelu saves input and sigmoid output."""
    if x.rg:
        if kind == "gelu_new":
            rec.save(x, f"{tag}.input")
            for part in ("tanh", "half_x", "one_plus_tanh"):
                rec.save_new(x.numel, x.dtype, f"{tag}.{part}")
        elif kind == "quick_gelu":
            rec.save(x, f"{tag}.input")
            rec.save_new(x.numel, x.dtype, f"{tag}.sigmoid")
        else:
            rec.save(x, f"{tag}.input")
    return rec.new(x.numel, x.dtype, x.rg)


def mul(rec: Recorder, a: T, b: T, tag: str) -> T:
    """a * b saves b when a needs a gradient and a when b does."""
    if b.rg:
        rec.save(a, f"{tag}.a")
    if a.rg:
        rec.save(b, f"{tag}.b")
    return rec.new(max(a.numel, b.numel), a.dtype, a.rg or b.rg)


# Families whose eager attention runs softmax in fp32 (modeling_llama.py eager_attention_forward and
# the ViT/CLIP copies); GPT-2/BERT/RoBERTa take the softmax in the scores' dtype.
FP32_SOFTMAX_FAMILIES = ("llama", "mistral", "qwen2", "vit", "clip_vision_model")


def attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, p_drop: float, tag: str) -> T:
    """Scaled dot-product attention over heads.

    sdpa (torch.nn.functional.scaled_dot_product_attention): the fused kernels (flash/memory-efficient
    on CUDA, the flash kernel on CPU) save q, k, v, the output and a logsumexp (fp32, batch x heads x
    query length). eager (transformers eager_attention_forward): q @ k^T saves q and k (keys/values
    repeated to all heads for GQA by repeat_kv), softmax in fp32 saves its output, the cast to the
    compute dtype is saved by the matmul with v, and dropout (p > 0) saves its mask.
    """
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    explicit_mask = kv != s
    if explicit_mask:
        # prefix tuning: the cache update concatenates the trainable past keys/values, and peft passes
        # an attention mask, so transformers (sdpa_attention_forward: use_gqa_in_sdpa is False with a
        # mask) repeats keys/values to every head (repeat_kv) and SDPA saves the float mask it builds
        width = spec.q_dim if spec.num_kv_heads != spec.num_heads else spec.kv_dim
        k = rec.new(b * kv * width, k.dtype, True)
        v = rec.new(b * kv * width, v.dtype, True)
        cpu_math = p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout
        if ctx.attention != "eager" and not cpu_math:  # eager and the math path add it to the scores
            rec.save_new(b * s * kv, q.dtype, f"{tag}.attn_mask")
    needs = q.rg or k.rg or v.rg
    out_numel = b * s * spec.q_dim
    if not needs:
        return rec.new(out_numel, q.dtype, False)
    if ctx.attention == "eager":
        groups = 1 if explicit_mask else spec.num_heads // spec.num_kv_heads  # repeat_kv (once)
        k_full = k if groups == 1 else rec.new(k.numel * groups, k.dtype, k.rg)
        v_full = v if groups == 1 else rec.new(v.numel * groups, v.dtype, v.rg)
        # q @ k^T saves q for k's gradient and k for q's; probs @ v saves v for the probabilities'
        # gradient and the probabilities for v's
        if k.rg:
            rec.save(q, f"{tag}.q")
        if q.rg:
            rec.save(k_full, f"{tag}.k")
        if spec.model_type in FP32_SOFTMAX_FAMILIES:  # softmax(..., dtype=float32).to(query.dtype)
            softmax = rec.new(b * heads * s * kv, "float32", True)
        else:  # softmax(attn_weights, dim=-1) in the scores' dtype
            softmax = rec.new(b * heads * s * kv, q.dtype if not ctx.autocast else "float32", True)
        rec.save(softmax, f"{tag}.softmax_out")
        probs = softmax
        if probs.dtype != q.dtype and not ctx.autocast:  # .to(query.dtype)
            probs = rec.new(probs.numel, q.dtype, True)
        probs = dropout(rec, probs, p_drop, tag)
        probs = autocast_in(rec, probs)  # autocast's matmul casts fp32 probabilities
        if v.rg:
            rec.save(probs, f"{tag}.probs")
        if q.rg or k.rg:
            rec.save(v_full, f"{tag}.v")
    elif p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout:
        # CPU has no fused kernel with dropout: torch's _scaled_dot_product_attention_math runs, in fp32
        # for half types, and saves the scaled q, k^T, v, the softmax, the dropout noise and the
        # dropped probabilities; its (batch, heads, seq, dim) output is copied by transpose().contiguous()
        up = "float32" if (ctx.autocast or q.dtype) in ("bfloat16", "float16") else q.dtype
        if k.rg:
            rec.save_new(b * s * spec.q_dim, up, f"{tag}.math_q")
        if q.rg:
            rec.save_new(b * kv * spec.q_dim, up, f"{tag}.math_k")
        if q.rg or k.rg:
            rec.save_new(b * kv * spec.q_dim, up, f"{tag}.math_v")
            rec.save_new(2 * b * heads * s * kv, up, f"{tag}.math_softmax_noise")
        if v.rg:
            rec.save_new(b * heads * s * kv, up, f"{tag}.math_probs")
    else:
        rec.save(q, f"{tag}.q")
        rec.save(k, f"{tag}.k")
        rec.save(v, f"{tag}.v")
        out = rec.new(out_numel, q.dtype, True)
        rec.save(out, f"{tag}.out")
        rec.save_new(b * heads * s, "float32", f"{tag}.logsumexp")
        if p_drop > 0 and ctx.device == "cpu":  # CPU flash has no dropout: the math path keeps the probs
            rec.save_new(b * heads * s * kv, q.dtype, f"{tag}.probs")
        # The fused kernels lay their output out as (batch, seq, heads, dim): transformers'
        # transpose(1, 2).contiguous() is then a view, and the output projection saves that storage.
        return out
    return rec.new(out_numel, q.dtype, True)  # eager: transpose(1, 2).contiguous() copies


def adapter_block(rec: Recorder, x: T, hidden: int, bottleneck: int, tag: str) -> T:
    """measure.adapters.BottleneckAdapter: x + up(gelu(down(x))), two trainable Linears around a GELU."""
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.adapter.down")
    act = activation(rec, down, "gelu", f"{tag}.adapter.act")
    up = linear(rec, act, bottleneck, hidden, True, f"{tag}.adapter.up")
    return rec.new(x.numel, up.dtype if rec.ctx.autocast is None else x.dtype, True)


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


def _lin(rec, lt: LayerTraining, x, name, in_f, out_f, plan: Plan, quantized=False):
    s = plan.settings
    ia3 = "ff" if name in lt.ia3_ff else ("out" if name in lt.ia3_out else "")
    return linear(rec, x, in_f, out_f, name in lt.trainable, name, lora_rank=s.rank if name in lt.lora else 0,
                  dora=s.dora and name in lt.lora, ia3=ia3, quantized=quantized,
                  conv1d=plan.spec.model_type == "gpt2", bias=name in _block_biases(build_layout(plan.spec)),
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
    """LlamaDecoderLayer (also Mistral, Qwen2): pre-RMSNorm attention with RoPE, gated SiLU MLP."""
    ctx = rec.ctx
    h, tok = spec.hidden_size, ctx.tokens
    quant = plan.settings.method == "qlora"
    n = rms_norm(rec, x, "input_layernorm" in lt.norm_trainable, "input_layernorm")
    q = _lin(rec, lt, n, "self_attn.q_proj", h, spec.q_dim, plan, quant)
    k = _lin(rec, lt, n, "self_attn.k_proj", h, spec.kv_dim, plan, quant)
    v = _lin(rec, lt, n, "self_attn.v_proj", h, spec.kv_dim, plan, quant)
    q = rec.new(q.numel, q.dtype, q.rg)  # RoPE: q * cos + rotate_half(q) * sin (saves only cos/sin)
    k = rec.new(k.numel, k.dtype, k.rg)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "self_attn.attention")
    o = _lin(rec, lt, a, "self_attn.o_proj", spec.q_dim, h, plan, quant)
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, "self_attn.o_proj")
    x2 = rec.new(tok * h, x.dtype, x.rg or o.rg)  # x + o keeps the residual stream's dtype
    n2 = rms_norm(rec, x2, "post_attention_layernorm" in lt.norm_trainable, "post_attention_layernorm")
    g = _lin(rec, lt, n2, "mlp.gate_proj", h, spec.intermediate_size, plan, quant)
    u = _lin(rec, lt, n2, "mlp.up_proj", h, spec.intermediate_size, plan, quant)
    act = activation(rec, g, "silu", "mlp.act_fn")
    p = mul(rec, act, u, "mlp.act_mul")
    d = _lin(rec, lt, p, "mlp.down_proj", spec.intermediate_size, h, plan, quant)
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "mlp.down_proj")
    return rec.new(tok * h, x2.dtype, x2.rg or d.rg)


def gpt2_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """GPT2Block: pre-LayerNorm, fused c_attn (Conv1D), gelu_new MLP, dropout on attention and residuals."""
    ctx = rec.ctx
    h, tok = spec.hidden_size, ctx.tokens
    quant = plan.settings.method == "qlora"
    n = layer_norm(rec, x, "ln_1" in lt.norm_trainable, h, "ln_1")
    qkv = _lin(rec, lt, n, "attn.c_attn", h, 3 * h, plan, quant and False)
    q = k = v = qkv  # views of c_attn's output: one storage
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "attn.attention")
    o = _lin(rec, lt, a, "attn.c_proj", h, h, plan)
    o = dropout(rec, o, dropout_p(spec, "resid"), "attn.resid_dropout")
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, "attn.c_proj")
    x2 = rec.new(tok * h, x.dtype, x.rg or o.rg)
    n2 = layer_norm(rec, x2, "ln_2" in lt.norm_trainable, h, "ln_2")
    f = _lin(rec, lt, n2, "mlp.c_fc", h, spec.intermediate_size, plan)
    act = activation(rec, f, spec.hidden_act if spec.hidden_act in ("gelu_new", "quick_gelu") else "gelu", "mlp.act")
    d = _lin(rec, lt, act, "mlp.c_proj", spec.intermediate_size, h, plan)
    d = dropout(rec, d, dropout_p(spec, "resid"), "mlp.dropout")
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "mlp.c_proj")
    return rec.new(tok * h, x2.dtype, x2.rg or d.rg)


def bert_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """BertLayer / RobertaLayer: post-LayerNorm; dropout after attention output and FFN output."""
    ctx = rec.ctx
    h, tok = spec.hidden_size, ctx.tokens
    q = _lin(rec, lt, x, "attention.self.query", h, h, plan)
    k = _lin(rec, lt, x, "attention.self.key", h, h, plan)
    v = _lin(rec, lt, x, "attention.self.value", h, h, plan)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "attention.self")
    o = _lin(rec, lt, a, "attention.output.dense", h, h, plan)
    o = dropout(rec, o, dropout_p(spec, "resid"), "attention.output.dropout")
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, "attention.output.dense")
    s1 = rec.new(tok * h, o.dtype if ctx.autocast is None else x.dtype, x.rg or o.rg)
    n1 = layer_norm(rec, s1, "attention.output.LayerNorm" in lt.norm_trainable, h, "attention.output.LayerNorm")
    f = _lin(rec, lt, n1, "intermediate.dense", h, spec.intermediate_size, plan)
    act = activation(rec, f, "gelu", "intermediate.act")
    d = _lin(rec, lt, act, "output.dense", spec.intermediate_size, h, plan)
    d = dropout(rec, d, dropout_p(spec, "resid"), "output.dropout")
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "output.dense")
    s2 = rec.new(tok * h, n1.dtype, n1.rg or d.rg)
    return layer_norm(rec, s2, "output.LayerNorm" in lt.norm_trainable, h, "output.LayerNorm")


def vision_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """ViTLayer / CLIPEncoderLayer: pre-LayerNorm attention and MLP (gelu / quick_gelu)."""
    ctx = rec.ctx
    h, tok = spec.hidden_size, ctx.tokens
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
    o = _maybe_adapter(rec, lt, o, "attn_out", spec, plan, out_name)
    x2 = rec.new(tok * h, x.dtype, x.rg or o.rg)
    n2 = layer_norm(rec, x2, ln2 in lt.norm_trainable, h, ln2)
    f = _lin(rec, lt, n2, "mlp.fc1", h, spec.intermediate_size, plan)
    act = activation(rec, f, "quick_gelu" if spec.hidden_act == "quick_gelu" else "gelu", "mlp.act")
    d = _lin(rec, lt, act, "mlp.fc2", spec.intermediate_size, h, plan)
    d = _maybe_adapter(rec, lt, d, "mlp_out", spec, plan, "mlp.fc2")
    out = rec.new(tok * h, x2.dtype, x2.rg or d.rg)
    if "block" in lt.adapters:  # seed 001's adapter on the layer's output (a forward hook of the layer)
        out = block_adapter(rec, out, h, resolve_bottleneck(spec, plan.settings), BLOCK_ADAPTER_DROPOUT)
    return out


BLOCKS = {
    "llama": llama_block,
    "mistral": llama_block,
    "qwen2": llama_block,
    "gpt2": gpt2_block,
    "bert": bert_block,
    "roberta": bert_block,
    "vit": vision_block,
    "clip_vision_model": vision_block,
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
    loss_saved: int  # what cross-entropy saves (log_softmax output)
    loss_backward_peak: int  # live loss buffers at the start of backward (saved + grads)
    loss_forward_peak: int  # live loss buffers while the loss is computed
    layer_transient: int  # gradient buffers alive inside one layer's backward
    forward_transient: int = 0  # intermediates alive inside one block's forward that nothing saves
    forward_transient_saved: int = 0  # block activations already saved when that working set peaks
    autocast_weight_cache: int = 0  # autocast's copies of trainable matmul weights, alive to the end of forward
    by_tag: tuple = ()

    @property
    def saved_total(self) -> int:
        return sum(self.per_layer) + self.pre + self.post


def check_memory_model(spec: ModelSpec) -> None:
    """BLIP-2 has parameter counts and the qformer method, not yet a memory, FLOPs or time model."""
    if spec.model_type in COUNTS_ONLY_FAMILIES:
        raise MemoryNotModelled(f"{spec.name} ({spec.architecture}): memory, time and cost are not modelled for "
                                f"{spec.model_type} yet; parameter counts only (peftcalc.api.plan_for)")


def make_ctx(spec: ModelSpec, plan: Plan, t: TrainingSettings) -> Ctx:
    check_memory_model(spec)
    seq = spec.vision_seq_len if spec.is_vision else t.seq_len
    kv_seq = seq
    method = plan.settings.method
    if method == "prompt":
        seq += plan.settings.num_virtual_tokens
        kv_seq = seq
    elif method == "prefix":
        kv_seq = seq + plan.settings.num_virtual_tokens
    weight = t.weight_dtype
    if method == "qlora":
        weight = t.compute_dtype  # non-quantized weights load in the compute dtype
    adapter = "float32"  # peft autocast_adapter_dtype=True keeps adapters in fp32
    return Ctx(
        batch=t.batch_size,
        seq=seq,
        kv_seq=kv_seq,
        compute=t.compute_dtype,
        weight=weight,
        autocast=t.autocast_dtype,
        adapter=adapter,
        device=t.device,
        attention=t.attention,
    )


@lru_cache(maxsize=4096)
def activation_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """Simulate one forward pass and return what stays saved for backward."""
    spec = plan.spec
    if spec.is_vlm:
        return _vlm_profile(plan, t)
    layout = build_layout(spec)
    ctx = make_ctx(spec, plan, t)
    rec = Recorder(ctx)
    h, tok = spec.hidden_size, ctx.tokens
    input_rg = plan.embedding_trains or plan.settings.method == "prompt"
    # The embedding output: token embeddings (+ positions) in the weight dtype.
    x = rec.new(tok * h, ctx.weight, input_rg)
    x = _embeddings(rec, spec, plan, layout, x)
    grads_reach_blocks = input_rg or plan.lowest_trainable_layer is not None or plan.settings.method == "prefix"
    if spec.model_type in ("llama", "mistral", "qwen2") and grads_reach_blocks:
        # LlamaRotaryEmbedding's cos and sin (1 x seq x head_dim, in the hidden states' dtype), shared
        # by every layer, saved by q * cos and rotate_half(q) * sin
        rec.save_new(2 * ctx.seq * spec.head_dim, ctx.weight, "rotary.cos_sin")
    per_layer = []
    tags: dict = {}
    blocks_seen: dict = {}
    for lt in _layer_trainings(plan, layout):
        # Blocks with the same trainable set and the same kind of input save the same tensors:
        # simulate each kind once (a 80-block model has two or three kinds).
        key = (lt, x.rg, x.dtype)
        if key not in blocks_seen:
            blocks_seen[key] = _simulate_block(spec, plan, lt, ctx, x.rg, x.dtype)
        saved, block_tags, out_rg, out_dtype = blocks_seen[key]
        per_layer.append(saved)
        for tag, nbytes in block_tags:
            tags[tag] = tags.get(tag, 0) + nbytes
        x = rec.new(x.numel, out_dtype, out_rg)
    rec.bucket = "post"
    logits_numel, x = _head(rec, spec, plan, layout, x)
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
        loss_saved=loss[0],
        loss_backward_peak=loss[1],
        loss_forward_peak=loss[2],
        layer_transient=_layer_transient(spec, ctx),
        forward_transient=_forward_transient(spec, plan, ctx, per_layer),
        forward_transient_saved=_saved_before_last_light_block(per_layer),
        autocast_weight_cache=_autocast_weight_cache(plan, ctx),
        by_tag=tuple(sorted(tags.items())),
    )


def _simulate_block(spec: ModelSpec, plan: Plan, lt: LayerTraining, ctx: Ctx, input_rg: bool, input_dtype: str):
    """One block's saved bytes, by tag, and its output's requires-grad and dtype."""
    rec = Recorder(ctx, bucket=0)
    x = rec.new(ctx.tokens * spec.hidden_size, input_dtype, input_rg)
    out = BLOCKS[spec.model_type](rec, spec, plan, lt, x)
    return sum(b for _, _, b in rec.saved.values()), tuple(rec.bytes_by_tag().items()), out.rg, out.dtype


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
    A classifier on the first token takes x[:, 0], a view: saving it keeps the whole storage."""
    ctx = rec.ctx
    h, tok, b = spec.hidden_size, ctx.tokens, ctx.batch
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
        d = linear(rec, x, h, h, _trains(plan, dense, True), "mlm.dense")
        d = activation(rec, d, "gelu", "mlm.act")
        d = layer_norm(rec, d, _trains(plan, norm), h, "mlm.layer_norm")
        decoder = _trains(plan, f"{c}.decoder", True) or (layout.head_tied_to_embedding and plan.embedding_trains)
        linear(rec, d, h, spec.vocab_size, decoder, "mlm.decoder")
        return tok * spec.vocab_size, x
    if spec.task == "seq_cls" and spec.is_decoder:  # score on every position, then gather the last
        linear(rec, x, h, spec.num_labels, _trains(plan, "score", True), "score")
        return b * spec.num_labels, x
    p = dropout_p(spec, "resid")
    if spec.task == "seq_cls" and spec.model_type == "bert":  # BertPooler, dropout, classifier
        pooled = _first_token_linear(rec, x, b, h, h, _trains(plan, "bert.pooler.dense", True), "pooler.dense")
        pooled = _tanh(rec, pooled, "pooler.tanh")
        pooled = dropout(rec, pooled, p, "classifier.dropout")
        linear(rec, pooled, h, spec.num_labels, _trains(plan, "classifier", True), "classifier")
        return b * spec.num_labels, x
    if spec.task == "seq_cls":  # RobertaClassificationHead: dropout, dense, tanh, dropout, out_proj
        d = dropout(rec, rec.new(b * h, x.dtype, x.rg), p, "classifier.dropout")
        d = linear(rec, d, h, h, _trains(plan, "classifier.dense", True), "classifier.dense")
        d = _tanh(rec, d, "classifier.tanh")
        d = dropout(rec, d, p, "classifier.dropout2")
        linear(rec, d, h, spec.num_labels, _trains(plan, "classifier.out_proj", True), "classifier.out_proj")
        return b * spec.num_labels, x
    if spec.task == "image_cls":  # classifier(sequence_output[:, 0, :])
        _first_token_linear(rec, x, b, h, spec.num_labels, _trains(plan, "classifier", True), "classifier")
        return b * spec.num_labels, x
    # A bare encoder is trained here on last_hidden_state.float().pow(2).mean() (measure.run
    # forward_loss): pow saves its fp32 input.
    if x.rg:
        rec.save(cast(rec, x, "float32"), "loss.pow_input")
    return 0, x


def _first_token_linear(rec: Recorder, x: T, batch: int, in_f: int, out_f: int, trainable: bool, tag: str) -> T:
    """A Linear on x[:, 0]: the weight's gradient needs the view, which keeps x's whole storage
    (under autocast the cast copy of the view is saved instead)."""
    if trainable:
        if rec.ctx.autocast:
            rec.save_new(batch * in_f, rec.ctx.autocast, f"{tag}.input")
        else:
            rec.save(x, f"{tag}.input")
    if rec.ctx.autocast and x.rg:
        rec.save_new(in_f * out_f, rec.ctx.autocast, f"{tag}.autocast_weight")
    return rec.new(batch * out_f, rec.ctx.autocast or x.dtype, x.rg or trainable)


def _tanh(rec: Recorder, x: T, tag: str) -> T:
    """tanh saves its output."""
    out = rec.new(x.numel, x.dtype, x.rg)
    if x.rg:
        rec.save(out, f"{tag}.output")
    return out


def _loss_buffers(spec: ModelSpec, ctx: Ctx, logits_numel: int) -> tuple[int, int, int]:
    """(saved, backward-start peak, forward peak) bytes of the loss.

    Causal LM (transformers loss_utils.ForCausalLMLoss): logits.float() (a copy unless already fp32),
    cross_entropy = log_softmax (saves its fp32 output) + nll_loss. At the start of backward,
    nll_loss_backward materialises a dense fp32 gradient and log_softmax_backward a second one, while
    the saved output is still alive: 3 x 4 bytes per logit. The model's own logits in the compute
    dtype are alive during the forward loss computation.
    Masked LM (BertForMaskedLM: CrossEntropyLoss on the logits as they are): the same without upcast.
    """
    if not logits_numel:
        return 0, 0, 0
    logit_dtype = ctx.autocast or ctx.compute
    if spec.task == "causal_lm":
        loss_dtype = "float32"
    else:
        loss_dtype = "float32" if ctx.autocast else logit_dtype  # autocast runs log_softmax in fp32
    lb = DTYPE_BYTES[loss_dtype]
    saved = logits_numel * lb
    if spec.task == "causal_lm":  # shift_labels = labels[..., 1:].contiguous(), saved by nll_loss
        saved += ctx.tokens * 8
    backward_peak = 3 * logits_numel * lb
    upcast_copy = logits_numel * lb if logit_dtype != loss_dtype else 0
    forward_peak = logits_numel * DTYPE_BYTES[logit_dtype] + upcast_copy + saved
    return saved, backward_peak, forward_peak


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
    matmul weights are alive at the end of the forward even where checkpointing saves none of them."""
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
        saved, tags, x_rg_next, x_dtype_next = _simulate_block(vspec, vplan, lt, ctx, x_rg, x_dtype)
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
    if t.grad_checkpointing:  # enable_input_require_grads makes embed_tokens' output a leaf that needs a
        # gradient (see _vision_input_grad_saves): the graph holds it to the end of backward
        rec.save_new(ctx.tokens * h, ctx.weight, "embed_tokens.output")
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
