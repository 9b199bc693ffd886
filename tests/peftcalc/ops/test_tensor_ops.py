"""peftcalc.ops.tensor_ops against torch's derivatives.yaml, by hand, and against real CPU traces.

Sizes: batch 2 x 8 tokens x 16 features = 256 values: U = 1,024 bytes in fp32, 512 in bf16."""

import pytest
from opkit import BF16, F32, context, replay_peak, trace

from peftcalc.ops.recorder import Recorder
from peftcalc.ops.tensor_ops import (add, autocast_in, autocast_weight_copy, cast, clone, dropout, first_token,
                                     heads_view, mul, mul_node, promote, scale)

N = 2 * 8 * 16
U = N * F32


def _x(rec, dtype="float32", requires_grad=True, numel=N):
    return rec.new(numel, dtype, requires_grad)


def test_promote_is_the_wider_float():
    assert promote("bfloat16", "float32") == promote("float32", "bfloat16") == "float32"
    assert promote("bfloat16", "bfloat16") == "bfloat16"


def test_add_hands_the_gradient_on_and_casts_it_where_dtypes_differ():
    """AddBackward0 (derivatives.yaml ``self: handle_r_to_c(self, grad)``, ``other: ...maybe_multiply(grad,
    alpha)``) saves nothing and hands the incoming gradient to both inputs as it is. fp32 a + bf16 b is fp32
    (type promotion); the engine casts b's gradient to bf16 (validate_outputs): a new N x 2 bytes beside
    the incoming N x 4."""
    rec = Recorder(context())
    a, b = _x(rec), _x(rec)
    out = add(rec, a, b)
    assert (rec.saved_bytes(), rec.forward_peak, out.dtype) == ({}, 3 * U, "float32")
    assert replay_peak(rec, out).total == U  # the incoming gradient, shared
    rec = Recorder(context())
    a, b = _x(rec), _x(rec, "bfloat16")
    out = add(rec, a, b)
    assert out.dtype == "float32"
    assert replay_peak(rec, out).total == U + N * BF16


def test_cast_is_a_copy_unless_the_dtype_matches():
    """Tensor.to(dtype): the same tensor when nothing changes; else a copy whose ToCopyBackward0
    (``self: _to_copy_backward(grad, self.options())``) makes a gradient in x's dtype: incoming bf16 (N x 2)
    and the fp32 gradient (N x 4) at once."""
    rec = Recorder(context())
    x = _x(rec)
    assert cast(rec, x, "float32") is x and rec.live_bytes == U
    y = cast(rec, x, "bfloat16")
    assert (y.dtype, rec.forward_peak, rec.saved_bytes()) == ("bfloat16", U + N * BF16, {})
    assert replay_peak(rec, y).total == N * BF16 + U


def test_scale_and_clone_save_nothing():
    """x * 2.0: MulBackward0 with a Python number saves nothing and makes grad * 2 (a new N x 4);
    x.clone(): CloneBackward0 hands grad on (``self: grad``)."""
    rec = Recorder(context())
    x = _x(rec)
    y = scale(rec, x)
    assert (rec.saved_bytes(), rec.forward_peak) == ({}, 2 * U)
    assert replay_peak(rec, y).total == 2 * U
    rec = Recorder(context())
    y = clone(rec, _x(rec))
    assert (rec.saved_bytes(), replay_peak(rec, y).total) == ({}, U)


def test_mul_saves_each_factor_the_other_needs():
    """a * b (derivatives.yaml mul.Tensor: ``self: mul_tensor_backward(grad, other, self.scalar_type())``,
    ``other: mul_tensor_backward(grad, self, other.scalar_type())``): a's gradient needs b, b's needs a. Only a
    needs a gradient: b alone is saved. Both: both. Backward with both: grad_a and grad_b beside the
    incoming gradient and the two saved factors: 5 x U."""
    rec = Recorder(context())
    a, b = _x(rec), _x(rec, requires_grad=False)
    mul(rec, a, b, "m")
    assert rec.bytes_by_tag() == {"m.b": U}
    rec = Recorder(context())
    a, b = _x(rec), _x(rec)
    out = mul(rec, a, b, "m")
    assert rec.bytes_by_tag() == {"m.a": U, "m.b": U}
    assert rec.forward_peak == 3 * U
    assert replay_peak(rec, out).total == 5 * U
    t = trace(lambda a, b: a * b, lambda: _torch_inputs(2))
    assert (t.forward_peak, t.saved, t.backward_peak) == (3 * U, 2 * U, 5 * U)


