"""loss "trl": TRL 1.16 SFTTrainer's fused LM head (peftcalc.sim.trl_head). The figures are the harness's traces
of tiny-llama (measure/matrices/ci.toml) and of a real SFTTrainer run (tests/peftcalc/integrations/
test_memory_callback.py), and a hand count of trl/kernels/chunked_logprob.py's buffers."""

import pytest

from peftcalc.api import estimate
from peftcalc.config import spec_from_config
from peftcalc.errors import InputError
from peftcalc.sim.trl_head import mm_buf_bytes, trl_tiles

TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, vocab_size=512)


def tiny(vocab=512):
    return spec_from_config({**TINY, "vocab_size": vocab}, name="tiny-llama")


def test_tiles_and_buffer():
    """ChunkedLogProbFunction: tiles of at most 4096 positions x 32768 vocabulary columns; mm_buf is
    min(N, 4096) x 32768 in the compute dtype whatever the vocabulary (126 positions, fp32: 16,515,072 bytes, the
    largest tensor of the traced step)."""
    assert trl_tiles(126, 512) == [(126, 512)]
    assert trl_tiles(5000, 40000) == [(4096, 32768), (4096, 7232), (904, 32768), (904, 7232)]
    assert mm_buf_bytes(126, 4) == 126 * 32768 * 4 == 16_515_072
    assert mm_buf_bytes(10_000, 2) == 4096 * 32768 * 2


@pytest.mark.parametrize("method, precision, peak, step1", [
    # traced: MemoryCallback in real SFTTrainer runs (b2 s64, TRL's own collator) and the harness's cpu rows
    ("lora", "fp32", 19_979_072, 19_946_272),
    ("lora", "bf16", 11_143_616, 11_110_816),
    ("full", "bf16", 11_915_508, 11_324_320),
])
def test_traced_peaks(method, precision, peak, step1):
    e = estimate(tiny(), method=method, batch_size=2, seq_len=64, precision=precision, optimizer="adamw",
                 device="cpu", loss="trl")
    assert (e.memory.peak_bytes, e.memory.step1_peak_bytes) == (peak, step1)
    assert e.memory.peak_phase == "backward:head"
    assert dict(e.memory.components)["inputs"] == 3 * 2 * 64 * 8  # input_ids, labels, attention_mask


def test_not_modelled_combinations():
    """Autocast (ChunkedLogProbFunction casts each chunk) and a non-causal model are refused in one line."""
    with pytest.raises(InputError, match="loss trl under autocast"):
        estimate(tiny(), method="lora", precision="amp-bf16", loss="trl", seq_len=64)
    with pytest.raises(InputError, match="loss trl"):
        estimate("bert-base-uncased", method="lora", precision="bf16", loss="trl", seq_len=64)
