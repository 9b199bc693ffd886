"""Rotary position embeddings (transformers apply_rotary_pos_emb).
"""

from __future__ import annotations


from peftcalc.backward import GRAD
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import add, cast, promote

__all__ = [
    "rope",
]


def rope(rec: Recorder, x: SymTensor, cos_dtype: str = "", cast_back: bool = False) -> SymTensor:
    """transformers apply_rotary_pos_emb (modeling_llama.py): x * cos + rotate_half(x) * sin,
    rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]). The products save cos and sin (shared, counted
    once per model), nothing of x; they take the dtype of cos/sin (the hidden states') when wider (a
    bf16 projection under autocast with fp32 hidden states gives fp32 products). Backward: grad * sin
    (cast back to the cat's dtype by the engine when it was promoted); cat's gradient splits into
    views; neg's gradient; each slice's slice_backward (zeros like x, then a copy), summed; grad * cos.
    `cos_dtype`: the dtype of cos and sin where it is not the hidden states' (Olmo2RotaryEmbedding returns them
    fp32); `cast_back`: the sum is cast back to x's dtype (Olmo2's apply_rotary_pos_emb: ``q_embed.to(q_type)``)."""
    n, half = x.nbytes, x.nbytes // 2
    dtype = promote(x.dtype, cos_dtype or rec.ctx.weight_dtype)

    def product_grad(src: SymTensor, prod: SymTensor) -> tuple:
        if prod.dtype == src.dtype:
            return input_grads(src)
        return [("new", "t", prod.nbytes), ("new", "d", src.nbytes), ("free", "t")], [(src.id, "d")]

    m1 = rec.new(x.numel, dtype, x.requires_grad)  # x * cos
    rec.node(m1, *product_grad(x, m1))
    x1 = rec.view(x, x.numel // 2)  # x[..., :d/2]
    rec.node(x1, [("new", "d", n)], [(x.id, "d")])
    x2 = rec.view(x, x.numel // 2)  # x[..., d/2:]
    rec.node(x2, [("new", "d", n)], [(x.id, "d")])
    ng = rec.new(x.numel // 2, x.dtype, x.requires_grad)  # -x2
    rec.node(ng, [("new", "d", half)], [(x2.id, "d")])
    c = rec.new(x.numel, x.dtype, x.requires_grad)  # cat: the gradient's two halves, views of it
    rec.node(c, outputs=[(ng.id, GRAD), (x1.id, GRAD)])
    rec.free(ng)
    m2 = rec.new(x.numel, dtype, x.requires_grad)  # cat * sin
    rec.node(m2, *product_grad(c, m2))
    rec.free(c)
    out = add(rec, m1, m2)
    rec.free(m1, m2)
    if cast_back and out.dtype != x.dtype:
        back = cast(rec, out, x.dtype)
        rec.free(out)
        return back
    return out
