"""measure_one on tiny models: real CPU and fake tensors agree, rows are complete, bad input is
a one-line InputError, and the numbers that can be counted by hand are right."""

import json

import pytest
import torch

from measure.build import count_logical_params
from measure.record import summarize
from measure.run import measure_one
from peftcalc.errors import InputError
from peftcalc.methods import make_plan
from peftcalc.settings import TrainingSettings

PAIRS = [
    ("tiny-llama-gqa", dict(method="lora"), dict()),
    ("tiny-gpt2", dict(method="full"), dict(precision="amp-bf16", grad_checkpointing=True)),
    ("tiny-llama-gqa", dict(method="qlora"), dict(precision="bf16")),
    ("tiny-bert", dict(method="lora", targets="all-linear"), dict(precision="bf16", attention="eager")),
    ("tiny-vit-cls", dict(method="full"), dict(optimizer="adafactor")),
    ("tiny-qwen2", dict(method="prompt"), dict(optimizer="adamw-8bit")),
]


def _measure(tiny, model, method, training, device, steps=2):
    run = tiny(model, **method)
    t = TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", **training})
    return measure_one(run.spec, run.method, t, device=device, steps=steps)


@pytest.mark.parametrize("model,method,training", PAIRS, ids=[f"{p[0]}-{p[1]['method']}" for p in PAIRS])
def test_cpu_and_fake_peaks_agree_within_one_percent(tiny, model, method, training):
    cpu = _measure(tiny, model, method, training, "cpu")
    fake = _measure(tiny, model, method, training, "fake")
    assert cpu["outcome"] == fake["outcome"] == "ok", (cpu["error"], fake["error"])
    for key in ("peak_bytes", "step1_peak_bytes", "model_bytes"):
        assert fake["measured"][key] == pytest.approx(cpu["measured"][key], rel=0.01), key
    assert cpu["params"] == fake["params"]


def test_cpu_and_fake_fail_alike_where_the_real_stack_fails(tiny):
    """transformers 5 quantizes BERT's biased classifier (get_keys_to_not_convert drops only a
    '.weight' suffix from the last parameter name, 'classifier.bias'), and peft's modules_to_save
    then cannot make the uint8 copy trainable. The fake build must take the same path."""
    cpu = _measure(tiny, "tiny-bert-cls", dict(method="qlora"), dict(), "cpu")
    fake = _measure(tiny, "tiny-bert-cls", dict(method="qlora"), dict(), "fake")
    assert cpu["outcome"] == fake["outcome"]
    if cpu["outcome"] == "ok":
        assert fake["measured"]["peak_bytes"] == pytest.approx(cpu["measured"]["peak_bytes"], rel=0.01)
        assert cpu["params"] == fake["params"]
    else:
        assert cpu["error"] == fake["error"]


def test_row_is_complete_and_json(tiny):
    row = _measure(tiny, "tiny-llama", dict(method="lora"), dict(), "cpu", steps=3)
    json.loads(json.dumps(row))
    run = tiny("tiny-llama", method="lora")
    plan = make_plan(run.spec, run.method)
    assert row["params"] == {"total": plan.total, "trainable": plan.trainable}
    m = row["measured"]
    assert [s["step"] for s in m["steps"]] == [1, 2, 3]
    assert set(m["steps"][0]["phases"]) == {"forward", "backward", "optimizer"}
    assert m["peak_bytes"] == m["steps"][-1]["peak_bytes"] and m["step1_peak_bytes"] == m["steps"][0]["peak_bytes"]
    assert sum(m["categories_at_peak"].values()) == m["peak_bytes"]
    assert m["top_tensors"][0]["bytes"] >= m["top_tensors"][-1]["bytes"] > 0
    assert row["settings"]["device"] == "cpu" and row["settings"]["training"]["device"] == "cpu"
    assert row["environment"]["torch"] == torch.__version__
    text = summarize(row)
    assert text.startswith("tiny-llama lora on cpu: batch 2, seq 32, fp32") and "peak " in text and "KiB" in text
    assert summarize({**row, "outcome": "oom", "error": "OutOfMemoryError: x"}).endswith("oom: OutOfMemoryError: x")
    # the saved adapter holds the fp32 LoRA weights (and a small safetensors header)
    assert 4 * plan.trainable <= row["saved"]["bytes"] < 4 * plan.trainable + 16_384
    if row["predicted"] is not None:
        assert row["predicted"]["peak_bytes"] > 0 and row["predicted"]["components"]
    else:
        assert row["predicted_error"]


