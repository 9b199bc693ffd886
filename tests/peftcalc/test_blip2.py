"""BLIP-2 OPT-2.7B (Salesforce/blip2-opt-2.7b): the layout mirrors Blip2ForConditionalGeneration's
named_parameters() exactly (names, order, sizes; built on the meta device with transformers), the qformer
method's counts equal the real model's requires_grad mask, the measurement harness runs a real training step of
a tiny BLIP-2, and the memory model's peak equals the traced peaks of the real model (fake tensors) and of tiny
BLIP-2s (real CPU steps)."""

from pathlib import Path

import pytest

import peftcalc
from measure.build import build_base_model, build_model, count_params
from peftcalc.errors import InputError
from peftcalc.families import build_layout
from peftcalc.layout import param_names
from peftcalc.methods import METHODS, MethodSettings, make_plan, methods_for
from peftcalc.config import load_spec, registry_configs, spec_from_config

MODEL = "blip2-opt-2.7b"
TOTAL = 3_744_761_856
# 12 Q-Former layers (self-attention, the query FFN; cross-attention to the 1408-wide tower in the 6 even
# layers) + its LayerNorm, 32 x 768 query tokens, the 768 -> 2560 language projection
QFORMER_TRAINABLE = 107_130_880
# what from_pretrained keeps in fp32 under fp16 (Blip2ForConditionalGeneration._keep_in_fp32_modules =
# ["query_tokens", "qformer"]): all of it but the projection's 2560 x 768 + 2560
KEPT_FP32 = QFORMER_TRAINABLE - (2560 * 768 + 2560)


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


# Traced peaks of the real blip2-opt-2.7b, one qformer step on fake tensors (the steady-state step of 2), each
# measured by
#   peftcalc measure blip2-opt-2.7b --device fake --steps 2 --precision P --batch-size B --seq-len S \
#       [--grad-checkpointing] --format json      (measured.peak_bytes)
# (the same rows are in reports/data/ci.jsonl, from measure/matrices/ci.toml). Before measure.fake.real_input_semantics read
# Blip2ForConditionalGeneration's all-ones attention mask as real inputs do, the fake trace also kept a
# (b, 1, s, s) float mask in every OPT layer (9,373,711,916 and 31,208,666,636 bytes at bf16 1 and 16 x 512).
# fp16: the harness builds the Q-Former and query tokens in fp32 as from_pretrained loads them
# (measure.build.keep_in_fp32); before it did, the fp16 traces were the bf16 ones (the calculator then
# predicted them; with the fp32 Q-Former counted it is 6.4% higher at 1 x 512).
REAL_TRACES = [
    # precision, batch, seq, checkpointing, traced peak bytes, phase of the peak
    ("bf16", 1, 512, False, 9_354_772_012, "backward:loss"),
    ("bf16", 16, 512, False, 30_905_628_172, "backward:loss"),
    ("bf16", 1, 512, True, 8_340_071_468, "backward:loss"),
    ("bf16", 16, 512, True, 14_670_419_468, "backward:loss"),
    ("fp16", 1, 512, False, 9_996_549_292, "backward:loss"),
    ("fp16", 16, 512, False, 31_709_463_052, "backward:loss"),
    ("fp16", 1, 512, True, 8_992_800_004, "optimizer"),  # the fp32 gradients outweigh the checkpointed activations
    ("fp16", 16, 512, True, 15_323_197_964, "backward:loss"),
    ("fp32", 2, 256, False, 18_546_854_988, "backward:loss"),
    ("amp-bf16", 2, 256, False, 23_081_445_452, "backward:loss"),
]


@pytest.mark.parametrize("precision, batch, seq, checkpointing, traced, phase", REAL_TRACES)
def test_real_blip2_peak_equals_fake_trace(precision, batch, seq, checkpointing, traced, phase):
    """The predicted peak (device cpu: what the storage tracer counts) is within 0.01% of the trace and in the
    same phase (since torch's CPU LayerNorm is counted with bf16 mean and rstd for bf16 inputs and weights, as
    it returns them, the bf16 rows are within 2,048 bytes; they were 2,326,520 over at 16 x 512; under fp16
    the Q-Former's LayerNorms are fp32, as from_pretrained keeps them)."""
    e = peftcalc.estimate(MODEL, method="qformer", batch_size=batch, seq_len=seq, precision=precision,
                          grad_checkpointing=checkpointing, device="cpu",
                          optimizer="adamw")  # the traces ran torch.optim.AdamW (foreach; single-tensor on cpu)
    assert e.memory.peak_bytes == pytest.approx(traced, rel=1e-4)
    assert e.memory.peak_phase == phase


