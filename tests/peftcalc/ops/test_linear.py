"""peftcalc.ops.linear (nn.Linear, bitsandbytes Linear4bit) against derivatives.yaml by hand and real CPU traces.

A 16 -> 32 Linear on 2 x 8 tokens: the input X = 16 x 16 x 4 = 1,024 bytes, the output Y = 16 x 32 x 4 =
2,048, the weight W = 32 x 16 x 4 = 2,048, the bias 32 x 4 = 128 (halves of each in bf16).
derivatives.yaml, addmm / mm: ``self: mm_mat1_backward(grad, mat2, ...)`` (grad @ W: needs the weight, a
parameter, no activation), ``mat2: mm_mat2_backward(grad, self, ...)`` (grad^T @ x: needs the input)."""

import pytest
from opkit import F32, context, replay_peak, trace

from peftcalc.backward import Node, run_backward
from peftcalc.ops.context import StepContext
from peftcalc.ops.linear import linear, matmul_4bit_backward_steps
from peftcalc.ops.recorder import Recorder

TOKENS, IN, OUT = 16, 16, 32
X, Y, W, B = TOKENS * IN * F32, TOKENS * OUT * F32, IN * OUT * F32, OUT * F32


def _torch_linear(trains, bias, autocast):
    import torch

    layer = torch.nn.Linear(IN, OUT, bias=bias)
    layer.requires_grad_(trains)

    def forward(x):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return layer(x)

    return forward, list(layer.parameters())


def _traced(trains, x_grad, bias=False, autocast=False):
    import torch

    forward, params = _torch_linear(trains, bias, autocast)
    return trace(forward, lambda: (torch.randn(2, 8, IN, requires_grad=x_grad),), params)


def _run(ctx, trains, x_grad, bias=False):
    rec = Recorder(ctx)
    x = rec.new(TOKENS * IN, "float32", x_grad)
    out = linear(rec, x, IN, OUT, trains, "fc", bias=bias, bias_trains=bias and trains)
    return rec, out


