"""Sliding-window attention (peftcalc.ops.attention: layer_windows, window_mask, model_masks_bytes; the readers
peftcalc.spec.sliding_windows and families.llama.llama_windows) against transformers' own config classes and
masking_utils, a hand derivation of what the explicit mask adds, and the harness's trace of the issue's case."""

import json
from pathlib import Path

import pytest

import peftcalc
from peftcalc.config import load_spec, spec_from_config
from peftcalc.errors import InputError
from peftcalc.ops.attention import layer_windows, model_masks_bytes, window_mask
from peftcalc.ops.context import StepContext

ROOT = Path(__file__).resolve().parents[3]
MISTRAL_CASE = dict(method="lora", targets="all-linear", batch_size=1, seq_len=4096, precision="bf16",
                    grad_checkpointing=True, device="cpu")


def _ctx(seq, kv_seq=None, attention="sdpa"):
    return StepContext(batch=1, seq=seq, kv_seq=kv_seq or seq, compute_dtype="bfloat16", weight_dtype="bfloat16",
                       autocast=None, adapter_dtype="bfloat16", device="cpu", attention=attention)


def _tiny(model_type, **extra):
    config = dict(model_type=model_type, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=512, **extra)
    return config, spec_from_config(config)


@pytest.mark.parametrize("extra", [dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
                                   dict(use_sliding_window=True, sliding_window=16),  # max_window_layers 28
                                   dict(use_sliding_window=False, sliding_window=16, max_window_layers=1),
                                   dict(use_sliding_window=True, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2)])
def test_qwen2_windows_are_transformers_layer_types(extra):
    from transformers import Qwen2Config

    config, spec = _tiny("qwen2", **extra)
    hf = Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"})
    expected = tuple(hf.sliding_window if t == "sliding_attention" else 0 for t in hf.layer_types)
    assert layer_windows(spec) == expected


@pytest.mark.parametrize("extra", [{}, dict(sliding_window=32), dict(sliding_window=None)])
def test_mistral_windows_are_transformers_config(extra):
    from transformers import MistralConfig

    config, spec = _tiny("mistral", **extra)
    window = MistralConfig(**{k: v for k, v in config.items() if k != "model_type"}).sliding_window
    assert layer_windows(spec) == (window or 0,) * 4  # MistralModel: one sliding mask for every layer


def test_bad_layer_types_are_one_clear_error():
    with pytest.raises(InputError, match="layer_types"):
        _tiny("qwen2", use_sliding_window=True, layer_types=["sliding_attention"])


@pytest.mark.parametrize("seq", [15, 16, 17, 40])
def test_explicit_mask_from_the_window_on_as_masking_utils_decides(seq):
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    built = sdpa_mask(batch_size=1, q_length=seq, kv_length=seq,
                      mask_function=sliding_window_causal_mask_function(16), local_size=16) is not None
    assert window_mask(_ctx(seq), 16) == built
    assert not window_mask(_ctx(seq), 0)  # full layers: is_causal
    assert not window_mask(_ctx(seq, attention="eager"), 16)  # eager adds its mask either way


def test_one_bool_mask_per_mask_type():
    _, mixed = _tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert model_masks_bytes(mixed, _ctx(15)) == 0
    assert model_masks_bytes(mixed, _ctx(16)) == 16 * 16  # the sliding layers' (1, 1, s, s) bool mask
    assert model_masks_bytes(mixed, _ctx(16, kv_seq=20)) == 2 * 16 * 20  # prefix tuning: the full layers' too


def test_mistral_7b_at_its_window_adds_what_the_explicit_mask_makes():
    """At 4,096 tokens every layer's mask is explicit. By hand, per layer the recomputed block saves
    repeat_kv's keys and values for all 32 heads instead of 8 (2 x 24 x 4,096 x 128 x 2 bytes =
    50,331,648) and SDPA's bf16 float mask (4,096 x 4,096 x 2 = 33,554,432); the checkpoints' kwargs hold
    the bool mask (4,096 x 4,096 = 16,777,216): 100,663,296 bytes above the same model without a window."""
    config = json.loads((ROOT / "peftcalc/data/models/mistral-7b.json").read_text())
    windowless = spec_from_config({**config, "sliding_window": None}, "mistral-7b (no window)")
    with_window = peftcalc.estimate("mistral-7b", **MISTRAL_CASE).memory
    without = peftcalc.estimate(windowless, **MISTRAL_CASE).memory
    assert with_window.peak_bytes - without.peak_bytes == 2 * 24 * 4096 * 128 * 2 + 4096 * 4096 * 2 + 4096 * 4096
    assert without.peak_bytes == 17_456_539_912  # what the calculator said before the fix


def test_mistral_7b_at_its_window_is_the_harness_trace():
    """The committed fake-tensor trace (measure/matrices/long.toml, reports/data/long.jsonl) of the case."""
    rows = [json.loads(line) for line in (ROOT / "reports/data/long.jsonl").read_text().splitlines() if line.strip()]
    row = next(r for r in rows if r["settings"]["model"] == "mistral-7b" and r["settings"]["training"]["seq_len"] == 4096
               and r["settings"]["training"]["grad_checkpointing"] and r["settings"]["method"]["targets"] == "all-linear")
    e = peftcalc.estimate(load_spec("mistral-7b"), **MISTRAL_CASE).memory
    assert row["measured"]["peak_bytes"] == e.peak_bytes == 17_557_203_208
    assert e.peak_phase == "backward:layer31"