@pytest.mark.parametrize("precision, kept", [("fp16", KEPT_FP32), ("bf16", 0), ("amp-fp16", 0)])
def test_fp16_keeps_the_qformer_fp32_by_hand(precision, kept):
    """Model states of the qformer method: under fp16 the 105,162,240 Q-Former and query-token parameters are
    fp32 (4 bytes, their gradients and both AdamW moments too), the projection and the frozen rest fp16; under
    bf16 nothing is kept (only _keep_in_fp32_modules_strict applies to bf16, and BLIP-2 has none); under
    amp-fp16 every weight is fp32 already."""
    from peftcalc.model_states import model_states
    from peftcalc.settings import TrainingSettings

    assert KEPT_FP32 == 105_162_240
    t = TrainingSettings(precision=precision, device="cpu")
    ms = model_states(make_plan(load_spec(MODEL), MethodSettings("qformer")), t)
    b = 4 if precision.startswith("amp") else 2
    assert ms.weights_trainable == ms.gradients == (QFORMER_TRAINABLE - kept) * b + kept * 4
    assert ms.weights_frozen == (TOTAL - QFORMER_TRAINABLE) * b
    assert ms.optimizer_states == 2 * ms.weights_trainable + 4 * 257  # + a 4-byte step per tensor on the CPU


def test_opt_block_saves_by_hand():
    """One frozen OPT-2.7B block at bf16, 1 x (32 queries + 512 text) tokens, h 2560, ffn 10240, 32 heads, on CPU
    (SDPA's flash kernel, dropout 0.1 saving a bf16 noise tensor): its input and the residual after attention
    (both saved by LayerNorms, with mean and rstd each: bf16, as torch's CPU native_layer_norm returns them for
    bf16 input and weights), q (the q_proj output times the scaling), k, v and
    the attention output (2,785,280 bytes each: 544 x 2560 x 2), the logsumexp (32 x 544 fp32), two dropout
    noises, and ReLU's output (544 x 10240 x 2). The frozen Linears save nothing: their weights are parameters."""
    from peftcalc.activations import activation_profile
    from peftcalc.settings import TrainingSettings

    t = TrainingSettings(batch_size=1, seq_len=512, precision="bf16", device="cpu")
    act = activation_profile(make_plan(load_spec(MODEL), MethodSettings("qformer")), t)
    tok, h = 544, 2560
    block = 2 * tok * h * 2 + 2 * (2 * tok * 2) + 4 * tok * h * 2 + 32 * tok * 4 + 2 * tok * h * 2 + tok * 10240 * 2
    assert act.per_layer == (block,) * 32 and block == 33_497_344


def test_flops_by_hand():
    """Forward FLOPs of one 1 x 512 step: 2 per multiply-accumulate of every Linear - EVA's 39 layers (qkv
    1408 -> 4224, projection, fc1/fc2 1408 <-> 6144) on 257 tokens, the Q-Former's 12 layers (self-attention and
    the query FFN on the 32 queries; the 6 cross-attentions' queries and outputs on 32, keys and values 1408 -> 768
    on the 257 image tokens), the projection 768 -> 2560 on 32, OPT's 32 blocks (4 x 2560^2 + 2 x 2560 x 10240)
    and the tied lm_head (2560 x 50304) on 544 - plus 4 x s_q x s_k x d of attention per layer. Backward: the
    Q-Former's weight and input gradients (none for the cross-attention keys' and values' input, the frozen
    tower's output), the projection's both, and the input gradients of every OPT matmul and attention."""
    from peftcalc.hardware import step_flops
    from peftcalc.settings import TrainingSettings

    plan = make_plan(load_spec(MODEL), MethodSettings("qformer"))
    f = step_flops(plan, TrainingSettings(batch_size=1, seq_len=512), 544)
    hv, iv, hq, iq, h, ffn, vocab = 1408, 6144, 768, 3072, 2560, 10240, 50304
    vision = 39 * (hv * 3 * hv + hv * hv + 2 * hv * iv) * 257
    q_own = (12 * (4 * hq * hq + 2 * hq * iq) + 6 * 2 * hq * hq) * 32  # self-attention, FFN; cross q, output
    q_cross_kv = 6 * 2 * hv * hq * 257
    projection = hq * h * 32
    text = (32 * (4 * h * h + 2 * h * ffn) + h * vocab) * 544
    attention = 4 * (257 * 257 * hv * 39 + 32 * 32 * hq * 12 + 32 * 257 * hq * 6 + 544 * 544 * h * 32)
    assert f.forward == 2 * (vision + q_own + q_cross_kv + projection + text) + attention
    backward_attention = 2 * 4 * (32 * 32 * hq * 12 + 32 * 257 * hq * 6 + 544 * 544 * h * 32)
    assert f.backward == 2 * (2 * q_own + q_cross_kv + 2 * projection + text) + backward_attention
    assert f.recompute == 0