def test_full_finetune_optimizer_state_by_hand(tiny):
    """AdamW (CPU single-tensor path) keeps exp_avg and exp_avg_sq in fp32 and a 4-byte step per
    parameter tensor; all of it is live at the steady-state peak, as are the fp32 weights."""
    row = _measure(tiny, "tiny-llama", dict(method="full"), dict(), "fake")
    run = tiny("tiny-llama", method="full")
    plan = make_plan(run.spec, run.method)
    n_tensors = sum(1 for g in plan.groups if g.trainable)
    at_peak = row["measured"]["categories_at_peak"]
    assert at_peak["optimizer_state"] == 2 * 4 * plan.trainable + 4 * n_tensors
    rotary = 2 * 4 * run.spec.head_dim // 2  # LlamaRotaryEmbedding inv_freq and original_inv_freq, fp32
    assert at_peak["parameters"] == 4 * plan.total + rotary
    assert row["measured"]["step1_categories_at_peak"]["optimizer_state"] <= at_peak["optimizer_state"]
    assert at_peak["inputs"] == 2 * 32 * 8  # int64 input ids; labels are the same tensor


def test_checkpointing_lowers_the_activation_peak(tiny):
    plain = _measure(tiny, "tiny-llama", dict(method="lora"), dict(), "fake")
    ckpt = _measure(tiny, "tiny-llama", dict(method="lora"), dict(grad_checkpointing=True), "fake")
    assert ckpt["measured"]["categories_at_peak"]["activations"] < plain["measured"]["categories_at_peak"]["activations"]


def test_qlora_row_counts_logical_parameters_and_packs_weights(tiny):
    row = _measure(tiny, "tiny-llama", dict(method="qlora"), dict(precision="bf16"), "fake")
    run = tiny("tiny-llama", method="qlora")
    plan = make_plan(run.spec, run.method)
    assert row["params"] == {"total": plan.total, "trainable": plan.trainable}
    nf4 = plan.numel_by(quantized=True)
    bf16 = plan.numel_by(quantized=False, trainable=False)
    # packed 4-bit weights (n/2 bytes) plus their quantization state sit between n/2 and n bytes
    weights = row["measured"]["model_bytes"] - 4 * plan.trainable - 2 * bf16
    assert nf4 // 2 < weights < nf4


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(steps=0), "--steps must be a positive integer"),
    (dict(training=TrainingSettings(seq_len=200)), "exceeds tiny-gpt2's 128 positions"),
    (dict(training=TrainingSettings(precision="fp8")), "unknown precision 'fp8'"),
])
def test_bad_input_is_an_input_error(tiny, kwargs, message):
    run = tiny("tiny-gpt2", method="lora")
    args = dict(device="fake", steps=1, training=TrainingSettings(seq_len=16, precision="fp32"))
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        measure_one(run.spec, run.method, args["training"], device=args["device"], steps=args["steps"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_an_input_error(tiny):
    run = tiny("tiny-gpt2", method="lora")
    with pytest.raises(InputError, match="no CUDA device"):
        measure_one(run.spec, run.method, TrainingSettings(seq_len=16), device="cuda")


@pytest.mark.gpu
def test_cuda_run_records_allocator_peaks_and_a_traced_breakdown(tiny):
    row = _measure(tiny, "tiny-llama-gqa", dict(method="lora"), dict(precision="bf16"), "cuda", steps=3)
    assert row["outcome"] == "ok", row["error"]
    m = row["measured"]
    assert m["source"] == "cuda_allocator"
    assert m["reserved_peak_bytes"] >= m["peak_bytes"] > m["load_bytes"] > 0
    # the allocator rounds blocks up and adds workspaces; the traced step never sees more than it
    assert m["tracer"]["peak_bytes"] <= m["peak_bytes"] * 1.01
    assert row["environment"]["device_name"]
    assert count_logical_params  # imported for the cpu tests; keeps the import used on GPU-only runs
