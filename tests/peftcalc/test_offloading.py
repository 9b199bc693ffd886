"""Activation offloading (peftcalc.offloading, the Recorder's offload mode): torch.autograd.graph.save_on_cpu's
host copies (one per saved variable, parameters and their views included) and the device's step (a saved tensor
leaves the device when the forward drops it; a device copy per unpack in backward), against hand derivations
and the harness's traces (measure/offload.py; rows of measure/matrices/ci.toml and long.toml)."""

import sys
from pathlib import Path

import pytest

import peftcalc
from peftcalc.backward import run_backward
from peftcalc.errors import CombinationError
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder
from peftcalc.ops.tensor_ops import mul

sys.path.insert(0, str(Path(__file__).parent / "traced"))
from matrix_models import matrix_spec  # noqa: E402


def _ctx(offload: bool) -> StepContext:
    return StepContext(batch=1, seq=4, kv_seq=4, compute_dtype="float32", weight_dtype="float32", autocast=None,
                       adapter_dtype="float32", device="cpu", attention="sdpa", offload=offload)


def test_a_tensor_saved_twice_is_two_host_copies_and_two_unpacked_copies():
    """z (64 fp32: 256 B, requires grad), (z * z): MulBackward0 saves self and other, both z. save_on_cpu packs
    each saved variable: two host copies (512 B), and the device keeps z only while the forward holds it. The
    node unpacks both (two 256 B device copies) before making grad * other and grad * self (256 B each), with the
    incoming gradient (256 B): 1,280 B at its peak, where without offloading z (256 B, saved) and the same
    formula make 1,024 B (as measure/offload.py's hand test traces: MulBackward0 unpacks z twice)."""
    peaks = {}
    for offload in (False, True):
        rec = Recorder(_ctx(offload))
        z = rec.new(64, "float32", True)
        out = mul(rec, z, z, "z")
        rec.free(z)
        assert rec.host_bytes == (512 if offload else 0)
        # z leaves the device with the forward's reference (offloaded), or autograd holds it (saved)
        assert (rec.live_bytes, rec.saved_total) == (256, 0 if offload else 256)
        peaks[offload] = run_backward(rec.nodes, rec.device_saved(), {out.id: out.nbytes}, in_place=False).peak
    assert peaks[False].total == 256 + 256 + 2 * 256
    assert (peaks[True].saved, peaks[True].total) == (0, 256 + 2 * 256 + 2 * 256)


def _estimate(model: str, method: str, precision: str, ckpt: bool, offload: bool, batch=2, seq=32):
    return peftcalc.estimate(matrix_spec(model), method=method, precision=precision, batch_size=batch,
                             seq_len=seq, optimizer="adamw", device="cpu", grad_checkpointing=ckpt,
                             offload_activations=offload).memory


def test_host_bytes_under_checkpointing_by_hand():
    """tiny-llama (hidden 64, vocab 512, 2 layers, fp32) full fine-tuning, batch 2 x 32 = 64 tokens, non-reentrant
    checkpointing (as tests/measure/test_offload.py derives and traces it): EmbeddingBackward's indices (64 int64),
    two checkpoint inputs (64 x 64 fp32 each), the final LlamaRMSNorm's pow input, rsqrt (64 fp32), the multiply's
    two operands, weight * normalized's weight (64 fp32) and normalized states, lm_head's weight.t() (512 x 64
    fp32) and input, ForCausalLMLoss's log_softmax output twice (64 x 512 fp32), the shifted labels and
    total_weight. LoRA (frozen embedding, final norm and lm_head): no indices, no normalized states."""
    h, logits = 64 * 64 * 4, 64 * 512 * 4
    full = 512 + 2 * h + (h + 256 + h + 256 + 256 + h) + (logits + h) + (2 * logits + 512 + 4)
    lora = 2 * h + (h + 256 + h + 256 + 256) + logits + (2 * logits + 512 + 4)
    assert _estimate("tiny-llama", "full", "fp32", True, True).host_bytes == full == 493_316
    assert _estimate("tiny-llama", "lora", "fp32", True, True).host_bytes == lora == 460_036
    assert _estimate("tiny-llama", "lora", "fp32", True, False).host_bytes == 0


