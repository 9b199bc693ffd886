"""Rotary position embeddings (transformers apply_rotary_pos_emb).
"""

from __future__ import annotations


from peftcalc.backward import GRAD
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import add, cast, promote
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "rope",
]


def rope(rec: Recorder, x: SymTensor, cos_dtype: str = "", cast_back: bool = False, cos_numel: int = 0) -> SymTensor:
    """transformers apply_rotary_pos_emb (modeling_llama.py): x * cos + rotate_half(x) * sin,
    rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]). The products save cos and sin (shared, counted
    once per model), nothing of x; they take the dtype of cos/sin (the hidden states') when wider (a
    bf16 projection under autocast with fp32 hidden states gives fp32 products). Backward: grad * sin
    (cast back to the cat's dtype by the engine when it was promoted); cat's gradient splits into
    views; neg's gradient; each slice's slice_backward (zeros like x, then a copy), summed; grad * cos.
    `cos_dtype`: the dtype of cos and sin where it is not the hidden states' (Olmo2RotaryEmbedding returns them
    fp32); `cast_back`: the sum is cast back to x's dtype (Olmo2's apply_rotary_pos_emb: ``q_embed.to(q_type)``).
    `cos_numel`: the size of cos (and of sin), whose saves the products unpack under offloading."""
    n, half = x.nbytes, x.nbytes // 2
    dtype = promote(x.dtype, cos_dtype or rec.ctx.weight_dtype)
    cos_bytes = cos_numel * DTYPE_BYTES[cos_dtype or rec.ctx.weight_dtype]

    def product_grad(src: SymTensor, prod: SymTensor) -> tuple:
        if prod.dtype == src.dtype:
            return input_grads(src)
        return [("new", "t", prod.nbytes), ("new", "d", src.nbytes), ("free", "t")], [(src.id, "d")]

    m1 = rec.new(x.numel, dtype, x.requires_grad)  # x * cos
    rec.shared_saved(cos_bytes)
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
    rec.shared_saved(cos_bytes)
    rec.node(m2, *product_grad(c, m2))
    rec.free(c)
    out = add(rec, m1, m2)
    rec.free(m1, m2)
    if cast_back and out.dtype != x.dtype:
        back = cast(rec, out, x.dtype)
        rec.free(out)
        return back
    return out


def rope_halves(rec: Recorder, x: SymTensor) -> SymTensor:
    """The RoPE of transformers models/gpt_oss/modeling_gpt_oss.py _apply_rotary_emb: ``first, second =
    chunk(x, 2, -1)``; ``cat((first * cos - second * sin, second * cos + first * sin), -1)`` with cos and sin
    half a head wide (GptOssRotaryEmbedding makes no cat of the frequencies). Each product is a new half-size
    tensor saving cos or sin (shared, counted once per model), nothing of x; each sum drops its two products,
    the cat its two sums. Backward: cat's gradient splits into views; the subtraction makes -grad; each
    product grad * cos or sin (cast back by the engine where promoted); each half sums its two gradients (a
    new buffer under a dispatch mode); chunk's SplitBackward cats the two halves into a new gradient like x."""
    half = x.numel // 2
    dtype = promote(x.dtype, rec.ctx.weight_dtype)
    first, second = rec.view(x, half), rec.view(x, half)
    rec.node(first, [("new", "d", x.nbytes)], [(x.id, "d")])  # SplitBackward: one node, both halves
    rec.node(second, hold=first.id)

    def product(src: SymTensor) -> SymTensor:
        p = rec.new(half, dtype, x.requires_grad)
        if p.dtype == src.dtype:
            rec.node(p, *input_grads(src))
        else:
            rec.node(p, [("new", "t", p.nbytes), ("new", "d", src.nbytes), ("free", "t")], [(src.id, "d")])
        return p

    def combined(a: SymTensor, b: SymTensor, subtract: bool) -> SymTensor:
        y = rec.new(half, dtype, x.requires_grad)
        if subtract:
            rec.node(y, [("new", "n", y.nbytes)], [(a.id, GRAD), (b.id, "n")])
        else:
            rec.node(y, outputs=[(a.id, GRAD), (b.id, GRAD)])
        rec.free(a, b)
        return y

    a = product(first)
    c = combined(a, product(second), True)
    d = product(second)
    f = combined(d, product(first), False)
    out = rec.new(x.numel, dtype, x.requires_grad)  # cat: its gradient's halves are views of it
    rec.node(out, outputs=[(c.id, GRAD), (f.id, GRAD)])
    rec.free(c, f)
    return out
