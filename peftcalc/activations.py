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

One record serves every timeline (Recorder): each op also allocates its outputs and frees what the
modeling code drops (a block's forward peak), and records the autograd node it creates with its
backward formula's allocations (peftcalc.backward.Node). peftcalc.backward replays those nodes for a
block's backward without checkpointing, and with it (the recompute of the block's forward, stopped at
its last save, then the backward on the recomputed tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from peftcalc.backward import GRAD, BackwardPeak, Node, run_backward, run_backward_both
from peftcalc.checkpointing import checkpointed_layers
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
    """A symbolic tensor; a view has the tensor whose storage it shares as its base."""

    numel: int
    dtype: str
    rg: bool
    id: int
    base: "T | None" = None
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
    """What the ops of a forward record: the saved tensors, each once, by bucket (a layer index, 'pre',
    'post'); the autograd nodes they create (peftcalc.backward.Node), in creation order; and the
    forward's live bytes: every op output is allocated when it is made and freed when the modeling code
    drops its last reference (free), unless autograd saved it. `forward_peak` is the largest saved + live
    sum (`forward_peak_saved` what of it is saved); `recompute_peak` that largest sum up to the last
    save (torch.utils.checkpoint's non-reentrant recompute stops when the last saved tensor is packed:
    ``_recomputation_hook.pack_hook`` raises ``_StopRecomputationError`` with ``early_stop=True``;
    autograd packs an op's inputs before the op runs and its outputs after, as the generated
    VariableType code does, and the ops record them in that order), `recompute_peak_saved` what of it
    the recompute saves into the checkpoint's frame by the time it stops: the tensors live at its peak
    that are saved then or later (a storage's category is what it becomes, as the harness's tracer
    decides it: an op's output is saved a moment after it is made)."""

    ctx: Ctx
    bucket: object = "pre"
    saved: dict = field(default_factory=dict)  # id -> (bucket, tag, bytes)
    next_id: int = 0
    nodes: list = field(default_factory=list)  # each a Node's fields as a plain tuple
    live: dict = field(default_factory=dict)  # id -> bytes of the unsaved tensors the forward still holds
    live_bytes: int = 0
    saved_total: int = 0
    forward_peak: int = 0
    forward_peak_saved: int = 0
    forward_peak_id: int = 0  # the newest tensor at the forward's peak
    recompute_peak: int = 0
    recompute_peak_saved: int = 0
    cached: list = field(default_factory=list)  # autocast's cached copies of trainable weights (see _weight_copy)
    # leaves that require grad besides the parameters (a reentrant checkpoint's detached input): id -> the
    # autocast cast autocast caches of it (None until made; see autocast_in), which no free() releases
    leaf_casts: dict = field(default_factory=dict)

    def new(self, numel: int, dtype: str, rg: bool) -> T:
        """A new tensor (an allocation of the forward)."""
        self.next_id += 1
        t = T(numel, dtype, rg, self.next_id)
        self.live[t.id] = t.nbytes
        self.live_bytes += t.nbytes
        if self.saved_total + self.live_bytes > self.forward_peak:
            self.forward_peak, self.forward_peak_saved = self.saved_total + self.live_bytes, self.saved_total
            self.forward_peak_id = t.id
        return t

    def free(self, *ts: T) -> None:
        """The forward drops its reference to each tensor: an unsaved one is freed (views and
        tensors already freed or saved are left as they are)."""
        for t in ts:
            if t is not None and t.base is None and t.id in self.live:
                if self.leaf_casts and t.id in self._cached_casts():
                    continue
                self.live_bytes -= self.live.pop(t.id)

    def _cached_casts(self) -> set:
        return {c.id for c in self.leaf_casts.values() if c is not None}

    def view(self, x: T, numel: int) -> T:
        """A view of x (same storage, its own shape and autograd node)."""
        self.next_id += 1
        return T(numel, x.dtype, x.rg, self.next_id, x.base or x)

    def save(self, t: T, tag: str) -> int:
        """Save t for backward, counted once per storage (a view saves its base's whole storage). A
        tensor that was alive at the forward's peak (still alive now, and made no later than the peak)
        counts among the peak's saved bytes: the harness's tracer (measure/tracer.py) gives a storage
        its category as finally decided, so a tensor autograd saves after the peak is an activation
        there too (peft DoRA's cast input, made before the weight norm and saved by lora_A after it)."""
        t = t.base or t
        if t.id not in self.saved:
            self.saved[t.id] = (self.bucket, tag, t.nbytes)
            self.saved_total += t.nbytes
            if t.id in self.live:  # held by autograd from now on
                self.live_bytes -= self.live.pop(t.id)
                if t.id <= self.forward_peak_id:
                    self.forward_peak_saved += t.nbytes
        self._recompute_stops_here()
        return t.id

    def _recompute_stops_here(self) -> None:
        """A save: a recompute runs at least this far, so its peak is the forward's so far."""
        self.recompute_peak = self.forward_peak
        self.recompute_peak_saved = self.forward_peak_saved  # tensors alive at it and saved since included

    def save_new(self, numel: int, dtype: str, tag: str) -> int:
        return self.save(self.new(numel, dtype, False), tag)

    def release(self, *ts: T) -> None:
        """Autograd frees what a graph saved once nothing references the graph: a graph whose output
        is only used detached (peft DoRA's lora_weight, see _dora_weight_norm) dies with its last
        reference, and its saved tensors with it. Each of `ts` is dropped from the saved tensors."""
        for t in ts:
            entry = self.saved.pop((t.base or t).id, None)
            if entry is not None:
                self.saved_total -= entry[2]

    def save_param(self) -> None:
        """A parameter saved for backward: no activation bytes, but a recompute stops only after it."""
        self._recompute_stops_here()

    def node(self, out: T, steps=(), outputs=(), saved=(), hold: int = 0, saves_param: bool = False) -> None:
        """The autograd node that made `out` (none when `out` needs no gradient): its backward
        formula's allocations, the gradients it hands on and the saved tensors it holds (and whether it
        holds a parameter too: it unpacks saved variables either way)."""
        if out.rg:  # a Node's fields as a plain tuple (see Node)
            self.nodes.append((out.id, tuple(steps), tuple(outputs), tuple(saved), hold, bool(saved) or saves_param))

    def saved_bytes(self) -> dict:
        return {tid: nbytes for tid, (_b, _t, nbytes) in self.saved.items()}

    def saved_cached_copies(self) -> int:
        """Bytes of autocast's cached weight copies that are also saved (one tensor, counted once)."""
        return sum(t.nbytes for t in self.cached if t.id in self.saved)

    def unsaved_cached_copies(self) -> int:
        """Bytes of autocast's cached weight copies no op saved: alive in the cache to the end of the forward."""
        return sum(t.nbytes for t in self.cached if t.id not in self.saved)

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
# Each op mirrors the forward of one torch function: it saves what its derivative formula needs and
# records the autograd node(s) it creates, whose backward allocations follow the formulas of torch's
# tools/autograd/derivatives.yaml (peftcalc.backward replays them).


def _grads(*inputs: T) -> tuple[list, list]:
    """A formula that allocates one new gradient, like its input, for each input that needs one:
    (steps, outputs) for Recorder.node."""
    steps, outputs = [], []
    for i, t in enumerate(inputs):
        if t is not None and t.rg:
            steps.append(("new", f"d{i}", t.nbytes))
            outputs.append((t.id, f"d{i}"))
    return steps, outputs


def add(rec: Recorder, a: T, b: T, dtype: str | None = None) -> T:
    """a + b (the residual stream, LoRA's result + delta): AddBackward hands the incoming gradient to
    both inputs as it is; where an input has another dtype (type promotion), the engine casts it
    (validate_outputs: a new gradient in the input's dtype)."""
    out = rec.new(max(a.numel, b.numel), dtype or _promote(a.dtype, b.dtype), a.rg or b.rg)
    steps, outputs = [], []
    for i, t in enumerate((a, b)):
        if not t.rg:
            continue
        if t.dtype == out.dtype:
            outputs.append((t.id, GRAD))
        else:
            steps.append(("new", f"c{i}", t.nbytes))
            outputs.append((t.id, f"c{i}"))
    rec.node(out, steps, outputs)
    return out


def cast(rec: Recorder, x: T, dtype: str) -> T:
    """Tensor.to(dtype): a no-op returning the same tensor when the dtype already matches; else a
    copy whose backward (ToCopyBackward) casts the gradient back: a new gradient like x."""
    if x.dtype == dtype:
        return x
    y = rec.new(x.numel, dtype, x.rg)
    rec.node(y, *_grads(x))
    return y


def autocast_in(rec: Recorder, x: T) -> T:
    """torch.autocast casts the inputs of matmul-like ops to the autocast dtype. The cast of a leaf that
    requires grad (and is no view) is cached until the autocast region exits (aten/src/ATen/
    autocast_mode.cpp cached_cast, as for the weights: _weight_copy), so every op casting it shares one
    copy; besides the parameters such a leaf is a reentrant checkpoint's detached input (Recorder.leaf_casts)."""
    if not rec.ctx.autocast:
        return x
    if x.id in rec.leaf_casts:
        if rec.leaf_casts[x.id] is None:
            rec.leaf_casts[x.id] = cast(rec, x, rec.ctx.autocast)
        return rec.leaf_casts[x.id]
    return cast(rec, x, rec.ctx.autocast)


def _weight_copy(rec: Recorder, numel: int, trains: bool, param_dtype: str | None = None,
                 grad_pending: bool = False) -> T:
    """autocast's lower-precision copy of a weight. The cast of a leaf that requires grad is cached until
    the autocast region exits (torch aten/src/ATen/autocast_mode.cpp cached_cast): alive to the end of
    the forward (Recorder.cached). When the weight trains, its gradient comes back in the autocast dtype
    and ToCopyBackward makes the .grad (in `param_dtype`, the weights' by default) from it; with
    `grad_pending`, the weight's gradient waits for another use's (see linear)."""
    w = rec.new(numel, rec.ctx.autocast, trains)
    if trains:
        rec.node(w, [("pending" if grad_pending else "param", numel * DTYPE_BYTES[param_dtype or rec.ctx.weight])])
        rec.cached.append(w)
    return w


def matmul(rec: Recorder, x: T, in_f: int, out_f: int, weight_trains: bool, out_dtype: str, saved: list,
           weight: T | None = None, weight_bytes: int = 0, bias_bytes: int = 0, dequantized: int = 0,
           grad_pending: bool = False, bias_copy: T | None = None) -> T:
    """The mm/addmm node of a Linear on x (tokens x in): its backward makes grad_x = grad @ W when x
    needs a gradient, grad_W = grad^T @ x when the weight trains (the .grad itself, or the gradient of
    autocast's weight copy `weight`), and the bias gradient (a sum over tokens). Without a copy, the
    weight a gradient of x needs is the parameter itself (saved, no activation bytes). bitsandbytes
    MatMul4Bit's forward dequantizes the weight (`dequantized` bytes) for F.linear on CUDA; the CPU
    backend runs a fused gemm_4bit (traced); both backwards dequantize it again to compute grad_x (the
    packed weight is in ctx.tensors, not save_for_backward)."""
    ctx = rec.ctx
    tokens = x.numel // in_f
    qdtype = ctx.quant_compute or ctx.compute
    saves_weight = x.rg and weight is None and not dequantized
    if saves_weight:
        rec.save_param()
    w = rec.new(dequantized // DTYPE_BYTES[qdtype], qdtype, False) if dequantized and ctx.device == "cuda" else None
    out = rec.new(tokens * out_f, out_dtype, x.rg or weight_trains or bias_bytes > 0)
    rec.free(w)
    steps, outputs = [], []
    if dequantized and x.rg:
        steps += matmul_4bit_backward_steps(ctx, in_f, out_f)
    s, o = _grads(x)
    steps += s
    outputs += o
    if dequantized and x.rg:
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


def scale(rec: Recorder, x: T) -> T:
    """x * a Python number: MulBackward saves nothing and makes a new gradient (grad * scalar)."""
    y = rec.new(x.numel, x.dtype, x.rg)
    rec.node(y, *_grads(x))
    return y


def clone(rec: Recorder, x: T) -> T:
    """Tensor.clone(): a copy; CloneBackward hands the incoming gradient on."""
    y = rec.new(x.numel, x.dtype, x.rg)
    rec.node(y, outputs=[(x.id, GRAD)] if x.rg else [])
    return y


def matmul_4bit_backward_steps(ctx: Ctx, in_f: int, out_f: int) -> list:
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


def linear(rec: Recorder, x: T, in_f: int, out_f: int, trainable: bool, tag: str,
           lora_rank: int = 0, dora: bool = False, ia3: str = "", quantized: bool = False,
           bias: bool = False, bias_trains: bool = False, grad_pending: bool = False) -> T:
    """nn.Linear / Conv1D (addmm): saves the input when the weight trains (grad_W = grad^T x) and the
    weight when the input needs a gradient. Under autocast the weight is cast to the autocast dtype
    (a copy made for every matmul; kept to the end of the forward when the weight trains, see
    _weight_copy), and that copy is what is saved; so is the bias (autocast_mode.cpp casts every
    floating argument of linear/addmm: a frozen bias's copy lives until the matmul has returned). bitsandbytes Linear4bit.forward (nn/modules.py) casts
    the input to bnb_4bit_compute_dtype and returns ``.to(inp_dtype)``. peft LoRA (tuners/lora/layer.py
    Linear.forward; lora/bnb.py Linear4bit.forward for a 4-bit base) adds
    lora_B(lora_A(x.to(lora_A.weight.dtype))) * scaling: the cast input and A's output are saved (see
    _lora); peft IA3 (tuners/ia3/layer.py Linear.forward) scales the input (feedforward) or the output.
    The feedforward scaling runs before peft calls the base layer, so autocast's weight copy (made inside
    the base layer's F.linear) comes after the scaling's fp32 product is freed (traced: fake tiny-vit-cls
    ia3 amp-bf16 b3 s48, tests/peftcalc/test_memory.py).
    grad_pending: the weight is used again below (a head tied to the input embedding), so its gradient
    is no .grad until the other use's arrives (peftcalc.backward: a "pending" step)."""
    ctx = rec.ctx
    saved = []
    xm = x
    if ia3 == "ff":
        xm = _ia3_input(rec, x, in_f, tag)
    # under autocast the bias's copy is made before the weight's (traced, cpu and fake: a recompute that
    # stops at fc2's saved weight copy holds the frozen bias's copy already)
    bias_copy = None
    trained_bias_copy = None
    if ctx.autocast and bias_trains:  # addmm's bias copy, kept in autocast's cache (a trainable leaf): its
        # gradient (addmm's, summed down to the bias's shape) comes back in the autocast dtype and its
        # ToCopyBackward makes the .grad
        trained_bias_copy = rec.new(out_f, ctx.autocast, True)
        rec.node(trained_bias_copy, [("param", out_f * DTYPE_BYTES[ctx.weight])])
    elif ctx.autocast and bias and not quantized:  # a frozen bias's copy, alive until the matmul returns
        bias_copy = rec.new(out_f, ctx.autocast, False)
    weight_copy = None
    if ctx.autocast and not quantized:
        weight_copy = _weight_copy(rec, in_f * out_f, trainable, grad_pending=grad_pending)
        if xm.rg:
            saved.append(rec.save(weight_copy, f"{tag}.autocast_weight"))
    # bitsandbytes Linear4bit.forward: x.to(compute_dtype) (not autocast's cast: bnb.matmul_4bit is no
    # autocast op), then .to(inp_dtype); the cast input is its local x until it returns
    quant_cast = quantized and ctx.quant_compute and xm.dtype != ctx.quant_compute
    xin = cast(rec, xm, ctx.quant_compute) if quant_cast else autocast_in(rec, xm)
    if trainable:
        saved.append(rec.save(xin, f"{tag}.input"))
    wb = DTYPE_BYTES[ctx.weight]
    out = matmul(rec, xin, in_f, out_f, trainable, ctx.quant_compute if quantized else ctx.autocast or ctx.compute,
                 saved, weight=weight_copy, weight_bytes=in_f * out_f * wb, bias_bytes=out_f * wb if bias_trains else 0,
                 bias_copy=trained_bias_copy,
                 dequantized=in_f * out_f * DTYPE_BYTES[ctx.quant_compute] if quantized else 0,
                 grad_pending=grad_pending)
    if quant_cast:  # Linear4bit.forward: .to(inp_dtype)
        y = cast(rec, out, xm.dtype)
        rec.free(out)
        out = y
    rec.free(bias_copy)
    if xin is not xm:
        rec.free(xin)
    if xm is not x:  # IA3's scaled input (peft's `interm`) goes when the layer returns
        rec.free(xm)
    if weight_copy is not None and not trainable:  # autocast caches only the copies of trainable leaves
        rec.free(weight_copy)
    if lora_rank:
        out = _lora(rec, x, out, in_f, out_f, lora_rank, dora, bias, tag, quantized)
    if ia3 == "out":  # IA3 on keys/values: (base_layer(x) * scaling).to(result dtype)
        s = _ia3_vector(rec, out_f)
        saved = [rec.save(out, f"{tag}.ia3_out")]
        if out.rg:  # the scaling vector is saved for the base result's gradient only
            saved.append(rec.save(s, f"{tag}.ia3_scaling"))
        y = rec.new(out.numel, _promote(out.dtype, s.dtype), True)
        _mul_node(rec, y, out, s, saved)
        rec.free(out, s)
        out = cast(rec, y, out.dtype)
        if out is not y:
            rec.free(y)
    return out


def _promote(a: str, b: str) -> str:
    """torch's type promotion between two floating dtypes: the wider one (fp32 over bf16/fp16)."""
    return a if DTYPE_BYTES[a] >= DTYPE_BYTES[b] else b


def _mul_node(rec: Recorder, out: T, a: T, b: T, saved: list) -> None:
    """MulBackward0 of out = a * b: grad_a = grad * b, grad_b = grad * a (derivatives.yaml
    mul_tensor_backward), each the size of the output; where an input was broadcast, the engine sums
    its gradient down to its shape after the formula has returned (torch/csrc/autograd/engine.cpp
    call_function: validate_outputs, InputMetadata::reduce_grad; peftcalc.backward's "returned")."""
    steps, outputs, reductions = [], [], []
    for i, t in enumerate((a, b)):
        if not t.rg:
            continue
        if t.numel == out.numel:
            steps.append(("new", f"d{i}", t.nbytes))
        else:
            steps.append(("new", f"t{i}", out.nbytes))
            reductions += [("new", f"d{i}", t.nbytes), ("free", f"t{i}")]
        outputs.append((t.id, f"d{i}"))
    rec.node(out, steps + ([("returned",)] + reductions if reductions else []), outputs, saved)


def _ia3_vector(rec: Recorder, n: int) -> T:
    """peft IA3: ia3_scaling = 1 * ia3_l.flatten(), a new adapter-dtype vector whose gradient
    (grad * 1) becomes the parameter's .grad."""
    s = rec.new(n, rec.ctx.adapter, True)
    rec.node(s, [("param", n * DTYPE_BYTES[rec.ctx.adapter])])
    return s


def _ia3_input(rec: Recorder, x: T, in_f: int, tag: str) -> T:
    """peft IA3 Linear.forward, feedforward: (x.to(ia3 dtype) * scaling).to(x dtype), then the frozen
    linear; the mul saves the cast input and the scaling vector (1 * ia3_l.flatten())."""
    s = _ia3_vector(rec, in_f)
    xc = cast(rec, x, rec.ctx.adapter)
    saved = [rec.save(xc, f"{tag}.ia3_input")]
    if xc.rg:  # the scaling vector is saved for the input's gradient only
        saved.append(rec.save(s, f"{tag}.ia3_scaling"))
    y = rec.new(x.numel, rec.ctx.adapter, True)
    _mul_node(rec, y, xc, s, saved)
    rec.free(s)
    out = cast(rec, y, x.dtype)
    if out is not y:
        rec.free(y)
    if xc is not x:
        rec.free(xc)
    return out


def _lora(rec: Recorder, x: T, base: T, in_f: int, out_f: int, rank: int, dora: bool, bias: bool, tag: str,
          quantized: bool = False) -> T:
    """peft tuners/lora/layer.py Linear.forward: result + lora_B(lora_A(x.to(lora_A.weight.dtype))) *
    scaling, then .to(the base result's dtype); with DoRA (variants.py DoraLinearVariant.forward) the
    delta is DoraLinearLayer.forward's, whose weight norm (_dora_weight_norm) comes before the LoRA
    product and whose locals go when it returns, before ``result + ...``. On a 4-bit base
    (lora/bnb.py Linear4bit.forward) the base result is cloned first ("defensively clone"), and unless
    torch.is_autocast_enabled() (CUDA's autocast: a CPU autocast region reads False) the input is cast
    to the adapter's dtype and the delta back to the result's before the sum."""
    ctx = rec.ctx
    tokens_in = x.numel // in_f
    convert = True
    if quantized:
        result = clone(rec, base)
        rec.free(base)
        base = result
        convert = not (ctx.autocast and ctx.device == "cuda")
    xc = cast(rec, x, ctx.adapter) if convert else x  # peft _cast_input_dtype: the local x until the layer returns
    norm = _dora_weight_norm(rec, in_f, out_f, rank, xc.dtype, tag) if dora else None
    if norm is not None:
        a_copy, b_copy = norm.a_copy, norm.b_copy
    else:
        a_copy = _weight_copy(rec, in_f * rank, True, ctx.adapter) if ctx.autocast else None
    xa = autocast_in(rec, xc)
    saved_a = [rec.save(xa, f"{tag}.lora_input")]
    if a_copy is not None and x.rg:
        saved_a.append(rec.save(a_copy, f"{tag}.lora_autocast_weights"))
    ab = DTYPE_BYTES[ctx.adapter]
    a = matmul(rec, xa, in_f, rank, True, ctx.autocast or ctx.adapter, saved_a, weight=a_copy,
               weight_bytes=in_f * rank * ab)
    if xa is not xc:
        rec.free(xa)
    if norm is None:
        b_copy = _weight_copy(rec, out_f * rank, True, ctx.adapter) if ctx.autocast else None
    saved_b = [rec.save(a, f"{tag}.lora_A_out")]
    if b_copy is not None:
        saved_b.append(rec.save(b_copy, f"{tag}.lora_autocast_weights"))
    lb = matmul(rec, a, rank, out_f, True, ctx.autocast or ctx.adapter, saved_b, weight=b_copy,
                weight_bytes=out_f * rank * ab)
    rec.free(a)
    if norm is not None:
        delta = _dora(rec, base, lb, norm.norm, out_f, tokens_in, bias, tag)
        rec.release(*norm.graph_saved)  # DoraLinearLayer.forward returns: lora_weight and its graph go
        rec.free(*norm.graph_saved, *norm.held)
    else:
        delta = scale(rec, lb)
    rec.free(lb)
    if quantized:  # output.to(expected_dtype), then result + output
        if convert and delta.dtype != base.dtype:
            d = cast(rec, delta, base.dtype)
            rec.free(delta)
            delta = d
        out = add(rec, base, delta, base.dtype)
        rec.free(delta, base)
    else:
        total = add(rec, base, delta, _promote(base.dtype, delta.dtype))
        rec.free(delta, base)
        out = cast(rec, total, base.dtype)  # result.to(torch_result_dtype)
        if out is not total:
            rec.free(total)
    if xc is not x:
        rec.free(xc)
    return out


@dataclass(frozen=True)
class DoraWeightNorm:
    """What _dora_weight_norm leaves for the rest of DoraLinearLayer.forward: the detached column norms,
    autocast's cached copies of lora_A/lora_B's weights (made here first, reused by lora_B(lora_A(x))),
    the tensors the lora_weight graph saved (released when the layer returns) and the other locals the
    forward references until it returns."""

    norm: T
    a_copy: T | None
    b_copy: T | None
    graph_saved: tuple
    held: tuple


def _dora_weight_norm(rec: Recorder, in_f: int, out_f: int, rank: int, x_dtype: str, tag: str) -> DoraWeightNorm:
    """The forward-only part of peft tuners/lora/dora.py DoraLinearLayer.forward, before the LoRA
    product. get_lora_weight: ``x_eye = torch.eye(in, dtype=lora_A.weight.dtype)``;
    ``lora_B(lora_A(x_eye)).T``, under grad mode: lora_A's mm saves its input (A's weight trains) and
    lora_B's saves A's output, in a graph whose output forward only uses detached, so it lives (with
    what it saved) until lora_weight goes when the layer returns. Under torch.autocast both Linears run
    in the autocast dtype (autocast_mode.cpp cached_cast: the cached copies of the adapter weights, the
    identity cast to a copy that is what the mm saves; x_eye itself goes when get_lora_weight returns).
    ``lora_weight.to(x.dtype)`` (x: the input cast to lora_A.weight.dtype) copies an autocast result
    (the lower-precision product goes), ``weight.to(x.dtype)`` the base weight where its dtype differs.
    get_weight_norm: ``weight + scaling * lora_weight`` (out x in each, the product a temporary) and
    ``torch.linalg.norm(weight, dim=1)``, in x's dtype."""
    ctx = rec.ctx
    low = ctx.autocast or ctx.adapter
    eye = rec.new(in_f * in_f, ctx.adapter, False)
    a_copy = _weight_copy(rec, in_f * rank, True, ctx.adapter) if ctx.autocast else None
    eye_in = rec.new(in_f * in_f, low, False) if low != eye.dtype else eye
    graph_saved = [eye_in]
    rec.save(eye_in, f"{tag}.dora_lora_weight_graph")
    a_eye = rec.new(in_f * rank, low, False)
    graph_saved.append(a_eye)
    b_copy = _weight_copy(rec, out_f * rank, True, ctx.adapter) if ctx.autocast else None
    rec.save(a_eye, f"{tag}.dora_lora_weight_graph")
    product = rec.new(in_f * out_f, low, False)
    if eye_in is not eye:
        rec.free(eye)  # get_lora_weight returns
    lora_weight = rec.new(in_f * out_f, x_dtype, False) if x_dtype != low else product
    if lora_weight is not product:
        rec.free(product)
    weight = rec.new(in_f * out_f, x_dtype, False) if ctx.weight != x_dtype else None
    scaled = rec.new(in_f * out_f, x_dtype, False)
    summed = rec.new(in_f * out_f, x_dtype, False)
    rec.free(scaled)
    norm = rec.new(out_f, x_dtype, False)
    rec.free(summed)
    held = tuple(t for t in (lora_weight, weight) if t is not None)
    return DoraWeightNorm(norm, a_copy, b_copy, tuple(graph_saved), held)


def _dora(rec: Recorder, base: T, lora_out: T, wn: T, out_f: int, tokens: int, bias: bool, tag: str) -> T:
    """peft tuners/lora/dora.py DoraLinearLayer.forward: (m/||W+BA|| - 1) * base_result +
    m/||W+BA|| * lora_B(lora_A(x)) * scaling: the muls save the base result (compute dtype), the LoRA
    result, and the vectors ||W+BA|| (`wn`, detached, saved by m/||.||) and m/||.||; m/||.|| - 1 only
    when the base result needs a gradient (x does: the base weight is frozen). base_result - bias when
    the layer has one (under autocast that promotes to fp32)."""
    ctx = rec.ctx
    vec = ctx.adapter
    rec.save(wn, f"{tag}.dora_scale")  # ||W + s BA||, detached
    mns = rec.new(out_f, vec, True)  # magnitude / weight_norm: DivBackward saves the norm
    rec.node(mns, [("param", out_f * DTYPE_BYTES[vec])], saved=[wn.id])
    br = base
    if bias:  # base_result - bias: a new tensor, in fp32 under autocast (the bias is the weight's dtype)
        br = rec.new(base.numel, _promote(base.dtype, ctx.weight), base.rg)
        if br.dtype == base.dtype:  # SubBackward hands the gradient on
            rec.node(br, outputs=[(base.id, GRAD)] if base.rg else [])
        else:  # the engine casts it back to the base result's dtype
            rec.node(br, *_grads(base))
    m1 = rec.new(out_f, vec, True)  # mag_norm_scale - 1: SubBackward hands the gradient on
    rec.node(m1, outputs=[(mns.id, GRAD)])
    saved1 = [rec.save(br, f"{tag}.dora_base_out")]  # for (m - 1)'s gradient
    if br.rg:
        saved1.append(rec.save(m1, f"{tag}.dora_scale"))
    p1 = rec.new(tokens * out_f, _promote(vec, br.dtype), True)
    _mul_node(rec, p1, m1, br, saved1)
    rec.free(m1)
    if br is not base:
        rec.free(br)
    lr = lora_out
    saved2 = [rec.save(lr, f"{tag}.dora_lora_out"), rec.save(mns, f"{tag}.dora_scale")]
    p2 = rec.new(tokens * out_f, _promote(vec, lr.dtype), True)
    _mul_node(rec, p2, mns, lr, saved2)
    p3 = scale(rec, p2)
    rec.free(p2)
    out = add(rec, p1, p3, _promote(p1.dtype, p3.dtype))
    rec.free(p1, p3)
    return out


def rms_norm(rec: Recorder, x: T, weight_trainable: bool, tag: str) -> T:
    """LlamaRMSNorm.forward: x.to(fp32); variance = pow(2).mean; x * rsqrt(variance + eps); weight *
    _.to(input dtype). pow and the product save the fp32 input and the rsqrt; weight * y saves y when the
    weight trains, and the weight (a parameter) when y needs a gradient. The variance stays referenced
    until the norm returns. Backward: the weight product (grad * weight, and (grad * y).sum for the
    weight), the product's grad * rsqrt and (grad * x).sum, rsqrt's -0.5 grad r^3, mean's expanded
    grad / n, pow's grad * 2 x (x.pow(1) and 2 * _ as temporaries)."""
    ctx = rec.ctx
    hidden = x.numel // ctx.tokens if ctx.tokens else x.numel
    rows = x.numel // hidden
    x32 = cast(rec, x, "float32")
    full, small = x.numel * 4, rows * 4
    xs = rec.save(x32, f"{tag}.input_fp32") if x.rg else 0
    p = rec.new(x.numel, "float32", x.rg)  # x.pow(2)
    m = rec.new(rows, "float32", x.rg)  # .mean(-1, keepdim=True): grad.expand() / n
    rec.free(p)
    ve = rec.new(rows, "float32", x.rg)  # variance + eps: AddBackward hands the gradient on
    r = rec.new(rows, "float32", x.rg)  # rsqrt, saves its result
    rec.free(ve)
    h = rec.new(x.numel, "float32", x.rg)  # x * rsqrt
    if x.rg:
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
    normed = cast(rec, h, x.dtype)
    saved = []
    steps, outputs = [], []
    if normed.rg:
        rec.save_param()
        steps.append(("new", "d", normed.nbytes))
        outputs.append((normed.id, "d"))
    if weight_trainable:
        saved.append(rec.save(normed, f"{tag}.normalized"))
        steps += [("new", "t", normed.nbytes), ("param", hidden * DTYPE_BYTES[ctx.weight]), ("free", "t")]
    out = rec.new(x.numel, x.dtype, x.rg or weight_trainable)
    rec.node(out, steps, outputs, saved, saves_param=normed.rg)
    rec.free(normed, h, m)
    return out


def layer_norm_stats_dtype(ctx: Ctx, input_dtype: str) -> str:
    """The dtype of the mean and rstd native_layer_norm returns (and saves): fp32, except on the CPU
    with half input and weights alike (ATen/native/layer_norm.cpp layer_norm_cpu: mixed_type only when
    input and weight dtypes differ, else the input's dtype; traced: 2 x (4, 17, 1) bf16 for CLIP's
    pre_layrnorm on cpu tiny-llava bf16 b4 ckpt)."""
    half = ctx.device == "cpu" and input_dtype == ctx.weight and input_dtype != "float32"
    return input_dtype if half else "float32"


def layer_norm(rec: Recorder, x: T, trainable: bool, hidden: int, tag: str, params: int = 2) -> T:
    """nn.LayerNorm (native_layer_norm): saves the input (and the weight), mean and rstd when any
    gradient is needed; its backward makes the input's gradient and, when they train, the weight's and
    bias's. CUDA autocast runs layer_norm in fp32 (it is on the fp32 list of
    aten/src/ATen/autocast_mode.cpp: the cast copy is saved); CPU autocast does not list it, so it runs
    on the input as it is (a bf16 input is saved as it is, mean and rstd are fp32, the output keeps the
    input's dtype; traced, torch 2.13). `params`: how many of its weight and bias train (BitFit: the bias)."""
    needs = x.rg or trainable
    xin = cast(rec, x, "float32") if rec.ctx.autocast and rec.ctx.device == "cuda" else x
    saved = []
    if needs:
        saved.append(rec.save(xin, f"{tag}.input"))
        rec.save_param()
    out = rec.new(x.numel, xin.dtype, needs)
    # mean and rstd: fp32, except on the CPU with half input and weights alike, where native_layer_norm
    # returns them in the input's dtype (a half input with fp32 weights gets fp32 ones)
    stats = rec.new(2 * (x.numel // hidden), layer_norm_stats_dtype(rec.ctx, xin.dtype), False)
    if needs:
        saved.append(rec.save(stats, f"{tag}.mean_rstd"))
        steps, outputs = _grads(xin)
        if trainable:
            steps += [("param", hidden * DTYPE_BYTES[rec.ctx.weight])] * params
        rec.node(out, steps, outputs, saved)
    rec.free(stats)
    if xin is not x:
        rec.free(xin)
    return out


def dropout(rec: Recorder, x: T, p: float, tag: str) -> T:
    """F.dropout in training. p == 0 returns the input itself (ATen _dropout). On CUDA p > 0 runs
    native_dropout and saves a bool mask; on CPU (ATen _dropout_impl) an empty_like noise tensor of the
    input's dtype is filled and multiplied in, and the mul saves it (the backward is grad * noise)."""
    if p <= 0.0 or not rec.ctx.training_dropout:
        return x
    noise = rec.new(x.numel, "uint8" if rec.ctx.device == "cuda" else x.dtype, False)
    saved = [rec.save(noise, f"{tag}.dropout_mask")] if x.rg else []
    y = rec.new(x.numel, x.dtype, x.rg)
    if x.rg:
        rec.node(y, *_grads(x), saved=saved)
    rec.free(noise)
    return y


def activation(rec: Recorder, x: T, kind: str, tag: str) -> T:
    """The MLP activation. silu/gelu save their input (silu_backward / gelu_backward: one new
    gradient); gelu_new (NewGELUActivation, a Python formula) saves input, tanh output, 0.5*x and
    1+tanh; quick_gelu (x * sigmoid(1.702 x)) saves input and sigmoid output; relu saves its output
    (derivatives.yaml: threshold_backward(grad, result, 0))."""
    if not x.rg:
        return _activation_forward(rec, x, kind)
    if kind == "relu":
        y = rec.new(x.numel, x.dtype, True)
        rec.node(y, *_grads(x), saved=[rec.save(y, f"{tag}.output")])
        return y
    if kind == "gelu_new":
        return _gelu_new(rec, x, tag)
    if kind == "quick_gelu":
        xs = rec.save(x, f"{tag}.input")
        z = scale(rec, x)  # 1.702 * x
        sg = rec.new(x.numel, x.dtype, True)
        sid = rec.save(sg, f"{tag}.sigmoid")
        rec.node(sg, *_grads(z), saved=[sid])  # sigmoid_backward(grad, output)
        rec.free(z)
        saved = [rec.save(x, f"{tag}.input"), rec.save(sg, f"{tag}.sigmoid")]  # x * sigmoid saves both
        y = rec.new(x.numel, x.dtype, True)
        _mul_node(rec, y, x, sg, saved)
        return y
    saved = [rec.save(x, f"{tag}.input")]
    y = rec.new(x.numel, x.dtype, True)
    rec.node(y, *_grads(x), saved=saved)
    return y


def _gelu_new(rec: Recorder, x: T, tag: str) -> T:
    """transformers NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))."""
    xs = rec.save(x, f"{tag}.input")
    half = scale(rec, x)  # 0.5 * x, evaluated first
    cube = rec.new(x.numel, x.dtype, True)  # pow(x, 3): grad * 3 x^2 (x.pow(2), 3 * _ temporaries)
    n = x.nbytes
    rec.node(cube, [("new", "t", n), ("new", "u", n), ("new", "d", n), ("free", "t"), ("free", "u")],
             [(x.id, "d")], [xs])
    c2 = scale(rec, cube)
    rec.free(cube)
    inner = add(rec, x, c2)
    rec.free(c2)
    c3 = scale(rec, inner)
    rec.free(inner)
    th = rec.new(x.numel, x.dtype, True)
    tid = rec.save(th, f"{tag}.tanh")
    rec.node(th, *_grads(c3), saved=[tid])  # tanh_backward(grad, output)
    rec.free(c3)
    one_plus = rec.new(x.numel, x.dtype, True)
    rec.node(one_plus, outputs=[(th.id, GRAD)])
    saved = [rec.save(half, f"{tag}.half_x"), rec.save(one_plus, f"{tag}.one_plus_tanh")]
    y = rec.new(x.numel, x.dtype, True)
    _mul_node(rec, y, half, one_plus, saved)
    return y


def _activation_forward(rec: Recorder, x: T, kind: str) -> T:
    """An activation on a tensor that needs no gradient: only its forward's intermediates (gelu_new:
    0.5 x, x^3, then each step of the formula; quick_gelu: 1.702 x and the sigmoid)."""
    if kind == "gelu_new":
        half = rec.new(x.numel, x.dtype, False)
        t = rec.new(x.numel, x.dtype, False)
        u = rec.new(x.numel, x.dtype, False)
        rec.free(t)
        rec.free(u)
        y = rec.new(x.numel, x.dtype, False)
        rec.free(half)
        return y
    if kind == "quick_gelu":
        z = rec.new(x.numel, x.dtype, False)
        sg = rec.new(x.numel, x.dtype, False)
        rec.free(z)
        y = rec.new(x.numel, x.dtype, False)
        rec.free(sg)
        return y
    return rec.new(x.numel, x.dtype, False)


def mul(rec: Recorder, a: T, b: T, tag: str) -> T:
    """a * b saves b when a needs a gradient and a when b does."""
    saved = []
    if b.rg:
        saved.append(rec.save(a, f"{tag}.a"))
    if a.rg:
        saved.append(rec.save(b, f"{tag}.b"))
    out = rec.new(max(a.numel, b.numel), a.dtype, a.rg or b.rg)
    _mul_node(rec, out, a, b, saved)
    return out


def heads_view(rec: Recorder, x: T, clone: bool) -> T:
    """x.view(b, s, heads, d).transpose(1, 2): a view; its backward reshapes the gradient back,
    which copies it (clone) when the gradient arrives laid out as (b, heads, s, d) - from the CPU math
    path, eager matmuls or RoPE - and not when a fused kernel returns it in the input's layout."""
    v = rec.view(x, x.numel)
    if clone:
        rec.node(v, *_grads(x))
    else:
        rec.node(v, outputs=[(x.id, GRAD)])
    return v


def rope(rec: Recorder, x: T) -> T:
    """transformers apply_rotary_pos_emb (modeling_llama.py): x * cos + rotate_half(x) * sin,
    rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]). The products save cos and sin (shared, counted
    once per model), nothing of x; they take the dtype of cos/sin (the hidden states') when wider (a
    bf16 projection under autocast with fp32 hidden states gives fp32 products). Backward: grad * sin
    (cast back to the cat's dtype by the engine when it was promoted); cat's gradient splits into
    views; neg's gradient; each slice's slice_backward (zeros like x, then a copy), summed; grad * cos."""
    n, half = x.nbytes, x.nbytes // 2
    dtype = _promote(x.dtype, rec.ctx.weight)

    def product_grad(src: T, prod: T) -> tuple:
        if prod.dtype == src.dtype:
            return _grads(src)
        return [("new", "t", prod.nbytes), ("new", "d", src.nbytes), ("free", "t")], [(src.id, "d")]

    m1 = rec.new(x.numel, dtype, x.rg)  # x * cos
    rec.node(m1, *product_grad(x, m1))
    x1 = rec.view(x, x.numel // 2)  # x[..., :d/2]
    rec.node(x1, [("new", "d", n)], [(x.id, "d")])
    x2 = rec.view(x, x.numel // 2)  # x[..., d/2:]
    rec.node(x2, [("new", "d", n)], [(x.id, "d")])
    ng = rec.new(x.numel // 2, x.dtype, x.rg)  # -x2
    rec.node(ng, [("new", "d", half)], [(x2.id, "d")])
    c = rec.new(x.numel, x.dtype, x.rg)  # cat: the gradient's two halves, views of it
    rec.node(c, outputs=[(ng.id, GRAD), (x1.id, GRAD)])
    rec.free(ng)
    m2 = rec.new(x.numel, dtype, x.rg)  # cat * sin
    rec.node(m2, *product_grad(c, m2))
    rec.free(c)
    out = add(rec, m1, m2)
    rec.free(m1, m2)
    return out


# Families whose eager attention runs softmax in fp32 (modeling_llama.py eager_attention_forward and
# the ViT/CLIP/OPT copies); GPT-2/BERT/RoBERTa and BLIP-2's own eager_attention_forward (Q-Former, vision
# tower) take the softmax in the scores' dtype.
FP32_SOFTMAX_FAMILIES = ("llama", "mistral", "qwen2", "vit", "clip_vision_model", "opt")


def attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, p_drop: float, tag: str, hold: int = 0,
              cross: bool = False, replaced: tuple = ()) -> T:
    """Scaled dot-product attention over heads.

    sdpa (torch.nn.functional.scaled_dot_product_attention): the fused kernels (flash/memory-efficient
    on CUDA, the flash kernel on CPU) save q, k, v, the output and a logsumexp (fp32, batch x heads x
    query length); their backward makes the three input gradients at once. eager (transformers
    eager_attention_forward): q @ k^T saves q and k (keys/values repeated to all heads for GQA by
    repeat_kv), softmax in fp32 saves its output, the cast to the compute dtype is saved by the matmul
    with v, and dropout (p > 0) saves its mask. `hold`: the node after which the CPU math path's
    incoming gradient is freed (traced: the query projection's) when bmm reads it without a reshape copy
    (_bmm_output_backward). `cross`: keys and values come from
    another sequence of ctx.kv_seq tokens (the BLIP-2 Q-Former's cross-attention to the image
    features), with no mask and no virtual tokens. `replaced`: what the modeling code drops when its
    key/value locals are rebound to the cache update's concatenations (prefix tuning only).
    """
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    explicit_mask = kv != s and not cross
    if not explicit_mask:
        return _attend(rec, spec, q, k, v, p_drop, tag, hold, False)
    # prefix tuning: the cache update concatenates the trainable past keys/values, and the causal
    # mask cannot be skipped, so transformers (sdpa_attention_forward: use_gqa_in_sdpa is False with a
    # mask) repeats keys/values to every head (repeat_kv, locals dropped when it returns) and SDPA saves
    # the float mask it builds
    kc, vc = _cache_keys(rec, k, b * kv * spec.kv_dim), _cache_keys(rec, v, b * kv * spec.kv_dim)
    rec.free(*replaced)
    kr, vr = _repeat_kv(rec, spec, kc), _repeat_kv(rec, spec, vc)
    cpu_math = p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout
    if ctx.attention != "eager" and not cpu_math:  # eager and the math path add it to the scores
        rec.save_new(b * s * kv, ctx.autocast or q.dtype, f"{tag}.attn_mask")  # in SDPA's (autocast) query dtype
    out = _attend(rec, spec, q, kr, vr, p_drop, tag, hold, True)
    for r, c in ((kr, kc), (vr, vc)):
        if r is not c:
            rec.free(r)
    return out


def _attend(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, p_drop: float, tag: str, hold: int,
            explicit_mask: bool) -> T:
    """The attention kernel transformers' attention interface runs (see attention)."""
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    needs = q.rg or k.rg or v.rg
    out_numel = b * s * spec.q_dim
    if ctx.attention == "eager":
        return _eager_attention(rec, spec, q, k, v, p_drop, explicit_mask, tag)
    # SDPA is on autocast's lower-precision list: it casts RoPE's wider q, k back, and the q, k, v a QLoRA
    # layer returns in the stream's dtype (bitsandbytes Linear4bit.forward's .to(inp_dtype)), before any
    # kernel (the CPU math path then upcasts the copies)
    qi, ki, vi = autocast_in(rec, q), autocast_in(rec, k), autocast_in(rec, v)
    if p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout:
        # prefix tuning's concatenated values are contiguous as (b, heads, s, d): bmm takes them as they are
        v_contiguous = explicit_mask and not (spec.num_kv_heads == 1 and spec.num_heads > 1)
        out = _math_attention(rec, spec, qi, ki, vi, tag, hold, v_contiguous)
        rec.free(*(t for t, orig in ((qi, q), (ki, k), (vi, v)) if t is not orig))
        return out
    saved = []
    if needs:
        saved = [rec.save(qi, f"{tag}.q"), rec.save(ki, f"{tag}.k"), rec.save(vi, f"{tag}.v")]
    out = rec.new(out_numel, qi.dtype, needs)
    lse = rec.new(b * heads * s, "float32", False)
    if needs:
        saved += [rec.save(out, f"{tag}.out"), rec.save(lse, f"{tag}.logsumexp")]
        if p_drop > 0 and ctx.device == "cpu":  # CPU flash has no dropout: the math path keeps the probs
            saved.append(rec.save_new(b * heads * s * kv, q.dtype, f"{tag}.probs"))
        # the backward computes all three gradients (and frees those no input needs)
        steps = [("new", "dq", qi.nbytes), ("new", "dk", ki.nbytes), ("new", "dv", vi.nbytes)]
        outputs = [(t.id, name) for t, name in ((qi, "dq"), (ki, "dk"), (vi, "dv")) if t.rg]
        rec.node(out, steps, outputs, saved)
    rec.free(lse)
    for t, orig in ((qi, q), (ki, k), (vi, v)):
        if t is not orig:
            rec.free(t)
    # The fused kernels lay their output out as (batch, seq, heads, dim): transformers'
    # transpose(1, 2).contiguous() is then a view, and the output projection saves that storage.
    return out


def _cache_keys(rec: Recorder, x: T, numel: int) -> T:
    """Prefix tuning's keys/values: cat(past, new) along the sequence (DynamicCache.update: the cache
    keeps the concatenation to the end of the forward), in the promoted dtype of the past (peft's
    prefix encoder, in the weights' dtype) and x (fp32 under autocast); the backward hands on slices of
    the gradient (the new part to x, copied back to x's layout and dtype)."""
    y = rec.new(numel, _promote(x.dtype, rec.ctx.weight), True)
    rec.node(y, *_grads(x))
    return y


def _repeat_kv(rec: Recorder, spec: ModelSpec, x: T) -> T:
    """transformers repeat_kv: x[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, heads, s, d):
    a copy, except with a single key/value head, where the reshape of the expanded tensor is a view
    (stride 0 across the heads); the backward sums the repeats (a new gradient like x)."""
    groups = spec.num_heads // spec.num_kv_heads
    if groups == 1:
        return x
    y = rec.view(x, x.numel * groups) if spec.num_kv_heads == 1 else rec.new(x.numel * groups, x.dtype, x.rg)
    rec.node(y, *_grads(x))
    return y


def _math_attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, tag: str, hold: int,
                    v_contiguous: bool = False) -> T:
    """CPU has no fused kernel with dropout: torch's _scaled_dot_product_attention_math runs, in fp32
    for half types, and saves the scaled q, k^T, v (reshape copies for bmm), the softmax, the dropout
    noise and the dropped probabilities; its (batch, heads, seq, dim) output is copied by
    transpose().contiguous(). Backward (traced): the output gradient is copied for bmm, bmm makes v's
    and the probabilities' gradients, dropout, _safe_softmax_backward, bmm makes q's and k's, the
    scalings make new ones. For causal models (is_causal) the kernel builds a (seq x kv) float mask from
    at::ones().tril() and adds it out of place (a dispatch mode makes the tensors subclass-like; a storage
    tracer is one); it returns the tuple (matmul(attn, v).to(dtype), attn.to(dtype)), evaluated right to
    left: for half types the attention weights' cast (discarded) exists until it returns
    (aten/src/ATen/native/transformers/attention.cpp). The reshape copies are views when the batch and
    head dimensions merge (_bmm_reshape_copies): bmm then saves the scaled q and k^T and v itself (a
    view keeps its whole storage: GPT-2's fused c_attn output in fp32, where v is not cast)."""
    ctx = rec.ctx
    b, s, kv, heads = ctx.batch, ctx.seq, ctx.kv_seq, spec.num_heads
    up = "float32" if (ctx.autocast or q.dtype) in ("bfloat16", "float16") else q.dtype
    ub = DTYPE_BYTES[up]
    nq, nk, sc = b * s * spec.q_dim * ub, b * kv * spec.q_dim * ub, b * heads * s * kv * ub
    qk_rg, needs = q.rg or k.rg, q.rg or k.rg or v.rg
    qu, ku, vu = (cast(rec, t, up) for t in (q, k, v))
    qs = scale(rec, qu)  # q * sqrt(scale), held to the end
    ks = scale(rec, ku)  # k^T * sqrt(scale)
    copies = _bmm_reshape_copies(b, heads)
    qc = rec.new(b * s * spec.q_dim, up, False) if copies else qs  # bmm's reshape copies
    kc = rec.new(b * kv * spec.q_dim, up, False) if copies else ks
    saved1 = []
    if k.rg:
        saved1.append(rec.save(qc, f"{tag}.math_q"))
    if q.rg:
        saved1.append(rec.save(kc, f"{tag}.math_k"))
    scores = rec.new(b * heads * s * kv, up, qk_rg)
    rec.node(scores, [("new", "dk", nk), ("new", "dq", nq)], [(t.id, n) for t, n in ((ks, "dk"), (qs, "dq")) if t.rg],
             saved1)
    rec.free(ks, *((kc, qc) if copies else ()))  # qs is held to the end
    mask = None
    if spec.is_decoder:
        mask = rec.new(s * kv, up, False)
        masked = rec.new(scores.numel, up, qk_rg)
        rec.node(masked, outputs=[(scores.id, GRAD)])
        rec.free(scores)
        scores = masked
    probs = rec.new(b * heads * s * kv, up, qk_rg)  # _safe_softmax, saves its output
    rec.free(scores)
    noise = rec.new(b * heads * s * kv, up, False)
    dropped = rec.new(b * heads * s * kv, up, qk_rg)
    if qk_rg:
        sm, nz = rec.save(probs, f"{tag}.math_softmax_noise"), rec.save(noise, f"{tag}.math_softmax_noise")
        rec.node(probs, [("new", "d", sc)], [(scores.id, "d")], [sm])
        rec.node(dropped, [("new", "d", sc)], [(probs.id, "d")], [nz])
    rec.free(noise, probs)
    weights = rec.new(dropped.numel, q.dtype, False) if up != q.dtype else None  # attn.to(origin_dtype)
    vc = vu if v_contiguous or not copies else rec.new(b * kv * spec.q_dim, up, False)  # bmm's reshape copy of v
    saved2 = []
    if q.rg or k.rg:
        saved2.append(rec.save(vc, f"{tag}.math_v"))
    if v.rg:
        saved2.append(rec.save(dropped, f"{tag}.math_probs"))
    out = rec.new(b * s * spec.q_dim, up, needs)  # bmm(probs, v), reshaped
    rec.node(out, _bmm_output_backward(nq, nk, sc, copies),
             [(t.id, n) for t, n in ((vu, "dv"), (dropped, "dp")) if t.rg], saved2, hold=0 if copies else hold)
    o = cast(rec, out, q.dtype)
    if o is not out:
        rec.free(out)
    # the kernel returns: its locals go
    if vc is not vu:
        rec.free(vc)
    rec.free(qs, dropped, mask, weights)
    for t, orig in ((qu, q), (ku, k), (vu, v)):
        if t is not orig:
            rec.free(t)
    y = rec.new(o.numel, o.dtype, needs)  # transpose(1, 2).contiguous(): a copy, its backward a view
    rec.node(y, outputs=[(o.id, GRAD)])
    rec.free(o)
    return y


def _bmm_output_backward(nq: int, nk: int, sc: int, copies: bool) -> list:
    """The backward of the math path's matmul(probs, v), which at::matmul folded into bmm and
    _unsafe_view (aten/src/ATen/native/LinearAlgebra.cpp _matmul_impl): UnsafeViewBackward0 reshapes the
    incoming gradient to bmm's (batch * heads, seq, dim), a copy when the operands' reshapes were
    (_bmm_reshape_copies: the gradient arrives with the transposed strides of transformers'
    transpose(1, 2), kept by ToCopyBackward0's fp32 upcast, _to_copy's preserve_format), after which the
    engine drops the incoming gradient as that node returns; then BmmBackward0 makes v's and the
    probabilities' gradients from the copy, freed when it returns. Traced (bert-base full bf16 and fp32,
    batch 4 x 512, checkpointing, fake tensors): aten.clone (4, 12, 512, 64), the incoming gradient freed,
    then bmm (48, 512, 64) and bmm (48, 512, 512), then the clone freed. Without the copies the reshape is
    a view and bmm reads the incoming gradient itself."""
    if not copies:
        return [("new", "dv", nk), ("new", "dp", sc)]
    return [("new", "g3", nq), ("free", GRAD), ("new", "dv", nk), ("new", "dp", sc), ("free", "g3")]


def _bmm_reshape_copies(batch: int, heads: int) -> bool:
    """Whether at::matmul copies the math path's (batch, heads, seq, dim) operands to fold them into
    bmm's (batch * heads, seq, dim): it folds with reshape (aten/src/ATen/native/LinearAlgebra.cpp
    _matmul_impl), a view when the two leading dimensions merge, which transformers'
    view(b, s, heads, d).transpose(1, 2) layout (and the scaled copies, which keep it) allows only when
    one of them is 1 (traced: tiny-gpt2 LoRA fp32 batch 1 x 64 on fake tensors, bmm saves the two
    scaled products and c_attn's whole (1, 64, 192) output, no clone)."""
    return batch > 1 and heads > 1


def _eager_attention(rec: Recorder, spec: ModelSpec, q: T, k: T, v: T, p_drop: float, explicit_mask: bool,
                     tag: str) -> T:
    """transformers eager_attention_forward: repeat_kv, matmul(q, k^T) * scaling (+ mask), softmax
    (fp32 for the Llama family and the vision towers), .to(q dtype), dropout, matmul with v, then
    transpose(1, 2).contiguous()."""
    ctx = rec.ctx
    b, s, kv, heads = ctx.batch, ctx.seq, ctx.kv_seq, spec.num_heads
    k_full, v_full = (k, v) if explicit_mask else (_repeat_kv(rec, spec, k), _repeat_kv(rec, spec, v))
    # q @ k^T saves q for k's gradient and k for q's; probs @ v saves v for the probabilities'
    # gradient and the probabilities for v's
    qi, ki = autocast_in(rec, q), autocast_in(rec, k_full)
    saved1 = []
    if k.rg:
        saved1.append(rec.save(qi, f"{tag}.q"))
    if q.rg:
        saved1.append(rec.save(ki, f"{tag}.k"))
    sdt = ctx.autocast or q.dtype
    qk_rg, needs = q.rg or k.rg, q.rg or k.rg or v.rg
    raw = rec.new(b * heads * s * kv, sdt, qk_rg)
    rec.node(raw, *_grads(qi, ki), saved=saved1)
    scores = scale(rec, raw)
    rec.free(raw)
    if spec.model_type in FP32_SOFTMAX_FAMILIES:  # softmax(..., dtype=float32).to(query.dtype)
        softmax = rec.new(b * heads * s * kv, "float32", qk_rg)
    else:  # softmax(attn_weights, dim=-1) in the scores' dtype
        softmax = rec.new(b * heads * s * kv, q.dtype if not ctx.autocast else "float32", qk_rg)
    if qk_rg:
        rec.node(softmax, *_grads(scores), saved=[rec.save(softmax, f"{tag}.softmax_out")])
    rec.free(scores)
    chain = [softmax]
    if softmax.dtype != q.dtype and not ctx.autocast:  # .to(query.dtype)
        chain.append(cast(rec, chain[-1], q.dtype))
    chain.append(dropout(rec, chain[-1], p_drop, tag))
    chain.append(autocast_in(rec, chain[-1]))  # autocast's matmul casts fp32 probabilities
    probs = chain[-1]
    vi = autocast_in(rec, v_full)
    saved2 = []
    if v.rg:
        saved2.append(rec.save(probs, f"{tag}.probs"))
    if q.rg or k.rg:
        saved2.append(rec.save(vi, f"{tag}.v"))
    out = rec.new(b * s * spec.q_dim, sdt, needs)
    rec.node(out, [("new", "g", out.nbytes)] + _grads(probs, vi)[0] + [("free", "g")], _grads(probs, vi)[1], saved2)
    rec.free(*chain)
    for t, orig in ((qi, q), (ki, k_full), (vi, v_full), (k_full, k), (v_full, v)):
        if t is not orig:
            rec.free(t)
    y = rec.new(out.numel, out.dtype, needs)  # transpose(1, 2).contiguous() copies; its backward a view
    rec.node(y, outputs=[(out.id, GRAD)])
    rec.free(out)
    return y


def adapter_block(rec: Recorder, x: T, hidden: int, bottleneck: int, tag: str) -> T:
    """measure.adapters.BottleneckAdapter: x + up(gelu(down(x))), two trainable Linears around a GELU,
    applied by a forward hook to the output projection's output, before the block's dropout."""
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.adapter.down", bias_trains=True)
    act = activation(rec, down, "gelu", f"{tag}.adapter.act")
    rec.free(down)
    up = linear(rec, act, bottleneck, hidden, True, f"{tag}.adapter.up", bias_trains=True)
    rec.free(act)
    out = add(rec, x, up, up.dtype if rec.ctx.autocast is None else x.dtype)
    rec.free(up)
    return out


# Tags of what seed 001's block adapter saves: it runs outside its encoder layer's checkpointed forward.
BLOCK_ADAPTER_TAG = "block_adapter"


def block_adapter(rec: Recorder, x: T, hidden: int, bottleneck: int, p_drop: float) -> T:
    """measure.adapters.BlockAdapter (seed 001, Example 4): layer_norm(x + dropout(up_proj(dropout(gelu(
    down_proj(x)))))), a forward hook on the encoder layer. The trainable Linears save their inputs, GELU
    its input, each dropout its noise, the trainable LayerNorm its input (the sum: fp32 under autocast,
    x + a bf16 tensor) with mean and rstd; each intermediate is dropped when `x` is rebound."""
    tag = BLOCK_ADAPTER_TAG
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.down_proj", bias_trains=True)
    act = activation(rec, down, "gelu", f"{tag}.activation")
    rec.free(down)
    d1 = dropout(rec, act, p_drop, f"{tag}.dropout1")
    if d1 is not act:
        rec.free(act)
    up = linear(rec, d1, bottleneck, hidden, True, f"{tag}.up_proj", bias_trains=True)
    rec.free(d1)
    d2 = dropout(rec, up, p_drop, f"{tag}.dropout2")
    if d2 is not up:
        rec.free(up)
    total = add(rec, d2, x)
    rec.free(d2)
    out = layer_norm(rec, total, True, hidden, f"{tag}.layer_norm")
    rec.free(total)
    return out


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
    norm_bias_only: frozenset = frozenset()  # norms of which only the bias trains (BitFit)


@lru_cache(maxsize=1024)
def _layer_trainings(plan: Plan, layout: Layout) -> list[LayerTraining]:
    """What trains inside each block, from the plan's parameter groups (one pass over them)."""
    n = plan.spec.num_layers
    sets = [dict(trainable=set(), norms=set(), lora=set(), ia3_out=set(), ia3_ff=set(), adapters=set(),
                 biases=set(), norm_weights=set(), norm_biases=set()) for _ in range(n)]
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
                s["norm_weights" if rel.endswith(".weight") else "norm_biases"].add(module)
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
                          frozenset(s["biases"]), frozenset(s["norm_biases"] - s["norm_weights"])) for s in sets]


def _norm_params(lt: LayerTraining, norm: str) -> int:
    """How many of a block's LayerNorm's parameters (weight, bias) get a gradient."""
    return 1 if norm in lt.norm_bias_only else 2


@lru_cache(maxsize=1024)
def _layer_kinds(plan: Plan, layout: Layout) -> tuple[tuple[LayerTraining, ...], tuple[int, ...]]:
    """The distinct LayerTrainings of the blocks (first-seen order) and each block's index among them:
    _run_blocks looks a block's simulation up by that index instead of hashing its LayerTraining."""
    distinct: dict = {}
    index = tuple(distinct.setdefault(lt, len(distinct)) for lt in _layer_trainings(plan, layout))
    return tuple(distinct), index


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


def _first_node(rec: Recorder, mark: int) -> int:
    """The output id of the first node recorded since `mark` (0: none)."""
    return rec.nodes[mark][0] if len(rec.nodes) > mark else 0  # Node.out


def _math_path(spec: ModelSpec, ctx: Ctx) -> bool:
    """Attention takes torch's math path (not a fused kernel) on the CPU in training with dropout."""
    return ctx.attention != "eager" and dropout_p(spec, "attn") > 0 and ctx.device == "cpu" and ctx.training_dropout


def _adapt(rec: Recorder, lt: LayerTraining, o: T, role: str, spec: ModelSpec, plan: Plan, tag: str) -> T:
    """The output projection's output through its adapter (a forward hook, run before the projection's
    call returns: its input is still referenced meanwhile, and its own output is dropped once the
    adapter has made its replacement)."""
    out = _maybe_adapter(rec, lt, o, role, spec, plan, tag)
    if out is not o:
        rec.free(o)
    return out


def llama_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """LlamaDecoderLayer (also Mistral, Qwen2): pre-RMSNorm attention with RoPE, gated SiLU MLP.
    The forward frees each tensor when modeling_llama.py drops it: the attention's q, k, v at its
    return, the MLP's gate/up/act intermediates as the expression proceeds, the normed inputs when
    `hidden_states` is rebound, the residual at the block's return."""
    ctx = rec.ctx
    h = spec.hidden_size
    eager = ctx.attention == "eager"
    n = rms_norm(rec, x, "input_layernorm" in lt.norm_trainable, "input_layernorm")
    # q_proj(x).view().transpose(1, 2), then k, then v; RoPE on q and k (its gradients come back laid
    # out as (b, heads, s, d), so the views' backward copies them; SDPA's come back in v's layout)
    ql = _lin(rec, lt, n, "self_attn.q_proj", h, spec.q_dim, plan)
    kl = _lin(rec, lt, n, "self_attn.k_proj", h, spec.kv_dim, plan)
    vl = _lin(rec, lt, n, "self_attn.v_proj", h, spec.kv_dim, plan)
    q, k, v = heads_view(rec, ql, clone=True), heads_view(rec, kl, clone=True), heads_view(rec, vl, clone=eager)
    q, k = rope(rec, q), rope(rec, k)
    rec.free(ql, kl)
    # `key_states, value_states = past_key_values.update(...)` drops RoPE's keys and the value projection
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "self_attn.attention", replaced=(k, vl))
    o = _lin(rec, lt, a, "self_attn.o_proj", spec.q_dim, h, plan)
    o = _adapt(rec, lt, o, "attn_out", spec, plan, "self_attn.o_proj")
    rec.free(a, q, k, vl, n)
    x2 = add(rec, x, o, x.dtype)  # x + o keeps the residual stream's dtype
    rec.free(o)
    n2 = rms_norm(rec, x2, "post_attention_layernorm" in lt.norm_trainable, "post_attention_layernorm")
    g = _lin(rec, lt, n2, "mlp.gate_proj", h, spec.intermediate_size, plan)
    act = activation(rec, g, "silu", "mlp.act_fn")
    rec.free(g)
    u = _lin(rec, lt, n2, "mlp.up_proj", h, spec.intermediate_size, plan)
    p = mul(rec, act, u, "mlp.act_mul")
    rec.free(act, u)
    d = _lin(rec, lt, p, "mlp.down_proj", spec.intermediate_size, h, plan)
    d = _adapt(rec, lt, d, "mlp_out", spec, plan, "mlp.down_proj")
    rec.free(p, n2)
    out = add(rec, x2, d, x2.dtype)
    rec.free(d, x2)
    return out


def gpt2_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """GPT2Block: pre-LayerNorm, fused c_attn (Conv1D) split into q, k, v (views of one storage;
    SplitBackward concatenates their gradients into a new one), gelu_new MLP, dropout on attention and
    residuals. GPT2Block.forward's local attn_output (the attention's resid_dropout output) stays
    referenced until the block returns (traced: alive at the peak of mlp.c_proj's DoRA)."""
    h = spec.hidden_size
    n = layer_norm(rec, x, "ln_1" in lt.norm_trainable, h, "ln_1", _norm_params(lt, "ln_1"))
    qkv = _lin(rec, lt, n, "attn.c_attn", h, 3 * h, plan)
    q, k, v = (rec.view(qkv, qkv.numel // 3) for _ in range(3))
    for part in (q, k, v):
        rec.node(part, [("new", "d", qkv.nbytes)], [(qkv.id, "d")])
    # the views' gradients come back contiguous as (b, heads, s, d) (no kernel can keep the layout of
    # a strided third of c_attn's output), so reshaping them back copies
    q, k, v = (heads_view(rec, t, clone=True) for t in (q, k, v))
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "attn.attention")
    o = _lin(rec, lt, a, "attn.c_proj", h, h, plan)
    o = _adapt(rec, lt, o, "attn_out", spec, plan, "attn.c_proj")
    rec.free(a)
    od = dropout(rec, o, dropout_p(spec, "resid"), "attn.resid_dropout")
    if od is not o:
        rec.free(o)
    rec.free(qkv)
    x2 = add(rec, od, x, x.dtype)
    rec.free(n)
    n2 = layer_norm(rec, x2, "ln_2" in lt.norm_trainable, h, "ln_2", _norm_params(lt, "ln_2"))
    f = _lin(rec, lt, n2, "mlp.c_fc", h, spec.intermediate_size, plan)
    act = activation(rec, f, spec.hidden_act if spec.hidden_act in ("gelu_new", "quick_gelu") else "gelu", "mlp.act")
    rec.free(f)
    d = _lin(rec, lt, act, "mlp.c_proj", spec.intermediate_size, h, plan)
    d = _adapt(rec, lt, d, "mlp_out", spec, plan, "mlp.c_proj")
    rec.free(act)
    dd = dropout(rec, d, dropout_p(spec, "resid"), "mlp.dropout")
    if dd is not d:
        rec.free(d)
    rec.free(n2)
    out = add(rec, x2, dd, x2.dtype)
    rec.free(dd, x2, od)
    return out


def bert_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """BertLayer / RobertaLayer: post-LayerNorm; dropout after attention output and FFN output. The
    forward frees q, k, v when BertSelfAttention returns, the attention output when BertAttention
    does, the intermediate output and the attention block's output when the layer returns (traced)."""
    ctx = rec.ctx
    h = spec.hidden_size
    reshaped = _math_path(spec, ctx) or ctx.attention == "eager"
    mark = len(rec.nodes)
    ql = _lin(rec, lt, x, "attention.self.query", h, h, plan)
    query_node = _first_node(rec, mark)
    kl = _lin(rec, lt, x, "attention.self.key", h, h, plan)
    vl = _lin(rec, lt, x, "attention.self.value", h, h, plan)
    q, k, v = (heads_view(rec, t, clone=reshaped) for t in (ql, kl, vl))
    # BertSelfAttention: `key_layer, value_layer = past_key_values.update(...)` drops the key and value
    # projections (views of them were the only references; traced, tiny-bert-cls prefix bf16)
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "attention.self", hold=query_node,
                  replaced=(kl, vl))
    rec.free(ql, kl, vl)
    o = _lin(rec, lt, a, "attention.output.dense", h, h, plan)
    o = _adapt(rec, lt, o, "attn_out", spec, plan, "attention.output.dense")
    od = dropout(rec, o, dropout_p(spec, "resid"), "attention.output.dropout")
    if od is not o:
        rec.free(o)
    s1 = add(rec, od, x, od.dtype if ctx.autocast is None else x.dtype)
    n1 = layer_norm(rec, s1, "attention.output.LayerNorm" in lt.norm_trainable, h, "attention.output.LayerNorm", _norm_params(lt, "attention.output.LayerNorm"))
    rec.free(s1, od, a)
    f = _lin(rec, lt, n1, "intermediate.dense", h, spec.intermediate_size, plan)
    act = activation(rec, f, "gelu", "intermediate.act")
    rec.free(f)
    d = _lin(rec, lt, act, "output.dense", spec.intermediate_size, h, plan)
    d = _adapt(rec, lt, d, "mlp_out", spec, plan, "output.dense")
    dd = dropout(rec, d, dropout_p(spec, "resid"), "output.dropout")
    if dd is not d:
        rec.free(d)
    s2 = add(rec, dd, n1, n1.dtype)
    out = layer_norm(rec, s2, "output.LayerNorm" in lt.norm_trainable, h, "output.LayerNorm", _norm_params(lt, "output.LayerNorm"))
    rec.free(s2, dd, act, n1)
    return out


def vision_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """ViTLayer / CLIPEncoderLayer: pre-LayerNorm attention and MLP (gelu / quick_gelu)."""
    ctx = rec.ctx
    h = spec.hidden_size
    vit = spec.model_type == "vit"
    ln1, ln2 = ("layernorm_before", "layernorm_after") if vit else ("layer_norm1", "layer_norm2")
    att = "attention" if vit else "self_attn"
    out_name = f"{att}.o_proj" if vit else f"{att}.out_proj"
    reshaped = _math_path(spec, ctx) or ctx.attention == "eager"
    n = layer_norm(rec, x, ln1 in lt.norm_trainable, h, ln1, _norm_params(lt, ln1))
    mark = len(rec.nodes)
    ql = _lin(rec, lt, n, f"{att}.q_proj", h, h, plan)
    query_node = _first_node(rec, mark)
    kl = _lin(rec, lt, n, f"{att}.k_proj", h, h, plan)
    vl = _lin(rec, lt, n, f"{att}.v_proj", h, h, plan)
    q, k, v = (heads_view(rec, t, clone=reshaped) for t in (ql, kl, vl))
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), att, hold=query_node)
    rec.free(ql, kl, vl)
    o = _lin(rec, lt, a, out_name, h, h, plan)
    o = _adapt(rec, lt, o, "attn_out", spec, plan, out_name)
    rec.free(a)
    rec.free(n)
    x2 = add(rec, o, x, x.dtype)
    rec.free(o)
    n2 = layer_norm(rec, x2, ln2 in lt.norm_trainable, h, ln2, _norm_params(lt, ln2))
    f = _lin(rec, lt, n2, "mlp.fc1", h, spec.intermediate_size, plan)
    act = activation(rec, f, "quick_gelu" if spec.hidden_act == "quick_gelu" else "gelu", "mlp.act")
    rec.free(f)
    d = _lin(rec, lt, act, "mlp.fc2", spec.intermediate_size, h, plan)
    d = _adapt(rec, lt, d, "mlp_out", spec, plan, "mlp.fc2")
    rec.free(act)
    rec.free(n2)
    out = add(rec, d, x2, x2.dtype)
    rec.free(d, x2)
    if "block" in lt.adapters:  # seed 001's adapter on the layer's output (a forward hook of the layer)
        adapted = block_adapter(rec, out, h, resolve_bottleneck(spec, plan.settings), BLOCK_ADAPTER_DROPOUT)
        rec.free(out)
        out = adapted
    return out


