"""peftcalc.sharding.zero against hand derivations from DeepSpeed's stage_1_and_2.py and against rank 0 of
DeepSpeed 0.19.8 ZeRO-1/2 traced on the fake process group (measure.zero.measure_zero, fake tensors)."""

import pytest

from peftcalc.config import load_spec
from peftcalc.errors import CombinationError
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding import check_sharding, rank_memory
from peftcalc.sharding.comm import communication
from peftcalc.sharding.zero import REDUCE_BUCKET_SIZE, zero_events, zero_layout

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
# tiny-llama: 512 x 64 embeddings, 2 x (4 x 64 x 64 + 3 x 64 x 128 + 2 x 64), final norm 64, 512 x 64 lm_head
TINY_PARAMS = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 512 * 64 + 64


def _t(**kw):
    return TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", "device": "cpu", "optimizer": "adamw",
                               **kw})


def _plan(method="full"):
    return make_plan(load_spec(dict(TINY)), MethodSettings(method=method))


def test_flat_buffer_and_partitions_by_hand():
    """147,776 elements divide by 2 x 8: no padding, partitions of 18,472; rank 0's partition lies inside the
    32,768-element embedding, so grads_in_partition holds that whole parameter (the traced (32768,) buffer).
    At 3 ranks the buffer pads to a multiple of 6 (147,780), partitions of 49,260: rank 0 overlaps the
    embedding (32,768) and layer 0's q, k, v, o (4 x 4,096) and gate_proj (8,192: starts at 49,152)."""
    eight = zero_layout(_plan(), _t(gpus=8, sharding="zero2"), 0)
    assert (eight.trainable, eight.padded, eight.partition, eight.in_partition) == (TINY_PARAMS, 147_776, 18_472, 32_768)
    three = zero_layout(_plan(), _t(gpus=3, sharding="zero2"), 0)
    assert (three.padded, three.partition) == (147_780, 49_260)
    assert three.in_partition == 32_768 + 4 * 4_096 + 8_192


def test_zero2_traced_rank0():
    """The traced peak of tiny-llama, full fp32, b2 s32, 8 ranks (measure.zero, two steps): 2,001,590,840 bytes
    in backward, when the lm_head's gradient has been made and the reduce bucket (5e8 fp32 elements,
    2,000,000,000 bytes) allocated for it: the one-GPU step's weights (591,104 + 64 of rotary buffer), inputs
    (512), activations saved to the head (646,400), the head's gradient (131,072), the fp32 master partition
    (73,888), AdamW's two states over it and its step (147,780), 8 bytes of the loss, 12 of the engine's
    scalars."""
    r = rank_memory(_plan(), _t(gpus=8, sharding="zero2"), 0)
    assert r.peak_bytes == 2_001_590_840
    assert r.peak_bytes == 591_104 + 64 + 512 + 646_400 + 131_072 + 73_888 + 147_780 + 2_000_000_000 + 8 + 12
    parts = dict(r.components)
    assert (parts["gradient_buckets"], parts["master_weights"]) == (4 * REDUCE_BUCKET_SIZE, 4 * 18_472)


def test_zero1_keeps_full_gradients_to_the_end_of_backward():
    """ZeRO-1 (traced: 2,001,656,376 bytes in layer 1's backward): autograd's gradients stay until
    reduce_gradients, so the peak is the one-GPU step's backward with the bucket, the master partition and the
    partitioned states in place of the full states."""
    r = rank_memory(_plan(), _t(gpus=8, sharding="zero1"), 0)
    assert r.peak_bytes == 2_001_656_376


def test_lora_counts_only_the_adapters():
    """LoRA (r 8 on q, v; 4 x 2 x 8 x 64 x 2 ... = 8,192 trainable elements): the flat buffer, partition and
    states cover the adapters only; the frozen base is as it was."""
    layout = zero_layout(_plan("lora"), _t(gpus=8, sharding="zero2"), 0)
    assert layout.trainable == 2 * 2 * 2 * 8 * 64 == 4_096
    assert layout.partition == 4_096 // 8


def test_lora_bucket_arrives_inside_the_top_block():
    """LoRA (head frozen): the bucket is allocated by the first adapter gradient's hook inside the top block's
    backward, after that block's MLP backward has peaked. Traced (fake process group): tiny-llama r8 q,v at 8
    ranks 2,000,953,688 bytes (ZeRO-2), 2,000,957,784 (ZeRO-1); Llama-3.2-1B b1 s1024 fp32 ZeRO-2 at 8 ranks
    9,254,216,984 (adding the bucket to the block's whole backward peak would give 9,401,222,424)."""
    lora = _plan("lora")
    assert rank_memory(lora, _t(gpus=8, sharding="zero2"), 0).peak_bytes == 2_000_953_688
    assert rank_memory(lora, _t(gpus=8, sharding="zero1"), 0).peak_bytes == 2_000_957_784
    big = make_plan(load_spec("llama-3.2-1b"), MethodSettings(method="lora"))
    t = _t(gpus=8, sharding="zero2", batch_size=1, seq_len=1024)
    assert rank_memory(big, t, 0).peak_bytes == 9_254_216_984


def _optimizer_event(t, method="full"):
    return next(b for name, b, _ in zero_events(_plan(method), t, 0) if name == "optimizer")


