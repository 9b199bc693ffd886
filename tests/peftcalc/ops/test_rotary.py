"""peftcalc.ops.rotary: transformers' apply_rotary_pos_emb, by hand and against a real CPU trace of it.

q and k are (2, 2 heads, 8, 8) views of the projections' (2, 8, 2, 8) outputs, as LlamaAttention makes
them: Q = 256 values, 1,024 bytes in fp32 (512 in bf16). cos and sin (2, 8, 8) are the model's, shared by
every layer (peftcalc.sim.model counts them once), so they are inputs here, not activations."""

from opkit import F32, context, replay_peak, trace

from peftcalc.ops.recorder import Recorder
from peftcalc.ops.rotary import rope

Q = 2 * 2 * 8 * 8


def _traced(dtype, backward=True):
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = torch.randn(2, 8, 8), torch.randn(2, 8, 8)  # the rotary embedding's fp32 output

    def rotate(q, k):
        q_embed, _k_embed = apply_rotary_pos_emb(q, k, cos, sin)
        return q_embed

    def make():
        return tuple(torch.randn(2, 8, 2, 8, dtype=getattr(torch, dtype), requires_grad=True).transpose(1, 2)
                     for _ in range(2))

    return trace(rotate, make, [cos, sin], backward=backward)


def _run(dtype):
    rec = Recorder(context(weight_dtype="float32"))
    q, k = rec.new(Q, dtype, True), rec.new(Q, dtype, True)
    q_embed = rope(rec, q)
    rope(rec, k)
    return rec, q_embed


def test_rope_saves_nothing_of_q_and_k():
    """q_embed = q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q[..., 4:], q[..., :4]). The products
    save cos and sin (the factor q's gradient needs; MulBackward0 saves ``other`` for ``self``), never q;
    slices and cat save only sizes, neg nothing. Forward, with U = Q x 4: q and k, then for q: q * cos
    (U), -q2 (U/2), the cat (U, -q2 freed), cat * sin (U, the cat freed), the sum (U, both products
    freed): q, k, q * cos, the cat and cat * sin are 5 U at once, q, k, the two products and the sum too;
    then k's the same next to q_embed: 6 U, the peak.
    Backward from q_embed: AddBackward0 hands the gradient to both products; grad * sin (U) goes to the
    cat, whose gradient splits into two views; neg's gradient (U/2); each slice's slice_backward makes
    zeros like q and copies its half in (U each), and q's buffer sums the two out of place under a
    dispatch mode: the incoming gradient, the cat's gradient, the second slice's and the first's: 4 U."""
    u = Q * F32
    rec, q_embed = _run("float32")
    assert rec.saved_bytes() == {}
    assert rec.forward_peak == 6 * u
    assert replay_peak(rec, q_embed).total == 4 * u
    t = _traced("float32")
    assert (t.forward_peak, t.saved, t.backward_peak) == (6 * u, 0, 4 * u)


def test_bf16_rope_with_fp32_cos_sin_promotes_the_products():
    """bf16 q with the fp32 cos and sin of fp32 hidden states (autocast): both products are fp32 (type
    promotion), so q_embed is fp32. With V = Q x 2: q and k (2 V), then q's products (2 V each), -q2 (V/2)
    and the cat (V): at k's sum, q, k, q_embed, k * cos, cat * sin and the sum: 2 V + 4 x 2 V = 10 V."""
    v = Q * 2
    rec, q_embed = _run("bfloat16")
    assert (q_embed.dtype, rec.saved_bytes(), rec.forward_peak) == ("float32", {}, 10 * v)
    t = _traced("bfloat16", backward=False)
    assert (t.forward_peak, t.saved) == (10 * v, 0)