def opt_block(rec: Recorder, spec: ModelSpec, plan: Plan, lt: LayerTraining, x: T) -> T:
    """OPTDecoderLayer (transformers models/opt/modeling_opt.py, do_layer_norm_before=True): LayerNorm,
    q_proj(x) * scaling (a multiply by a Python scalar saves nothing), k_proj, v_proj, attention,
    out_proj, dropout, residual; LayerNorm on the (tokens, hidden) reshape, fc1, activation, fc2, dropout,
    residual. The LayerNorm's output is the attention's argument until it returns; each MLP
    intermediate is dropped when `hidden_states` is rebound. With the harness's use_cache the keys and
    values SDPA saves are the DynamicCache's concatenated copies instead of views of the projections:
    the same bytes, counted as the projections."""
    ctx = rec.ctx
    h = spec.hidden_size
    p = dropout_p(spec, "resid")
    reshaped = _math_path(spec, ctx) or ctx.attention == "eager"
    n = layer_norm(rec, x, "self_attn_layer_norm" in lt.norm_trainable, h, "self_attn_layer_norm", _norm_params(lt, "self_attn_layer_norm"))
    ql = _lin(rec, lt, n, "self_attn.q_proj", h, h, plan)
    qs = scale(rec, ql)
    rec.free(ql)
    kl = _lin(rec, lt, n, "self_attn.k_proj", h, h, plan)
    vl = _lin(rec, lt, n, "self_attn.v_proj", h, h, plan)
    q, k, v = (heads_view(rec, t, clone=reshaped) for t in (qs, kl, vl))
    a = attention(rec, spec, q, k, v, dropout_p(spec, "attn"), "self_attn.attention")
    rec.free(qs, kl, vl)
    o = _lin(rec, lt, a, "self_attn.out_proj", h, h, plan)
    rec.free(a, n)
    od = dropout(rec, o, p, "self_attn.dropout")
    if od is not o:
        rec.free(o)
    x2 = add(rec, x, od, x.dtype)
    rec.free(od)
    n2 = layer_norm(rec, x2, "final_layer_norm" in lt.norm_trainable, h, "final_layer_norm", _norm_params(lt, "final_layer_norm"))
    f = _lin(rec, lt, n2, "fc1", h, spec.intermediate_size, plan)
    rec.free(n2)
    act = activation(rec, f, spec.hidden_act, "activation_fn")
    rec.free(f)
    d = _lin(rec, lt, act, "fc2", spec.intermediate_size, h, plan)
    rec.free(act)
    dd = dropout(rec, d, p, "dropout")
    if dd is not d:
        rec.free(d)
    out = add(rec, x2, dd, x2.dtype)
    rec.free(dd, x2)
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
    "opt": opt_block,
}


