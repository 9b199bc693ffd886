"""peftcalc.ops.moe on gpt-oss's MLP (models/gpt_oss/modeling_gpt_oss.py GptOssMLP with transformers' default experts
implementation, grouped_mm: integrations/moe.py grouped_mm_experts_forward with biases and the clamped SwiGLU) against
a real CPU trace of it: 8 tokens, hidden 16, 4 experts of intermediate size 8, top-2, balanced routing."""

import pytest
from opkit import context, replay_peak, trace

from peftcalc.ops.moe import experts_grouped_mm, router_top_k_softmax
from peftcalc.ops.recorder import Recorder

T, H, I, E, K = 8, 16, 8, 4, 2


def _traced(dtype, trains):
    import torch
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from measure.routing import drive_routing

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=32)
    cfg._experts_implementation = "grouped_mm"
    mlp = GptOssMLP(cfg).to(getattr(torch, dtype))
    for p in mlp.parameters():
        p.data.normal_()
        p.requires_grad_(trains)
    drive_routing(mlp, E, "balanced")

    def run(x):
        out, _scores = mlp(x)
        return out

    return trace(run, lambda: (torch.randn(1, T, H, dtype=getattr(torch, dtype), requires_grad=True),),
                 list(mlp.parameters()))


@pytest.mark.parametrize("dtype, trains", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_gpt_oss_mlp_equals_the_trace(dtype, trains):
    rec = Recorder(context(batch=1, seq=T, kv_seq=T, weight_dtype=dtype, compute_dtype=dtype))
    x = rec.new(T * H, dtype, True)
    logits, scores, idx = router_top_k_softmax(rec, x, H, E, K, trains, "mlp.router")
    out = experts_grouped_mm(rec, x, scores, idx, H, I, E, (trains, trains), "", "mlp.experts",
                             biases=(trains, trains))
    rec.free(logits, scores, idx)
    t = _traced(dtype, trains)
    assert (rec.forward_peak, sum(rec.saved_bytes().values()), replay_peak(rec, out).total) == (
        t.forward_peak, t.saved, t.backward_peak)
