"""peftcalc.ops.experts.experts_forward under each experts implementation transformers offers (integrations/moe.py:
grouped_mm, the default; batched_mm; the experts module's own eager loop) against a real CPU trace of the MoE block:
Mixtral's (router, then MixtralExperts) and gpt-oss's (GptOssMLP: biases, clamped SwiGLU), 8 tokens, hidden 16, 4
experts of intermediate size 8, top-2, with the router driven to each routing (measure.routing)."""

import pytest
from opkit import context, replay_peak, trace

from peftcalc.ops.experts import experts_forward
from peftcalc.ops.moe import router_top_k, router_top_k_softmax
from peftcalc.ops.recorder import Recorder

T, H, I, E, K = 8, 16, 8, 4, 2


def _traced(family, impl, routing, dtype, trains):
    import torch
    from transformers import GptOssConfig, MixtralConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from measure.routing import drive_routing

    sizes = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    if family == "mixtral":
        cfg = MixtralConfig(**sizes)
        cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg)
    else:
        cfg = GptOssConfig(**sizes, head_dim=8)
        cfg._experts_implementation = impl
        block = GptOssMLP(cfg)
    block = block.to(getattr(torch, dtype))
    for p in block.parameters():
        p.data.normal_()
        p.requires_grad_(trains)
    drive_routing(block, E, routing)

    def run(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    return trace(run, lambda: (torch.randn(1, T, H, dtype=getattr(torch, dtype), requires_grad=True),),
                 list(block.parameters()))


def _predicted(family, impl, routing, dtype, trains):
    rec = Recorder(context(batch=1, seq=T, kv_seq=T, weight_dtype=dtype, compute_dtype=dtype, experts=impl,
                           routing=routing))
    x = rec.new(T * H, dtype, True)
    if family == "mixtral":
        logits, weights, idx = router_top_k(rec, x, H, E, K, trains, True, "mlp.gate")
        out = experts_forward(rec, x, weights, idx, H, I, E, (trains, trains), "silu", "mlp.experts")
        rec.free(logits, weights.base or weights, idx)
    else:
        logits, weights, idx = router_top_k_softmax(rec, x, H, E, K, trains, "mlp.router")
        out = experts_forward(rec, x, weights, idx, H, I, E, (trains, trains), "", "mlp.experts", biases=(trains, trains))
        rec.free(logits, weights, idx)
    return rec.forward_peak, sum(rec.saved_bytes().values()), replay_peak(rec, out).total


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("dtype, trains", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_batched_mm_equals_the_trace(family, dtype, trains):
    t = _traced(family, "batched_mm", "balanced", dtype, trains)
    assert _predicted(family, "batched_mm", "balanced", dtype, trains) == (t.forward_peak, t.saved, t.backward_peak)


@pytest.mark.parametrize("routing", ["balanced", "skewed", "worst"])
@pytest.mark.parametrize("dtype, trains", [("float32", True), ("bfloat16", True), ("bfloat16", False), ("float32", False)])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_eager_loop_equals_the_trace(family, routing, dtype, trains):
    t = _traced(family, "eager", routing, dtype, trains)
    assert _predicted(family, "eager", routing, dtype, trains) == (t.forward_peak, t.saved, t.backward_peak)


@pytest.mark.parametrize("routing", ["balanced", "skewed", "worst"])
@pytest.mark.parametrize("tokens, top_k, experts", [(8, 2, 4), (7, 2, 6), (13, 3, 8)])
def test_expert_token_counts_match_the_driven_router(routing, tokens, top_k, experts):
    """Each expert's pair count is what measure.routing writes into a real (tokens, top_k) index tensor."""
    import torch

    from measure.routing import drive_indices
    from peftcalc.ops.moe_eager import expert_token_counts

    indices = torch.zeros(tokens, top_k, dtype=torch.int64)
    drive_indices(indices, experts, routing)
    assert expert_token_counts(tokens, top_k, experts, routing) == torch.bincount(indices.view(-1), minlength=experts).tolist()


def test_expert_token_counts_by_hand():
    # skewed, 6 tokens, top-2, 4 experts: even tokens 0, 2, 4 -> experts 0 and 1 (3 each); the odd tokens' 6 pairs
    # (u * 2 + j) mod 4 -> 0, 1, 2, 3, 0, 1: experts 0 and 1 get 2 more, 2 and 3 one each
    from peftcalc.ops.moe_eager import expert_token_counts

    assert expert_token_counts(6, 2, 4, "skewed") == [5, 5, 1, 1]
    assert expert_token_counts(6, 2, 4, "balanced") == [3, 3, 3, 3]
    assert expert_token_counts(6, 2, 4, "worst") == [6, 6, 0, 0]
