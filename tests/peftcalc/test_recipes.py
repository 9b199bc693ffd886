"""The recipe settings of issue 13 against hand derivations from the library code paths (the traced
rows of measure/matrices/ci.toml's recipes block hold the same terms to the byte, reports/bounds.toml)."""

from math import ceil

import pytest
import torch

import peftcalc
from peftcalc.api import plan_for
from peftcalc.model_states import PAGED_MIN_NUMEL, clip_grad_norm_bytes, model_states
from peftcalc.settings import TrainingSettings
from peftcalc.sim.loss import chunk_sizes

MODEL = "llama-3.2-1b"  # 1,235,814,400 parameters, vocab 128,256 (tests/peftcalc/test_params.py)


def events(e, prefix=""):
    return {k[len(prefix):]: v for k, v in e.memory.events.items() if k.startswith(prefix)}


def test_later_micro_batches_hold_every_gradient_through_forward():
    """Micro-batch 2..N of full fine-tuning in bf16: zero_grad ran after the last optimizer step only, so
    the forward holds a 2-byte .grad per parameter on top of micro-batch 1's forward (nothing else differs
    before backward)."""
    e = peftcalc.estimate(MODEL, method="full", precision="bf16", seq_len=128, grad_accum=4)
    first, later = events(e, "micro-batch 1 "), events(e, "micro-batch 2-4 ")
    assert later["forward"] - first["forward"] == 2 * e.params.trainable == 2 * 1_235_814_400
    assert set(first) == set(later) and "optimizer" in e.memory.events
    assert e.memory.peak_micro_batch == 2 and not e.memory.peak_phase.startswith("optimizer")


def test_one_micro_batch_is_todays_step():
    one = peftcalc.estimate(MODEL, method="lora", seq_len=128)
    assert one.memory.peak_micro_batch is None and not any(k.startswith("micro-batch") for k in one.memory.events)


def test_accumulation_scales_tokens_and_flops_per_optimizer_step():
    one = peftcalc.estimate(MODEL, method="lora", batch_size=2, seq_len=512, gpu="H100")
    four = peftcalc.estimate(MODEL, method="lora", batch_size=2, seq_len=512, gpu="H100", grad_accum=4)
    assert four.cost.tokens_per_step == 4 * one.cost.tokens_per_step == 4 * 2 * 512
    assert four.cost.flops_per_step == pytest.approx(4 * one.cost.flops_per_step)
    assert four.cost.steps_per_epoch == ceil(one.cost.dataset_tokens / (4 * 2 * 512))
    assert four.cost.epoch_hours == pytest.approx(one.cost.epoch_hours, rel=1e-3)


def test_fused_adamw_has_no_temporaries_and_a_step_tensor_per_parameter():
    """torch/optim/adam.py: fused, the 'step' of each parameter is a float32 tensor on its device (one 512-byte
    block of the caching allocator on CUDA) and _fused_adamw_ updates in place; the foreach path's largest
    temporary is torch._foreach_sqrt over the whole bf16 group (2 bytes per parameter)."""
    plan = plan_for(MODEL, "full")
    foreach = model_states(plan, TrainingSettings(precision="bf16", optimizer="adamw"))
    fused = model_states(plan, TrainingSettings(precision="bf16", optimizer="adamw-fused"))
    tensors = sum(n for _, n in fused.grad_tensors)
    assert tensors == 146  # 16 layers x 9 + embed_tokens + norm (lm_head tied)
    assert fused.optimizer_temporaries == 0
    assert foreach.optimizer_temporaries == 2 * 1_235_814_400
    assert fused.optimizer_states - foreach.optimizer_states == 512 * tensors
    e = peftcalc.estimate(MODEL, method="full", precision="bf16", seq_len=128)
    assert e.training.optimizer == "adamw-fused"  # the HF Trainer's default with torch >= 2.8


@pytest.mark.parametrize("device,expected", [
    # traced: tiny-llama full bf16 b2 s32 (21 parameters), fused AdamW, cpu and fake: the optimizer phase's
    # peak 1,182,954 bytes clipped and 1,182,868 without (21 bf16 norms + their 21-element stack + the total)
    ("cpu", 21 * 2 + 21 * 2 + 2),
    ("cuda", 21 * 512 + 512 + 512),  # each a 512-byte block
])
def test_clip_grad_norm_temporaries(device, expected):
    ms = model_states(plan_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                                "vocab_size": 512, "_name_or_path": "tiny-llama"}, "full"),
                      TrainingSettings(precision="bf16"))
    assert dict(ms.grad_tensors) == {"bfloat16": 21}
    assert clip_grad_norm_bytes(ms, device) == (expected, 2 if device == "cpu" else 512)


def test_clipping_is_an_optimizer_event_before_the_step():
    e = peftcalc.estimate(MODEL, method="full", precision="bf16", seq_len=128, max_grad_norm=1.0, optimizer="sgd")
    plain = peftcalc.estimate(MODEL, method="full", precision="bf16", seq_len=128, optimizer="sgd")
    assert list(e.memory.events)[-2:] == ["optimizer:clip", "optimizer"]
    assert e.memory.events["optimizer"] == plain.memory.events["optimizer"] + 512  # the total norm, kept