def test_device_peak_under_checkpointing_by_hand():
    """tiny-llama LoRA fp32 as above, peak backward:loss either way: offloading takes off the device block 1's
    checkpoint input (block 0's is the hooked embedding output, a leaf its AccumulateGrad node keeps) and the
    final norm's saved input and rsqrt, 16,384 + 16,384 + 256 B (traced: 1,087,848 -> 1,054,824)."""
    plain = _estimate("tiny-llama", "lora", "fp32", True, False)
    offloaded = _estimate("tiny-llama", "lora", "fp32", True, True)
    assert (plain.peak_bytes, offloaded.peak_bytes) == (1_087_848, 1_087_848 - (16_384 + 16_384 + 256))
    assert offloaded.peak_phase == plain.peak_phase == "backward:loss"


@pytest.mark.parametrize("model,method,precision,ckpt,device_peak,host", [
    ("tiny-llama", "full", "fp32", False, 2_627_476, 1_596_164),
    ("tiny-llama", "lora", "fp32", False, 1_034_088, 1_234_436),
    ("tiny-llama", "lora", "bf16", False, 738_536, 859_140),
    ("tiny-qwen2", "full", "fp32", False, 1_975_984, 1_530_628),
    ("tiny-qwen2", "full", "bf16", True, 1_038_640, 394_884),
    ("tiny-qwen2", "lora", "bf16", False, 650_984, 832_516),
    ("tiny-mistral", "lora", "fp32", True, 996_456, 460_036),
    ("tiny-llama", "lora", "amp-bf16", True, 1_054_824, 394_500),
    ("tiny-qwen3", "lora", "fp32", False, 1_112_488, 1_534_852),
])
def test_tiny_rows_as_traced(model, method, precision, ckpt, device_peak, host):
    """Traced rows of the ci matrix (reports/data/ci.jsonl, fake and cpu alike), batch 2 x 32: the device peak
    with save_on_cpu and the host copies' largest sum (measured.host_peak_bytes)."""
    m = _estimate(model, method, precision, ckpt, True)
    assert (m.peak_bytes, m.host_bytes) == (device_peak, host)


@pytest.mark.parametrize("ckpt,device_peak,host", [
    (False, 4_057_870_856, 5_302_919_172),
    (True, 4_062_335_496, 1_659_916_292),
])
def test_llama_3_2_1b_lora_as_traced(ckpt, device_peak, host):
    """Llama-3.2-1B LoRA bf16, 1 x 1,024, fake tensors (reports/data/long.jsonl; tests/measure/test_offload.py
    derives the checkpointed one by hand): the host copies hold the tied lm_head's weight.t() (525 MB) and
    log_softmax's fp32 output twice."""
    m = _estimate("llama-3.2-1b", "lora", "bf16", ckpt, True, batch=1, seq=1024)
    assert (m.peak_bytes, m.host_bytes) == (device_peak, host)


@pytest.mark.parametrize("kw,what", [
    (dict(model="gpt2"), "model type gpt2"),
    (dict(method="qlora"), "method qlora"),
    (dict(precision="amp-fp16"), "precision amp-fp16"),
    (dict(model="qwen3-0.6b", grad_checkpointing=True), "gradient checkpointing on model type qwen3"),
    (dict(attention="eager"), "attention eager"),
    (dict(loss="chunked"), "loss chunked"),
    (dict(grad_checkpointing=True, checkpoint_reentrant=True), "reentrant or partial gradient checkpointing"),
])
def test_what_is_not_modelled_is_refused_in_one_line(kw, what):
    kw = {"model": "llama-3.2-1b", **kw}
    with pytest.raises(CombinationError, match=f"offload_activations with {what}.* is not modelled"):
        peftcalc.estimate(kw.pop("model"), offload_activations=True, **kw)
