"""Mixture-of-experts families (Mixtral and kin): exact parameter counts against the real transformers/peft models on
the meta device (router and fused 3-D experts included), the routing the harness drives, and the MoE block against
traced runs of a tiny Mixtral (fake tensors and a real CPU run with the model's own random-weight routing).
"""

import pytest
import torch

from measure.build import build_model
from measure.routing import drive_indices
from measure.run import measure_one
from peftcalc.config import load_spec
from peftcalc.errors import CombinationError
from peftcalc.families import build_layout
from peftcalc.layout import param_names
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings

TINY_MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                "vocab_size": 512, "num_local_experts": 4, "num_experts_per_tok": 2}


def test_mixtral_8x7b_total_is_the_published_46_7b():
    """Mistral AI's model card: 46.7B parameters (32 layers x (attention 4096 x (4096 + 2 x 1024 + 4096), router
    8 x 4096, experts 8 x 3 x 4096 x 14336, two norms) + embeddings and head 2 x 32000 x 4096 + final norm)."""
    layer = 4096 * (4096 + 2 * 1024 + 4096) + 8 * 4096 + 8 * 3 * 4096 * 14336 + 2 * 4096
    assert build_layout(load_spec("mixtral-8x7b")).total_params == 32 * layer + 2 * 32000 * 4096 + 4096 == 46_702_792_704


def test_layout_names_and_order_equal_named_parameters():
    spec = load_spec(TINY_MIXTRAL)
    ours = [n for m in build_layout(spec).modules for n, _ in param_names(m)]
    model = build_model(spec, MethodSettings("full"))
    assert ours == [n for n, _ in model.named_parameters()]
    assert "model.layers.0.mlp.experts.gate_up_proj" in ours and "model.layers.0.mlp.gate.weight" in ours


def test_instruct_alias_is_the_same_model():
    assert load_spec("mistralai/Mixtral-8x7B-Instruct-v0.1") == load_spec("mixtral-8x7b")


def test_all_linear_on_a_peft_converted_moe_is_refused():
    with pytest.raises(CombinationError, match="target_parameters"):
        make_plan(load_spec(TINY_MIXTRAL), MethodSettings("lora", targets="all-linear"))


@pytest.mark.parametrize("routing, counts", [("balanced", [4, 4, 4, 4]), ("worst", [8, 8, 0, 0]),
                                             ("skewed", [6, 6, 2, 2])])
def test_driven_routing_per_expert_counts(routing, counts):
    """8 tokens, top-2, 4 experts (16 pairs): balanced 4 each; worst, every token to experts 0 and 1; skewed, the 4
    even tokens to 0 and 1, the 4 odd ones as balanced (odd token t: experts 2t mod 4 and 2t + 1 mod 4)."""
    idx = torch.zeros(8, 2, dtype=torch.int64)
    drive_indices(idx, 4, routing)
    assert torch.bincount(idx.view(-1), minlength=4).tolist() == counts
    assert all(len(set(row)) == 2 for row in idx.tolist())  # a token never goes to one expert twice


def _peak(device, method, routing="balanced", **training):
    row = measure_one(TINY_MIXTRAL, MethodSettings(method), TrainingSettings(
        **{"batch_size": 2, "seq_len": 32, "precision": "fp32", "routing": routing, **training}), device, 2)
    assert row["outcome"] == "ok", row["error"]
    return row["measured"]["peak_bytes"], row["predicted"]["peak_bytes"]


def test_tiny_mixtral_lora_fake_trace_equals_prediction():
    measured, predicted = _peak("fake", "lora", seq_len=256)
    assert measured == predicted == 8_828_296  # traced op by op (fake tensors)


def test_own_routing_lands_where_the_driven_routings_do(monkeypatch):
    """A real CPU run with the model's own (random-weight) routing peaks at the predicted bytes, which are the same for
    every driven routing (the committed ci rows hold balanced, skewed and worst to them): grouped_mm's tensors are
    (tokens x top_k, .) whatever expert each pair goes to."""
    import measure.setup

    monkeypatch.setattr(measure.setup, "drive_routing", lambda *a: [])
    own, predicted = _peak("cpu", "full", optimizer="sgd")
    assert own == predicted == _peak_predicted("worst", optimizer="sgd") == 3_189_608


def _peak_predicted(routing, **training):
    from peftcalc.api import estimate

    return estimate(TINY_MIXTRAL, method="full", batch_size=2, seq_len=32, precision="fp32", routing=routing,
                    device="cpu", **training).memory.peak_bytes


def test_qwen3_30b_a3b_total_is_the_published_30_5b():
    """Qwen's model card: 30.5B parameters. Per layer: attention 2048 x (32 + 2 x 4 + 32) x 128, q/k norms 2 x 128,
    128 experts x 3 x 2048 x 768, router 128 x 2048, two norms; embeddings and head 2 x 151936 x 2048; final norm."""
    layer = 2048 * 72 * 128 + 2 * 128 + 128 * 3 * 2048 * 768 + 128 * 2048 + 2 * 2048
    expected = 48 * layer + 2 * 151936 * 2048 + 2048
    assert build_layout(load_spec("Qwen/Qwen3-30B-A3B")).total_params == expected == 30_532_122_624


def test_forward_flops_count_the_active_experts_only():
    """One token through Mixtral-8x7B: 2 FLOPs per active matmul weight (attention, router, 2 of the 8 experts, the
    head: 12.9B active parameters less the embedding lookup, Mistral AI's figure) plus attention's 4 s^2 d per layer."""
    from peftcalc.hardware import step_flops

    plan = make_plan(load_spec("mixtral-8x7b"), MethodSettings("full"))
    flops = step_flops(plan, TrainingSettings(batch_size=1, seq_len=1), 1)
    layer = 4096 * (4096 + 2 * 1024 + 4096) + 8 * 4096 + 2 * 3 * 4096 * 14336
    assert flops.forward == 2 * (32 * layer + 32000 * 4096) + 4 * 4096 * 32
    assert flops.backward == 2 * flops.forward