def test_kept_outputs_hold_the_logits_through_backward():
    """outputs = model(**batch); outputs.loss.backward(): the bf16 logits (batch x seq x vocab) stay alive in
    every backward event; the forward's do not change."""
    kw = dict(method="lora", precision="bf16", batch_size=2, seq_len=256)
    kept, dropped = peftcalc.estimate(MODEL, keep_outputs=True, **kw), peftcalc.estimate(MODEL, **kw)
    logits = 2 * 256 * 128_256 * 2
    for name, value in dropped.memory.events.items():
        assert kept.memory.events[name] - value == (logits if name.startswith("backward") else 0), name


@pytest.mark.parametrize("n,chunks", [(32, 8), (30, 8), (60, 8), (4096, 8), (7, 3), (5, 8)])
def test_chunk_sizes_are_torch_chunks(n, chunks):
    assert chunk_sizes(n, chunks) == [c.numel() for c in torch.empty(n).chunk(chunks)]


def test_chunked_loss_drops_the_full_fp32_copy():
    """ForCausalLMLoss's backward holds three fp32 copies of the logits (the saved log-softmax output and two
    dense gradients); torchtune's chunks hold the saved outputs and two chunk-sized gradients."""
    kw = dict(method="lora", precision="bf16", batch_size=1, seq_len=4096)
    hf, chunked = peftcalc.estimate(MODEL, **kw), peftcalc.estimate(MODEL, loss="chunked", **kw)
    fp32 = 4096 * 128_256 * 4
    drop = hf.memory.events["backward:loss"] - chunked.memory.events["backward:loss"]
    assert drop == pytest.approx(2 * fp32 - 2 * fp32 / 8 - 4096 * 8, rel=1e-4)


def test_paged_states_are_outside_the_allocator_peak():
    """bitsandbytes get_state_buffer: state1/state2 of parameters of 1e5 elements or more are paged (uint8 for
    paged-adamw-8bit); their absmax (fp32, one per 256) stays in the allocator."""
    plan = plan_for(MODEL, "full")
    ms = model_states(plan, TrainingSettings(precision="bf16", optimizer="paged-adamw-8bit"))
    big = [g.numel for g in plan.groups if g.trainable and g.numel >= PAGED_MIN_NUMEL]
    assert ms.paged_states == 2 * sum(big)
    e = peftcalc.estimate(MODEL, method="full", precision="bf16", seq_len=128, optimizer="paged-adamw-8bit")
    assert e.memory.paged_bytes == ms.paged_states and e.memory.traced == "modelled, not traced"
    assert e.memory.overhead["paged_optimizer_states"] == ms.paged_states
    lora = peftcalc.estimate("llama-3.1-8b", method="qlora", optimizer="paged-adamw-8bit")
    assert lora.memory.paged_bytes == 0  # every LoRA matrix of rank 8 has fewer than 1e5 elements


def test_qlora_pays_its_dequantizations_at_the_memory_bandwidth():
    """bitsandbytes MatMul4Bit dequantizes each NF4 weight in the forward and, where its input needs a
    gradient, in the backward: llama-3.2-1b QLoRA (every block Linear is NF4: q_proj and o_proj 2048 x 2048,
    k_proj and v_proj 2048 x 512, gate, up and down 2048 x 8192; LoRA on q_proj and v_proj from block 0, whose
    input needs no gradient, blocks 1-15 do), each dequantization reading the NF4 weight and writing bf16."""
    from peftcalc.hardware import dequant_bytes, find_gpu
    from peftcalc.model_states import nf4_bytes

    plan = plan_for(MODEL, "qlora")
    per_layer = sum(nf4_bytes(n, True) + 2 * n for n in (2048 * 2048, 2048 * 512, 2048 * 512, 2048 * 2048,
                                                          2048 * 8192, 2048 * 8192, 8192 * 2048))
    assert dequant_bytes(plan, TrainingSettings()) == per_layer * (1 + 15 * 2)
    assert dequant_bytes(plan_for(MODEL, "lora"), TrainingSettings()) == 0
    lora = peftcalc.estimate(MODEL, method="lora", gpu="H100")
    qlora = peftcalc.estimate(MODEL, method="qlora", gpu="H100", prepare_kbit=False)
    assert qlora.cost.flops_per_step == lora.cost.flops_per_step
    gap = qlora.cost.step_seconds - lora.cost.step_seconds
    assert gap == pytest.approx(per_layer * 31 / (find_gpu("H100").memory_gbs * 1e9))


def test_dora_pays_its_weight_norm_matmuls_every_forward():
    """peft DoraLinearLayer.get_lora_weight: lora_B(lora_A(eye(in))), in x in x r then in x r x out
    multiply-adds, per adapted Linear and forward (the norm is detached: no backward)."""
    lora = peftcalc.estimate(MODEL, method="lora", gpu="H100")
    dora = peftcalc.estimate(MODEL, method="lora", dora=True, gpu="H100")
    per_layer = sum(2 * 2048 * 8 * (2048 + out) for out in (2048, 512))
    assert dora.cost.flops_per_step - lora.cost.flops_per_step == pytest.approx(16 * per_layer)