# ---------------------------------------------------------------- the whole model


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
    loss_scalars: int = 0  # the loss and backward's seed, alive through the backward
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
    reentrant_backward: tuple = ()  # per layer: the peak of its reentrant checkpoint's backward (_reentrant_block)

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
    module's own ops save for backward and every block's input needs a gradient. Under reentrant
    checkpointing a vision model gets the hook too (measure.run.prepare_for_training: CheckpointFunction
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


@dataclass(frozen=True)
class BlockRun:
    """The blocks of a model run one after another (see _run_blocks)."""

    per_layer: tuple  # saved bytes of each block
    blocks: tuple  # each block's BlockSimulation
    forward_block: tuple  # (saved, live unsaved) bytes at the largest peak inside a block's forward
    tags: dict
    out: T  # the last block's output
    leaves: int  # unsaved bytes the blocks leave referenced to the end of the forward (BlockSimulation.leaves)
    held_after: int = 0  # unsaved bytes the forward holds when the blocks are done, their output aside
    unsaved_block_live: int = 0  # live bytes at the largest forward peak of a block that saves nothing
    # when only some blocks are checkpointed (TrainingSettings.checkpoint_every): what each block keeps
    # for backward (its input if checkpointed and saving, else what it saves), the largest peak inside an
    # unwrapped block's forward on what the blocks below keep, and held_after as it is then
    kept: tuple = ()
    mixed_forward_block: tuple = (0, 0)
    mixed_held_after: int = 0
    reentrant: tuple = ()  # per block: its reentrant checkpoint's backward peak (_reentrant_block), or None


def _run_blocks(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, ctx: Ctx, x: T, held: int,
                embedding_held: bool, checkpointed: tuple = (), reentrant: bool = False) -> BlockRun:
    """Each block on the output of the one below (`x`: the first block's input, made by `rec`). Blocks
    with the same trainable set and the same kind of input save the same tensors: each kind is simulated
    once (_simulate_block is cached; a 80-block model has two or three kinds). The forward's peak inside
    block i is what the blocks below and the model's forward (`rec`) saved, block i's own forward peak
    (its input included), `held` (tensors the model's caller keeps referenced meanwhile), what the blocks
    below left referenced (BlockSimulation.leaves: prefix tuning's cache, autocast's cached copies) and,
    when `embedding_held` (the model's forward keeps its own reference to the embedding output, e.g.
    LlamaModel.forward's inputs_embeds), the first block's input from the second block on, unless saved.
    A block that saves nothing (below the lowest trainable one) runs the same ops under gradient
    checkpointing: its forward peak on top of what was saved before it is `unsaved_block_live`.

    `checkpointed` (per block, peftcalc.checkpointing) decides what a block keeps when only some are
    checkpointed (_mixed_blocks); `reentrant`: each checkpointed block's reentrant backward peak too."""
    per_layer, peaks = [], []
    forward_block = (0, 0)
    unsaved_block_live = 0
    leaves = 0
    kinds: dict = {}  # id of a block simulation -> [it, how many layers are of its kind]
    below = rec.saved_total
    rg, dtype = x.rg, x.dtype
    first = None
    seen: dict = {}  # (layer kind, input kind) -> its simulation, without hashing the plan or the layer per layer
    trainings, layer_kinds = _layer_kinds(plan, layout)
    reentrant_peaks = []
    for i, k in enumerate(layer_kinds):
        key = (k, rg, dtype)
        block = seen.get(key)
        if block is None:
            block = seen[key] = _simulate_block(spec, plan, trainings[k], ctx, rg, dtype)
        if reentrant and checkpointed[i]:
            reentrant_peaks.append(_reentrant_block(spec, plan, trainings[k], ctx, rg, dtype))
        else:
            reentrant_peaks.append(None)
        extra = held
        if first is not None and embedding_held and x.id not in rec.saved and not first.saves_input:
            extra += x.nbytes
        if below + block.forward_peak + extra > sum(forward_block):
            forward_block = (below + block.forward_peak_saved, block.forward_peak - block.forward_peak_saved + extra)
        if not block.saved:
            unsaved_block_live = max(unsaved_block_live, block.forward_peak + extra)
        first = first or block
        held += block.leaves
        leaves += block.leaves
        below += block.saved
        per_layer.append(block.saved)
        peaks.append(block)
        kind = kinds.get(id(block))
        if kind is None:
            kinds[id(block)] = [block, 1]
        else:
            kind[1] += 1
        rg, dtype = block.out_rg, block.out_dtype
    tags: dict = {}
    for block, count in kinds.values():
        for tag, nbytes in block.tags:
            tags[tag] = tags.get(tag, 0) + count * nbytes
    held_before = held - leaves
    if first is not None and embedding_held and x.id not in rec.saved and not first.saves_input:
        held += x.nbytes
    run = BlockRun(tuple(per_layer), tuple(peaks), forward_block, tags, rec.new(x.numel, dtype, rg), leaves, held,
                   unsaved_block_live, reentrant=tuple(reentrant_peaks))
    if any(checkpointed) and not all(checkpointed):
        run = _mixed_blocks(run, rec, spec, plan, ctx, x, held_before, embedding_held, checkpointed)
    return run


def _mixed_blocks(run: BlockRun, rec: Recorder, spec: ModelSpec, plan: Plan, ctx: Ctx, x: T, held: int,
                  embedding_held: bool, checkpointed: tuple) -> BlockRun:
    """The forward when only some blocks are checkpointed (transformers activation_checkpointing_enable
    with every_n_layers > 1): a checkpointed block that saves keeps only its input (torch.utils.checkpoint
    saves the checkpoint's tensor arguments: non-reentrant _NoopSaveInputs, reentrant CheckpointFunction's
    save_for_backward), the others keep what they save. The forward's peak inside an unwrapped block is its
    own peak on what the blocks below keep (`rec`'s saves, the model's forward, included) and what the
    forward holds (`held`, as _run_blocks counts it; a checkpointed block leaves autocast's cached copies
    of all its trainable weights referenced, _autocast_cached_by_layer, its saves being dropped); the first block's
    input is a checkpoint's when the first block is wrapped and saves. The peaks inside the checkpointed
    blocks are the checkpointed forward's (ActivationProfile.forward_transient)."""
    input_bytes = ctx.tokens * spec.hidden_size * DTYPE_BYTES[_stream_dtype(ctx)]
    cached = _autocast_cached_by_layer(plan, ctx)
    first = run.blocks[0]
    x_extra = (embedding_held and x.id not in rec.saved and not first.saves_input
               and not (checkpointed[0] and first.saved))
    below = rec.saved_total
    forward_block = (0, 0)
    kept = []
    for i, block in enumerate(run.blocks):
        extra = held + (x.nbytes if i and x_extra else 0)
        if checkpointed[i]:
            kept.append(input_bytes if block.saved else 0)
            held += cached[i]
        else:
            if below + block.forward_peak + extra > sum(forward_block):
                forward_block = (below + block.forward_peak_saved, block.forward_peak - block.forward_peak_saved + extra)
            kept.append(block.saved)
            held += block.leaves
        below += kept[-1]
    return replace(run, kept=tuple(kept), mixed_forward_block=forward_block,
                   mixed_held_after=held + (x.nbytes if x_extra else 0))


def _final_norm_peak(spec: ModelSpec, plan: Plan, layout: Layout, ctx: Ctx, out: T) -> tuple[int, int]:
    """The final norm's forward on the last block's output, simulated alone like a block: (peak, saved at
    it), its input included. It runs inside the base model's forward (LlamaModel.forward's self.norm,
    ViTModel's layernorm, GPT2Model's ln_f), with what the forward holds when the blocks are done
    (BlockRun.held_after: prefix tuning's cache, the positions, the embedding output). Traced
    (tiny-llama-cls prefix amp-bf16, fake): the step's peak is LlamaRMSNorm's x * rsqrt and
    weight * _, with the variance still referenced."""
    rec = Recorder(ctx, bucket="post")
    _final_norm(rec, spec, plan, layout, rec.new(out.numel, out.dtype, out.rg))
    return rec.forward_peak, rec.forward_peak_saved


def _with_final_norm(spec: ModelSpec, plan: Plan, layout: Layout, ctx: Ctx, blocks: BlockRun,
                     below: int) -> tuple:
    """BlockRun.forward_block, or the final norm's peak (_final_norm_peak) where it is larger, on what
    the model's forward (`below`) and the blocks saved."""
    if not _has_final_norm(spec, layout):
        return blocks.forward_block
    peak, peak_saved = _final_norm_peak(spec, plan, layout, ctx, blocks.out)
    below += sum(blocks.per_layer)
    if below + peak + blocks.held_after > sum(blocks.forward_block):
        return below + peak_saved, peak - peak_saved + blocks.held_after
    return blocks.forward_block


def _head_backward(rec: Recorder, start: int, root: T) -> BackwardPeak:
    """The head's backward replayed (peftcalc.backward) from the nodes recorded since `start`, with what
    the head ('post') saved, from the gradient of `root` (the logits, or the bare encoder's loss)."""
    post_saved = {tid: nbytes for tid, (bucket, _t, nbytes) in rec.saved.items() if bucket == "post"}
    return run_backward(rec.nodes[start:], post_saved, {root.id: root.nbytes} if root.rg else {},
                        in_place=rec.ctx.device == "cuda").peak


@lru_cache(maxsize=4096)
def activation_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """Simulate one forward pass and return what stays saved for backward."""
    spec = plan.spec
    if spec.is_vlm:
        return _vlm_profile(plan, t)
    if spec.model_type == "blip-2":
        return _blip2_profile(plan, t)
    return _model_profile(plan, t, checkpointed_layers(spec, t))


@lru_cache(maxsize=4096)
def _model_profile(plan: Plan, t: TrainingSettings, checkpointed: tuple) -> ActivationProfile:
    """activation_profile of a model of one stack of blocks (also a VLM's language model), whose blocks
    gradient checkpointing wraps as `checkpointed` says (peftcalc.checkpointing; empty: none)."""
    spec = plan.spec
    layout = build_layout(spec)
    ctx = make_ctx(spec, plan, t)
    rec = Recorder(ctx)
    h, tok = spec.hidden_size, ctx.tokens
    hooked = input_embeddings_require_grad(spec, t)
    input_rg = plan.embedding_trains or plan.settings.method == "prompt" or hooked
    leaf = 0
    if hooked and not plan.embedding_trains and spec.is_vision:
        # the hooked output of the frozen patch embedding (ViTPatchEmbeddings, CLIP's patch_embedding: the
        # conv's output, in autocast's dtype under autocast) is such a leaf too; the class token is
        # concatenated before it and the positions added
        numel = t.batch_size * spec.num_patches * h
        leaf = numel * DTYPE_BYTES[ctx.autocast or ctx.weight]
        rec.new(numel, ctx.autocast or ctx.weight, True)
    elif hooked and not plan.embedding_trains and (spec.model_type in ("gpt2", "bert", "roberta")
                                                   or plan.settings.method == "prompt"):
        # the hooked output of the frozen word embeddings is a leaf that requires grad: its
        # AccumulateGrad node holds it to the end of backward, and it is not the tensor the blocks get
        # (positions are added to it, or peft concatenates the prompt before it)
        leaf = t.batch_size * t.seq_len * h * DTYPE_BYTES[ctx.weight]
        rec.new(t.batch_size * t.seq_len * h, ctx.weight, True)
    indices = _embedding_indices_saved(spec, plan, layout, ctx)
    for numel, tag in indices:
        rec.save_new(numel, "int64", tag)
    # The embedding output: token embeddings (+ positions) in the weight dtype.
    x = rec.new(tok * h, ctx.weight, input_rg)
    x = _embeddings(rec, spec, plan, layout, x)
    if plan.settings.method in ("prefix", "prompt"):
        # peft PeftModel.get_prompt: self.prompt_tokens[adapter].unsqueeze(0).expand(batch, -1), an int64
        # arange of the virtual tokens peft keeps, is what the prompt encoder's embedding saves
        rec.save_new(plan.settings.num_virtual_tokens, "int64", "prompt_encoder.indices")
    grads_reach_blocks = input_rg or plan.lowest_trainable_layer is not None or plan.settings.method == "prefix"
    if spec.model_type in ("llama", "mistral", "qwen2") and grads_reach_blocks:
        # LlamaRotaryEmbedding's cos and sin (1 x seq x head_dim, in the hidden states' dtype), shared
        # by every layer, saved by q * cos and rotate_half(q) * sin
        rec.save_new(2 * ctx.seq * spec.head_dim, ctx.weight, "rotary.cos_sin")
    # held while the blocks run: prompt tuning's inputs, the positions and rotary embeddings of the
    # Llama family (what the blocks leave referenced adds up in _run_blocks)
    held = _prompt_inputs_held(spec, plan, ctx) + _positions_held(spec, ctx, grads_reach_blocks)
    blocks = _run_blocks(rec, spec, plan, layout, ctx, x, held, True, checkpointed, t.checkpoint_reentrant)
    mixed = bool(blocks.kept)
    forward_block = _with_final_norm(spec, plan, layout, ctx, _as_kept(blocks) if mixed else blocks, rec.saved_total)
    rec.bucket = "post"
    head_start = len(rec.nodes)
    logits_numel, hidden, root = _head(rec, spec, plan, layout, blocks.out)
    head = _head_backward(rec, head_start, root)
    model_output = _unsaved_model_output(rec, hidden)
    by_bucket = rec.bytes_by_bucket()
    tags = blocks.tags
    for tag, nbytes in rec.bytes_by_tag().items():
        tags[tag] = tags.get(tag, 0) + nbytes
    per_layer = blocks.per_layer
    needs_grad_layers = [i for i in range(spec.num_layers) if per_layer[i] > 0 and (not checkpointed or checkpointed[i])]
    ckpt_inputs = len(needs_grad_layers) * tok * h * DTYPE_BYTES[_stream_dtype(ctx)]
    loss = _loss_buffers(spec, ctx, logits_numel)
    weight_cache = (_autocast_weight_cache(plan, ctx) - rec.saved_cached_copies()
                    - _unwrapped_saved_copies(plan, ctx, blocks, checkpointed))
    return ActivationProfile(
        per_layer=per_layer,
        pre=by_bucket.get("pre", 0),
        post=by_bucket.get("post", 0),
        checkpoint_inputs=ckpt_inputs,
        checkpoint_kwargs=0 if indices or not any(checkpointed) else _checkpointed_layer_positions(spec, ctx, t),
        input_leaf=leaf,
        forward_checkpoint_inputs=_forward_checkpoint_inputs(spec, ctx, t, per_layer, checkpointed),
        lookup_saved=_lookup_saved(plan, indices),
        logits_bytes=logits_numel * DTYPE_BYTES[ctx.autocast or ctx.compute],
        loss_saved=loss.saved,
        loss_saved_backward=loss.saved_backward,
        loss_backward_peak=loss.backward_peak,
        loss_forward_peak=loss.forward_peak,
        loss_scalars=loss.scalars,
        forward_transient=_forward_transient(spec, plan, ctx, per_layer, blocks.unsaved_block_live),
        forward_transient_saved=_saved_before_last_light_block(per_layer),
        autocast_weight_cache=weight_cache,
        model_output=model_output,
        head_backward=head,
        forward_block_saved=forward_block[0],
        forward_block_live=forward_block[1],
        # and the head's cached weight copies no op saves (a trainable lm_head over frozen blocks: traced,
        # fake tiny-llama frozen amp-bf16 b3 s48, its 512 x 64 bf16 copy alive through the loss)
        forward_leaves=blocks.leaves + rec.unsaved_cached_copies(),
        blocks=blocks.blocks,
        embedding_grad=x.nbytes if x.rg else 0,
        by_tag=tuple(sorted(tags.items())),
        checkpointed=checkpointed,
        reentrant_backward=blocks.reentrant if t.checkpoint_reentrant else (),
    )


def _unwrapped_saved_copies(plan: Plan, ctx: Ctx, blocks: BlockRun, checkpointed: tuple) -> int:
    """autocast's cached copies of trainable weights that the blocks checkpointing leaves unwrapped save:
    their activations, not the cache's temporaries (an unwrapped block's copies are saved or among its
    leaves, BlockSimulation.leaves). 0 unless only some blocks are checkpointed."""
    if not blocks.kept:
        return 0
    cached = _autocast_cached_by_layer(plan, ctx)
    return sum(cached[i] - b.leaves for i, b in enumerate(blocks.blocks) if not checkpointed[i])


def _as_kept(blocks: BlockRun) -> BlockRun:
    """A BlockRun whose blocks save what they keep when only some are checkpointed (_mixed_blocks), for
    _with_final_norm."""
    return replace(blocks, per_layer=blocks.kept, forward_block=blocks.mixed_forward_block,
                   held_after=blocks.mixed_held_after)


def _positions_held(spec: ModelSpec, ctx: Ctx, rotary_saved: bool) -> int:
    """LlamaModel.forward (Mistral, Qwen2) holds cache_position (int64, one per token of the sequence)
    and the rotary position embeddings (cos, sin: 1 x seq x head_dim each, in the hidden states' dtype)
    while the layers run; cos and sin count as saved where the layers need gradients (activation_profile
    saves them then). With prefix tuning's past keys the causal mask cannot be skipped: masking_utils
    builds a (1, 1, seq, past + seq) bool mask, held too (traced)."""
    if spec.model_type not in ("llama", "mistral", "qwen2"):
        return 0
    rotary = 0 if rotary_saved else 2 * ctx.seq * spec.head_dim * DTYPE_BYTES[ctx.weight]
    mask = ctx.seq * ctx.kv_seq if ctx.kv_seq != ctx.seq else 0
    return ctx.seq * 8 + rotary + mask


def _embedding_indices_saved(spec: ModelSpec, plan: Plan, layout: Layout, ctx: Ctx) -> list:
    """(numel, tag) of the int64 indices the model's forward makes for its position or token-type
    embeddings, which their EmbeddingBackward saves when the embedding trains (derivatives.yaml
    embedding: indices): GPT2Model.forward's position_ids, arange(seq).unsqueeze(0) (wpe);
    BertEmbeddings.forward's token types, gathered from the registered all-zeros buffer at the
    position ids, 1 x seq; RobertaEmbeddings.forward's, batch x seq, gathered at the batch x seq
    position ids create_position_ids_from_input_ids makes (position_embeddings). BERT's position ids
    are a slice of its registered buffer (counted with the buffers)."""
    if spec.model_type == "gpt2":
        return [(ctx.seq, "wpe.position_ids")] if _trains(plan, "transformer.wpe") else []
    if spec.model_type not in ("bert", "roberta"):
        return []
    embeddings = layout.embedding_path.rsplit(".", 1)[0]
    rows = ctx.batch if spec.model_type == "roberta" else 1
    out = []
    if _trains(plan, f"{embeddings}.token_type_embeddings"):
        out.append((rows * ctx.seq, "token_type_embeddings.token_type_ids"))
    if spec.model_type == "roberta" and _trains(plan, f"{embeddings}.position_embeddings"):
        out.append((rows * ctx.seq, "position_embeddings.position_ids"))
    return out


def _lookup_saved(plan: Plan, indices: list) -> int:
    """What the model's forward saved before the blocks ('pre') that is still saved when the embeddings'
    backward runs, last in the backward (torch's engine runs nodes in reverse creation order): only what
    the lookups' own EmbeddingBackward nodes hold, the int64 indices (_embedding_indices_saved; peft's
    prompt encoder's virtual-token indices). Everything else in 'pre' has been released by then by the
    node that saved it: the embeddings' LayerNorm input and statistics and dropout mask (BERT, RoBERTa,
    GPT-2's drop), the rotary cos and sin of the Llama family, whose last holder is block 0's q * cos
    (traced, fake tensors: bert-base frozen bf16 b1 s128, no activations left at the tied embedding's
    gradient sum; llama-3.2-1b full bf16 b4 s128, the cos/sin, 2 x 128 x 64 x 2 bytes, freed in block 0)."""
    prompt = plan.settings.num_virtual_tokens * 8 if plan.settings.method in ("prefix", "prompt") else 0
    return sum(numel * 8 for numel, _tag in indices) + prompt


def _forward_checkpoint_inputs(spec: ModelSpec, ctx: Ctx, t: TrainingSettings, per_layer: tuple,
                               checkpointed: tuple = ()) -> int:
    """Under checkpointing, the hidden states a light block's forward holds (_forward_transient: the
    embeddings output and the block's input) were each a checkpoint's input, which torch saves for
    backward whether or not anything below needs a gradient (torch/utils/checkpoint.py
    _checkpoint_without_reentrant_generator: ``_NoopSaveInputs.apply(dummy, kwargs, *args)``, a
    save_for_backward of every tensor argument): two of them from the second block on, the first and
    the second block's inputs, each where its block is checkpointed."""
    if not t.grad_checkpointing or all(per_layer):
        return 0
    wrapped = min(2, spec.num_layers) if all(checkpointed) else sum(checkpointed[:2])
    return wrapped * ctx.tokens * spec.hidden_size * DTYPE_BYTES[ctx.weight]


def _checkpointed_layer_positions(spec: ModelSpec, ctx: Ctx, t: TrainingSettings) -> int:
    """Under gradient checkpointing transformers' GradientCheckpointingLayer (modeling_layers.py)
    checkpoints ``partial(forward, self, **kwargs)``, and torch.utils.checkpoint's frame keeps that
    function to recompute the layer (``_CheckpointFrame.recompute_fn``) until the layer's backward has
    released its saved tensors: what a layer gets as a keyword argument outlives the model's forward. The
    decoders pass every layer the same int64 positions, GPT2Model.forward's and LlamaModel.forward's
    (Mistral, Qwen2) ``position_ids = arange(seq).unsqueeze(0)``, 1 x seq, held until block 0's
    backward (traced: seq x 8 bytes, 'other', at the checkpointed decoders' backward peaks; GPT-2's
    wpe, when it trains, saves them anyway)."""
    if not t.grad_checkpointing or spec.model_type not in ("gpt2", "llama", "mistral", "qwen2"):
        return 0
    return ctx.seq * 8


def _prompt_inputs_held(spec: ModelSpec, plan: Plan, ctx: Ctx) -> int:
    """Prompt tuning: peft's PeftModel.forward keeps `prompts` (the prompt encoder's output repeated
    over the batch) and inputs_embeds = cat(prompts, word embeddings) referenced while the base model
    runs; where the model's embeddings make a new tensor from inputs_embeds (BERT/RoBERTa add positions
    and token types, GPT-2 positions) the concatenation is held besides the embedding output."""
    if plan.settings.method != "prompt":
        return 0
    wb = DTYPE_BYTES[ctx.weight]
    prompts = ctx.batch * plan.settings.num_virtual_tokens * spec.hidden_size * wb
    concatenated = ctx.tokens * spec.hidden_size * wb if spec.model_type in ("bert", "roberta", "gpt2") else 0
    return prompts + concatenated


@dataclass(frozen=True)
class BlockSimulation:
    """One block: its saved bytes (total and by tag), its output's requires-grad and dtype, the peaks
    inside its forward and its backward (from its output's gradient to its input's), and the same under
    gradient checkpointing (torch.utils.checkpoint, non-reentrant), where the block's input is the
    checkpoint's and counted outside it: its backward, in which the first node that unpacks a saved
    variable recomputes the forward (stopped at the last save, see Recorder; peftcalc.backward)."""

    saved: int
    tags: tuple
    out_rg: bool
    out_dtype: str
    backward: BackwardPeak
    forward_peak: int = 0  # saved + live bytes at the peak of its forward, its input included
    forward_peak_saved: int = 0  # what of it is saved
    saves_input: bool = False
    leaves: int = 0  # unsaved bytes still referenced when it returns, besides its input and output
    checkpointed_backward: BackwardPeak = BackwardPeak()  # recompute and backward's peak, its input not included


@lru_cache(maxsize=4096)
def _simulate_block(spec: ModelSpec, plan: Plan, lt: LayerTraining, ctx: Ctx, input_rg: bool,
                    input_dtype: str) -> BlockSimulation:
    """One block (BLOCKS) on an input of `input_rg`, `input_dtype`, replayed backward (peftcalc.backward)
    from its output's gradient; input buffers sum out of place under a TorchDispatchMode (the harness's
    cpu/fake tracer: at::isTensorSubclassLike), in place on plain cuda tensors."""
    rec = Recorder(ctx, bucket=0)
    x = rec.new(ctx.tokens * spec.hidden_size, input_dtype, input_rg)
    out = BLOCKS[spec.model_type](rec, spec, plan, lt, x)
    saved = rec.saved_bytes()
    incoming = {out.id: out.nbytes} if out.rg else {}
    in_place = ctx.device == "cuda"
    # under checkpointing the input is the checkpoint's, counted outside the block
    recompute = rec.recompute_peak - x.nbytes if rec.recompute_peak else 0
    # what of it the recompute saves into the checkpoint's frame (autograd holds it for backward)
    recompute_saved = rec.recompute_peak_saved - (x.nbytes if x.id in rec.saved else 0)
    replay, checkpointed = run_backward_both(rec.nodes, saved, incoming, in_place, recompute,
                                             recompute_saved if recompute else 0,
                                             checkpoint_input=x.id if x.id in saved else None)
    leaves = rec.live_bytes - rec.live.get(out.id, 0) - rec.live.get(x.id, 0)
    return BlockSimulation(sum(saved.values()), tuple(rec.bytes_by_tag().items()), out.rg, out.dtype, replay.peak,
                           rec.forward_peak, rec.forward_peak_saved, x.id in rec.saved, leaves,
                           checkpointed_backward=checkpointed.peak)


@lru_cache(maxsize=4096)
def _reentrant_block(spec: ModelSpec, plan: Plan, lt: LayerTraining, ctx: Ctx, input_rg: bool,
                     input_dtype: str) -> BackwardPeak:
    """The peak of one block's backward under reentrant checkpointing (torch/utils/checkpoint.py
    CheckpointFunction.backward, use_reentrant=True), its input (the checkpoint's saved tensor, which
    the recompute's detach_variable copies share) counted outside, as under non-reentrant checkpointing:
    - the recompute runs the whole forward again under torch.enable_grad() (no early stop, unlike the
      non-reentrant _recomputation_hook), with the incoming gradient alive: the block's forward peak;
    - then ``torch.autograd.backward(outputs_with_grad, args_with_grad)`` replays the block's nodes
      (peftcalc.backward) with every recomputed saved tensor held from the start, as without
      checkpointing, while ``outputs`` keeps the recomputed block output referenced and ``args`` the
      incoming gradient, both to the end (the engine passes the incoming gradient on, and sums into it,
      but cannot free it before CheckpointFunction.backward returns). A sentinel node created first (so
      replayed last) holds the incoming gradient (Node.hold on the output's node).
    The detached input is a leaf that requires grad: under autocast the ops that cast it share one cached
    cast (autocast_in), where a forward makes one per op (traced: BERT's query, key and value Linears).
    Autocast's cache of the recompute empties when its autocast context exits, before the backward."""
    rec = Recorder(ctx, bucket=0)
    x = rec.new(ctx.tokens * spec.hidden_size, input_dtype, input_rg)
    if input_rg:  # detach_variable: x.detach() with x's requires_grad, a leaf (autocast caches its casts)
        rec.leaf_casts[x.id] = None
    out = BLOCKS[spec.model_type](rec, spec, plan, lt, x)
    incoming = out.nbytes if out.rg else 0
    x_saved = x.nbytes if x.id in rec.saved else 0
    recompute = BackwardPeak(rec.forward_peak_saved - x_saved,
                             incoming + rec.forward_peak - rec.forward_peak_saved - (x.nbytes - x_saved))
    saved = rec.saved_bytes()
    if x.id in saved:
        saved[x.id] = 0
    sentinel = rec.next_id + 1
    nodes = [Node(sentinel)] + [Node(*n)._replace(hold=sentinel) if n[0] == out.id else n for n in rec.nodes]
    replay = run_backward(nodes, saved, {out.id: out.nbytes} if out.rg else {}, in_place=ctx.device == "cuda")
    output = out.nbytes if (out.base or out).id not in rec.saved else 0
    inner = BackwardPeak(replay.peak.saved, replay.peak.buffers + output, replay.peak.params)
    return inner if inner.total > recompute.total else recompute


def _stream_dtype(ctx: Ctx) -> str:
    return ctx.weight


@lru_cache(maxsize=1024)
def _trainable_names(plan: Plan) -> frozenset:
    """Names of the trainable parameters outside the blocks (a modules_to_save copy counts as its
    original)."""
    return frozenset(g.name.split("#", 1)[0] for g in plan.groups if g.trainable and g.layer is None)


def _trained_norm_params(plan: Plan, path: str) -> int:
    """How many of the weight and bias of the LayerNorm at `path` (outside the blocks) train (2 when
    neither does: layer_norm then makes no parameter gradient)."""
    names = _trainable_names(plan)
    return ((f"{path}.weight" in names) + (f"{path}.bias" in names)) or 2


def _trains(plan: Plan, path: str, weight_only: bool = False) -> bool:
    names = _trainable_names(plan)
    if weight_only:
        return f"{path}.weight" in names or path in names
    return any(n == path or n.startswith(path + ".") for n in names)


def _embeddings(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: T) -> T:
    h = spec.hidden_size
    if spec.is_vision and rec.ctx.autocast and _trains(plan, layout.embedding_path):
        # the patch embedding's Conv2d under autocast: convolution_backward's formula saves the input and
        # the weight whenever the node exists (any of them needs a gradient), here their bf16 copies
        image = spec.num_channels * spec.image_size ** 2
        rec.save_new(rec.ctx.batch * image, rec.ctx.autocast, "patch_embedding.input")
        rec.save_new(spec.hidden_size * image // spec.num_patches, rec.ctx.autocast, "patch_embedding.weight")
    if spec.model_type == "gpt2":
        return dropout(rec, x, dropout_p(spec, "embd"), "embeddings.dropout")
    if spec.model_type in ("bert", "roberta"):
        norm = f"{layout.embedding_path.rsplit('.', 1)[0]}.LayerNorm"
        x = layer_norm(rec, x, _trains(plan, norm), h, "embeddings.LayerNorm", _trained_norm_params(plan, norm))
        return dropout(rec, x, dropout_p(spec, "embd"), "embeddings.dropout")
    if spec.model_type == "clip_vision_model":
        return layer_norm(rec, x, _trains(plan, "pre_layrnorm"), h, "pre_layrnorm",
                          _trained_norm_params(plan, "pre_layrnorm"))
    return x


def _head_linear(rec: Recorder, plan: Plan, x: T, path: str, in_f: int, out_f: int, tag: str,
                 trains: bool | None = None) -> T:
    """A head Linear: trainable (a modules_to_save copy, a trainable head), or a LoRA/DoRA target
    (all-linear takes the MLM transform's dense, BERT's pooler and ViT's classifier; DoRA subtracts the
    bias of one that has it, see _dora)."""
    s = plan.settings
    lora = s.method in ("lora", "qlora") and path in plan.targets
    w = _trains(plan, path, True) if trains is None else trains
    return linear(rec, x, in_f, out_f, w, tag, lora_rank=s.rank if lora else 0, dora=s.dora and lora,
                  quantized=path in quantized_paths(plan), bias=path in _biased_paths(build_layout(plan.spec)),
                  bias_trains=f"{path}.bias" in _trainable_names(plan))


@lru_cache(maxsize=256)
def _biased_paths(layout: Layout) -> frozenset:
    """Paths of the model's modules that carry a bias."""
    return frozenset(m.path for m in layout.modules if m.bias)


@lru_cache(maxsize=1024)
def quantized_paths(plan: Plan) -> frozenset:
    """Module paths whose weight is NF4 (QLoRA: bitsandbytes Linear4bit, methods._quantizable)."""
    return frozenset(g.name.rsplit(".", 1)[0] for g in plan.groups if g.quantized)


def _first_token(rec: Recorder, x: T, batch: int) -> T:
    """x[:, 0]: a view; saving it keeps x's whole storage. Its backward (select_backward) makes a new
    gradient like x (zeros, then the copy)."""
    v = rec.view(x, batch * (x.numel // rec.ctx.tokens))
    rec.node(v, *_grads(x))
    return v


def _has_final_norm(spec: ModelSpec, layout: Layout) -> bool:
    return bool(layout.final_norm_path) and spec.model_type != "clip_vision_model"  # CLIP norms only the pooled token


def _final_norm(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: T) -> T:
    """The base model's final norm on the last block's output (x itself where it has none)."""
    if not _has_final_norm(spec, layout):
        return x
    norm_trains = _trains(plan, layout.final_norm_path)
    if spec.model_type in ("llama", "mistral", "qwen2"):
        return rms_norm(rec, x, norm_trains, "norm")
    return layer_norm(rec, x, norm_trains, spec.hidden_size, layout.final_norm_path,
                      _trained_norm_params(plan, layout.final_norm_path))


def _head(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: T):
    """Final norm and task head (as each ForXxx class runs them); returns (logits numel, the final
    hidden state, the tensor whose gradient starts the head's backward: the logits, or the bare
    encoder's loss)."""
    ctx = rec.ctx
    h, tok, b = spec.hidden_size, ctx.tokens, ctx.batch
    x = _final_norm(rec, spec, plan, layout, x)
    if spec.task == "causal_lm":
        tied = layout.head_tied_to_embedding and plan.embedding_trains  # its gradient waits for the lookup's
        logits = linear(rec, x, h, spec.vocab_size, _trains(plan, "lm_head", True) or tied, "lm_head", grad_pending=tied)
        return tok * spec.vocab_size, x, logits
    if spec.task == "masked_lm":
        c = "cls.predictions" if spec.model_type == "bert" else "lm_head"
        dense = f"{c}.transform.dense" if spec.model_type == "bert" else f"{c}.dense"
        norm = f"{c}.transform.LayerNorm" if spec.model_type == "bert" else f"{c}.layer_norm"
        d = _head_linear(rec, plan, x, dense, h, h, "mlm.dense")
        d = activation(rec, d, "gelu", "mlm.act")
        d = layer_norm(rec, d, _trains(plan, norm), h, "mlm.layer_norm", _trained_norm_params(plan, norm))
        tied = layout.head_tied_to_embedding and plan.embedding_trains  # its gradient waits for the lookup's
        logits = linear(rec, d, h, spec.vocab_size, _trains(plan, f"{c}.decoder", True) or tied, "mlm.decoder",
                        grad_pending=tied, bias=True, bias_trains=_trains(plan, _mlm_decoder_bias(spec, layout)))
        return tok * spec.vocab_size, x, logits
    if spec.task == "seq_cls" and spec.is_decoder:  # score on every position, then gather the last
        scores = _head_linear(rec, plan, x, "score", h, spec.num_labels, "score")
        # logits[arange(b), last_non_pad]: index's backward makes zeros like the scores and index_put
        logits = rec.new(b * spec.num_labels, scores.dtype, scores.rg)
        rec.node(logits, [("new", "z", scores.nbytes), ("new", "d", scores.nbytes), ("free", "z")],
                 [(scores.id, "d")])
        return b * spec.num_labels, x, logits
    p = dropout_p(spec, "resid")
    if spec.task == "seq_cls" and spec.model_type == "bert":  # BertPooler, dropout, classifier
        pooled = _head_linear(rec, plan, _first_token(rec, x, b), "bert.pooler.dense", h, h, "pooler.dense")
        pooled = _tanh(rec, pooled, "pooler.tanh")
        pooled = dropout(rec, pooled, p, "classifier.dropout")
        logits = _head_linear(rec, plan, pooled, "classifier", h, spec.num_labels, "classifier")
        return b * spec.num_labels, x, logits
    if spec.task == "seq_cls":  # RobertaClassificationHead: dropout, dense, tanh, dropout, out_proj
        d = dropout(rec, _first_token(rec, x, b), p, "classifier.dropout")
        d = _head_linear(rec, plan, d, "classifier.dense", h, h, "classifier.dense")
        d = _tanh(rec, d, "classifier.tanh")
        d = dropout(rec, d, p, "classifier.dropout2")
        logits = _head_linear(rec, plan, d, "classifier.out_proj", h, spec.num_labels, "classifier.out_proj")
        return b * spec.num_labels, x, logits
    if spec.task == "image_cls":  # classifier(sequence_output[:, 0, :])
        logits = _head_linear(rec, plan, _first_token(rec, x, b), "classifier", h, spec.num_labels, "classifier")
        return b * spec.num_labels, x, logits
    # A bare encoder is trained here on last_hidden_state.float().pow(2).mean() (measure.run
    # forward_loss): pow saves its fp32 input; the backward expands the mean's gradient and makes
    # pow's grad * 2 x (x.pow(1) and 2 * _ as temporaries).
    x32 = cast(rec, x, "float32")
    loss = rec.new(1, "float32", x.rg)
    if x.rg:
        xs = rec.save(x32, "loss.pow_input")
        n = x32.nbytes
        sq = rec.new(x.numel, "float32", True)
        rec.node(sq, [("new", "t", n), ("new", "u", n), ("new", "d", n), ("free", "t"), ("free", "u")],
                 [(x32.id, "d")], [xs])
        rec.node(loss, [("new", "d", n)], [(sq.id, "d")])
    return 0, x, loss


def _mlm_decoder_bias(spec: ModelSpec, layout: Layout) -> str:
    """The masked-LM decoder's bias parameter: BertLMPredictionHead's / RobertaLMHead's ``bias``, which
    ``decoder.bias`` is (the layout's "<head>.bias"), or an untied decoder's own."""
    c = "cls.predictions" if spec.model_type == "bert" else "lm_head"
    names = {m.path for m in layout.modules}
    return f"{c}.bias" if f"{c}.bias" in names else f"{c}.decoder.bias"


def _unsaved_model_output(rec: Recorder, hidden: T) -> int:
    """The base model's output (last_hidden_state: the final norm's output, or the last block's)
    stays alive until the loss is computed, because the ForXxx forward holds ``outputs`` (e.g.
    LlamaForCausalLM.forward: outputs = self.model(...); logits = self.lm_head(outputs.last_hidden_state);
    loss = self.loss_function(...)). Counted here when no op saved it (a frozen head, or autocast's
    head saving a cast copy); a saved one is already in the saved bytes."""
    storage = hidden.base if hidden.base is not None else hidden
    return 0 if storage.id in rec.saved else storage.nbytes


def _tanh(rec: Recorder, x: T, tag: str) -> T:
    """tanh saves its output; tanh_backward makes a new gradient."""
    out = rec.new(x.numel, x.dtype, x.rg)
    if x.rg:
        rec.node(out, *_grads(x), saved=[rec.save(out, f"{tag}.output")])
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
    The forward's peak is nll_loss_forward's return (aten nll_loss_forward: the loss and total_weight,
    two scalars in the loss dtype; NllLossBackward0 saves total_weight), while ForCausalLMLoss still holds
    the padded labels its shift_labels were cut from (``labels = pad(labels, (0, 1))``: b x (seq + 1) int64);
    traced on tiny-blip2 amp-bf16 b2 s16 (tests/peftcalc/test_memory.py).
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
    padded_labels = (ctx.tokens + ctx.batch) * 8 if spec.task == "causal_lm" else 0
    total_weight = lb
    saved = log_softmax_out + shift_labels + total_weight
    upcast_copy = logits_numel * lb if logit_dtype != loss_dtype else 0
    forward_peak = logits_numel * DTYPE_BYTES[logit_dtype] + upcast_copy + saved + padded_labels + lb
    return LossBuffers(saved=saved, saved_backward=log_softmax_out, backward_peak=3 * logits_numel * lb,
                       forward_peak=forward_peak, scalars=2 * lb)


def _forward_transient(spec: ModelSpec, plan: Plan, ctx: Ctx, per_layer: tuple, unsaved_block_live: int = 0) -> int:
    """The working set of one block's forward that autograd does not keep (what the forward:block event
    adds under gradient checkpointing). Where some block saves nothing (it is below the lowest trainable
    one) it is that block's forward as simulated op by op (`unsaved_block_live`, see _run_blocks: a block
    whose ops save nothing runs the same ops under checkpointing), the hidden states the model holds
    meanwhile, autocast's weight copies and cast inputs included (traced: fake tiny-vit-cls frozen
    amp-bf16 b3 s48 ckpt). Blocks that save their intermediates still hold one unsaved buffer at a time:
    the raw scores before softmax (eager, CPU math path) or one MLP output; DoRA adds B @ A and
    W + s * BA (out x in) and the identity it multiplies (in x in), per layer (peft tuners/lora/dora.py)."""
    if any(not a for a in per_layer):
        return unsaved_block_live
    tok, b, s, kv = ctx.tokens, ctx.batch, ctx.seq, ctx.kv_seq
    cb = DTYPE_BYTES[ctx.autocast or ctx.compute]
    scores = b * spec.num_heads * s * kv
    dora = 0
    if plan.settings.dora and plan.targets:
        layout = build_layout(spec)
        mods = {m.path: m for m in layout.modules}
        dora = max(((m.in_features ** 2 + 3 * m.in_features * m.out_features) * DTYPE_BYTES[ctx.adapter]
                    for m in (mods[p] for p in plan.targets) if m.kind in ("linear", "conv1d")), default=0)
    fused = ctx.attention != "eager" and not (dropout_p(spec, "attn") > 0 and ctx.device == "cpu")
    return max(dora, tok * spec.intermediate_size * cb if fused else scores * 4)


def _autocast_weight_cache(plan: Plan, ctx: Ctx) -> int:
    """torch.autocast caches the lower-precision copy of every leaf weight that requires grad (the
    autocast weight cache, cleared when the autocast region exits), so the copies of all trainable
    matmul weights are alive at the end of the forward even where checkpointing saves none of them.
    (activation_profile subtracts the copies the head saves anyway, which are one tensor with the
    cached ones.) The matmuls' trainable biases are cast too (addmm's bias argument) and cached alike
    (traced: fake tiny-qwen2 full amp-bf16 b3 s48 ckpt, the q/k/v biases' bf16 copies at the loss)."""
    if not ctx.autocast:
        return 0
    return _autocast_cached_numel(plan) * DTYPE_BYTES[ctx.autocast]


@lru_cache(maxsize=1024)
def _autocast_cached_numel(plan: Plan) -> int:
    """Elements of the weights autocast caches a copy of (_autocast_weight_cache), from the plan alone."""
    layout = build_layout(plan.spec)
    matmul_params = {f"{m.path}.{p}" for m in layout.modules if m.kind in LINEAR_KINDS for p in ("weight", "bias")}
    if plan.spec.task == "masked_lm":  # the decoder's bias, a parameter of the head (_mlm_decoder_bias)
        matmul_params.add(_mlm_decoder_bias(plan.spec, layout))
    numel = sum(g.numel for g in plan.groups if g.trainable and (g.name in matmul_params or g.origin == "lora"))
    if layout.head_tied_to_embedding and plan.embedding_trains:
        numel += plan.spec.vocab_size * plan.spec.hidden_size
    return numel


def _autocast_cached_by_layer(plan: Plan, ctx: Ctx) -> tuple:
    """Per block, the bytes of autocast's cached copies of its trainable matmul weights and biases (the
    part of _autocast_weight_cache each block owns; 0 without autocast)."""
    if not ctx.autocast:
        return (0,) * plan.spec.num_layers
    return tuple(n * DTYPE_BYTES[ctx.autocast] for n in _autocast_cached_numel_by_layer(plan))


@lru_cache(maxsize=1024)
def _autocast_cached_numel_by_layer(plan: Plan) -> tuple:
    layout = build_layout(plan.spec)
    matmul_params = {f"{m.path}.{p}" for m in layout.modules if m.kind in LINEAR_KINDS for p in ("weight", "bias")}
    numel = [0] * plan.spec.num_layers
    for g in plan.groups:
        if g.trainable and g.layer is not None and (g.name in matmul_params or g.origin == "lora"):
            numel[g.layer] += g.numel
    return tuple(numel)


def _saved_before_last_light_block(per_layer: tuple) -> int:
    """Activations saved by the blocks below the last block that saves nothing (all of them when
    every block saves something)."""
    light = [i for i, a in enumerate(per_layer) if not a]
    return sum(per_layer[: light[-1]]) if light else sum(per_layer)


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
    input_leaf: int = 0  # the hooked patch_embedding output (not among `kept`; _vision_input_leaf_bytes)


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
    (pre_layrnorm's output) is alive throughout; it is among the saves when checkpointing keeps it.
    With checkpoint_every > 1 only the layers peftcalc.checkpointing names are checkpointed; the others
    save as without checkpointing (their input still needs a gradient: the hook is on)."""
    from peftcalc.methods import vision_layers_used

    vplan = vision_plan(plan)
    input_rg = t.grad_checkpointing  # see _vision_input_grad_saves
    wrapped = checkpointed_layers(plan.spec, t, "vision") or (False,) * plan.spec.vision.num_layers
    if vplan.lowest_trainable_layer is None and not input_rg:
        return VisionSaves()
    vspec = vplan.spec
    ctx = make_ctx(vspec, vplan, t)
    used = vision_layers_used(plan.spec)
    tok, h, inter = ctx.tokens, vspec.hidden_size, vspec.intermediate_size
    wb, cb = DTYPE_BYTES[ctx.weight], DTYPE_BYTES[ctx.autocast or ctx.compute]
    x_rg, x_dtype = input_rg, ctx.weight  # pre_layrnorm's output (LayerNorm: fp32 under autocast)
    leaf = _vision_input_leaf_bytes(vspec, ctx) if input_rg else 0
    kept = leaf + _vision_input_grad_saves(vspec, ctx) if input_rg else 0
    dropped = cached = peak = 0
    feature_rg = False
    for i, lt in enumerate(_layer_trainings(vplan, build_layout(vspec))):
        block = _simulate_block(vspec, vplan, lt, ctx, x_rg, x_dtype)
        saved, tags, x_rg_next, x_dtype_next = block.saved, block.tags, block.out_rg, block.out_dtype
        hook = {tag: nbytes for tag, nbytes in tags if tag.startswith(BLOCK_ADAPTER_TAG + ".")}
        after_mlp = sum(nbytes for tag, nbytes in tags if tag.startswith(("mlp.fc2.adapter.", BLOCK_ADAPTER_TAG + ".")))
        if wrapped[i] and saved:
            inside = saved - sum(hook.values())
            saved = (tok * h * DTYPE_BYTES[_stream_dtype(ctx)] if inside else 0) + sum(hook.values())
            cached += sum(nbytes for tag, nbytes in hook.items() if tag.endswith(".autocast_weight"))
        before = kept + dropped
        if saved - after_mlp and not wrapped[i]:  # LayerNorm output, activation output, fc2 output
            peak = max(peak, before + saved - after_mlp + tok * h * wb + tok * inter * cb + tok * h * cb)
        else:  # the layer's input (unless kept as a checkpoint's or it is the encoder input), x2, working set
            own_input = tok * h * wb if i and not (wrapped[i] and saved - sum(hook.values())) else 0
            peak = max(peak, before + saved - after_mlp + own_input + _frozen_layer_working_set(vspec, ctx))
        if i < used:
            kept += saved
        else:
            dropped += saved
        x_rg, x_dtype = x_rg_next, x_dtype_next
        if i == used - 1:
            feature_rg = x_rg
    if x_rg:  # post_layernorm(last_hidden_state[:, 0, :]): the whole output through the view, mean and rstd
        dropped += tok * h * DTYPE_BYTES[x_dtype] + 2 * ctx.batch * DTYPE_BYTES[layer_norm_stats_dtype(ctx, x_dtype)]
    encoder_input = 0 if t.grad_checkpointing else tok * h * wb
    return VisionSaves(kept - leaf, dropped, feature_rg, cached, encoder_input + peak, leaf)


def _frozen_layer_working_set(vspec: ModelSpec, ctx: Ctx) -> int:
    """What a CLIP encoder layer that saves nothing holds at its forward's peak besides its input (the
    per-layer part of vision_forward_bytes): the residual after attention, the MLP's LayerNorm output and
    the activation's intermediates, or, in the attention half, the LayerNorm output, q, k, v and the output."""
    tok, h = ctx.batch * vspec.vision_seq_len, vspec.hidden_size
    wb, cb = DTYPE_BYTES[ctx.weight], DTYPE_BYTES[ctx.autocast or ctx.compute]
    intermediates = 3 if vspec.hidden_act == "quick_gelu" else 2
    return max(2 * tok * h * wb + intermediates * tok * vspec.intermediate_size * cb, tok * h * wb + 4 * tok * h * cb)


def _vision_input_leaf_bytes(vspec: ModelSpec, ctx: Ctx) -> int:
    """Gradient checkpointing makes the vision tower's input need a gradient: transformers'
    PreTrainedModel.gradient_checkpointing_enable calls enable_input_require_grads for a model whose
    main input is input_ids (LLaVA), and that hooks the input embeddings of every PreTrainedModel inside,
    the CLIPVisionModel's patch_embedding too (its output.requires_grad_(True)): a leaf, b x patches x
    hidden in the conv's dtype (autocast's under autocast), that no op saves (CLIPVisionEmbeddings' cat
    with the class embedding saves nothing) but its AccumulateGrad node holds to the end of backward, as
    the language model's hooked token embeddings (ActivationProfile.input_leaf; the tracer counts it
    as 'other'). Its .grad, written at the end of backward, is not counted."""
    return ctx.batch * vspec.num_patches * vspec.hidden_size * DTYPE_BYTES[ctx.autocast or ctx.weight]


def _vision_input_grad_saves(vspec: ModelSpec, ctx: Ctx) -> int:
    """What the vision tower saves because its input needs a gradient (_vision_input_leaf_bytes): the
    position add saves nothing; pre_layrnorm saves its input (b x 577 x hidden, fp32 under autocast: the
    cat promotes to the fp32 class embedding) with mean and rstd, and every encoder layer saves (its
    checkpointed input)."""
    v = vspec
    tok = ctx.batch * v.vision_seq_len
    # pre_layrnorm's input: the weight dtype, or fp32 under autocast (the cat's promotion), as its weights
    stats = layer_norm_stats_dtype(ctx, "float32" if ctx.autocast else ctx.weight)
    return tok * v.hidden_size * DTYPE_BYTES[ctx.weight] + 2 * tok * DTYPE_BYTES[stats]


def projector_input_numel(spec: ModelSpec, batch: int) -> int:
    """Elements of the storage LlavaMultiModalProjector.linear_1 saves for its weight's gradient when it
    reads the selected hidden state as it is (no autocast copy). F.linear on a 3-D input (aten::matmul,
    ATen/native/LinearAlgebra.cpp _matmul_impl) folds it with ``reshape(-1, hv)``: the "default"
    strategy's ``[:, 1:]`` view of the (b, 577, hv) hidden state cannot be folded in place when b > 1
    (the row stride skips the class token), so reshape makes a contiguous (b x 576 x hv) copy and mm
    saves it (traced: aten.clone (2, 16, 32) fp32, 4,096 B, on cpu tiny-llava projector fp32 b2 s32);
    with one image, or the "full" strategy, the fold is a view and mm saves the hidden state's own
    (b x 577 x hv) storage."""
    vseq = spec.vision.vision_seq_len
    if batch > 1 and spec.image_tokens != vseq:
        return batch * spec.image_tokens * spec.vision.hidden_size
    return batch * vseq * spec.vision.hidden_size


def _vlm_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """LlavaForConditionalGeneration.forward: the vision tower (frozen, it saves nothing; with unfrozen
    layers, see _vision_saves), the projector on the selected hidden state, masked_scatter of the image
    features into the token embeddings, then the language model and the loss over text + image tokens,
    which is the Llama profile at seq_len + image_tokens (the blocks' input needs a gradient whenever the
    projector trains, so a frozen language model still saves its activations in stage 1)."""
    from peftcalc.layout import PROJECTOR

    spec = plan.spec
    t_text = vlm_text_training(spec, t)
    # the language model's layers come after the vision tower's in model.modules() (peftcalc.checkpointing)
    text = _model_profile(text_plan(plan), t_text, checkpointed_layers(spec, t, "text"))
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
            rec.save_new(projector_input_numel(spec, b), ctx.weight, "projector.linear_1.input")
    if ctx.autocast and feature_rg:
        rec.save_new(hv * h, ctx.autocast, "projector.linear_1.autocast_weight")
    p1 = rec.new(b * itok * h, ctx.autocast or ctx.compute, trains or feature_rg)
    act = activation(rec, p1, "gelu", "projector.act")
    linear(rec, act, h, h, _trains(plan, f"{PROJECTOR}.linear_2", True), "projector.linear_2")
    if plan.embedding_trains:  # masked_scatter saves the image-token mask (bool, b x seq, expanded view)
        rec.save_new(ctx.tokens, "uint8", "masked_scatter.mask")
    leaf = 0
    if input_embeddings_require_grad(spec, t) and not _trains(plan, build_layout(spec).embedding_path):
        # the hooked output of the frozen token embeddings is a leaf held to the end of backward
        # (masked_scatter makes the tensor the language model gets; ActivationProfile.input_leaf)
        leaf = ctx.tokens * h * DTYPE_BYTES[ctx.weight]
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
    if vision_ws > text.pre + extra + leaf + transient_saved + transient:
        transient, transient_saved = vision_ws - text.pre - extra - leaf, 0
    # without checkpointing, the language model's block forward peak (ActivationProfile.forward_block_*)
    # with the vision tower's kept saves and the image features, or the vision tower's forward
    block_saved, block_live = text.forward_block_saved + extra, text.forward_block_live + features + vision_dropped
    if vision_ws > block_saved + block_live:
        block_saved, block_live = 0, vision_ws
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
    return replace(text, pre=text.pre + extra, input_leaf=text.input_leaf + leaf + vs.input_leaf,
                   forward_transient=transient, forward_transient_saved=transient_saved,
                   forward_block_saved=block_saved, forward_block_live=block_live,
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
    unsaved_bias_copies: int = 0  # autocast's cached copies of the trainable Linear biases (in `unsaved`)
    # autocast's cached copies of trainable weights that layers checkpointing leaves unwrapped save (in
    # `checkpointed`, as they are also in the cache memory counts under checkpointing)
    unwrapped_saved_copies: int = 0


def qformer_ctx(plan: Plan, ctx: Ctx) -> Ctx:
    """The Q-Former's Ctx: the language model's (`ctx`), or, where from_pretrained keeps the Q-Former in fp32
    (spec.kept_in_fp32: Blip2ForConditionalGeneration._keep_in_fp32_modules under fp16), fp32 weights and
    compute: Blip2QFormerModel.forward casts the query tokens to its layernorm's dtype ("Qformer is kept as
    fp32") and the encoder hidden states to theirs, so every op inside it runs in fp32."""
    if kept_in_fp32(plan.spec, QFORMER, ctx.weight):
        return replace(ctx, weight="float32", compute="float32")
    return ctx


@lru_cache(maxsize=4096)
def qformer_saves(plan: Plan, ctx: Ctx, wrapped: tuple = ()) -> QFormerSaves:
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
    `wrapped` (peftcalc.checkpointing, per layer; empty: every layer) says which layers checkpointing
    wraps: the others keep what they save, and the image features are the checkpoints' only while a
    wrapped layer saves (unless an unwrapped layer's cross-attention saved them already).
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
    if queries_rg or norm_trains:  # native_layer_norm saves mean and rstd (the input is the parameter):
        # fp32, but in the input's dtype on the CPU when input and weight are both half (see layer_norm;
        # traced: 2 x b x queries bf16 on cpu tiny-blip2-wide-vision bf16 b4 s4)
        half = qctx.device == "cpu" and qctx.weight != "float32" and not ctx.autocast
        rec.save_new(2 * batch * n, qctx.weight if half else "float32", f"{QFORMER}.layernorm.mean_rstd")
    x = rec.new(batch * n * hq, "float32" if ctx.autocast else qctx.weight, queries_rg or norm_trains)
    image = cast(rec, tower_out, qctx.weight)
    x = dropout(rec, x, dropout_p(qspec, "embd"), f"{QFORMER}.dropout")
    kept = unwrapped = 0
    wrapped = wrapped or (True,) * qspec.num_layers
    for i in range(qspec.num_layers):
        rec.bucket = i
        before = set(rec.saved)
        x_in = x
        x = qformer_layer(rec, spec, trains, i, x, image)
        layer_saved = sum(rec.saved[k][2] for k in set(rec.saved) - before)
        if not wrapped[i]:
            unwrapped += layer_saved
        elif layer_saved:
            kept += x_in.nbytes
    rec.bucket = "post"
    rec.ctx = ctx
    out = _qformer_linear(rec, trains, cast(rec, x, tower_out.dtype), hq, spec.hidden_size, LANGUAGE_PROJECTION)
    buckets = rec.bytes_by_bucket()
    layers = sum(v for k, v in buckets.items() if isinstance(k, int))
    cached = sum(n for bucket, tag, n in rec.saved.values() if bucket == "post" and tag.endswith(".autocast_weight"))
    image_bucket = rec.saved.get(image.id, (None,))[0]
    image_unwrapped = isinstance(image_bucket, int) and not wrapped[image_bucket]
    checkpointed = (buckets.get("pre", 0) + buckets.get("post", 0) + kept + unwrapped
                    + (image.nbytes if kept and not image_unwrapped else 0))
    unwrapped_copies = sum(c.nbytes for c in rec.cached if c.id in rec.saved and isinstance(rec.saved[c.id][0], int)
                           and not wrapped[rec.saved[c.id][0]])
    unsaved = x.nbytes if x.id not in rec.saved else 0
    weight_copies = bias_copies = 0
    if ctx.autocast:
        bias_copies = DTYPE_BYTES[ctx.autocast] * _trainable_linear_numel(plan, ".bias")
        unsaved += bias_copies
        weight_copies = DTYPE_BYTES[ctx.autocast] * _trainable_linear_numel(
            plan, ".weight", ".crossattention.attention.key", ".crossattention.attention.value")
    return QFormerSaves(saved=buckets.get("pre", 0) + layers + buckets.get("post", 0), checkpointed=checkpointed,
                        unsaved=unsaved, unsaved_image=0 if image.id in rec.saved else image.nbytes,
                        unsaved_weight_copies=weight_copies, saved_weight_copies=cached, output_rg=out.rg,
                        by_tag=tuple(rec.bytes_by_tag().items()),
                        tower_output=tower_out.nbytes if image is not tower_out else 0,
                        unsaved_bias_copies=bias_copies, unwrapped_saved_copies=unwrapped_copies)


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
    q = qformer_saves(plan, replace(ctx, seq=blip2_image_tokens(spec), kv_seq=blip2_image_tokens(spec)),
                      checkpointed_layers(spec, t, "qformer"))
    wrapped = checkpointed_layers(spec, t, "text")
    rec = Recorder(ctx)
    if q.output_rg:  # masked_scatter saves its (b, seq, 1) bool mask for the gradients of both inputs
        rec.save_new(tok, "uint8", "masked_scatter.mask")
    x = rec.new(tok * h, ctx.weight, q.output_rg)  # inputs_embeds + embed_positions(...)
    outputs = blip2_forward_outputs(spec, ctx, q, t.grad_checkpointing)
    # OPTDecoder.forward rebinds hidden_states: the blocks' first input is not held (inputs_embeds is,
    # among `outputs`)
    blocks = _run_blocks(rec, tspec, plan, layout, ctx, x, outputs, False, wrapped, t.checkpoint_reentrant)
    rec.bucket = "post"
    head_start = len(rec.nodes)
    logits_numel, x, root = _head(rec, tspec, plan, layout, blocks.out)
    head = _head_backward(rec, head_start, root)
    tags = dict(q.by_tag)
    for tag, nbytes in list(blocks.tags.items()) + list(rec.bytes_by_tag().items()):
        tags[tag] = tags.get(tag, 0) + nbytes
    by_bucket = rec.bytes_by_bucket()
    per_layer = blocks.per_layer
    saving = [a for i, a in enumerate(per_layer) if a and (not wrapped or wrapped[i])]
    # OPTDecoder's position_ids (b x seq, int64) are an input of every checkpointed layer
    ckpt_inputs = len(saving) * tok * h * DTYPE_BYTES[_stream_dtype(ctx)] + (tok * 8 if saving else 0)
    qformer = q.checkpointed if t.grad_checkpointing else q.saved
    pre = by_bucket.get("pre", 0) + qformer
    loss = _loss_buffers(tspec, ctx, logits_numel)
    transient = _forward_transient(tspec, plan, ctx, per_layer) + outputs
    transient_saved = _saved_before_last_light_block(per_layer)
    forward_block = blocks.mixed_forward_block if blocks.kept else blocks.forward_block
    block_saved, block_live = forward_block[0] + qformer, forward_block[1]
    vision = eva_forward_bytes(spec, ctx)  # runs before anything is saved
    if vision > pre + (0 if t.grad_checkpointing else transient_saved) + transient:
        transient, transient_saved = vision - pre, 0
    if vision > block_saved + block_live:  # the tower's forward: the Q-Former has saved nothing yet
        block_saved, block_live = 0, vision
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
        forward_transient=transient,
        forward_transient_saved=transient_saved,
        # the projection's saved weight copy is the cache's own, already in `pre`; the biases' copies are
        # among the forward's outputs (blip2_forward_outputs: QFormerSaves.unsaved)
        autocast_weight_cache=_autocast_weight_cache(plan, ctx) - q.saved_weight_copies - q.unsaved_bias_copies
        - q.unwrapped_saved_copies - _unwrapped_saved_copies(plan, ctx, blocks, wrapped),
        # Blip2ForConditionalGeneration.forward computes the loss itself, after OPTForCausalLM.forward has
        # returned CausalLMOutputWithPast (logits and past_key_values): the decoder's last hidden state
        # died with OPTForCausalLM's `outputs`, so no model_output is alive while the loss runs (traced)
        model_output=0,
        head_backward=head,
        forward_block_saved=block_saved,
        forward_block_live=block_live,
        forward_leaves=blocks.leaves,
        blocks=blocks.blocks,
        by_tag=tuple(sorted(tags.items())),
        checkpointed=wrapped,
        reentrant_backward=blocks.reentrant if t.checkpoint_reentrant else (),
    )
