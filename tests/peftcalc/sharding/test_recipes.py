"""The loop's recipes on one rank of a sharded step (peftcalc.sharding.recipes, peftcalc.sharding.ddp over
peftcalc.memory.loop_events) against hand derivations and rank 0's traces (measure/dist.py; the rows of
reports/data/dist.jsonl, measure/matrices/dist.toml's recipe grids)."""

import pytest

from peftcalc.config import load_spec
from peftcalc.errors import CombinationError
from peftcalc.memory import timeline
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding import EVENTS, rank_memory, sharded_timeline
from peftcalc.sharding.ddp import bucket_bytes
from peftcalc.sharding.fsdp import group_bytes
from peftcalc.sharding.recipes import loop_recipes

# measure/matrices/dist.toml's tiny-llama: hidden 64, 2 layers, 4 heads, intermediate 128, vocab 512 (untied)
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
LOGITS = 2 * 32 * 512 * 4  # b x s x vocab fp32: what the kept outputs hold (ModelOutput.logits)


def _plan(method="full"):
    return make_plan(load_spec(dict(TINY)), MethodSettings(method=method))


def _t(**kw):
    return TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", "device": "cpu", "optimizer": "adamw",
                               "sharding": "fsdp", **kw})


@pytest.mark.parametrize("method, kw, peak, step1", [
    # FSDP2 rank 0, traced on the fake process group (reports/data/dist.jsonl)
    ("full", dict(gpus=3, keep_outputs=True), 2_201_052, 1_801_752),
    ("full", dict(gpus=3, loss="chunked"), 2_041_324, 1_642_024),
    ("full", dict(gpus=8, loss="chunked", keep_outputs=True), 1_787_516, 1_639_656),
    ("lora", dict(gpus=3, loss="chunked", keep_outputs=True), 1_504_840, 1_493_032),
    ("lora", dict(gpus=8, keep_outputs=True), 1_481_224, 1_477_096),
    # DDP rank 0 on real CPU tensors (the HF Trainer's no_sync micro-batches under grad_accum)
    ("full", dict(gpus=2, sharding="ddp", grad_accum=2), 3_995_804, 3_218_580),
    ("full", dict(gpus=2, sharding="ddp", max_grad_norm=1.0), 3_404_700, 3_218_584),
    ("full", dict(gpus=2, sharding="ddp", keep_outputs=True), 3_535_772, 3_218_580),
    ("full", dict(gpus=2, sharding="ddp", loss="chunked", keep_outputs=True, grad_accum=2, max_grad_norm=1.0),
     4_012_188, 3_218_584),
    ("full", dict(gpus=2, sharding="ddp", trainer_loop=True, grad_accum=4, max_grad_norm=1.0), 3_995_808, 3_218_584),
    ("full", dict(gpus=2, sharding="ddp", loss="trl"), 12_207_220, 11_024_928),
    ("lora", dict(gpus=2, sharding="ddp", precision="bf16", optimizer="adamw-fused", loss="chunked"), 883_472, 850_672),
])
def test_traced_rank0(method, kw, peak, step1):
    r = rank_memory(_plan(method), _t(**kw), 0)
    assert (r.peak_bytes, r.step1_peak_bytes) == (peak, step1)


@pytest.mark.parametrize("model, method, kw, peak, phase", [
    # dist.toml's tiny-llama-v4k (tiny-llama with a 4,096-token vocabulary) and Llama-3.2-1B: the chunked loss's
    # root unshard, after the loss's backward, is the peak (FSDP2 and HSDP rank 0, traced)
    ("v4k", "full", dict(gpus=3, loss="chunked"), 8_326_868, "backward:unshard"),
    ("v4k", "lora", dict(gpus=8, gpus_per_node=4, sharding="hsdp", precision="bf16", optimizer="adamw-fused",
                         loss="chunked"), 3_246_088, "backward:unshard"),
    ("v4k", "full", dict(gpus=3, loss="chunked", reshard_after_forward=False), 7_629_292, "backward:head"),
    ("llama-3.2-1b", "lora", dict(gpus=8, precision="bf16", optimizer="adamw-fused", loss="chunked", batch_size=1,
                                  seq_len=1024), 3_137_078_280, "backward:unshard"),
])
def test_traced_loss_outside_the_root(model, method, kw, peak, phase):
    spec = load_spec(dict(TINY, vocab_size=4096)) if model == "v4k" else load_spec(model)
    r = rank_memory(make_plan(spec, MethodSettings(method=method)), _t(**kw), 0)
    assert (r.peak_bytes, r.peak_phase) == (peak, phase)