def test_mul_by_a_broadcast_vector_sums_its_gradient_after_the_formula():
    """x (2 x 8 x 16) * w (16), both needing gradients (IA3's scaling): grad_x = grad * w (U), and grad * x
    (U, the formula's output for w) which the engine then sums down to w's 16 values (64 B;
    validate_outputs, InputMetadata::reduce_grad) while it is alive: saved x and w (U + 64), the incoming
    gradient, grad_x and the full-size product (3 U), and the sum (64): 4 U + 128."""
    rec = Recorder(context())
    x, w = _x(rec), _x(rec, numel=16)
    out = mul(rec, x, w, "ia3")
    assert rec.bytes_by_tag() == {"ia3.a": U, "ia3.b": 64}
    assert replay_peak(rec, out).total == 4 * U + 128
    t = trace(lambda x, w: x * w, lambda: (_torch_inputs(1)[0], _leaf((16,))))
    assert (t.saved, t.backward_peak) == (U + 64, 4 * U + 128)


def test_mul_of_an_fp32_vector_and_a_bf16_tensor_makes_both_gradients_in_fp32_first():
    """DoRA's ``mag_norm_scale * lora_result`` under autocast (peft tuners/lora/dora.py DoraLinearLayer.forward):
    an fp32 (16,) vector w times a bf16 x (2 x 8 x 16), both needing gradients, is fp32. MulBackward0's formula
    makes grad * x for w and grad * w for x, both fp32 and full-size (2 U: the promoted dtype of grad and the
    other factor); then the engine, input by input (validate_outputs), sums w's down to 16 values (64 B) and
    casts x's to bf16, each a new tensor replacing the one before. Peak: the saved w and x (64 + N x 2), the
    incoming gradient (U), both products (2 U) and the sum (64): 3 U + N x 2 + 128. Counting x's gradient in
    bf16 from the start (before the fix) gave 2 U + 2 N x 2 + 128, N x 2 less: on Phi-3's gate_up_proj, tiny-phi3
    DoRA all-linear amp-bf16 checkpointed b3 s48, 73,728 B (1,922,472 predicted, 1,943,720 traced)."""
    rec = Recorder(context())
    w, x = _x(rec, numel=16), _x(rec, "bfloat16")
    out = rec.new(N, "float32", True)
    mul_node(rec, out, w, x, [rec.save(w, "dora.w"), rec.save(x, "dora.x")])
    assert replay_peak(rec, out).total == 3 * U + N * BF16 + 128
    import torch

    t = trace(lambda w, x: w * x, lambda: (_leaf((16,)), _torch_inputs(1, torch.bfloat16)[0]))
    assert (t.saved, t.backward_peak) == (64 + N * BF16, 3 * U + N * BF16 + 128)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_dropout_saves_a_noise_tensor_of_the_input_dtype(dtype):
    """F.dropout(x, 0.1, training=True) on the CPU (ATen Dropout.cpp _dropout_impl): noise = empty_like(x)
    .bernoulli_(1 - p).div_(1 - p), then x * noise, whose MulBackward0 saves the noise (x's dtype; x is
    not saved: the noise needs no gradient). Forward peak: x, the noise and the output. Backward:
    grad * noise, a new gradient like x: saved noise, incoming, grad_x."""
    size = N * (F32 if dtype == "float32" else BF16)
    rec = Recorder(context())
    x = _x(rec, dtype)
    y = dropout(rec, x, 0.1, "drop")
    assert rec.bytes_by_tag() == {"drop.dropout_mask": size}
    assert rec.forward_peak == 3 * size
    assert replay_peak(rec, y).total == 3 * size
    import torch

    t = trace(lambda x: torch.nn.functional.dropout(x, 0.1, True),
              lambda: _torch_inputs(1, getattr(torch, dtype)))
    assert (t.forward_peak, t.saved, t.backward_peak) == (3 * size, size, 3 * size)


