"""Eager attention with attention sinks: one learned logit per head joins every query's scores and takes its share
of the softmax, then is dropped (transformers models/gpt_oss/modeling_gpt_oss.py eager_attention_forward).
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.ops.attention import _bmm_reshape_copies, _contiguous_output, _repeat_kv, _scaled_scores, _values_matmul
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import cast, dropout, promote
from peftcalc.settings import DTYPE_BYTES
from peftcalc.spec import ModelSpec

__all__ = ["sink_attention"]


def sink_attention(rec: Recorder, spec: ModelSpec, q: SymTensor, k: SymTensor, v: SymTensor, p_drop: float,
                   sinks_train: bool, tag: str) -> tuple[SymTensor, SymTensor]:
    """eager_attention_forward of gpt-oss, op by op: repeat_kv (a copy per GQA group), ``matmul(q, k^T) * scaling``
    (the matmul saves q and the repeated k), ``+ attention_mask`` (the eager float mask of the layer's type, in the
    weights' dtype: type promotion; the local ``attn_weights`` holds the sum until it is rebound after dropout), ``cat([scores, sinks.expand(b, heads, s, 1)], -1)`` (b, heads, s, kv + 1),
    ``combined - combined.max(-1, keepdim=True).values`` (MaxBackward saves its int64 indices), ``softmax(...,
    dtype=combined.dtype)`` in the scores' dtype (saves its output; the shifted scores stay referenced by the local
    ``combined_logits`` until the function returns), ``probs[..., :-1]`` (a view: the matmul with v
    saves the whole (b, heads, s, kv + 1) probabilities), dropout, ``.to(v.dtype)``, ``matmul(_, v)``, then
    ``transpose(1, 2).contiguous()``. Backward: matmul's reshape copy of the incoming gradient (which then goes, as on
    the math path: attention._bmm_output_backward), the probabilities' and v's gradients; the slice's new (.., kv + 1) gradient; softmax's; the subtraction's -grad summed to the
    max's (.., 1) shape; max's zeros and scatter (out of place under a dispatch mode); the cat's views, the sinks'
    gradient summed over batch and queries; the scaling's and q/k's. Returns (the attention output, the
    attention weights, which the decoder layer keeps in ``_`` until its MLP returns)."""
    ctx = rec.ctx
    b, s, kv, heads = ctx.batch, ctx.seq, ctx.kv_seq, spec.num_heads
    kr, vr = _repeat_kv(rec, spec, k), _repeat_kv(rec, spec, v)
    qi, ki, scaled = _scaled_scores(rec, spec, q, kr, tag)
    sdt = ctx.autocast or q.dtype
    qk_rg = q.requires_grad or k.requires_grad
    cells = b * heads * s * kv
    cdt = promote(sdt, ctx.weight_dtype)  # + the float mask
    masked = rec.new(cells, cdt, qk_rg)
    rec.node(masked, *(input_grads(scaled) if cdt != sdt else ([], [(scaled.id, GRAD)] if qk_rg else [])))
    rec.free(scaled)
    rows = b * heads * s
    wide = rows * (kv + 1)
    grad = qk_rg or sinks_train
    combined = rec.new(wide, cdt, grad)
    sink_grad = [("param", heads * DTYPE_BYTES[ctx.weight_dtype])] if sinks_train else []
    rec.node(combined, sink_grad, [(masked.id, GRAD)] if qk_rg else [])
    values = rec.new(rows, cdt, grad)
    indices = rec.new(rows, "int64", False)
    n = wide * DTYPE_BYTES[cdt]
    if grad:
        rec.node(values, [("new", "z", n), ("new", "d", n), ("free", "z")], [(combined.id, "d")],
                 [rec.save(indices, f"{tag}.sink_max_indices")])
    rec.free(indices)
    shifted = rec.new(wide, cdt, grad)
    rec.node(shifted, [("new", "n", n), ("returned",), ("new", "r", values.nbytes), ("free", "n")],
             [(combined.id, GRAD), (values.id, "r")])
    rec.free(combined, values)
    probs = rec.new(wide, cdt, grad)
    if grad:
        rec.node(probs, *input_grads(shifted), saved=[rec.save(probs, f"{tag}.softmax_out")])
    weights = rec.view(probs, cells)  # probs[..., :-1]
    rec.node(weights, [("new", "d", n)], [(probs.id, "d")])
    chain = [dropout(rec, weights, p_drop, tag)]
    chain.append(cast(rec, chain[-1], vr.dtype))
    rec.free(masked)  # the local attn_weights, rebound to the dropped-out probabilities
    pv = chain[-1]
    # UnsafeViewBackward's copy of the transposed gradient, which then goes
    vi, out = _values_matmul(rec, spec, pv, vr, v, sdt, tag, "freed" if _bmm_reshape_copies(b, heads) else "")
    y = _contiguous_output(rec, out, ((qi, q), (ki, kr), (vi, vr), (kr, k), (vr, v)))
    rec.free(out, shifted, *chain[:-1])  # the function's local combined_logits holds the shifted scores
    return y, pv
