"""peftcalc.ops.norms: LayerNorm (native_layer_norm) and LlamaRMSNorm, by hand and against real CPU traces.

Sizes: 2 x 8 tokens (16 rows) x hidden 16: the input U = 256 values x 4 = 1,024 bytes in fp32 (512 in
bf16), one value per row R = 16 x 4 = 64 bytes in fp32, the weight (and bias) 16 x 4 = 64 bytes."""

import pytest
from opkit import F32, context, replay_peak, trace

from peftcalc.ops.norms import layer_norm, layer_norm_stats_dtype, rms_norm
from peftcalc.ops.recorder import Recorder

ROWS, H = 16, 16
U, R, P = ROWS * H * F32, ROWS * F32, H * F32


def _traced_layer_norm(dtype, weight_dtype, trains, x_grad):
    import torch

    norm = torch.nn.LayerNorm(H).to(getattr(torch, weight_dtype))
    norm.requires_grad_(trains)
    return trace(norm, lambda: (torch.randn(2, 8, H, dtype=getattr(torch, dtype), requires_grad=x_grad),),
                 list(norm.parameters()), backward=trains or x_grad)


def _layer_norm(trains, x_grad, dtype="float32", **ctx):
    rec = Recorder(context(**ctx))
    x = rec.new(ROWS * H, dtype, x_grad)
    return rec, layer_norm(rec, x, trains, H, "ln")


@pytest.mark.parametrize("trains", [False, True])
def test_layer_norm_saves_its_input_and_fp32_statistics(trains):
    """native_layer_norm returns (out, mean, rstd) and NativeLayerNormBackward0 saves input, weight, bias,
    mean and rstd (derivatives.yaml ``input, weight, bias: native_layer_norm_backward(grad, input,
    normalized_shape, result1, result2, weight, bias, grad_input_mask)``): the input U and mean + rstd, fp32
    (2 R). Forward: x, out and the statistics. Backward: saved U + 2 R, the incoming gradient U, grad_x U,
    and the weight's and bias's .grad (2 x 64) when they train."""
    rec, out = _layer_norm(trains, True)
    assert rec.bytes_by_tag() == {"ln.input": U, "ln.mean_rstd": 2 * R}
    assert rec.forward_peak == U + U + 2 * R
    expected = U + 2 * R + U + U + (2 * P if trains else 0)
    assert replay_peak(rec, out).total == expected
    t = _traced_layer_norm("float32", "float32", trains, True)
    assert (t.forward_peak, t.saved, t.backward_peak) == (U + U + 2 * R, U + 2 * R, expected)


def test_layer_norm_with_trainable_weights_only():
    """The weight's gradient needs x-hat, so the input and statistics are saved though x needs no gradient;
    the backward makes only the two parameter gradients (grad_input_mask [False, True, True])."""
    rec, out = _layer_norm(True, False)
    assert sum(rec.saved_bytes().values()) == U + 2 * R
    assert replay_peak(rec, out).total == U + 2 * R + U + 2 * P
    t = _traced_layer_norm("float32", "float32", True, False)
    assert (t.saved, t.backward_peak) == (U + 2 * R, U + 2 * R + U + 2 * P)


def test_layer_norm_without_any_gradient_saves_nothing():
    """A frozen norm over a tensor that needs no gradient: no node; the statistics are made and dropped."""
    rec, _ = _layer_norm(False, False)
    assert (rec.saved_bytes(), rec.nodes, rec.forward_peak) == ({}, [], U + U + 2 * R)
    t = _traced_layer_norm("float32", "float32", False, False)
    assert (t.forward_peak, t.saved) == (U + U + 2 * R, 0)


