"""peftcalc.ops.sink_attention: gpt-oss's eager attention with sinks (modeling_gpt_oss.py eager_attention_forward)
against a real CPU trace of it: batch 2, 4 query heads over 2 key/value heads (repeat_kv copies), 8 tokens, head_dim
8, the eager float mask (2, 1, 8, 8) an input as the model's forward makes it."""

import pytest
from opkit import context, replay_peak, trace

from peftcalc.ops.recorder import Recorder
from peftcalc.ops.sink_attention import sink_attention
from peftcalc.spec import ModelSpec

SPEC = ModelSpec(name="t", model_type="gpt_oss", task="causal_lm", architecture="", hidden_size=32, num_layers=1,
                 num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=32)


def _traced(dtype, sinks_train, weight_dtype=None, autocast=False):
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    wdt = getattr(torch, weight_dtype or dtype)

    class Stub(torch.nn.Module):
        num_key_value_groups = 2

        def __init__(self):
            super().__init__()
            self.sinks = torch.nn.Parameter(torch.randn(4, dtype=wdt), requires_grad=sinks_train)

    stub = Stub()
    stub.train()
    mask = torch.zeros(2, 1, 8, 8, dtype=wdt)

    def attend(q, k, v):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            out, _weights = eager_attention_forward(stub, q, k, v, mask, scaling=0.35)
        return out

    def make():
        dt = getattr(torch, dtype)
        return (torch.randn(2, 4, 8, 8, dtype=dt, requires_grad=True),
                *(torch.randn(2, 8, 2, 8, dtype=dt, requires_grad=True).transpose(1, 2) for _ in range(2)))

    return trace(attend, make, [stub.sinks, mask])


@pytest.mark.parametrize("dtype, sinks_train", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_sink_attention_equals_the_trace(dtype, sinks_train):
    rec = Recorder(context(weight_dtype=dtype, compute_dtype=dtype, attention="eager"))
    q, k, v = rec.new(2 * 4 * 8 * 8, dtype, True), rec.new(2 * 2 * 8 * 8, dtype, True), rec.new(2 * 2 * 8 * 8, dtype, True)
    out, _weights = sink_attention(rec, SPEC, q, k, v, 0.0, sinks_train, "attn")
    t = _traced(dtype, sinks_train)
    assert (rec.forward_peak, sum(rec.saved_bytes().values()), replay_peak(rec, out).total) == (
        t.forward_peak, t.saved, t.backward_peak)
