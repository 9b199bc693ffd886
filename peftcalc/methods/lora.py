"""LoRA, DoRA and QLoRA (peft tuners/lora): the A/B matrices (and DoRA's magnitude) they add, the NF4
base QLoRA quantizes, and the ops a LoRA/DoRA layer runs after its base Linear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from peftcalc.backward import GRAD
from peftcalc.errors import CombinationError, InputError
from peftcalc.layout import LINEAR_KINDS, Layout, Module
from peftcalc.methods.groups import base_groups, head_copy, modules_by_path, resolve_targets, shape_numel
from peftcalc.methods.vlm import projector_copy, vision_trains_fn
from peftcalc.ops.linear import matmul
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import add, autocast_in, autocast_weight_copy, cast, clone, mul_node, promote, scale
from peftcalc.plan import ParamGroup
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "DoraWeightNorm",
    "dora_output",
    "dora_weight_norm",
    "lora",
    "lora_numel",
    "lora_shapes",
    "plan_lora",
    "quantizable",
]


def lora_numel(module: Module, rank: int, dora: bool) -> tuple[int, int]:
    """LoRA A and B (plus DoRA's magnitude) for one module, as peft's LoraLayer.update_layer makes them:
    Linear/Conv1D: A r x in, B out x r, magnitude out; Embedding: A r x num, B dim x r
    (Hu et al. 2021, LoRA, section 4.1; Liu et al. 2024, DoRA, section 4.1)."""
    if module.kind in LINEAR_KINDS:
        ab = rank * (module.in_features + module.out_features)
        return ab, (module.out_features if dora else 0)
    if module.kind == "embedding":
        num, dim = module.shape
        return rank * (num + dim), (dim if dora else 0)
    if module.kind == "param" and module.role == "experts":  # peft ParamWrapper: rank r per expert
        experts, out_f, in_f = module.shape
        return experts * rank * (in_f + out_f), 0
    raise InputError(f"LoRA cannot wrap module '{module.path}' ({module.kind}); target Linear or Embedding modules")


def lora_shapes(module: Module, rank: int) -> list[tuple[str, tuple]]:
    """peft's LoRA tensors for one module: lora_A.weight (r, in) and lora_B.weight (out, r) for
    Linear/Conv1D; lora_embedding_A (r, num) and lora_embedding_B (dim, r) for Embedding."""
    if module.kind in LINEAR_KINDS:
        return [("lora_A.weight", (rank, module.in_features)), ("lora_B.weight", (module.out_features, rank))]
    if module.kind == "param":  # fused experts (E, out, in) through target_parameters: lora_A (E*r, in), lora_B (out, E*r)
        experts, out_f, in_f = module.shape
        return [("lora_A.weight", (experts * rank, in_f)), ("lora_B.weight", (out_f, experts * rank))]
    num, dim = module.shape
    return [("lora_embedding_A", (rank, num)), ("lora_embedding_B", (dim, rank))]


def plan_lora(spec, layout, s):
    if s.rank < 1:
        raise InputError(f"rank must be a positive integer, got {s.rank}", names=("rank",))
    mods = modules_by_path(layout)
    targets = resolve_targets(spec, layout, s)
    quantize = s.method == "qlora"
    vision = vision_trains_fn(spec, s)  # a VLM's unfrozen vision layers train as they are (requires_grad)
    groups = [
        replace(g, quantized=quantize and g.name.endswith(".weight") and quantizable(mods, g.name, layout))
        for g in base_groups(layout, vision)
    ]
    for path in targets:
        m = mods[path]
        if m.kind == "param" and s.dora:
            raise CombinationError(f"DoRA does not wrap parameters (peft ParamWrapper): '{path}'")
        limit = min(m.in_features, m.out_features) if m.kind in LINEAR_KINDS else min(m.shape[-2:] if m.kind == "param" else m.shape)
        if s.rank > limit:
            raise CombinationError(f"rank {s.rank} is larger than module '{path}' ({m.in_features} -> {m.out_features})"
                             if m.kind in LINEAR_KINDS else f"rank {s.rank} is larger than module '{path}'", names=("rank",))
        for name, shape in lora_shapes(m, s.rank):
            groups.append(ParamGroup(f"{path}.{name}", shape_numel(shape), True, "lora", m.layer, shape=shape))
        _, magnitude = lora_numel(m, s.rank, s.dora)
        if magnitude:
            groups.append(ParamGroup(f"{path}.lora_magnitude_vector", magnitude, True, "dora", m.layer,
                                     shape=(magnitude,)))
    return groups + head_copy(layout, spec) + projector_copy(layout, spec), targets


def quantizable(mods: dict[str, Module], param: str, layout: Layout) -> bool:
    """transformers (integrations/bitsandbytes.py replace_with_bnb_linear) turns every nn.Linear and
    GPT-2 Conv1D into a Linear4bit except what quantizers/base.py get_keys_to_not_convert keeps in full
    precision: tied weights, the output embeddings, and the model's last parameter's name less a
    '.weight' suffix - the task head (lm_head, score) when its weight is the last parameter; a head with a
    bias ends in '.bias', which names no module, so ViT's and BERT's classifiers are quantized. The rest
    of a head is quantized too, e.g. BERT's MLM transform dense and RoBERTa's lm_head.dense (traced:
    uint8 weights)."""
    m = mods.get(param.rsplit(".", 1)[0])  # None for a bare parameter (a MoE router's weight)
    if m is None or m.kind not in LINEAR_KINDS:
        return False
    last = layout.modules[-1]
    return not (m.path == last.path and not last.bias)


def lora(rec: Recorder, x: SymTensor, base: SymTensor, in_f: int, out_f: int, rank: int, dora: bool, bias: bool, tag: str,
          quantized: bool = False) -> SymTensor:
    """peft tuners/lora/layer.py Linear.forward: result + lora_B(lora_A(x.to(lora_A.weight.dtype))) *
    scaling, then .to(the base result's dtype); with DoRA (variants.py DoraLinearVariant.forward) the
    delta is DoraLinearLayer.forward's, whose weight norm (dora_weight_norm) comes before the LoRA
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
    xc = cast(rec, x, ctx.adapter_dtype) if convert else x  # peft _cast_input_dtype: the local x until the layer returns
    norm = dora_weight_norm(rec, in_f, out_f, rank, xc.dtype, tag) if dora else None
    if norm is not None:
        a_copy, b_copy = norm.a_copy, norm.b_copy
    else:
        a_copy = autocast_weight_copy(rec, in_f * rank, True, ctx.adapter_dtype) if ctx.autocast else None
    xa = autocast_in(rec, xc)
    saved_a = [rec.save(xa, f"{tag}.lora_input")]
    if a_copy is not None and x.requires_grad:
        saved_a.append(rec.save(a_copy, f"{tag}.lora_autocast_weights"))
    ab = DTYPE_BYTES[ctx.adapter_dtype]
    a = matmul(rec, xa, in_f, rank, True, ctx.autocast or ctx.adapter_dtype, saved_a, weight=a_copy,
               weight_bytes=in_f * rank * ab)
    if xa is not xc:
        rec.free(xa)
    if norm is None:
        b_copy = autocast_weight_copy(rec, out_f * rank, True, ctx.adapter_dtype) if ctx.autocast else None
    saved_b = [rec.save(a, f"{tag}.lora_A_out")]
    if b_copy is not None:
        saved_b.append(rec.save(b_copy, f"{tag}.lora_autocast_weights"))
    lb = matmul(rec, a, rank, out_f, True, ctx.autocast or ctx.adapter_dtype, saved_b, weight=b_copy,
                weight_bytes=out_f * rank * ab)
    rec.free(a)
    if norm is not None:
        delta = dora_output(rec, base, lb, norm.norm, out_f, tokens_in, bias, tag)
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
        total = add(rec, base, delta, promote(base.dtype, delta.dtype))
        rec.free(delta, base)
        out = cast(rec, total, base.dtype)  # result.to(torch_result_dtype)
        if out is not total:
            rec.free(total)
    if xc is not x:
        rec.free(xc)
    return out


@dataclass(frozen=True)
class DoraWeightNorm:
    """What dora_weight_norm leaves for the rest of DoraLinearLayer.forward: the detached column norms,
    autocast's cached copies of lora_A/lora_B's weights (made here first, reused by lora_B(lora_A(x))),
    the tensors the lora_weight graph saved (released when the layer returns) and the other locals the
    forward references until it returns."""

    norm: SymTensor
    a_copy: SymTensor | None
    b_copy: SymTensor | None
    graph_saved: tuple
    held: tuple


def dora_weight_norm(rec: Recorder, in_f: int, out_f: int, rank: int, x_dtype: str, tag: str) -> DoraWeightNorm:
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
    low = ctx.autocast or ctx.adapter_dtype
    eye = rec.new(in_f * in_f, ctx.adapter_dtype, False)
    a_copy = autocast_weight_copy(rec, in_f * rank, True, ctx.adapter_dtype) if ctx.autocast else None
    eye_in = rec.new(in_f * in_f, low, False) if low != eye.dtype else eye
    graph_saved = [eye_in]
    rec.save(eye_in, f"{tag}.dora_lora_weight_graph")
    a_eye = rec.new(in_f * rank, low, False)
    graph_saved.append(a_eye)
    b_copy = autocast_weight_copy(rec, out_f * rank, True, ctx.adapter_dtype) if ctx.autocast else None
    rec.save(a_eye, f"{tag}.dora_lora_weight_graph")
    product = rec.new(in_f * out_f, low, False)
    if eye_in is not eye:
        rec.free(eye)  # get_lora_weight returns
    lora_weight = rec.new(in_f * out_f, x_dtype, False) if x_dtype != low else product
    if lora_weight is not product:
        rec.free(product)
    weight = rec.new(in_f * out_f, x_dtype, False) if ctx.weight_dtype != x_dtype else None
    scaled = rec.new(in_f * out_f, x_dtype, False)
    summed = rec.new(in_f * out_f, x_dtype, False)
    rec.free(scaled)
    norm = rec.new(out_f, x_dtype, False)
    rec.free(summed)
    held = tuple(t for t in (lora_weight, weight) if t is not None)
    return DoraWeightNorm(norm, a_copy, b_copy, tuple(graph_saved), held)


def dora_output(rec: Recorder, base: SymTensor, lora_out: SymTensor, wn: SymTensor, out_f: int, tokens: int, bias: bool, tag: str) -> SymTensor:
    """peft tuners/lora/dora.py DoraLinearLayer.forward: (m/||W+BA|| - 1) * base_result +
    m/||W+BA|| * lora_B(lora_A(x)) * scaling: the muls save the base result (compute dtype), the LoRA
    result, and the vectors ||W+BA|| (`wn`, detached, saved by m/||.||) and m/||.||; m/||.|| - 1 only
    when the base result needs a gradient (x does: the base weight is frozen). base_result - bias when
    the layer has one (under autocast that promotes to fp32)."""
    ctx = rec.ctx
    vec = ctx.adapter_dtype
    rec.save(wn, f"{tag}.dora_scale")  # ||W + s BA||, detached
    mns = rec.new(out_f, vec, True)  # magnitude / weight_norm: DivBackward saves the norm
    rec.node(mns, [("param", out_f * DTYPE_BYTES[vec])], saved=[wn.id])
    br = base
    if bias:  # base_result - bias: a new tensor, in fp32 under autocast (the bias is the weight's dtype)
        br = rec.new(base.numel, promote(base.dtype, ctx.weight_dtype), base.requires_grad)
        if br.dtype == base.dtype:  # SubBackward hands the gradient on
            rec.node(br, outputs=[(base.id, GRAD)] if base.requires_grad else [])
        else:  # the engine casts it back to the base result's dtype
            rec.node(br, *input_grads(base))
    m1 = rec.new(out_f, vec, True)  # mag_norm_scale - 1: SubBackward hands the gradient on
    rec.node(m1, outputs=[(mns.id, GRAD)])
    saved1 = [rec.save(br, f"{tag}.dora_base_out")]  # for (m - 1)'s gradient
    if br.requires_grad:
        saved1.append(rec.save(m1, f"{tag}.dora_scale"))
    p1 = rec.new(tokens * out_f, promote(vec, br.dtype), True)
    mul_node(rec, p1, m1, br, saved1)
    rec.free(m1)
    if br is not base:
        rec.free(br)
    lr = lora_out
    saved2 = [rec.save(lr, f"{tag}.dora_lora_out"), rec.save(mns, f"{tag}.dora_scale")]
    p2 = rec.new(tokens * out_f, promote(vec, lr.dtype), True)
    mul_node(rec, p2, mns, lr, saved2)
    p3 = scale(rec, p2)
    rec.free(p2)
    out = add(rec, p1, p3, promote(p1.dtype, p3.dtype))
    rec.free(p1, p3)
    return out
