"""Activation offloading in the harness (measure/offload.py): torch.autograd.graph.save_on_cpu(pin_memory=True)'s
hooks, the host copies kept out of the tracer's device figure and counted apart, a device copy per unpack."""

import pytest
import torch

from measure.offload import HostOffload
from measure.run import measure_one
from measure.setup import check_run
from peftcalc.errors import InputError
from measure.tracer import StorageTracer
from peftcalc.settings import TrainingSettings


def test_host_copies_and_unpacked_copies_by_hand():
    """x (4 x 8 fp32, 128 B, requires grad) @ w (8 x 16 fp32, 512 B, frozen) -> y (256 B); sigmoid(y) -> z (256 B);
    (z * z).sum() -> loss (4 B). Saved variables: mm's mat2 (w: its gradient of x needs it), sigmoid's result z,
    mul's self and other (z twice): four host copies, 512 + 256 + 2 x 256 = 1,280 B, none of them on the device.
    The forward's device peak is z, z * z and the loss: 516 B above x and w (y freed once sigmoid returns).
    Backward: SumBackward's ones (4 B) beside the loss; MulBackward0 unpacks z twice (two 256 B copies) and makes
    grad * other and grad * self (256 B each): 4 + 4 + 512 + 512 = 1,032 B, the backward's peak (MmBackward holds
    less: w's copy 512, grad_y 256, grad_x 128). x.grad (128 B) and the loss are left; every host copy is freed."""
    tracer = StorageTracer()
    offload = HostOffload(tracer, own_host=True)
    with tracer:
        x = torch.randn(4, 8, requires_grad=True)
        w = torch.randn(8, 16)
        tracer.mark([x, w], "inputs")
        base = tracer.live_bytes
        with tracer.phase("forward") as forward, offload.hooks():
            z = torch.sigmoid(x @ w)
            loss = (z * z).sum()
            del z
        assert (offload.live, offload.peak, offload.copies) == (1280, 1280, 4)
        assert (forward.peak_bytes - base, forward.end_bytes - base) == (516, 4)
        with tracer.phase("backward") as backward:
            loss.backward()
    assert (backward.peak_bytes - base, backward.end_bytes - base) == (1032, 132)
    assert offload.live == 0


