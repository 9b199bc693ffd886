"""peftcalc.ops.norms.gemma_rms_norm against a real CPU trace of transformers' Gemma2RMSNorm (modeling_gemma2.py:
``self._norm(x.float()) * (1.0 + self.weight.float())``, then ``.type_as(x)``) and by hand.

Shapes: batch 2 x 8 tokens of 64 (opkit.context): U = 2 x 8 x 64 x 4 = 4,096 bytes for an fp32 activation, the
rsqrt R = 2 x 8 x 4 = 64, the fp32 (1 + weight) vector W = 64 x 4 = 256."""

import pytest
from opkit import F32, context, replay_peak, trace

from peftcalc.ops.norms import gemma_rms_norm
from peftcalc.ops.recorder import Recorder

H = 64
U, R, W = 2 * 8 * H * F32, 2 * 8 * F32, H * F32


def _norm(dtype, trains, input_rg=True):
    rec = Recorder(context(weight_dtype=dtype, compute_dtype=dtype))
    x = rec.new(2 * 8 * H, dtype, input_rg)
    return rec, gemma_rms_norm(rec, x, trains, "norm", H)


def _traced(dtype, trains, input_rg=True, backward=True):
    import torch
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    torch_dtype = getattr(torch, dtype)
    norm = Gemma2RMSNorm(H).to(torch_dtype)
    norm.weight.requires_grad_(trains)
    return trace(norm, lambda: (torch.randn(2, 8, H, dtype=torch_dtype, requires_grad=input_rg),), [norm.weight],
                 backward=backward)


@pytest.mark.parametrize("trains", [False, True])
def test_fp32_saves_input_rsqrt_and_one_plus_weight(trains):
    """fp32: x.float() is x itself, saved by pow and by x * rsqrt (U), rsqrt's result (R), the product saves
    (1 + w) (W) for the input's gradient and the normalized h (U) when the weight trains."""
    rec, out = _norm("float32", trains)
    expected = {"norm.input_fp32": U, "norm.rsqrt": R, "norm.one_plus_weight": W}
    if trains:
        expected["norm.normalized"] = U
    assert rec.bytes_by_tag() == expected
    t = _traced("float32", trains)
    assert t.saved == sum(expected.values())
    assert (t.forward_peak, t.backward_peak) == (rec.forward_peak, replay_peak(rec, out).total)


@pytest.mark.parametrize("trains", [False, True])
def test_bf16_runs_in_fp32_and_casts_back(trains):
    """bf16: the fp32 copy of x is what is saved (U), the product is fp32 and its bf16 cast a new tensor."""
    rec, out = _norm("bfloat16", trains)
    assert out.dtype == "bfloat16" and rec.bytes_by_tag()["norm.input_fp32"] == U
    t = _traced("bfloat16", trains)
    assert (t.forward_peak, t.saved, t.backward_peak) == (rec.forward_peak, sum(rec.saved_bytes().values()),
                                                          replay_peak(rec, out).total)


def test_frozen_norm_over_a_frozen_input_saves_nothing():
    rec, _ = _norm("bfloat16", False, input_rg=False)
    assert rec.saved_bytes() == {}
    t = _traced("bfloat16", False, input_rg=False, backward=False)
    assert (t.saved, t.forward_peak) == (0, rec.forward_peak)
