"""peftcalc.ops.rotary.rope_halves: gpt-oss's RoPE (modeling_gpt_oss.py _apply_rotary_emb, chunk and cat, cos and sin
half a head wide), by hand and against a real CPU trace of it.

q and k are (2, 2 heads, 8, 8) views of the projections' (2, 8, 2, 8) outputs: Q = 256 values; cos and sin (2, 8, 4)
are the model's (shared by every layer), inputs here."""

import pytest
from opkit import BF16, F32, context, replay_peak, trace

from peftcalc.ops.recorder import Recorder
from peftcalc.ops.rotary import rope_halves

Q = 2 * 2 * 8 * 8


def _traced(dtype, cos_dtype):
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

    cos, sin = torch.randn(2, 8, 4, dtype=getattr(torch, cos_dtype)), torch.randn(2, 8, 4, dtype=getattr(torch, cos_dtype))

    def rotate(q, k):
        q_embed, _k_embed = apply_rotary_pos_emb(q, k, cos, sin)
        return q_embed

    def make():
        return tuple(torch.randn(2, 8, 2, 8, dtype=getattr(torch, dtype), requires_grad=True).transpose(1, 2)
                     for _ in range(2))

    return trace(rotate, make, [cos, sin])


def _run(dtype, weight_dtype):
    rec = Recorder(context(weight_dtype=weight_dtype))
    q, k = rec.new(Q, dtype, True), rec.new(Q, dtype, True)
    q_embed = rope_halves(rec, q)
    rope_halves(rec, k)
    return rec, q_embed


@pytest.mark.parametrize("dtype, weight_dtype, unit", [("float32", "float32", F32), ("bfloat16", "bfloat16", BF16),
                                                       ("bfloat16", "float32", F32)])
def test_rope_halves_equals_the_trace(dtype, weight_dtype, unit):
    """Nothing of q or k is saved. Forward (U = Q x unit, the products' width): for q, four half-size products and two
    half-size sums, never more than three halves at once besides q, k; then the cat (U) while both sums live; then
    k's the same beside q_embed. Backward: the gradient's halves are views; -grad, the four products' gradients and
    the two sums per half, SplitBackward's cat."""
    rec, q_embed = _run(dtype, weight_dtype)
    t = _traced(dtype, weight_dtype)
    assert rec.saved_bytes() == {} and t.saved == 0
    assert (rec.forward_peak, replay_peak(rec, q_embed).total) == (t.forward_peak, t.backward_peak)