def test_frozen_linear_saves_nothing():
    """A frozen weight and an input that needs a gradient (a frozen layer above a trainable one): only
    grad @ W is computed, and W is a parameter: no activation. Forward: X + Y. Backward: the incoming
    gradient (Y) and grad_x (X)."""
    rec, out = _run(context(), trains=False, x_grad=True)
    assert rec.saved_bytes() == {}
    assert rec.forward_peak == X + Y
    assert replay_peak(rec, out).total == Y + X
    t = _traced(False, True)
    assert (t.forward_peak, t.saved, t.backward_peak) == (X + Y, 0, Y + X)


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_trainable_linear_saves_its_input(x_grad, bias):
    """grad_W = grad^T @ x needs the input: X saved. Backward peak: saved X, the incoming gradient Y, grad_x
    (X, when the input needs one), the weight's .grad (W) and the bias's (128 B, the incoming gradient
    summed over the tokens by the engine after addmm's formula returns)."""
    rec, out = _run(context(), trains=True, x_grad=x_grad, bias=bias)
    assert rec.bytes_by_tag() == {"fc.input": X}
    assert rec.forward_peak == X + Y
    expected = X + Y + (X if x_grad else 0) + W + (B if bias else 0)
    assert replay_peak(rec, out).total == expected
    t = _traced(True, x_grad, bias)
    assert (t.forward_peak, t.saved, t.backward_peak) == (X + Y, X, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_frozen_linear_saves_the_weight_copy(bias):
    """Under CPU autocast bf16 F.linear takes bf16 copies of the input (X/2), the weight (W/2) and the bias
    (64 B); the output is bf16 (Y/2). mm's grad @ W needs the weight operand, which is now the copy: W/2
    saved (a frozen weight: no cache, it lives as the saved tensor). Forward peak: x, the three copies and
    the output. Backward: the saved copy, the incoming bf16 gradient and grad_x in bf16 (X/2)."""
    rec, out = _run(context(autocast="bfloat16"), trains=False, x_grad=True, bias=bias)
    assert rec.bytes_by_tag() == {"fc.autocast_weight": W // 2}
    assert rec.forward_peak == X + W // 2 + X // 2 + Y // 2 + (B // 2 if bias else 0)
    assert replay_peak(rec, out).total == W // 2 + Y // 2 + X // 2
    assert rec.cached == []
    t = _traced(False, True, bias, autocast=True)
    assert (t.forward_peak, t.saved, t.backward_peak) == (rec.forward_peak, W // 2, W // 2 + Y // 2 + X // 2)


def test_autocast_trainable_linear_saves_both_copies_and_caches_the_weights():
    """A trainable weight under autocast: the bf16 input copy (X/2, for grad_W) and the weight copy (W/2, for
    grad_x) are saved; the weight copy is autocast's cached cast (Recorder.cached). Backward peak, in mm's
    formula: the two saved copies, the incoming bf16 gradient (Y/2), grad_x (X/2) and the weight copy's
    bf16 gradient (W/2) = 4,096. ToCopyBackward0 turns the latter into the fp32 .grad (W) later, once the
    saved copies and the incoming gradient are gone (W/2 + W + X/2 = 3,584)."""
    rec, out = _run(context(autocast="bfloat16"), trains=True, x_grad=True)
    assert rec.bytes_by_tag() == {"fc.autocast_weight": W // 2, "fc.input": X // 2}
    assert [t.nbytes for t in rec.cached] == [W // 2]
    assert rec.forward_peak == X + W // 2 + X // 2 + Y // 2
    assert replay_peak(rec, out).total == X // 2 + W // 2 + Y // 2 + X // 2 + W // 2 == 4_096
    t = _traced(True, True, autocast=True)
    assert (t.forward_peak, t.saved, t.backward_peak) == (rec.forward_peak, W // 2 + X // 2, 4_096)


def test_4bit_linear_dequantizes_in_both_directions():
    """bitsandbytes Linear4bit (QLoRA, bf16 compute, bf16 loaded weights, no double quantization), input
    bf16 needing a gradient: nothing is saved (the packed weight is in ctx.tensors). On CUDA
    MatMul4Bit.forward dequantizes W for F.linear (W/2 alive while the output is made), the CPU backend a
    fused gemm_4bit without it. Its backward dequantizes again: grad_A = grad @ dequantize_4bit(W):
    incoming Y/2, the weight W/2, grad_A X/2."""
    for device, peak in (("cuda", X // 2 + W // 2 + Y // 2), ("cpu", X // 2 + Y // 2)):
        ctx = context(device=device, compute_dtype="bfloat16", weight_dtype="bfloat16", quant_compute="bfloat16",
                      quant_source="bfloat16")
        rec = Recorder(ctx)
        x = rec.new(TOKENS * IN, "bfloat16", True)
        out = linear(rec, x, IN, OUT, False, "fc", quantized=True)
        assert (rec.saved_bytes(), rec.forward_peak, out.dtype) == ({}, peak, "bfloat16")
        assert replay_peak(rec, out).total == Y // 2 + W // 2 + X // 2


def test_4bit_linear_casts_its_input_to_the_compute_dtype_and_back():
    """Linear4bit.forward: x.to(bnb_4bit_compute_dtype) (bf16 copy of an fp32 input, X/2), the bf16 matmul
    output (Y/2), then .to(inp_dtype): an fp32 output (Y). On the CPU: X + X/2 + Y/2 + Y at the last cast."""
    ctx = context(quant_compute="bfloat16", quant_source="float32")
    rec = Recorder(ctx)
    x = rec.new(TOKENS * IN, "float32", True)
    out = linear(rec, x, IN, OUT, False, "fc", quantized=True)
    assert (out.dtype, rec.saved_bytes()) == ("float32", {})
    assert rec.forward_peak == X + X // 2 + Y // 2 + Y


def test_matmul_4bit_backward_dequantizes_in_the_loaded_dtype():
    """MatMul4Bit.backward on tiny-vit-cls's fc2 (in 128, out 64; 51 tokens) under amp-bf16, traced on
    fake tensors: dequantize_blockwise (128,) fp32 512 B, dequantize_4bit (64, 128) fp32 32,768 B, its
    .to(bf16) 16,384 B, then mm (51, 128) bf16 13,056 B (the first two die before the mm). The peak is
    the fp32 weight and its bf16 copy: 49,152 bytes, 36,096 besides grad_A."""
    ctx = StepContext(batch=3, seq=17, kv_seq=17, compute_dtype="bfloat16", weight_dtype="float32", autocast="bfloat16",
              adapter_dtype="float32", device="cpu", attention="sdpa", quant_compute="bfloat16",
              quant_source="float32", quant_nested=True)
    grad_out, grad_a = 51 * 64 * 2, 51 * 128 * 2

    def replay(c: StepContext) -> int:  # MatMul4Bit's node as ops.linear.matmul records it, from a bf16 grad_output
        steps = tuple(matmul_4bit_backward_steps(c, 128, 64)) + (("new", "d0", grad_a), ("free", "wc"))
        return run_backward([Node(2, steps, ((1, "d0"),))], {}, {2: grad_out}, False).peak.total

    assert replay(ctx) == grad_out + 32_768 + 16_384
    # loaded in bf16 (the bf16 policy): dequantize_4bit returns bf16, .to() copies nothing; the
    # nested absmax (512 B) is smaller than grad_A, so the peak is the weight and grad_A
    bf16 = StepContext(**{**ctx.__dict__, "weight_dtype": "bfloat16", "autocast": None, "quant_source": "bfloat16"})
    assert replay(bf16) == grad_out + 16_384 + grad_a
