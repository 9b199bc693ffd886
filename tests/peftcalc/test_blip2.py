"""BLIP-2 OPT-2.7B (Salesforce/blip2-opt-2.7b): the layout mirrors Blip2ForConditionalGeneration's
named_parameters() exactly (names, order, sizes; built on the meta device with transformers), the qformer
method's counts equal the real model's requires_grad mask, the measurement harness runs a real training step of
a tiny BLIP-2, and the memory model refuses blip-2."""

from pathlib import Path

import pytest

import peftcalc
from measure.build import build_base_model, build_model, count_params
from peftcalc.errors import InputError
from peftcalc.layout import build_layout, param_names
from peftcalc.methods import METHODS, MethodSettings, make_plan, methods_for
from peftcalc.spec import load_spec, registry_configs, spec_from_config

MODEL = "blip2-opt-2.7b"
TOTAL = 3_744_761_856
# 12 Q-Former layers (self-attention, the query FFN; cross-attention to the 1408-wide tower in the 6 even
# layers) + its LayerNorm, 32 x 768 query tokens, the 768 -> 2560 language projection
QFORMER_TRAINABLE = 107_130_880


@pytest.fixture(scope="module")
def real():
    return build_base_model(load_spec(MODEL))


def test_layout_is_named_parameters_exactly(real):
    ours = [(n, k) for m in build_layout(load_spec(MODEL)).modules for n, k in param_names(m)]
    assert ours == [(n, p.numel()) for n, p in real.named_parameters()]
    assert type(real).__name__ == "Blip2ForConditionalGeneration"
    assert sum(k for _, k in ours) == TOTAL


def test_qformer_counts_equal_the_real_model():
    spec = load_spec("Salesforce/blip2-opt-2.7b")
    plan = make_plan(spec, MethodSettings("qformer"))
    assert (plan.total, plan.trainable) == count_params(build_model(spec, MethodSettings("qformer"))) \
        == (TOTAL, QFORMER_TRAINABLE)
    by_part = {}
    for g in plan.groups:
        if g.trainable:
            key = g.name.split(".")[0]
            by_part[key] = by_part.get(key, 0) + g.numel
    q, hv, iq = 768, 1408, 3072
    attn = lambda kv: 2 * (q * q + q) + 2 * (q * kv + q) + 2 * q  # query, output.dense; key, value; LayerNorm
    ffn = (iq * q + iq) + (q * iq + q) + 2 * q
    assert by_part == {"query_tokens": 32 * q, "language_projection": 2560 * q + 2560,
                       "qformer": 2 * q + 12 * (attn(q) + ffn) + 6 * attn(hv)}


def test_only_qformer_applies():
    spec = load_spec(MODEL)
    assert methods_for(spec) == ("qformer",)
    for method in METHODS + ("projector", "projector-llm"):
        with pytest.raises(InputError, match="BLIP-2"):
            make_plan(spec, MethodSettings(method))
    with pytest.raises(InputError, match="Q-Former"):
        make_plan(load_spec("llama-2-7b"), MethodSettings("qformer"))


def test_memory_is_refused_not_guessed():
    with pytest.raises(InputError, match="not modelled for blip-2"):
        peftcalc.estimate(MODEL, method="qformer")
    with pytest.raises(InputError, match="not modelled for blip-2"):
        peftcalc.sweep(MODEL, method="qformer", batch_size=[1, 2])


@pytest.mark.parametrize("change, match", [
    ({"qformer_config": {"model_type": "blip_2_qformer", "use_qformer_text_input": True}}, "text input"),
    ({"use_decoder_only_language_model": False}, "encoder-decoder"),
    ({"text_config": {"model_type": "opt", "hidden_size": 2560, "word_embed_proj_dim": 768}}, "word_embed_proj_dim"),
    ({"vision_config": {"model_type": "clip_vision_model"}}, "blip_2_vision_model"),
])
def test_configs_the_layout_cannot_mirror_are_refused(change, match):
    config = {**registry_configs()[MODEL], **change}
    with pytest.raises(InputError, match=match):
        spec_from_config(config)


def test_sizes_come_from_the_config():
    config = registry_configs()[MODEL]
    small = {**config, "num_query_tokens": 8,
             "qformer_config": {**config["qformer_config"], "num_hidden_layers": 2, "cross_attention_frequency": 1}}
    spec = spec_from_config(small)
    assert spec != load_spec(MODEL) and build_layout(spec) is not build_layout(load_spec(MODEL))
    plan = make_plan(spec, MethodSettings("qformer"))
    assert (plan.total, plan.trainable) == count_params(build_model(spec, MethodSettings("qformer")))
    assert plan.trainable == 8 * 768 + 2560 * 768 + 2560 + 2 * 768 + 2 * (
        2 * (2 * (768 * 768 + 768) + 2 * 768) + 2 * (768 * 1408 + 768) + 2 * (768 * 768 + 768)
        + (3072 * 768 + 3072) + (768 * 3072 + 768) + 2 * 768)


TINY = str(Path(__file__).parent / "configs" / "blip2_tiny.json")


@pytest.mark.parametrize("precision, nbytes", [("fp32", 4), ("bf16", 2)])
def test_harness_runs_a_tiny_blip2_step(precision, nbytes):
    """A real CPU training step of a tiny Blip2ForConditionalGeneration (2 EVA layers of 64 at 56 px, 2 Q-Former
    layers of 32 with 8 queries, 2 OPT layers of 64), --method qformer: measure.run.make_batch gives it pixel
    values and the 8 image_token_index placeholders before the text, the step runs and is traced; the traced
    parameter bytes are the layout's total, and the calculator refuses the prediction instead of guessing."""
    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings

    spec = load_spec(TINY)
    plan = make_plan(spec, MethodSettings("qformer"))
    t = TrainingSettings(batch_size=2, seq_len=16, precision=precision, device="cpu")
    row = measure_one(TINY, MethodSettings("qformer"), t, device="cpu", steps=2)
    assert row["outcome"] == "ok", row["error"]
    measured = row["measured"]
    assert measured["model_bytes"] == plan.total * nbytes
    assert measured["categories_at_peak"]["parameters"] == plan.total * nbytes
    # AdamW's two moments in the parameters' dtype plus a 4-byte step per trainable tensor (CPU)
    tensors = sum(1 for g in plan.groups if g.trainable)
    assert measured["categories_at_peak"]["optimizer_state"] == 2 * plan.trainable * nbytes + 4 * tensors
    assert measured["categories_at_peak"]["activations"] > 0
    assert row["predicted"] is None and "not modelled for blip-2" in row["predicted_error"]


def test_harness_traces_the_real_blip2_on_fake_tensors():
    """The real blip2-opt-2.7b (3.74B parameters) built on fake tensors, one bf16 qformer step of 1 x (32 query +
    64 text) tokens: the step runs; the traced parameters are the layout's total and the optimizer state is
    AdamW's two bf16 moments of the 107,130,880 trainable parameters plus a step per trainable tensor (257)."""
    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings

    t = TrainingSettings(batch_size=1, seq_len=64, precision="bf16", device="cpu")
    row = measure_one(MODEL, MethodSettings("qformer"), t, device="fake", steps=2, predicted=False)
    assert row["outcome"] == "ok", row["error"]
    at_peak = row["measured"]["categories_at_peak"]
    assert at_peak["parameters"] == 2 * TOTAL
    tensors = sum(1 for g in make_plan(load_spec(MODEL), MethodSettings("qformer")).groups if g.trainable)
    assert tensors == 257 and at_peak["optimizer_state"] == 2 * 2 * QFORMER_TRAINABLE + 4 * tensors
