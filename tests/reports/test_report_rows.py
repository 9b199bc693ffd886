"""Rows -> report rows: the prediction is the current calculator's, the error is (pred - meas) / meas."""

import json
import math
from pathlib import Path

import pytest

import peftcalc
from peftcalc.config import load_spec, spec_from_config
from reports.rows import config_index, config_sha, flatten, load_rows, resolve_spec, signed_error

from rowkit import make_row, write_jsonl

CONFIGS = Path(__file__).parents[1] / "peftcalc" / "configs"


def test_signed_error_by_hand():
    assert signed_error(110, 100) == pytest.approx(0.10)
    assert signed_error(75, 100) == pytest.approx(-0.25)
    assert math.isnan(signed_error(None, 100))
    assert math.isnan(signed_error(5, 0))


def test_config_sha_is_the_harness_hash():
    from measure.record import config_sha as harness_sha

    for spec in (load_spec("llama-2-7b"), load_spec(str(CONFIGS / "gpt2_cls.json"))):
        assert config_sha(spec.hf_config) == harness_sha(spec)


def test_fake_row_error_uses_the_current_calculator():
    row = make_row("gpt2", "fake", measured=900_000_000, predicted=1, batch_size=2, seq_len=256)
    r = flatten("f.jsonl", row, config_index())
    e = peftcalc.estimate("gpt2", method="lora", batch_size=2, seq_len=256, precision="amp-bf16", device="cpu")
    assert r["source"] == "fake" and r["family"] == "gpt2"
    assert r["predicted_from"] == "current"
    assert r["predicted_peak_bytes"] == e.memory.peak_bytes
    assert r["error"] == pytest.approx((e.memory.peak_bytes - 900_000_000) / 900_000_000)
    assert r["stored_error"] == pytest.approx((1 - 900_000_000) / 900_000_000)
    assert r["predicted_params_trainable"] == e.params.trainable


def test_cuda_row_is_gpu_and_predicted_for_cuda():
    row = make_row("gpt2", "cuda", measured=2_000_000_000, reserved=2_200_000_000, method="full", precision="bf16")
    r = flatten("gpu.jsonl", row, config_index())
    e = peftcalc.estimate("gpt2", method="full", seq_len=128, precision="bf16", device="cuda", optimizer="adamw")
    assert r["source"] == "gpu"
    assert r["predicted_peak_bytes"] == e.memory.peak_bytes
    allocator_reserved = e.memory.reserved_bytes - e.memory.overhead["cuda_context"]
    assert r["predicted_reserved_bytes"] == allocator_reserved
    assert r["reserved_error"] == pytest.approx((allocator_reserved - 2_200_000_000) / 2_200_000_000)


def test_inline_matrix_config_resolves_by_sha_not_by_name():
    """A 2-layer 'gpt2' config must not be predicted as the registry's gpt2."""
    config = json.loads((CONFIGS / "gpt2_cls.json").read_text())
    spec = spec_from_config(config)
    assert spec.name == "gpt2"  # the name the harness records
    row = make_row("gpt2", "cpu", measured=1_000_000, sha=config_sha(config), method="full", precision="fp32",
                   seq_len=16, batch_size=2)
    r = flatten("x.jsonl", row, config_index())
    e = peftcalc.estimate(spec, method="full", seq_len=16, batch_size=2, precision="fp32", device="cpu")
    assert r["predicted_peak_bytes"] == e.memory.peak_bytes
    assert r["predicted_params_total"] == e.params.total < 1_000_000


def test_matrix_models_are_candidates():
    index = config_index()
    assert "tiny-llama" in index.by_name
    sha = config_sha({**index.by_name["tiny-llama"]})
    spec, why = resolve_spec({"model": "tiny-llama", "model_config_sha": sha}, index)
    assert why == "" and spec.num_layers == 2 and spec.name == "tiny-llama"


def test_unknown_config_falls_back_to_the_stored_prediction():
    row = make_row("my-model", "fake", measured=1000, predicted=1100, sha="000000000000")
    r = flatten("x.jsonl", row, config_index())
    assert r["predicted_from"] == "stored"
    assert "sha 000000000000" in r["prediction_note"]
    assert r["error"] == pytest.approx(0.10)


def test_failed_rows_are_not_scored(tmp_path):
    rows = [make_row("gpt2", "fake", measured=10, predicted=11, outcome="oom"),
            make_row("gpt2", "fake", measured=1000, predicted=1200)]
    df = load_rows([write_jsonl(tmp_path / "r.jsonl", rows)], recompute=False)
    assert list(df["outcome"]) == ["oom", "ok"]
    assert math.isnan(df["error"][0]) and df["error"][1] == pytest.approx(0.2)


def test_component_error_is_a_share_of_the_measured_peak():
    cats = {"parameters": 500, "gradients": 100, "optimizer_state": 200, "activations": 150, "inputs": 0,
            "other": 50}
    pred = {"weights_frozen": 400, "weights_trainable": 100, "gradients": 100, "optimizer_states": 200,
            "activations": 100, "logits_loss": 80, "temporaries": 0, "inputs": 0}
    row = make_row("gpt2", "fake", measured=1000, predicted=980, categories=cats, predicted_components=pred,
                   measured_phase="backward", predicted_phase="backward:layer3")
    r = flatten("x.jsonl", row, config_index(), recompute=False)
    assert r["same_peak_phase"] is True
    assert r["error_weights"] == 0
    # the tracer's split is the definition: activations are what autograd saved, the unsaved logits and
    # loss buffers (logits_loss) are "other" with the temporaries
    assert r["error_activations"] == pytest.approx((100 - 150) / 1000)
    assert r["error_other"] == pytest.approx((80 + 0 - 50) / 1000)
    # Peaks in different phases: the breakdowns describe different moments and are not compared.
    row = make_row("gpt2", "fake", measured=1000, predicted=980, categories=cats, predicted_components=pred,
                   measured_phase="optimizer", predicted_phase="backward:layer3")
    r = flatten("x.jsonl", row, config_index(), recompute=False)
    assert r["same_peak_phase"] is False and math.isnan(r["error_activations"])


def test_torn_last_line_is_skipped(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(make_row(measured=10, predicted=10)) + "\n{\"key\": \"trunc")
    assert len(load_rows([p], recompute=False)) == 1
