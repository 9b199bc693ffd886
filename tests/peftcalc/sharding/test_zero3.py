"""peftcalc.sharding.zero3 against hand derivations from DeepSpeed 0.19.8's stage3.py / partition_parameters.py and
against rank 0 of DeepSpeed ZeRO-3 traced on the fake process group (measure.zero.measure_zero, fake tensors, two
steps; the rows of measure/matrices/dist.toml's zero3 block in reports/data/dist.jsonl)."""

import pytest

from peftcalc.config import load_spec
from peftcalc.errors import CombinationError
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding import check_sharding, rank_memory
from peftcalc.sharding.comm import communication
from peftcalc.sharding.zero import REDUCE_BUCKET_SIZE
from peftcalc.sharding.zero3 import PERSISTENCE_THRESHOLD, zero3_layout

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
TINY_QWEN2 = dict(TINY, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_key_value_heads=2)
# tiny-llama: 512 x 64 embeddings and lm_head (untied), 2 x (q, k, v, o 64 x 64; gate, up, down 64 x 128; two
# norms of 64), the final norm 64
TINY_PARAMS = 2 * 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64


def _t(**kw):
    return TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", "device": "cpu", "optimizer": "adamw",
                               "sharding": "zero3", **kw})


def _plan(config=TINY, method="full"):
    return make_plan(load_spec(dict(config)), MethodSettings(method=method))


def test_partitions_by_hand():
    """Every parameter is its own partition of ceil(numel / world) elements (partition_parameters.py
    ``_aligned_size`` // world). At 8 ranks nothing pads: 2 x 32,768 / 8 + 2 x (4 x 4,096 + 3 x 8,192 + 2 x 64) / 8
    + 64 / 8 = 8,192 + 10,272 + 8 = 18,472 = 147,776 / 8. At 3 ranks: 2 x 10,923 + 8 x 1,366 + 6 x 2,731 + 5 x 22 =
    49,270, 34 elements more than 147,776 / 3 (the traced bf16 flat partition: 98,540 bytes). The largest
    parameter, 32,768 elements, is under stage3_param_persistence_threshold (1e5): all persistent."""
    assert TINY_PARAMS == 147_776
    eight = zero3_layout(_plan(), _t(gpus=8))
    assert (eight.trainable, eight.trainable_partition, eight.largest_partition) == (TINY_PARAMS, 18_472, 4_096)
    three = zero3_layout(_plan(), _t(gpus=3))
    assert three.trainable_partition == 2 * 10_923 + 8 * 1_366 + 6 * 2_731 + 5 * 22 == 49_270
    assert 3 * three.trainable_partition - TINY_PARAMS == 34
    assert max(g.numel for g in _plan().groups) == 32_768 < PERSISTENCE_THRESHOLD


def test_traced_rank0_fp32_8_ranks():
    """tiny-llama, full fp32 AdamW, b2 s32, 8 ranks, traced: 2,002,000,765 bytes in backward (the loss's
    backward), step 2 starting from 2,000,961,133. The start by hand: the whole persistent parameters (591,104,
    all-gathered after step 1's optimizer) and the rotary buffers (64), the flat partition (fp32, the model's
    dtype), its fp32 clone and the gradient partitions (3 x 73,888), the reduce bucket allocated up front (5e8 fp32 elements),
    AdamW's states and step over the partition (147,780), the batch (512), inf_or_nan_tracker (1) and the norm
    kept from the step before (8); the step ends with it and 24 bytes of the step's scalars."""
    r = rank_memory(_plan(), _t(gpus=8), 0)
    assert (r.peak_bytes, r.peak_phase) == (2_002_000_765, "backward:loss")
    start = 591_104 + 64 + 3 * 73_888 + 4 * REDUCE_BUCKET_SIZE + 147_780 + 512 + 1 + 8
    assert start == 2_000_961_133
    assert dict(r.events)["optimizer:gather"] == start + 24 == 2_000_961_157  # traced step-2 optimizer peak
    parts = dict(r.components)
    assert (parts["all_gather_buffers"], parts["master_weights"], parts["gradient_partition"]) == (591_104, 73_888, 73_888)