def test_cpu_layer_norm_of_half_input_and_weights_keeps_half_statistics():
    """ATen layer_norm_cpu computes mean and rstd in fp32 only for mixed input/weight dtypes; with bf16 input
    and bf16 weights they are bf16 (2 x 16 x 2 = 64 B); with bf16 input and fp32 weights (CPU autocast
    leaves layer_norm alone) fp32 (128 B). The input is saved as it is (U/2)."""
    assert layer_norm_stats_dtype(context(weight_dtype="bfloat16"), "bfloat16") == "bfloat16"
    assert layer_norm_stats_dtype(context(weight_dtype="float32"), "bfloat16") == "float32"
    assert layer_norm_stats_dtype(context(weight_dtype="bfloat16", device="cuda"), "bfloat16") == "float32"
    for weights, stats in (("bfloat16", R), ("float32", 2 * R)):
        rec, out = _layer_norm(False, True, "bfloat16", weight_dtype=weights, compute_dtype="bfloat16")
        assert rec.bytes_by_tag() == {"ln.input": U // 2, "ln.mean_rstd": stats}
        assert out.dtype == "bfloat16"
        t = _traced_layer_norm("bfloat16", weights, False, True)
        assert (t.forward_peak, t.saved) == (U // 2 + U // 2 + stats, U // 2 + stats)


def test_cuda_autocast_runs_layer_norm_in_fp32():
    """layer_norm is on CUDA autocast's fp32 list (aten/src/ATen/autocast_mode.cpp): a bf16 input is cast to
    fp32 first (U), and that copy is what is saved, with fp32 statistics; the output is fp32. Forward: the
    bf16 input (U/2), its copy, the output and the statistics."""
    rec, out = _layer_norm(False, True, "bfloat16", device="cuda", autocast="bfloat16")
    assert rec.bytes_by_tag() == {"ln.input": U, "ln.mean_rstd": 2 * R}
    assert out.dtype == "float32"
    assert rec.forward_peak == U // 2 + U + U + 2 * R


def _traced_rms_norm(dtype, trains):
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(H).to(getattr(torch, dtype))
    norm.weight.requires_grad_(trains)
    return trace(norm, lambda: (torch.randn(2, 8, H, dtype=getattr(torch, dtype), requires_grad=True),),
                 [norm.weight])


def _rms_norm(dtype, trains):
    rec = Recorder(context(compute_dtype=dtype, weight_dtype=dtype))
    x = rec.new(ROWS * H, dtype, True)
    return rec, rms_norm(rec, x, trains, "norm")


def test_fp32_rms_norm():
    """LlamaRMSNorm.forward on fp32 x: ``x.to(float32)`` is x; ``variance = x.pow(2).mean(-1,
    keepdim=True)``; ``x * torch.rsqrt(variance + eps)``; ``self.weight * _.to(input_dtype)``.
    Saved: pow's x (PowBackward0 saves self) and the product's x and rsqrt (MulBackward0), one storage x (U),
    rsqrt (R; RsqrtBackward0 saves its result too); a frozen weight saves nothing more (the product's
    gradient for the normalized tensor needs the weight, a parameter).
    Forward peak, at the output: x, the variance (held by the local until the norm returns), rsqrt, the
    normalized h, the output: 3 U + 2 R.
    Backward peak, in PowBackward0 (``pow_backward``: grad * (2 * x.pow(1))): x saved, grad_x from the
    product (U, waiting in x's buffer), the mean's gradient (U, grad.expand() / 16: a new tensor), x.pow(1),
    2 * _ and the result (3 U): 6 U."""
    rec, out = _rms_norm("float32", False)
    assert rec.bytes_by_tag() == {"norm.input_fp32": U, "norm.rsqrt": R}
    assert rec.forward_peak == 3 * U + 2 * R
    assert replay_peak(rec, out).total == 6 * U
    t = _traced_rms_norm("float32", False)
    assert (t.forward_peak, t.saved, t.backward_peak) == (3 * U + 2 * R, U + R, 6 * U)


def test_rms_norm_with_a_trainable_weight_saves_the_normalized_tensor():
    """weight * h saves h (U) for the weight's gradient; the backward peak is the same PowBackward0 moment,
    now with the weight's .grad (64 B) made."""
    rec, out = _rms_norm("float32", True)
    assert rec.bytes_by_tag() == {"norm.input_fp32": U, "norm.rsqrt": R, "norm.normalized": U}
    assert replay_peak(rec, out).total == 6 * U + P
    t = _traced_rms_norm("float32", True)
    assert (t.saved, t.backward_peak) == (2 * U + R, 6 * U + P)


def test_bf16_rms_norm_saves_the_fp32_copy():
    """bf16 x: ``x.to(float32)`` is a copy (U), saved in place of x; ``.to(input_dtype)`` copies h back to
    bf16 (U/2). Forward peak, at the output: x (U/2), its fp32 copy, the variance, rsqrt, h (U), the bf16
    h (U/2) and the output (U/2): 3.5 U + 2 R. A trainable weight saves the bf16 h (U/2)."""
    rec, out = _rms_norm("bfloat16", False)
    assert rec.bytes_by_tag() == {"norm.input_fp32": U, "norm.rsqrt": R}
    assert rec.forward_peak == U // 2 + U + 2 * R + U + U // 2 + U // 2
    t = _traced_rms_norm("bfloat16", False)
    assert (t.forward_peak, t.saved) == (rec.forward_peak, U + R)
    rec, out = _rms_norm("bfloat16", True)
    assert rec.bytes_by_tag() == {"norm.input_fp32": U, "norm.rsqrt": R, "norm.normalized": U // 2}
    assert _traced_rms_norm("bfloat16", True).saved == U + R + U // 2