def test_fused_adamw_traced_rank0():
    """Fused AdamW (the HF Trainer's default, handed to deepspeed.initialize as the client optimizer), full fp32,
    3 ranks (measure.zero, two steps): the peak is backward's, as with the single-tensor AdamW (traced
    2,001,960,312 under ZeRO-2, 2,002,025,848 under ZeRO-1). The step's phase (traced 1,674,352): the fused
    kernel makes no temporaries, so its top is the norm's fp64 copy of rank 0's largest gradient piece (the
    embedding, 32,768 elements: 262,144 bytes) beside grads_in_partition (57,344 fp32 elements), the fp32
    weights (147,780 padded), rotary buffer, inputs, AdamW's states over the 49,260-element partition and its
    4-byte step, the master partition, and 12 bytes of norm scalars."""
    t = _t(gpus=3, sharding="zero2", optimizer="adamw-fused")
    assert rank_memory(_plan(), t, 0).peak_bytes == 2_001_960_312
    assert rank_memory(_plan(), _t(gpus=3, sharding="zero1", optimizer="adamw-fused"), 0).peak_bytes == 2_002_025_848
    p = 49_260
    assert _optimizer_event(t) == 1_674_352 == (
        4 * 147_780 + 64 + 512 + (8 * p + 4) + 4 * p + 4 * 57_344 + 8 * 32_768 + 12)


def test_fused_adamw_bf16_step_holds_the_flat_partition_and_its_fp32_copy():
    """bf16.enabled with fused AdamW, 3 ranks: the step's top (traced 1,297,520) is the flattened bf16
    partition (2 x 49,260) beside its fp32 copy (4 x 49,260), larger than the norm's fp64 piece (262,144);
    the single-tensor AdamW's top is later, its two temporaries over the fp32 gradient (1,478,384 modelled,
    1,478,392 traced)."""
    p = 49_260
    fused = _optimizer_event(_t(gpus=3, sharding="zero2", precision="mixed-bf16", optimizer="adamw-fused"))
    assert fused == 1_297_520 == 2 * 147_780 + 64 + 512 + (8 * p + 4) + 4 * p + 2 * 57_344 + 6 * p + 12
    assert _optimizer_event(_t(gpus=3, sharding="zero2", precision="mixed-bf16")) == 1_478_384


def test_gradient_checkpointing_traced_rank0():
    """Gradient checkpointing, full fp32, 3 ranks, ZeRO-2 (traced 2,001,773,940): the activations are small, so
    the peak is backward's epilogue (average_tensor), the bucket's gradients flattened (147,776 x 4) beside
    the bucket, with the fp32 weights (padded 147,780), rotary buffer, inputs, AdamW's states and step, the
    master partition, the loop's loss (8) and the engine's loss/gas and norm scalars (4 + 4). ZeRO-1 keeps
    autograd's gradients through backward: traced 2,001,894,008; bf16.enabled under ZeRO-2: 1,001,182,828."""
    t = _t(gpus=3, sharding="zero2", grad_checkpointing=True)
    r = rank_memory(_plan(), t, 0)
    assert r.peak_bytes == 2_001_773_940 == (
        4 * 147_780 + 64 + 512 + (8 * 49_260 + 4) + 4 * 49_260 + 4 * REDUCE_BUCKET_SIZE + 4 * 147_776 + 8 + 4 + 4)
    assert rank_memory(_plan(), _t(gpus=3, sharding="zero1", grad_checkpointing=True), 0).peak_bytes == 2_001_894_008
    bf16 = _t(gpus=3, sharding="zero2", precision="mixed-bf16", grad_checkpointing=True)
    assert rank_memory(_plan(), bf16, 0).peak_bytes == 1_001_182_828


def test_refused_in_one_line():
    with pytest.raises(CombinationError, match="lora under mixed-bf16"):
        check_sharding(_plan("lora"), _t(gpus=8, sharding="zero2", precision="mixed-bf16"))
    with pytest.raises(CombinationError, match="trainable elements fill more than one"):
        check_sharding(make_plan(load_spec("llama-3.2-1b"), MethodSettings(method="full")), _t(gpus=8, sharding="zero2"))


def test_bf16_enabled_traced_rank0():
    """bf16.enabled (precision mixed-bf16), full, 8 ranks: the engine casts the model to bf16 (flat buffer
    147,776 x 2), the bucket is bf16 (1,000,000,000 bytes), the master partition and AdamW's states stay fp32.
    Traced: 1,000,949,176 bytes at the bucket's allocation; the model is 4 bytes short (one 0-dim fp32 tensor)."""
    r = rank_memory(_plan(), _t(gpus=8, sharding="zero2", precision="mixed-bf16"), 0)
    assert r.peak_bytes == 1_000_949_176 - 4
    parts = dict(r.components)
    assert (parts["weights_trainable"], parts["gradient_buckets"], parts["master_weights"]) == (
        2 * 147_776, 2 * REDUCE_BUCKET_SIZE, 4 * 18_472)


def test_real_gloo_ranks_equal_the_fake_group():
    """tools/torchrun_dist.py zero2 on 2 CPU gloo ranks with real tensors (DeepSpeed's CPU accelerator): rank 0
    peaks at 2,002,255,832 bytes, as the fake-group trace of the same row and this model do."""
    assert rank_memory(_plan(), _t(gpus=2, sharding="zero2"), 0).peak_bytes == 2_002_255_832


def test_communication_by_hand():
    c = communication(_plan(), _t(gpus=8, sharding="zero2"))
    assert (c.reduce_scatter, c.all_gather) == (7 * 591_104 // 8, 7 * 591_104 // 8)


def test_deepspeed_json_routes_to_zero2(tmp_path):
    """A DeepSpeed JSON with zero_optimization.stage 2 and no bf16 gives sharding zero2, which estimates."""
    from peftcalc.training_configs import from_files

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    cfg = tmp_path / "ax.yaml"
    cfg.write_text("base_model: meta-llama/Llama-3.2-1B\ndeepspeed: ds.json\n")
    assert from_files(cfg).training["sharding"] == "zero2"
    assert rank_memory(_plan(), _t(gpus=8, sharding=from_files(cfg).training["sharding"]), 0).peak_bytes > 0