def test_offload_is_what_save_on_cpu_packs():
    """The same saved variables as torch's save_on_cpu: one host copy per saved variable, of its own size."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = torch.sigmoid(x @ w)
        (z * z).sum()
    offload = HostOffload(own_host=True)
    with offload.hooks():
        z = torch.sigmoid(x @ w)
        (z * z).sum()
    assert sorted(sizes) == [256, 256, 256, 512] and offload.peak == sum(sizes)


@pytest.mark.parametrize("method,ckpt,plain,offloaded,host", [
    ("full", False, 2_813_596, 2_627_476, 1_596_164),
    ("lora", False, 1_475_432, 1_034_088, 1_234_436),
    ("full", True, 2_627_476, 2_627_476, 493_316),
])
def test_tiny_llama_traced_with_and_without_offload(tiny, method, ckpt, plain, offloaded, host):
    """tiny-llama (2 layers, hidden 64, vocab 512) fp32, batch 2 x 32, AdamW foreach, fake tensors: the device peak
    with save_on_cpu and the host copies' largest sum. Under checkpointing only the checkpoints' inputs and what
    is saved outside the blocks go to the host (the checkpoint's hooks are innermost inside a block), and the
    step's peak is the optimizer's either way."""
    run = tiny("tiny-llama", method=method)
    peaks = []
    for off in (False, True):
        t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu",
                             grad_checkpointing=ckpt, offload_activations=off)
        row = measure_one(run.spec, run.method, t, device="fake", steps=2)
        assert row["outcome"] == "ok", row.get("error")
        peaks.append(row["measured"]["peak_bytes"])
    assert peaks == [plain, offloaded]
    assert row["measured"]["host_peak_bytes"] == host
    assert row["predicted"]["peak_bytes"] == offloaded  # the calculator (peftcalc.offloading) to the byte


def test_offload_is_one_gpus_step(tiny):
    run = tiny("tiny-llama", method="lora")
    t = TrainingSettings(offload_activations=True, gpus=2, sharding="ddp", device="cpu")
    with pytest.raises(InputError, match="offload_activations under sharding ddp: the harness offloads one GPU"):
        check_run(run.spec, run.method, t, "cpu", 2)


def test_host_bytes_under_checkpointing_by_hand(tiny):
    """tiny-llama (hidden 64, vocab 512, 2 layers, fp32), batch 2 x 32 = 64 tokens, non-reentrant checkpointing with
    save_on_cpu: inside a block the checkpoint's hooks are innermost, so the host gets, per saved variable,
    - EmbeddingBackward's indices (64 int64: 512 B);
    - each checkpoint's _NoopSaveInputs: the block's hidden states (64 x 64 fp32: 16,384 B; its keyword
      arguments, position embeddings and mask, are no tensor arguments), two layers;
    - the final LlamaRMSNorm: pow saves the hidden states, rsqrt its result (64 fp32: 256 B), the multiply both
      again, weight * normalized the weight (256 B) and the normalized states (16,384 B);
    - lm_head: the weight's transposed view (64 x 512 fp32: 131,072 B, the whole weight) and its input;
    - ForCausalLMLoss: log_softmax's result and nll_loss's copy of it (64 x 512 fp32: 131,072 B each), the shifted
      labels (512 B) and total_weight (4 B)."""
    h, logits = 64 * 64 * 4, 64 * 512 * 4
    by_hand = (512 + 2 * h + (h + 256 + h + 256 + 256 + h) + (logits + h) + (2 * logits + 512 + 4))
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu",
                         grad_checkpointing=True, offload_activations=True)
    row = measure_one(run.spec, run.method, t, device="fake", steps=2)
    assert row["measured"]["host_peak_bytes"] == by_hand == 493_316


def test_lora_device_and_host_bytes_under_checkpointing_by_hand(tiny):
    """tiny-llama LoRA (r8 defaults of the ci matrix, frozen embedding and lm_head) fp32, batch 2 x 32 = 64 tokens,
    non-reentrant checkpointing, fake tensors; the step's peak is backward:loss with and without save_on_cpu.
    Device: the peak drops by what was saved outside the checkpoints' own hooks and nothing else holds,
    - block 1's checkpoint input (64 x 64 fp32: 16,384 B; block 0's is the leaf enable_input_require_grads makes of
      the embedding output, which its AccumulateGrad node keeps on the device),
    - the final LlamaRMSNorm's saved input (16,384 B) and rsqrt result (64 fp32: 256 B; weight * normalized saves
      only the frozen weight, a parameter, which stays on the device anyway),
    while the loss's saved variables are back on the device at its backward (log_softmax's result unpacked as a new
    64 x 512 copy, the size of the original the forward freed): 1,087,848 - 33,024 = 1,054,824.
    Host, one copy per saved variable: both checkpoint inputs (2 x 16,384), the final norm's pow input, rsqrt, the
    multiply's two operands and its weight (16,384 + 256 + 16,384 + 256 + 256), lm_head's weight.t() (512 x 64 fp32:
    131,072), log_softmax's result and nll_loss's copy of it (2 x 131,072), the shifted labels (512) and total_weight
    (4): 460,036 B."""
    h, logits = 64 * 64 * 4, 64 * 512 * 4
    device_drop = h + h + 256
    host = 2 * h + (h + 256 + h + 256 + 256) + logits + (2 * logits + 512 + 4)
    run = tiny("tiny-llama", method="lora")
    peaks, row = _backward_peaks_without_and_with_offload(run, batch_size=2, seq_len=32, precision="fp32",
                                                          device="cpu")
    assert (peaks[False], peaks[True]) == (1_087_848, 1_087_848 - device_drop) == (1_087_848, 1_054_824)
    assert row["measured"]["host_peak_bytes"] == host == 460_036


@pytest.mark.slow
def test_llama_3_2_1b_lora_under_checkpointing_by_hand():
    """Llama-3.2-1B LoRA (r8, peft's default targets) bf16, batch 1 x 1,024, non-reentrant checkpointing, fake tensors,
    as test_lora_device_and_host_bytes_under_checkpointing_by_hand at a real shape (hidden 2,048, 16 layers,
    vocab 128,256, lm_head tied to the embedding). The backward:loss peak drops by
    - 15 checkpoint inputs (1,024 x 2,048 bf16: 4,194,304 B each; block 0's is the leaf, kept on the device),
    - the final norm's fp32 input (x.to(float32): 8,388,608 B) and rsqrt (1,024 fp32: 4,096 B).
    Host: 16 checkpoint inputs; the norm's pow input, rsqrt, the multiply's two operands and its weight (2,048 bf16:
    4,096 B); lm_head's weight.t() (the tied 128,256 x 2,048 bf16 table: 525,336,576 B); log_softmax's fp32
    result twice (1,024 x 128,256 x 4: 525,336,576 B each), the shifted labels (1,024 int64) and total_weight (4 B)."""
    from measure.matrix import load_matrix, to_run

    hidden, f32, logits = 1024 * 2048 * 2, 1024 * 2048 * 4, 1024 * 128_256 * 4
    drop = 15 * hidden + f32 + 4096
    host = 16 * hidden + (f32 + 4096 + f32 + 4096 + 4096) + 128_256 * 2048 * 2 + (2 * logits + 1024 * 8 + 4)
    run = to_run({"model": "llama-3.2-1b", "method": "lora"}, load_matrix("long").get("models", {}))
    peaks, row = _backward_peaks_without_and_with_offload(run, batch_size=1, seq_len=1024, precision="bf16",
                                                          device="cuda")
    assert (peaks[False], peaks[True]) == (4_133_642_760, 4_133_642_760 - drop) == (4_133_642_760, 4_062_335_496)
    assert row["measured"]["host_peak_bytes"] == host == 1_659_916_292


def _backward_peaks_without_and_with_offload(run, **training) -> tuple[dict, dict]:
    """The fake-tensor peaks of `run` under non-reentrant checkpointing with offload_activations False and True,
    each asserted to be in backward, and the offloaded run's row."""
    peaks = {}
    for off in (False, True):
        t = TrainingSettings(optimizer="adamw", grad_checkpointing=True, offload_activations=off, **training)
        row = measure_one(run.spec, run.method, t, device="fake", steps=2)
        assert row["measured"]["peak_phase"] == "backward"
        peaks[off] = row["measured"]["peak_bytes"]
    return peaks, row
