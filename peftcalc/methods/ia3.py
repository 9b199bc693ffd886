"""IA3 (peft tuners/ia3): learned scaling vectors on keys, values and the FFN, and the ops they run.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families import family
from peftcalc.layout import LINEAR_KINDS
from peftcalc.methods.groups import base_groups, head_copy, module_matches, modules_by_path, resolve_targets, shape_numel
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import cast, mul_node, promote
from peftcalc.plan import ParamGroup
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "ia3_input",
    "ia3_output",
    "ia3_vector",
    "plan_ia3",
]


def plan_ia3(spec, layout, s):
    mods = modules_by_path(layout)
    targets = resolve_targets(spec, layout, s)
    ff_keys = family(spec).ia3_feedforward if s.targets is None else ()
    groups = base_groups(layout, lambda m, name: False)
    for path in targets:
        m = mods[path]
        if m.kind not in LINEAR_KINDS:
            raise InputError(f"IA3 cannot wrap module '{path}' ({m.kind}); target Linear modules")
        # peft tuners/ia3/layer.py IA3Layer.update_layer: (out, 1) or, for feedforward, (1, in)
        feedforward = module_matches(path, ff_keys)
        shape = (1, m.in_features) if feedforward else (m.out_features, 1)
        groups.append(ParamGroup(f"{path}.ia3_l", shape_numel(shape), True, "ia3", m.layer, shape=shape))
    return groups + head_copy(layout, spec), targets


def ia3_vector(rec: Recorder, n: int) -> SymTensor:
    """peft IA3: ia3_scaling = 1 * ia3_l.flatten(), a new adapter-dtype vector whose gradient
    (grad * 1) becomes the parameter's .grad."""
    s = rec.new(n, rec.ctx.adapter_dtype, True)
    rec.node(s, [("param", n * DTYPE_BYTES[rec.ctx.adapter_dtype])])
    return s


def ia3_input(rec: Recorder, x: SymTensor, in_f: int, tag: str) -> SymTensor:
    """peft IA3 Linear.forward, feedforward: (x.to(ia3 dtype) * scaling).to(x dtype), then the frozen
    linear; the mul saves the cast input and the scaling vector (1 * ia3_l.flatten())."""
    s = ia3_vector(rec, in_f)
    xc = cast(rec, x, rec.ctx.adapter_dtype)
    saved = [rec.save(xc, f"{tag}.ia3_input")]
    if xc.requires_grad:  # the scaling vector is saved for the input's gradient only
        saved.append(rec.save(s, f"{tag}.ia3_scaling"))
    y = rec.new(x.numel, rec.ctx.adapter_dtype, True)
    mul_node(rec, y, xc, s, saved)
    rec.free(s)
    out = cast(rec, y, x.dtype)
    if out is not y:
        rec.free(y)
    if xc is not x:
        rec.free(xc)
    return out


def ia3_output(rec: Recorder, out: SymTensor, out_f: int, tag: str) -> SymTensor:
    """peft IA3 Linear.forward on keys/values: (base_layer(x) * scaling).to(result dtype); the product saves
    the base result, and the scaling vector when the base result needs a gradient."""
    s = ia3_vector(rec, out_f)
    saved = [rec.save(out, f"{tag}.ia3_out")]
    if out.requires_grad:  # the scaling vector is saved for the base result's gradient only
        saved.append(rec.save(s, f"{tag}.ia3_scaling"))
    y = rec.new(out.numel, promote(out.dtype, s.dtype), True)
    mul_node(rec, y, out, s, saved)
    rec.free(out, s)
    scaled = cast(rec, y, out.dtype)
    if scaled is not y:
        rec.free(y)
    return scaled