def test_estimate_and_compare_answer_on_the_command_line():
    """`peftcalc estimate blip2-opt-2.7b` (qformer: the one method BLIP-2 takes) and `peftcalc compare`."""
    from typer.testing import CliRunner

    from peftcalc.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["estimate", MODEL])
    assert result.exit_code == 0, result.output
    assert "blip2-opt-2.7b (Blip2ForConditionalGeneration) - qformer" in result.output
    assert "512 text + 32 image tokens = 544 per sample" in result.output
    assert "trainable 107,130,880" in result.output and "peak phase" in result.output
    result = runner.invoke(app, ["compare", MODEL, "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert result.output.count("qformer") == 1
    sweep = peftcalc.sweep(MODEL, batch_size=[1, 2])
    assert list(sweep["method"]) == ["qformer", "qformer"] and sweep["peak_bytes"].is_monotonic_increasing


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
    layers of 32 with 8 queries, 2 OPT layers of 64), --method qformer: measure.setup.make_batch gives it pixel
    values and the 8 image_token_index placeholders before the text, the step runs and is traced; the traced
    parameter bytes are the layout's total, and the predicted peak is the traced one, to the byte (fp32: the last
    8 bytes were the loss and the backward's ones_like(loss) gradient scalars; bf16, ci.jsonl row b755c265ccc76500: 1,344,564 traced, it
    was 1,336 bytes more before torch's CPU LayerNorm was counted with bf16 mean and rstd, as it returns them,
    then 64 more until the Q-Former layernorm's were too)."""
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
    assert measured["peak_phase"] == "backward" and row["predicted"]["peak_phase"] == "backward:loss"
    assert measured["peak_bytes"] == row["predicted"]["peak_bytes"]


@pytest.mark.parametrize("precision, checkpointing", [
    ("fp32", True), ("amp-bf16", False), ("amp-bf16", True), ("bf16", True),
])
def test_tiny_blip2_peak_matches_cpu_trace(precision, checkpointing):
    """Real CPU steps of the tiny BLIP-2 at 4 x (8 queries + 64 text) tokens, traced: checkpointing (OPT blocks
    and Q-Former layers keep their inputs, the Q-Former every layer's reference to the image features) and
    autocast (cast copies of the Q-Former's inputs, of every frozen OPT weight, of the image features for each
    cross-attention key and value) are predicted within 0.05%."""
    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings

    t = TrainingSettings(batch_size=4, seq_len=64, precision=precision, grad_checkpointing=checkpointing, device="cpu")
    row = measure_one(TINY, MethodSettings("qformer"), t, device="cpu", steps=2)
    assert row["outcome"] == "ok", row["error"]
    assert row["predicted"]["peak_bytes"] == pytest.approx(row["measured"]["peak_bytes"], rel=5e-4)


def test_fake_trace_of_a_tiny_blip2_equals_its_cpu_trace():
    """The same step on fake tensors and on real CPU tensors: the same peak, byte for byte (the fake trace reads
    the all-ones attention masks as the real one does, measure.fake.real_input_semantics)."""
    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings

    t = TrainingSettings(batch_size=2, seq_len=16, precision="fp32", device="cpu")
    cpu = measure_one(TINY, MethodSettings("qformer"), t, device="cpu", steps=2, predicted=False)
    fake = measure_one(TINY, MethodSettings("qformer"), t, device="fake", steps=2, predicted=False)
    assert cpu["measured"]["peak_bytes"] == fake["measured"]["peak_bytes"] == 2_343_668


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_frozen_tower_forward_peak_matches_cpu_trace(precision):
    """A tiny BLIP-2 whose EVA tower (112 px: 65 tokens, MLP 64 -> 2048) outweighs everything after it at 4 x 4
    text tokens: the peak is the frozen tower's forward (the embeddings output, a layer's input, its residual
    after attention, layer_norm2's output, fc1's and GELU's outputs), predicted exactly (traced on CPU). Nothing
    is saved yet when the tower runs (the Q-Former comes after it): the tracer's activations there are 0, and so
    are the calculator's (it had the Q-Former's saved bytes there); the rest is other on both sides."""
    import json

    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings

    config = json.loads(Path(TINY).read_text())
    config["vision_config"].update(intermediate_size=2048, image_size=112)
    t = TrainingSettings(batch_size=4, seq_len=4, precision=precision, device="cpu")
    row = measure_one(config, MethodSettings("qformer"), t, device="cpu", steps=2)
    assert row["outcome"] == "ok", row["error"]
    assert row["measured"]["peak_phase"] == "forward" and row["predicted"]["peak_phase"] == "forward:block"
    assert row["predicted"]["peak_bytes"] == row["measured"]["peak_bytes"]
    at_peak, parts = row["measured"]["categories_at_peak"], row["predicted"]["components"]
    assert at_peak["activations"] == parts["activations"] == 0
    assert at_peak["other"] == parts["logits_loss"] + parts["temporaries"]


@pytest.mark.parametrize("precision, kept", [("bf16", 0), ("fp16", KEPT_FP32)])
def test_harness_traces_the_real_blip2_on_fake_tensors(precision, kept):
    """The real blip2-opt-2.7b (3.74B parameters) built on fake tensors, one qformer step of 1 x (32 query +
    64 text) tokens: the step runs; the traced parameters are the layout's total and the optimizer state is
    AdamW's two moments of the 107,130,880 trainable parameters plus a step per trainable tensor (257), 2 bytes
    each, except under fp16 the 105,162,240 of the Q-Former and query tokens, fp32 as from_pretrained loads them
    (2 more bytes per parameter and moment)."""
    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings

    t = TrainingSettings(batch_size=1, seq_len=64, precision=precision, device="cpu")
    row = measure_one(MODEL, MethodSettings("qformer"), t, device="fake", steps=2, predicted=False)
    assert row["outcome"] == "ok", row["error"]
    at_peak = row["measured"]["categories_at_peak"]
    assert at_peak["parameters"] == 2 * TOTAL + 2 * kept
    tensors = sum(1 for g in make_plan(load_spec(MODEL), MethodSettings("qformer")).groups if g.trainable)
    assert tensors == 257 and at_peak["optimizer_state"] == 2 * (2 * QFORMER_TRAINABLE + 2 * kept) + 4 * tensors


def test_tiny_blip2_fp16_step_keeps_the_qformer_fp32():
    """A real CPU fp16 step of the tiny BLIP-2 at 2 x (8 queries + 16 text) tokens: the Q-Former (31,808) and the
    8 x 32 query tokens are fp32, as from_pretrained(dtype=torch.float16) loads them; the traced parameter and
    AdamW state bytes say so, and the predicted peak is the traced one, 1,577,524 bytes, to the byte (it was 960
    over, 5 x 48 tokens x 2 x 2 bytes, before the calculator counted the mean and rstd of OPT's 5 LayerNorms in
    fp16 as torch's CPU kernel returns them; the Q-Former's LayerNorms are fp32).
    The trainable tensors the harness saves are the size peftcalc.storage gives them."""
    from measure.run import measure_one
    from peftcalc.settings import TrainingSettings
    from peftcalc.storage import adapter_tensors, safetensors_size

    spec = load_spec(TINY)
    plan = make_plan(spec, MethodSettings("qformer"))
    kept = 31_808 + 8 * 32
    t = TrainingSettings(batch_size=2, seq_len=16, precision="fp16", device="cpu")
    row = measure_one(TINY, MethodSettings("qformer"), t, device="cpu", steps=2)
    assert row["outcome"] == "ok", row["error"]
    at_peak = row["measured"]["categories_at_peak"]
    assert at_peak["parameters"] == 2 * plan.total + 2 * kept
    tensors = sum(1 for g in plan.groups if g.trainable)
    assert at_peak["optimizer_state"] == 2 * (2 * plan.trainable + 2 * kept) + 4 * tensors
    assert row["measured"]["peak_bytes"] == 1_577_524
    assert row["predicted"]["peak_bytes"] == row["measured"]["peak_bytes"]
    # the saved trainable tensors (safetensors save_file, no metadata): the kept ones as F32, 137,824 bytes
    assert safetensors_size(adapter_tensors(plan, "float16")) == row["saved"]["bytes"] == 137_824
