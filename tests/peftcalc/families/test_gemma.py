"""Gemma 2 and Gemma 3 text (peftcalc.families.gemma2, gemma3): config reading against transformers' own config
classes, the attention implementation transformers allows, and unsloth#2366's situation (Gemma-3-12B LoRA on an
80 GB H100 runs out of memory past ~16k tokens, and the logits decide it). The exact parameter counts of the
registry entries are held by tests/peftcalc/test_params.py (real models on the meta device), the traced peaks by
the ci and long matrices (reports/bounds.toml)."""

import pytest

import peftcalc
from peftcalc.config import load_spec, spec_from_config
from peftcalc.errors import InputError
from peftcalc.families import attention_for
from peftcalc.ops.attention import layer_windows

TINY = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512)


def _hf(model_type, config):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **config)


@pytest.mark.parametrize("model_type,extra", [
    ("gemma2", {}),
    ("gemma2", dict(sliding_window=64)),
    ("gemma3_text", {}),
    ("gemma3_text", dict(sliding_window=512, sliding_window_pattern=4)),
    ("gemma3_text", dict(layer_types=["full_attention"] * 12)),
])
def test_layer_windows_are_transformers_layer_types(model_type, extra):
    config = {**TINY, **extra}
    spec = spec_from_config({"model_type": model_type, **config})
    hf = _hf(model_type, config)
    assert layer_windows(spec) == tuple(hf.sliding_window if t == "sliding_attention" else 0 for t in hf.layer_types)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_softcapping_is_the_config_class_default(model_type):
    spec = spec_from_config({"model_type": model_type, **TINY})
    hf = _hf(model_type, TINY)
    assert spec.attn_logit_softcap == (hf.attn_logit_softcapping or 0.0)
    assert spec.final_logit_softcap == (hf.final_logit_softcapping or 0.0)


def test_gemma2_runs_eager_as_transformers_allows():
    """Gemma2PreTrainedModel._supports_sdpa is False (sdpa_attention_forward refuses a softcap): asked for sdpa,
    transformers refuses the model, so the calculator and the harness run its only default, eager."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3PreTrainedModel

    assert Gemma2PreTrainedModel._supports_sdpa is False and Gemma3PreTrainedModel._supports_sdpa is True
    assert attention_for(load_spec("gemma-2-9b"), "sdpa") == "eager"
    assert attention_for(load_spec("gemma-3-12b"), "sdpa") == "sdpa"


def test_bad_softcap_is_one_clear_error():
    with pytest.raises(InputError, match="final_logit_softcapping"):
        spec_from_config({"model_type": "gemma2", **TINY, "final_logit_softcapping": "yes"})


def test_instruct_ids_are_the_same_model():
    assert load_spec("google/gemma-3-12b-it").hf_config == load_spec("gemma-3-12b").hf_config
    assert load_spec("google/gemma-2-9b-it").hf_config == load_spec("gemma-2-9b").hf_config


def _lora_12b(seq):
    return peftcalc.estimate("gemma-3-12b", method="lora", batch_size=1, seq_len=seq, grad_checkpointing=True,
                             gpu="H100 80GB")


def test_unsloth_2366_gemma3_12b_lora_stops_fitting_an_h100_past_16k_tokens():
    """unsloth#2366 reports Gemma-3-12B LoRA running out of memory on an H100 above ~14k tokens. bf16 LoRA (q, v),
    batch 1, checkpointing: 16,128 tokens fit in 80 GB, 16,384 do not; the peak is the loss's backward, where the
    262,208-wide logits (bf16, their fp32 upcast and the loss's gradients) outweigh the 12B weights."""
    fit = {g.name: g.fits for g in _lora_12b(16128).gpus}
    over = _lora_12b(16384)
    assert fit["H100 80GB"] and not {g.name: g.fits for g in over.gpus}["H100 80GB"]
    m = over.memory
    assert m.peak_phase == "backward:loss"
    c = m.components
    assert c["logits_loss"] > c["weights_frozen"] + c["weights_trainable"]
    assert c["logits_loss"] == max(c.values())