def test_cuda_dropout_saves_a_bool_mask():
    """On CUDA F.dropout runs native_dropout (derivatives.yaml ``input: native_dropout_backward(grad,
    result1, ...)``): its mask, result1, is a bool tensor, one byte per value."""
    rec = Recorder(context(device="cuda"))
    x = _x(rec)
    dropout(rec, x, 0.1, "drop")
    assert rec.bytes_by_tag() == {"drop.dropout_mask": N}
    assert rec.forward_peak == U + N + U


def test_dropout_that_does_nothing_returns_its_input():
    """p = 0, or eval mode (training_dropout False): ATen returns the input itself, no allocation. A
    tensor that needs no gradient: the noise is made and dropped, nothing saved."""
    rec = Recorder(context())
    x = _x(rec)
    assert dropout(rec, x, 0.0, "d") is x
    assert dropout(Recorder(context(training_dropout=False)), x, 0.1, "d") is x
    rec = Recorder(context())
    x = _x(rec, requires_grad=False)
    dropout(rec, x, 0.1, "d")
    assert (rec.saved_bytes(), rec.nodes, rec.forward_peak) == ({}, [], 3 * U)


def test_views_allocate_nothing_and_save_their_whole_base():
    """x.view(b, s, heads, d).transpose(1, 2) and x[:, 0] are views: no bytes. Saving the first-token view
    (a classifier's pooled token) keeps x's whole storage. The head view's backward reshapes its gradient:
    a copy (clone=True) or the gradient itself; select_backward makes zeros like x, then copies."""
    rec = Recorder(context())
    x = _x(rec)
    v = heads_view(rec, x, clone=True)
    tok = first_token(rec, x, batch=2)
    assert (rec.live_bytes, v.nbytes, tok.nbytes) == (U, U, 2 * 16 * F32)
    rec.save(tok, "pooled")
    assert rec.saved_bytes() == {x.id: U}
    assert replay_peak(rec, v).total == U + U + U  # x saved, the incoming gradient, the copy
    rec = Recorder(context())
    v = heads_view(rec, _x(rec), clone=False)
    assert replay_peak(rec, v).total == U


def test_autocast_caches_the_copy_of_a_trainable_weight_only():
    """torch.autocast's cast of a weight (aten/src/ATen/autocast_mode.cpp cached_cast) is cached until the
    region exits when the weight is a leaf that requires grad: a trainable 16 x 32 weight's bf16 copy (1,024 B)
    is kept (Recorder.cached) and its ToCopyBackward0 makes the fp32 .grad (2,048 B); a frozen one's is an
    ordinary temporary with no node. autocast_in casts an input only under autocast, and a leaf of
    Recorder.leaf_casts once."""
    rec = Recorder(context(autocast="bfloat16"))
    w = autocast_weight_copy(rec, 16 * 32, trains=True)
    frozen = autocast_weight_copy(rec, 16 * 32, trains=False)
    assert (w.nbytes, frozen.nbytes) == (1_024, 1_024)
    assert rec.cached == [w] and rec.unsaved_cached_copies() == 1_024
    assert [n[1] for n in rec.nodes] == [(("param", 16 * 32 * F32),)]
    rec.save(w, "w")
    assert (rec.saved_cached_copies(), rec.unsaved_cached_copies()) == (1_024, 0)
    x = _x(rec)
    rec.leaf_casts[x.id] = None
    first, second = autocast_in(rec, x), autocast_in(rec, x)
    assert first is second and first.dtype == "bfloat16"
    plain = Recorder(context())
    y = _x(plain)
    assert autocast_in(plain, y) is y


def _leaf(shape, dtype=None):
    import torch

    return torch.randn(*shape, dtype=dtype or torch.float32, requires_grad=True)


def _torch_inputs(count, dtype=None):
    return tuple(_leaf((2, 8, 16), dtype) for _ in range(count))
