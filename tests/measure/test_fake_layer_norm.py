"""measure.fake.real_cpu_kernel_dtypes: fake ``aten.native_layer_norm`` outputs carry the dtypes and
shapes of the real CPU kernel's (the real kernel, run on real CPU tensors here, is the reference)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from measure.fake import real_cpu_kernel_dtypes

LN = torch.ops.aten.native_layer_norm.default
LN_BACKWARD = torch.ops.aten.native_layer_norm_backward.default


def _meta(tensors):
    return [(t.dtype, tuple(t.shape)) for t in tensors]


def _real_and_fake(input_dtype, param_dtype):
    x = torch.randn(2, 3, 8, dtype=input_dtype)
    w, b = torch.randn(8, dtype=param_dtype), torch.randn(8, dtype=param_dtype)
    real = LN(x, [8], w, b, 1e-5)
    with real_cpu_kernel_dtypes(), FakeTensorMode() as mode:
        fake = LN(mode.from_tensor(x), [8], mode.from_tensor(w), mode.from_tensor(b), 1e-5)
    return real, fake


@pytest.mark.parametrize("input_dtype,param_dtype", [
    (torch.bfloat16, torch.float32),   # amp-bf16: bf16 activation into an fp32 LayerNorm
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),  # pure bf16
    (torch.float32, torch.float32),
])
def test_fake_native_layer_norm_matches_real_cpu(input_dtype, param_dtype):
    real, fake = _real_and_fake(input_dtype, param_dtype)
    assert _meta(fake) == _meta(real)


def test_mixed_dtype_stats_are_fp32_on_real_cpu_and_now_fake():
    # real CPU: bf16 out, fp32 mean/rstd of shape (2, 3, 1); torch's own fake rule gives bf16 stats
    real, fake = _real_and_fake(torch.bfloat16, torch.float32)
    expected = [(torch.bfloat16, (2, 3, 8)), (torch.float32, (2, 3, 1)), (torch.float32, (2, 3, 1))]
    assert _meta(real) == expected and _meta(fake) == expected
    with FakeTensorMode() as mode:  # outside the context: torch's rule, restored
        x, w = mode.from_tensor(torch.randn(2, 3, 8, dtype=torch.bfloat16)), mode.from_tensor(torch.randn(8))
        assert [t.dtype for t in LN(x, [8], w, w, 1e-5)][1:] == [torch.bfloat16, torch.bfloat16]


def test_fake_backward_matches_real_cpu_with_fp32_stats():
    x, go = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w, b = torch.randn(8), torch.randn(8)
    _, mean, rstd = LN(x, [8], w, b, 1e-5)
    real = LN_BACKWARD(go, x, [8], mean, rstd, w, b, [True, True, True])
    with real_cpu_kernel_dtypes(), FakeTensorMode() as mode:
        f = [mode.from_tensor(t) for t in (go, x, mean, rstd, w, b)]
        fake = LN_BACKWARD(f[0], f[1], [8], f[2], f[3], f[4], f[5], [True, True, True])
    assert _meta(fake) == _meta(real) == [(torch.bfloat16, (2, 3, 8)), (torch.float32, (8,)), (torch.float32, (8,))]
