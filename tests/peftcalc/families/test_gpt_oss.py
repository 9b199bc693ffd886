"""gpt-oss (families.gpt_oss): exact parameter counts against the model card and the real transformers/peft models on
the meta device (sinks, router bias, fused experts with biases; LoRA on the experts through peft's target_parameters,
layer by layer as the gpt-oss recipes name them), the MXFP4 checkpoint size, and tiny gpt-oss's traced peaks."""

import pytest

from measure.build import build_model, count_params
from measure.run import measure_one
from peftcalc.api import estimate
from peftcalc.config import load_spec
from peftcalc.families import attention_for, build_layout
from peftcalc.layout import param_names
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings

TINY = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32, "vocab_size": 512,
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16}


def _layer(experts: int) -> int:
    """One gpt-oss block: q (2880 -> 64 x 64) and o (64 x 64 -> 2880) with biases, k and v (2880 -> 8 x 64) with biases,
    64 sinks, the router (E x 2880 + E), E experts of gate_up (2880 x 5760 + 5760) and down (2880 x 2880 + 2880), two
    norms."""
    attention = 2 * (2880 * 4096) + 4096 + 2880 + 2 * (2880 * 512 + 512) + 64
    return attention + experts * 2881 + experts * (2880 * 5760 + 5760 + 2880 * 2880 + 2880) + 2 * 2880


@pytest.mark.parametrize("name, layers, experts, card", [("gpt-oss-20b", 24, 32, 20_914_757_184),
                                                         ("openai/gpt-oss-120b", 36, 128, 116_829_156_672)])
def test_totals_are_the_model_cards(name, layers, experts, card):
    """OpenAI's gpt-oss model card (table 1): 20.91B and 116.83B total parameters; embeddings and the untied head
    2 x 201,088 x 2,880, the final norm 2,880."""
    total = layers * _layer(experts) + 2 * 201088 * 2880 + 2880
    assert build_layout(load_spec(name)).total_params == total == card


def test_layout_names_and_order_equal_named_parameters():
    spec = load_spec(TINY)
    ours = [n for m in build_layout(spec).modules for n, _ in param_names(m)]
    assert ours == [n for n, _ in build_model(spec, MethodSettings("full")).named_parameters()]
    assert spec.layer_windows == (16, 0)  # GptOssConfig's default layer_types: sliding, full, ...


def test_eager_is_what_runs():
    """GptOssPreTrainedModel: _supports_sdpa = False, so from_config falls back to eager."""
    assert attention_for(load_spec(TINY), "sdpa") == "eager"


@pytest.mark.parametrize("targets", [
    ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    # the OpenAI cookbook's recipe: attention everywhere, the experts of layers 7, 15 and 23 (of 24)
    ("q_proj", "k_proj", "v_proj", "o_proj", "7.mlp.experts.gate_up_proj", "7.mlp.experts.down_proj",
     "15.mlp.experts.gate_up_proj", "15.mlp.experts.down_proj", "23.mlp.experts.gate_up_proj", "23.mlp.experts.down_proj"),
])
def test_lora_on_the_experts_counts_equal_peft(targets):
    """peft's ParamWrapper per targeted experts parameter: lora_A (E r, in) and lora_B (out, E r); '7.mlp...' matches
    layer 7 only (peft's ``key.endswith('.' + target)``), not 17."""
    spec = load_spec("gpt-oss-20b")
    settings = MethodSettings("lora", rank=8, targets=targets)
    plan = make_plan(spec, settings)
    assert (plan.total, plan.trainable) == count_params(build_model(spec, settings))
    if "7.mlp.experts.gate_up_proj" in targets:  # 3 layers x 32 experts x 8 x ((2880 + 5760) + (2880 + 2880)), + attention
        attention = 24 * 8 * ((2880 + 4096) + 2 * (2880 + 512) + (4096 + 2880))
        assert plan.trainable == 3 * 32 * 8 * (8640 + 5760) + attention


def test_mxfp4_checkpoint_against_bf16():
    """gpt-oss-20b's experts, 24 x 32 x (5,760 x 2,880 + 2,880 x 2,880) values, take 17/32 byte each in MXFP4 (half a
    byte, and one scale byte per 32 values); the other 1,804,459,584 parameters 2 bytes: 13,761,264,768 bytes of data
    (Hugging Face lists the repo's safetensors at 13.8 GB), against 41,829,514,368 in bf16; the headers add the rest."""
    s = estimate("gpt-oss-20b", method="lora", seq_len=128, device="cpu").storage
    experts = 24 * 32 * (5760 * 2880 + 2880 * 2880)
    data = experts * 17 // 32 + (20_914_757_184 - experts) * 2
    assert data == 13_761_264_768
    assert 0 < s.mxfp4_checkpoint_bytes - data < 200_000
    assert 0 < s.bf16_checkpoint_bytes - 2 * 20_914_757_184 < 100_000
    assert estimate(TINY, method="lora", seq_len=32, device="cpu").storage.mxfp4_checkpoint_bytes == 0  # no mxfp4 config


@pytest.mark.parametrize("method, training", [
    (MethodSettings("frozen"), dict(precision="bf16", seq_len=256)),  # peak in a frozen block's forward
    (MethodSettings("lora"), dict(precision="bf16", seq_len=256, grad_checkpointing=True)),  # in a block's backward
    (MethodSettings("lora", targets=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")), dict(precision="bf16")),
])
def test_tiny_gpt_oss_fake_trace_equals_prediction(method, training):
    row = measure_one(TINY, method, TrainingSettings(**{"batch_size": 2, "seq_len": 64, **training}), "fake", 2)
    assert row["outcome"] == "ok", row["error"]
    assert row["measured"]["peak_bytes"] == row["predicted"]["peak_bytes"]


def test_batched_mm_predicts_the_gathered_expert_weights():
    """batched_mm gathers each (token, expert) pair's expert weights: on tiny gpt-oss (2 x 64 tokens, top-2: S = 256
    pairs) the gate_up copies are 256 x 64 x 64 values and the down copies 256 x 32 x 64, saved for the input's
    gradient in every layer; grouped_mm keeps none. The fake trace of full bf16 with checkpointing equals the
    prediction, and the prediction exceeds grouped_mm's by more than one layer's copies (2 bytes each)."""
    training = TrainingSettings(batch_size=2, seq_len=64, precision="bf16", optimizer="sgd", grad_checkpointing=True,
                                experts="batched_mm")
    row = measure_one(TINY, MethodSettings("full"), training, "fake", 2)
    assert row["outcome"] == "ok", row["error"]
    assert row["measured"]["peak_bytes"] == row["predicted"]["peak_bytes"]
    grouped = estimate(TINY, method="full", batch_size=2, seq_len=64, precision="bf16", optimizer="sgd",
                       grad_checkpointing=True, device="cpu").memory.peak_bytes
    assert row["predicted"]["peak_bytes"] - grouped > 256 * (64 * 64 + 32 * 64) * 2


def test_eager_experts_loop_with_lora_on_the_experts_is_refused_in_one_line():
    from peftcalc.errors import CombinationError

    with pytest.raises(CombinationError, match="eager experts loop with LoRA on the experts"):
        estimate(TINY, method="lora", seq_len=32, device="cpu", experts="eager",
                 targets="mlp.experts.gate_up_proj,mlp.experts.down_proj")
    with pytest.raises(CombinationError, match="eager experts loop with autocast"):
        estimate(TINY, method="lora", seq_len=32, device="cpu", experts="eager", precision="amp-bf16")
