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
    the single-tensor AdamW's top is later, its two temporaries over the fp32 gradient (1,478,392 traced,
    with two 4-byte scalars)."""
    p = 49_260
    fused = _optimizer_event(_t(gpus=3, sharding="zero2", precision="mixed-bf16", optimizer="adamw-fused"))
    assert fused == 1_297_520 == 2 * 147_780 + 64 + 512 + (8 * p + 4) + 4 * p + 2 * 57_344 + 6 * p + 12
    assert _optimizer_event(_t(gpus=3, sharding="zero2", precision="mixed-bf16")) == 1_478_392


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
    with pytest.raises(CombinationError, match="prompt under mixed-bf16"):
        check_sharding(_plan("prompt"), _t(gpus=8, sharding="zero2", precision="mixed-bf16"))
    with pytest.raises(CombinationError, match="several ZeRO reduce buckets with gradient checkpointing"):
        check_sharding(make_plan(load_spec("llama-3.2-1b"), MethodSettings(method="full")),
                       _t(gpus=8, sharding="zero2", grad_checkpointing=True))


def test_bf16_enabled_traced_rank0():
    """bf16.enabled (precision mixed-bf16), full, 8 ranks: the engine casts the model to bf16 (flat buffer
    147,776 x 2), the bucket is bf16 (1,000,000,000 bytes), the master partition and AdamW's states stay fp32.
    Traced: 1,000,949,176 bytes at the bucket's allocation (the engine's loss times its static loss scale, 1.0, is
    a 0-dim fp32 tensor under bf16.enabled too)."""
    r = rank_memory(_plan(), _t(gpus=8, sharding="zero2", precision="mixed-bf16"), 0)
    assert r.peak_bytes == 1_000_949_176
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


def test_lora_under_bf16_enabled_casts_the_adapters():
    """bf16.enabled with LoRA (r 8 on q, v): DeepSpeed's engine casts every parameter to bf16, the adapters
    included (engine.py _cast_module_mixed_precision), so the flat buffer is 4,096 bf16 elements (8,192 bytes),
    the master partition 512 fp32 elements at 8 ranks, the bucket 5e8 bf16 elements. Traced (fake process
    group, 8 ranks): 1,000,528,856 bytes under ZeRO-2, 1,000,532,952 under ZeRO-1, both in the top block's
    backward.
    IA3 (traced 1,000,624,112 at 3 ranks) and bottleneck adapters (1,000,579,140) likewise; Llama-3.2-1B LoRA
    b1 s1024 with fused AdamW at 8 ranks 5,362,266,392, in backward at the loss."""
    t = _t(gpus=8, sharding="zero2", precision="mixed-bf16")
    layout = zero_layout(_plan("lora"), t, 0)
    assert (layout.padded * layout.nbytes, layout.partition) == (2 * 4_096, 512)
    parts = dict(rank_memory(_plan("lora"), t, 0).components)
    assert (parts["weights_trainable"], parts["master_weights"], parts["gradient_buckets"]) == (
        2 * 4_096, 4 * 512, 2 * REDUCE_BUCKET_SIZE)
    assert rank_memory(_plan("lora"), t, 0).peak_bytes == 1_000_528_856
    assert rank_memory(_plan("lora"), _t(gpus=8, sharding="zero1", precision="mixed-bf16"), 0).peak_bytes == 1_000_532_952
    three = _t(gpus=3, sharding="zero2", precision="mixed-bf16")
    assert rank_memory(_plan("ia3"), three, 0).peak_bytes == 1_000_624_112
    assert rank_memory(_plan("adapter"), three, 0).peak_bytes == 1_000_579_140
    big = make_plan(load_spec("llama-3.2-1b"), MethodSettings(method="lora"))
    fused = _t(gpus=8, sharding="zero2", precision="mixed-bf16", optimizer="adamw-fused", batch_size=1, seq_len=1024)
    assert rank_memory(big, fused, 0).peak_bytes == 5_362_266_392


def test_several_buckets_llama_1b_flushes_inside_layer_7():
    """Llama-3.2-1B full fp32, ZeRO-2 at 8 ranks (1,235,814,400 trainable elements, more than the 5e8-element
    bucket): backward's hooks fill the bucket with the final norm (2,048) and layers 15 to 8 (8 x 60,821,504:
    486,574,080 elements); layer 7's down_proj (16,777,216 elements) overflows it, so its hook flushes: the
    bucket's gradients flattened (the traced aten.cat of 486,574,080 fp32 elements, 1,946,296,320 bytes) beside
    the bucket, with down_proj's gradient (67,108,864 bytes) not yet copied. Layers 7 to 0 (486,572,032) fill it
    again and the tied embedding's hook (262,668,288 elements) flushes a second time; the epilogue flushes the
    embedding. Traced rank 0 (b1 s1024, two steps): 13,515,260,184 bytes at the first flush, as modelled: the
    fp32 weights, rotary buffer, inputs, AdamW's states over the 154,476,800-element partition and its step, the
    master partition, the bucket, the flattened copy, down_proj's gradient, the activations saved below and in
    layer 7 at that moment (1,612,251,136) and layer 7's gradient buffers and the engine's scalars."""
    big = make_plan(load_spec("llama-3.2-1b"), MethodSettings(method="full"))
    t = _t(gpus=8, sharding="zero2", batch_size=1, seq_len=1024)
    flushes = [e for e in zero_events(big, t, 0) if e[0] == "backward:flush"]
    assert len(flushes) == 2
    r = rank_memory(big, t, 0)
    assert (r.peak_bytes, r.peak_phase) == (13_515_260_184, "backward:flush")
    parts = dict(r.components)
    p = 1_235_814_400 // 8
    assert parts["weights_trainable"] == 4 * 1_235_814_400 and parts["master_weights"] == 4 * p
    assert parts["optimizer_states"] == 8 * p + 4 and parts["unsharded_gradients"] == 4 * 2_048 * 8_192
    assert parts["activations"] == 1_612_251_136
    # the tracer's "other" at the peak (5,723,928,596): the bucket, the master partition, the flattened copy with
    # layer 7's gradient buffers and the scalars, and down_proj's gradient
    assert (4 * REDUCE_BUCKET_SIZE + parts["master_weights"] + parts["temporaries"] + parts["unsharded_gradients"]
            == 5_723_928_596)
    assert parts["temporaries"] >= 4 * (2_048 + 8 * 60_821_504)


def test_gradient_clipping_adds_nothing_at_the_peak():
    """gradient_clipping 1.0 (max_grad_norm, the HF Trainer's default): stage_1_and_2.py unscale_and_clip_grads
    scales the fp32 partition's gradient in place with a few 0-dim tensors. Traced, full fp32 at 3 ranks: the same
    peaks as without clipping, 2,002,025,848 (ZeRO-1) and 2,001,960,312 (ZeRO-2), and the same step phase."""
    for sharding, traced in (("zero1", 2_002_025_848), ("zero2", 2_001_960_312)):
        clipped = rank_memory(_plan(), _t(gpus=3, sharding=sharding, max_grad_norm=1.0), 0)
        assert clipped.peak_bytes == traced == rank_memory(_plan(), _t(gpus=3, sharding=sharding), 0).peak_bytes


def test_gradient_accumulation_traced_rank0():
    """gradient_accumulation_steps 2, full fp32 at 3 ranks. ZeRO-2 reduces every micro-batch, so from micro-batch 2
    on grads_in_partition (rank 0 overlaps 57,344 elements: 229,376 bytes) is held: the traced peak 2,002,189,688
    is the one-step peak 2,001,960,312 plus it. ZeRO-1 reduces at the boundary only: micro-batch 2 starts with the
    bucket micro-batch 1's first hook made and autograd's fp32 gradients (591,104 bytes) beside micro-batch 1's
    forward (2,092,416): traced forward@2 2,002,683,520; its peak 2,002,813,560 is the loss's backward."""
    zero2 = rank_memory(_plan(), _t(gpus=3, sharding="zero2", grad_accum=2), 0)
    assert zero2.peak_bytes == 2_002_189_688 == 2_001_960_312 + 4 * 57_344
    events = zero_events(_plan(), _t(gpus=3, sharding="zero1", grad_accum=2), 0)
    forwards = [b for name, b, _ in events if name == "forward"]
    assert forwards[1] == 2_002_683_520 == forwards[0] + 4 * REDUCE_BUCKET_SIZE + 591_104
    assert rank_memory(_plan(), _t(gpus=3, sharding="zero1", grad_accum=2), 0).peak_bytes == 2_002_813_560


def test_trainer_loop_traced_rank0():
    """The HF Trainer's step under DeepSpeed: training_step passes scale_wrt_gas=False (no loss / gas scalar: 4
    bytes less through backward) and accelerate's DeepSpeedEngineWrapper.backward runs engine.step() while the
    Trainer holds its loss (4 bytes more in the step). Traced ZeRO-1 full fp32 at 3 ranks with clipping:
    2,002,025,844 (the engine's own loop: 2,002,025,848), step 1,773,956 (1,773,952)."""
    t = _t(gpus=3, sharding="zero1", trainer_loop=True, max_grad_norm=1.0)
    check_sharding(_plan(), t)
    assert rank_memory(_plan(), t, 0).peak_bytes == 2_002_025_844
    plain = _optimizer_event(_t(gpus=3, sharding="zero1"))
    assert _optimizer_event(t) == plain + 4


WIDE = dict(TINY, vocab_size=7_812_400, tie_word_embeddings=False)  # embedding and lm_head of 499,993,600 elements


def test_several_buckets_at_the_embedding_hook_and_in_reduce_gradients():
    """tiny-llama with a 7,812,400-token vocabulary (1,000,069,440 trainable elements), b1 s4, fp32, traced rank 0.
    ZeRO-2 at 8 ranks: the lm_head fills the bucket, layer 1's down_proj overflows it (first flush), layers 1
    and 0 (2 x 41,088 elements) refill it and the embedding's hook flushes them: 9,500,685,144 bytes traced,
    the fp32 weights, AdamW's states over the 125,008,680-element partition and its step, the master partition,
    the bucket, the embedding's gradient not yet copied (1,999,974,400) and the 82,176 flattened elements.
    ZeRO-1 at 2 ranks: reduce_gradients walks the parameters in order after backward; its second flush (78,144
    elements, before the lm_head) runs beside grads_in_partition (500,038,784 elements: the embedding, layer 0
    and layer 1's q_proj overlap rank 0's 500,034,720), which the first made, and the lm_head's gradient, not yet
    copied: 16,001,136,628 bytes traced."""
    plan = make_plan(load_spec(dict(WIDE)), MethodSettings(method="full"))
    zero2 = rank_memory(plan, _t(gpus=8, sharding="zero2", batch_size=1, seq_len=4), 0)
    p = 125_008_680
    assert (zero2.peak_bytes, zero2.peak_phase) == (9_500_685_144, "backward:flush")
    parts = dict(zero2.components)
    assert parts["unsharded_gradients"] == 4 * 499_993_600 and parts["optimizer_states"] == 8 * p + 4
    assert parts["temporaries"] - 4 * 2 * 41_088 == 20  # the engine's scalars
    zero1 = rank_memory(plan, _t(gpus=2, sharding="zero1", batch_size=1, seq_len=4), 0)
    assert (zero1.peak_bytes, zero1.peak_phase) == (16_001_136_628, "backward:reduce")
    parts = dict(zero1.components)
    assert parts["gradient_partition"] == 4 * (499_993_600 + 41_088 + 4_096)
    assert parts["unsharded_gradients"] == 4 * 499_993_600 and parts["temporaries"] == 4 * 78_144 + 8


def test_flush_at_a_tied_embedding_hook():
    """One block with a 499,968,000-element MLP (intermediate 2,604,000) and a tied 512 x 64 embedding, b1 s4, fp32,
    ZeRO-2 at 8 ranks (500,017,344 trainable elements): the final norm and the block fill the bucket with
    499,984,576 elements, and the embedding's hook (its .grad the sum of the head's and the lookup's gradients,
    131,072 bytes; the two addends gone) flushes them: the traced aten.cat of 499,984,576 fp32 elements beside
    the bucket. Traced rank 0: 6,750,164,888 bytes."""
    tied = dict(TINY, num_hidden_layers=1, intermediate_size=2_604_000, tie_word_embeddings=True)
    plan = make_plan(load_spec(tied), MethodSettings(method="full"))
    r = rank_memory(plan, _t(gpus=8, sharding="zero2", batch_size=1, seq_len=4), 0)
    p = 500_017_344 // 8
    assert (r.peak_bytes, r.peak_phase) == (6_750_164_888, "backward:flush")
    assert r.peak_bytes == (4 * 500_017_344 + 64 + 32 + (8 * p + 4) + 4 * p + 4 * REDUCE_BUCKET_SIZE
                            + 4 * 499_984_576 + 20 + 4 * 512 * 64)