def test_kept_outputs_add_the_logits_to_every_backward_event():
    """Under FSDP2 the outputs are held from the model's return until loss.backward() returns, which runs the
    root's unshard and its final reduce-scatter too: b x s x vocab x 4 = 131,072 bytes more at each backward
    event, nothing elsewhere (the traced rows differ by as much: 2,201,052 - 2,069,980)."""
    plain = rank_memory(_plan(), _t(gpus=3), 0).events
    kept = rank_memory(_plan(), _t(gpus=3, keep_outputs=True), 0).events
    assert [n for n, _ in plain] == [n for n, _ in kept]
    for (name, a), (_, b) in zip(plain, kept):
        assert b - a == (LOGITS if name.startswith("backward") else 0), name
    assert 2_201_052 - 2_069_980 == LOGITS


def test_chunked_loss_runs_outside_the_root_by_hand():
    """torchtune's chunked cross-entropy runs on the returned logits: the root's post-forward has resharded the
    root (embeddings, final norm, head) and freed the last block's all-gather output before it, and the root's
    pre-backward (a hook on the logits) runs after its backward, so the unshard follows backward:loss and holds
    the root's all-gather output and unsharded parameters beside the logits' gradient."""
    t = _t(gpus=3, loss="chunked")
    root = group_bytes(_plan(), t, 3, 0)[None]
    # the root at 3 ranks: embeddings and head 512 rows padded to 171 x 3 = 513, x 64 x 4 bytes each; the norm 22 x 3
    assert root.unsharded == root.all_gather == 2 * 513 * 64 * 4 + 66 * 4 == 262_920
    events = {name: parts for name, _, parts in _parts(_plan(), t)}
    names = [name for name, _, _ in _parts(_plan(), t)]
    assert names.index("backward:unshard") == names.index("backward:loss") + 1
    assert events["forward"]["unsharded_params"] == 0 and events["forward"]["all_gather_buffers"] == 0
    assert events["backward:loss"]["unsharded_params"] == 0 and events["backward:loss"]["all_gather_buffers"] == 0
    unshard = events["backward:unshard"]
    assert (unshard["unsharded_params"], unshard["all_gather_buffers"]) == (262_920, 262_920)
    assert unshard["logits_loss"] == LOGITS + 8  # the logits' gradient, the loss and its ones_like gradient (fp32)
    # the head's matmul inside the root's forward: the root gathered and block 1's all-gather output alive
    assert events["forward:head"]["unsharded_params"] == 262_920 and events["forward:head"]["logits_loss"] == LOGITS


def test_ddp_is_the_one_gpu_loop_plus_its_buckets():
    """DDP's step is the one-GPU loop (accumulation, clipping, kept outputs) with the reducer's buckets, one
    fp32 gradient of every parameter: 591,104 bytes on tiny-llama. With two micro-batches the second holds
    micro-batch 1's gradients (591,104 more) through its backward: 3,404,700 + 591,104 = 3,995,804, traced."""
    plan = _plan()
    for kw in (dict(grad_accum=2), dict(max_grad_norm=1.0), dict(keep_outputs=True), dict(loss="chunked")):
        one = timeline(plan, _t(sharding="none", **kw))
        ddp = rank_memory(plan, _t(gpus=2, sharding="ddp", **kw), 0)
        assert ddp.peak_bytes == one.peak_bytes + bucket_bytes(plan, _t()) == one.peak_bytes + 591_104
    assert rank_memory(plan, _t(gpus=2, sharding="ddp"), 0).peak_bytes + 591_104 == 3_995_804


@pytest.mark.parametrize("kw, what", [
    (dict(sharding="zero2", keep_outputs=True), "keep_outputs under sharding zero2"),
    (dict(sharding="zero1", loss="chunked"), "loss under sharding zero1"),
    (dict(sharding="fsdp", loss="liger"), "loss under sharding fsdp"),
    (dict(sharding="ddp", loss="cce"), "loss under sharding ddp"),
])
def test_what_is_not_modelled_is_refused(kw, what):
    with pytest.raises(CombinationError, match=what):
        sharded_timeline(_plan(), _t(gpus=2, **kw))


def _parts(plan, t):
    """Rank 0's events with their parts (rank_memory keeps the bytes only)."""
    return loop_recipes(plan, t, EVENTS[t.sharding](plan, t, 0), 0)
