"""peftcalc.sharding.ddp against DDP traced on the fake process group (measure.dist.measure_ddp, real CPU
tensors), and peftcalc.sharding.comm against a hand count of the ring collectives."""

from peftcalc.config import load_spec
from peftcalc.hardware import find_gpu
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding import rank_memory
from peftcalc.sharding.comm import communication, step_seconds_with_comm
from peftcalc.sharding.ddp import bucket_bytes

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
# tiny-llama: 2 x (4 x 64 x 64 + 3 x 64 x 128 + 2 x 64) + 512 x 64 (embeddings) + 512 x 64 (lm_head) + 64
TINY_PARAMS = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 512 * 64 + 64


def _t(**kw):
    return TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", "device": "cpu", "optimizer": "adamw", **kw})


def test_buckets_are_one_gradient_copy():
    plan = make_plan(load_spec(dict(TINY)), MethodSettings(method="full"))
    assert bucket_bytes(plan, _t()) == 4 * TINY_PARAMS == 591_104


def test_ddp_traced_rank0():
    """measure.dist.measure_ddp on tiny-llama, full fp32 b2 s32, 8 ranks: 3,404,700 bytes at the peak (the
    one-GPU step's 2,813,596 plus the 591,104 of buckets), 3,218,580 in step 1."""
    plan = make_plan(load_spec(dict(TINY)), MethodSettings(method="full"))
    r = rank_memory(plan, _t(gpus=8, sharding="ddp"), 0)
    assert (r.peak_bytes, r.step1_peak_bytes) == (3_404_700, 3_218_580)
    assert dict(r.components)["gradient_buckets"] == 591_104


def test_ring_bytes_by_hand():
    plan = make_plan(load_spec(dict(TINY)), MethodSettings(method="full"))
    # DDP all-reduce: 2 (N - 1) / N of the buckets
    assert communication(plan, _t(gpus=8, sharding="ddp")).all_reduce == 2 * 7 * 591_104 // 8
    # FSDP2 at 8 ranks (every dim 0 divides): all-gather twice (forward, backward) and reduce-scatter once of
    # the whole fp32 model, 7/8 of it each
    c = communication(plan, _t(gpus=8, sharding="fsdp"))
    assert (c.all_gather, c.reduce_scatter) == (2 * 7 * 591_104 // 8, 7 * 591_104 // 8)
    keep = communication(plan, _t(gpus=8, sharding="fsdp", reshard_after_forward=False))
    assert keep.all_gather == 7 * 591_104 // 8
    assert communication(plan, _t()).total == 0


def test_overlap_takes_the_longer():
    h100 = find_gpu("H100 80GB")  # NVLink 450 GB/s one way inside a node, 50 GB/s between nodes
    plan = make_plan(load_spec(dict(TINY)), MethodSettings(method="full"))
    inside = communication(plan, _t(gpus=8, sharding="ddp"))
    assert step_seconds_with_comm(1.0, inside, h100, _t(gpus=8, sharding="ddp")) == (1.0, inside.total / 450e9)
    across = communication(plan, _t(gpus=16, sharding="ddp"))
    step, comm = step_seconds_with_comm(0.0, across, h100, _t(gpus=16, sharding="ddp"))
    assert step == comm == across.total / 50e9