def test_traced_rank0_bf16_3_ranks():
    """bf16.enabled at 3 ranks (traced: 1,001,843,585 bytes in backward): a bf16 bucket (1e9 bytes), bf16 partitions
    and gradient partitions (2 x 98,540), the fp32 master (197,080), AdamW's states (394,164), and the whole bf16
    parameters as their all-gather outputs, each padded to 3 partitions: 3 x 49,270 x 2 = 295,620 bytes."""
    r = rank_memory(_plan(), _t(gpus=3, precision="mixed-bf16"), 0)
    assert (r.peak_bytes, r.peak_phase) == (1_001_843_585, "backward:loss")
    parts = dict(r.components)
    assert parts["all_gather_buffers"] == 295_620 and parts["gradient_buckets"] == 2 * REDUCE_BUCKET_SIZE
    assert (parts["weights_trainable"], parts["gradient_partition"], parts["master_weights"]) == (98_540, 98_540, 197_080)


def test_traced_qwen2_reduce_scatter_input():
    """tiny-qwen2, fused AdamW, gradient checkpointing, 3 ranks (traced: 2,002,052,297 bytes in backward): the peak
    is the epilogue's reduce-scatter input (coalesced_collectives.py ``reduce_scatter_coalesced``: every gradient
    in 3 padded partitions, 559,512 bytes, beside the 152 bytes of torch.empty padding pieces it concatenates)."""
    r = rank_memory(_plan(TINY_QWEN2), _t(gpus=3, optimizer="adamw-fused", grad_checkpointing=True), 0)
    assert (r.peak_bytes, r.peak_phase) == (2_002_052_297, "backward:reduce")
    layout = zero3_layout(_plan(TINY_QWEN2), _t(gpus=3))
    assert 3 * layout.trainable_partition * 4 == 559_512
    assert (3 * layout.trainable_partition - layout.trainable) * 4 == 152


def test_communication_by_hand():
    """One all-gather of the whole parameters a step (after the optimizer) and one reduce-scatter of the padded
    gradients: each rank sends 7/8 of 591,104 bytes in each."""
    c = communication(_plan(), _t(gpus=8))
    assert c.all_gather == c.reduce_scatter == 7 * 591_104 // 8


@pytest.mark.parametrize("config, method, kw, words", [
    (TINY, "lora", {"precision": "mixed-bf16"}, "lora under mixed-bf16"),
    (TINY, "qlora", {}, "method qlora"),
    (TINY, "full", {"offload": "optimizer"}, "offload optimizer"),
    (dict(TINY, hidden_size=512, intermediate_size=1024, num_attention_heads=8), "full", {}, "stage3_param_persistence_threshold"),
])
def test_refused(config, method, kw, words):
    with pytest.raises(CombinationError, match=words):
        check_sharding(_plan(config, method), _t(gpus=8, **kw))


def test_traced_lora_frozen_linears_save_their_input():
    """tiny-llama LoRA (q_proj, v_proj), fp32, 8 ranks (traced: 2,001,641,469 bytes in backward, 98,304 more in
    forward than the same step under ZeRO-2): ZeRO-3's linear (LinearFunctionForZeroStage3) saves the input of
    the frozen gate_proj/up_proj (the norm's output, 2 x 32 x 64 fp32) and down_proj (2 x 32 x 128 fp32) in both
    blocks: 2 x (16,384 + 32,768) = 98,304. The frozen parameters keep their padded partitions (ds_tensor)
    beside their whole copies: 147,776 / 8 x 4 = 73,888 bytes."""
    plan = _plan(method="lora")
    r = rank_memory(plan, _t(gpus=8), 0)
    assert (r.peak_bytes, r.peak_phase) == (2_001_641_469, "backward:loss")
    assert zero3_layout(plan, _t(gpus=8)).frozen_partition_bytes == 73_888
    zero2 = rank_memory(plan, _t(gpus=8, sharding="zero2"), 0)
    forward = dict(r.events)["forward"] - (dict(r.events)["optimizer:gather"] - 24)  # from the step's start
    assert forward - (dict(zero2.events)["forward"] - 614_216) == 2 * (16_384 + 32_768)  # ZeRO-2's step-2 start, traced
