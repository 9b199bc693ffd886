"""peftcalc.sharding.fsdp against hand derivations of FSDP2's shards (torch/distributed/fsdp/_fully_shard/
_fsdp_param.py, _fsdp_collectives.py) and against rank 0's trace on the fake process group
(reports/data/dist.jsonl holds more; tests/measure/test_dist.py traces one here)."""

import subprocess
import sys
from pathlib import Path

import pytest

from peftcalc import estimate
from peftcalc.errors import CombinationError, InputError
from peftcalc.format import render_estimate_text
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.config import load_spec
from peftcalc.settings import TrainingSettings
from peftcalc.sharding import rank_memory, sharded_timeline
from peftcalc.sharding.fsdp import fsdp_events, group_bytes
from peftcalc.sharding.shards import local_rows, padded_rows

ROOT = Path(__file__).resolve().parents[3]
# measure/matrices/dist.toml's tiny-llama: hidden 64, 2 layers, 4 heads, intermediate 128, vocab 512 (untied)
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}


def _plan(method="full"):
    return make_plan(load_spec(dict(TINY)), MethodSettings(method=method))


def _t(**kw):
    return TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", "device": "cpu", "optimizer": "adamw",
                               "sharding": "fsdp", **kw})


def test_torch_chunk_rows():
    # torch.chunk(64 rows, 3) -> 22, 22, 20; (512, 1024) -> 1 row for the first 512 ranks, none after
    assert padded_rows(64, 3) == 22 and [local_rows(64, 3, r) for r in range(3)] == [22, 22, 20]
    assert padded_rows(512, 1024) == 1 and local_rows(512, 1024, 511) == 1 and local_rows(512, 1024, 512) == 0


def test_block_group_bytes_by_hand_at_three_ranks():
    # a block: q, k, v, o (64 x 64): 22 of 64 rows padded -> 22 x 64 each; gate, up (128 x 64): 43 x 64;
    # down (64 x 128): 22 x 128; two RMSNorm weights (64): 22 each; fp32
    shard = 4 * 22 * 64 + 2 * 43 * 64 + 22 * 128 + 2 * 22
    g = group_bytes(_plan(), _t(gpus=3), 3, 0)[0]
    assert g.sharded_trainable == 4 * shard
    assert g.all_gather == g.unsharded == g.reduce_scatter == 3 * 4 * shard
    # rank 2's rows: q, k, v, o, down and the norms 20 of 64, gate and up 42 of 128
    last = group_bytes(_plan(), _t(gpus=3), 3, 2)[0]
    assert sum(n for n, _ in last.optimizer_numel) == 4 * 20 * 64 + 2 * 42 * 64 + 20 * 128 + 2 * 20


def test_traced_rank0_peaks():
    """Rank 0's peak and step 1 of tiny-llama, traced on the fake process group (measure/dist.py, the rows of
    reports/data/dist.jsonl), to the byte."""
    cases = [("full", dict(gpus=8), 1688700, 1540840), ("full", dict(gpus=3), 2069980, 1670680),
             ("lora", dict(gpus=8), 1350152, 1346024),
             ("full", dict(gpus=8, reshard_after_forward=False), 1887372, 1739512),
             # the defaults: fused AdamW, LoRA under bf16 (fp32 adapters beside the bf16 base)
             ("full", dict(gpus=3, optimizer="adamw-fused"), 2069980, 1670680),
             ("lora", dict(gpus=3, precision="bf16", optimizer="adamw-fused"), 1043792, 1031984),
             ("lora", dict(gpus=64, precision="bf16"), 960370, 958034),
             ("full", dict(gpus=3, precision="mixed-bf16"), 1573968, 1174668),
             ("full", dict(gpus=64, precision="mixed-bf16", optimizer="adamw-fused"), 1000792, 982236)]
    for method, kw, peak, step1 in cases:
        r = rank_memory(_plan(method), _t(**kw), 0)
        assert (r.peak_bytes, r.step1_peak_bytes) == (peak, step1), (method, kw)


def test_last_rank_reported_where_padding_differs():
    _, ranks = sharded_timeline(_plan(), _t(gpus=3))
    assert [r.rank for r in ranks] == [0, 2]
    assert ranks[1].peak_bytes < ranks[0].peak_bytes  # fewer rows of optimizer state
    _, even = sharded_timeline(_plan(), _t(gpus=8))
    assert [r.rank for r in even] == [0]


def test_estimate_reports_ranks():
    e = estimate(dict(TINY), method="full", precision="fp32", optimizer="adamw", batch_size=2, seq_len=32, device="cpu", gpus=3,
                 sharding="fsdp")
    assert e.memory.peak_bytes == 2069980 and [r["rank"] for r in e.memory.ranks] == [0, 2]
    assert e.memory.components["unsharded_params"] > 0 and sum(e.memory.components.values()) == 2069980


@pytest.mark.parametrize("kw, error", [
    (dict(gpus=0, sharding="fsdp"), InputError),
    (dict(gpus=12, gpus_per_node=8, sharding="hsdp"), CombinationError),
    (dict(gpus=4), CombinationError),  # several GPUs need a sharding
    (dict(gpus=2, sharding="ddp", precision="mixed-bf16"), CombinationError),
    (dict(gpus=2, sharding="zero2", offload="params"), CombinationError),
    (dict(gpus=2, sharding="ddp", offload="optimizer"), CombinationError),
    (dict(gpus=2, sharding="fsdp", method="qlora", prepare_kbit=True), CombinationError),  # prepare_model_for_kbit_training asked for
    (dict(gpus=2, sharding="fsdp", method="qlora", prepare_kbit=False, precision="fp32"), CombinationError),
    (dict(gpus=2, sharding="zero1", reshard_after_forward=False), CombinationError),
])
def test_bad_parallel_settings(kw, error):
    kw = {"method": "full", "optimizer": "adamw", **kw}
    with pytest.raises(error):
        estimate(dict(TINY), **kw)


def test_cli_bad_gpus_is_one_line_exit_2():
    for args, message in ((["--gpus", "0", "--sharding", "fsdp"], "--gpus must be a positive integer or 'auto', got 0"),
                          (["--gpus", "12", "--sharding", "hsdp"], "--gpus-per-node (8) must divide --gpus (12)"),
                          # full fine-tuning of 1.2B parameters in fp32 at 8 x 8192 tokens does not fit one H100,
                          # and without a sharding more GPUs do not help
                          (["-m", "full", "--precision", "fp32", "-b", "8", "-s", "8192", "--gpus", "auto"],
                           "one H100 80GB does not hold this step and --sharding none gives every GPU all of it; "
                           "use a --sharding that splits the model (fsdp, hsdp, zero1, zero2)")):
        proc = subprocess.run([sys.executable, "-m", "peftcalc.cli", "estimate", "llama-3.2-1b", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr


def test_fused_adamw_states_on_cuda_by_hand():
    """torch/optim/adam.py _init_group with fused=True: exp_avg and exp_avg_sq like each local shard and a float32
    'step' on the parameter's device (one 512-byte CUDA block each). tiny-llama at 8 ranks divides evenly: rank 0
    holds 147,776 / 8 = 18,472 fp32 elements of its 21 parameters (embeddings, head, final norm, 2 x 9 per block)."""
    events = fsdp_events(_plan(), _t(gpus=8, optimizer="adamw-fused", device="cuda"), 0)
    optimizer = [parts for name, _, parts in events if name == "optimizer"][-1]
    assert optimizer["optimizer_states"] == 2 * 4 * 18_472 + 21 * 512
    assert optimizer["temporaries"] == 0  # _fused_adamw_ updates in place


def test_lora_under_bf16_names_its_wrapping():
    e = estimate(dict(TINY), method="lora", precision="bf16", batch_size=2, seq_len=32, device="cpu", gpus=3,
                 sharding="fsdp")
    assert e.training.optimizer == "adamw-fused" and e.memory.peak_bytes == 1043792
    assert "the LoRA adapters stay float32 beside the bf16 base" in render_estimate_text(e)


def test_mixed_bf16_group_bytes_by_hand_at_three_ranks():
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) over fp32 parameters: fp32 shards and
    reduce-scatter buffers, bf16 all-gather output, unsharded parameters and autograd gradients (the block of
    test_block_group_bytes_by_hand_at_three_ranks: 10,604 padded elements per rank of 31,936 elements)."""
    rows = 4 * 22 * 64 + 2 * 43 * 64 + 22 * 128 + 2 * 22
    g = group_bytes(_plan(), _t(gpus=3, precision="mixed-bf16"), 3, 0)[0]
    assert g.sharded_trainable == g.sharded_grads == 4 * rows
    assert g.all_gather == g.unsharded == 3 * 2 * rows
    assert g.reduce_scatter == 3 * 4 * rows
    assert g.unsharded_grads == 2 * (4 * 64 * 64 + 3 * 128 * 64 + 2 * 64)


def test_mixed_bf16_refused_for_other_adapters_and_clipping_adds_an_event():
    for method, name in (("ia3", "ia3"), ("prompt", "prompt")):
        with pytest.raises(CombinationError, match=f"{name} under mixed-bf16"):
            estimate(dict(TINY), method=method, precision="mixed-bf16", gpus=3, sharding="fsdp")
    with pytest.raises(CombinationError, match="dora under mixed-bf16"):
        estimate(dict(TINY), method="lora", dora=True, precision="mixed-bf16", gpus=3, sharding="fsdp")
    clipped = rank_memory(_plan(), _t(gpus=3, precision="mixed-bf16", max_grad_norm=1.0), 0)
    names = [n for n, _ in clipped.events]
    assert names[-2:] == ["optimizer:clip", "optimizer"]
    # the total norm (a 0-dim fp32 tensor on cpu) beside the optimizer step's temporaries
    plain = rank_memory(_plan(), _t(gpus=3, precision="mixed-bf16"), 0)
    assert clipped.events[-1][1] == plain.events[-1][1] + 4


def test_grad_accum_holds_the_sharded_gradients():
    """From micro-batch 2 on every group's reduce-scatter output of micro-batch 1 (the sharded gradients, padded
    shards: 199,608 fp32 bytes on rank 0 of 3) is held beside the repeated micro-batch; traced: 2,269,588 bytes,
    step 1 1,870,288 (rank 0, tiny-llama full fp32 at 3 ranks, two micro-batches)."""
    one = rank_memory(_plan(), _t(gpus=3), 0)
    two = rank_memory(_plan(), _t(gpus=3, grad_accum=2), 0)
    held = sum(g.sharded_grads for g in group_bytes(_plan(), _t(gpus=3), 3, 0).values())
    assert held == 199_608 and two.peak_bytes - one.peak_bytes == held
    assert (two.peak_bytes, two.step1_peak_bytes) == (2269588, 1870288)
    e = estimate(dict(TINY), method="full", precision="fp32", optimizer="adamw", batch_size=2, seq_len=32, device="cpu",
                 gpus=3, sharding="fsdp", grad_accum=2)
    assert e.memory.peak_micro_batch == 2


def test_first_copy_out_holds_the_roots_all_gather_output():
    """Block 0's pre-forward copy-out (wait_for_unshard keeps the root's all-gather result until it returns): the
    root's all-gather output (embeddings, final norm, head: 65,600 fp32 = 262,400 bytes) and unsharded parameters,
    block 0's all-gather output and unsharded parameters (172,544 bytes at 2 ranks: 41,088 base + 2,048 LoRA
    elements, fp32) on the states (320,256 bytes), the rotary cos and sin (512), the embeddings' output (1 x 4 x 64
    fp32: 1,024) and the position ids (32): tiny-llama LoRA at batch 1 x 4 tokens, traced 1,191,712, step 1
    1,175,296 (rank 0 of 2, checkpointing)."""
    t = _t(gpus=2, batch_size=1, seq_len=4, grad_checkpointing=True)
    r = rank_memory(_plan("lora"), t, 0)
    assert r.peak_phase == "forward:copy-out"
    assert r.peak_bytes == 320_256 + 2 * 262_400 + 2 * 172_544 + 512 + 1_024 + 32 == 1191712
    assert r.step1_peak_bytes == 1175296


def test_last_copy_out_of_llama_70b_lora_at_five_ranks():
    """The README's Llama-3.1-70B LoRA fp32 at 5 ranks with checkpointing, traced on the fake process group (rank 0,
    batch 1 x 2,048): the peak is the last block's pre-forward copy-out, blocks 78's and 79's all-gather outputs
    (2 x 3.42 GB), block 79's unsharded parameters and the root's, on 79 checkpoint inputs."""
    e = estimate("llama-3.1-70b", method="lora", precision="fp32", optimizer="adamw", batch_size=1, seq_len=2048,
                 grad_checkpointing=True, device="cpu", gpus=5, sharding="fsdp")
    assert e.memory.peak_phase == "forward:copy-out"
    assert (e.memory.peak_bytes, e.memory.step1_peak_bytes) == (80551115760, 80520701680)


def test_hsdp_rank_holds_what_an_fsdp_rank_of_its_node_holds():
    """HSDP on a (2, 4) mesh: sharded over 4 ranks, replicated twice; traced 1,910,364 bytes, step 1 1,614,728,
    as FSDP2 at 4 ranks; the replicas all-reduce the sharded gradients (2 x (2 - 1) / 2 of them per step)."""
    from peftcalc.sharding.comm import communication

    hsdp, fsdp = _t(gpus=8, gpus_per_node=4, sharding="hsdp"), _t(gpus=4)
    r = rank_memory(_plan(), hsdp, 0)
    assert (r.peak_bytes, r.step1_peak_bytes) == (1910364, 1614728) == (
        rank_memory(_plan(), fsdp, 0).peak_bytes, rank_memory(_plan(), fsdp, 0).step1_peak_bytes)
    held = sum(g.sharded_grads for g in group_bytes(_plan(), fsdp, 4, 0).values())
    c = communication(_plan(), hsdp)
    assert c.all_reduce == held and c.reduce_scatter == communication(_plan(), fsdp).reduce_scatter


def test_lora_under_mixed_bf16_group_bytes_by_hand_at_three_ranks():
    """LoRA (r 8 on q_proj and v_proj) over an fp32 base under MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32): param_dtype casts the frozen base and the trainable adapters alike
    (_fsdp_param.py FSDPParam.init_dtype_attrs). Block 0 at 3 ranks: the base's 13,996 padded rows of
    test_block_group_bytes_by_hand_at_three_ranks, each adapter's lora_A (8 x 64: 3 of 8 rows padded, 192) and
    lora_B (64 x 8: 22 of 64 rows, 176); fp32 shards (4 x 736 trainable), a bf16 all-gather output and unsharded
    parameters (3 x 2 x (13,996 + 736)), bf16 autograd gradients of the 2,048 adapter elements, an fp32
    reduce-scatter input (3 x 2,944)."""
    g = group_bytes(_plan("lora"), _t(gpus=3, precision="mixed-bf16"), 3, 0)[0]
    assert (g.sharded_frozen, g.sharded_trainable, g.sharded_grads) == (4 * 13_996, 4 * 736, 4 * 736)
    assert g.all_gather == g.unsharded == 3 * 2 * (13_996 + 736) == 88_392
    assert g.unsharded_grads == 2 * 2 * (512 + 512) and g.reduce_scatter == 3 * 4 * 736


def test_lora_under_mixed_bf16_traced_rank0_peaks():
    """tiny-llama LoRA under mixed-bf16, traced on the fake process group (rows of reports/data/dist.jsonl): the
    adapters computed in bf16 (peft casts the input to lora_A.weight.dtype, bf16 once all-gathered), to the byte;
    fused AdamW with clipping peaks at the same moment (the loss's backward)."""
    for kw, peak in ((dict(gpus=3), 1085932), (dict(gpus=8), 946312), (dict(gpus=64), 893308),
                     (dict(gpus=8, optimizer="adamw-fused", max_grad_norm=1.0), 946312)):
        r = rank_memory(_plan("lora"), _t(precision="mixed-bf16", **kw), 0)
        assert (r.peak_bytes, r.peak_phase) == (peak, "backward:loss"), kw


def test_qlora_group_bytes_by_hand_at_two_ranks():
    """QLoRA with NF4 packed in bf16 (bnb_4bit_quant_storage=bfloat16: functional.quantize_4bit's ((numel + 1) // 4,
    1) bf16 tensor), sharded on dim 0 by fully_shard. Block 0 of tiny-llama at 2 ranks: q, k, v, o (4,096 elements:
    1,024 packed rows, 512 each, 1,024 bytes), gate, up, down (8,192: 2,048 rows, 2,048 bytes), two bf16 norms (32
    rows, 64 bytes); each double-quantized QuantState whole (64 or 128 8-bit absmax, one fp32 second-level absmax
    and offset, the 16-level NF4 code and the 256-entry nested code: 1,160 or 1,224 bytes); LoRA r8 on q and v,
    fp32 (lora_A 4 of 8 rows, lora_B 32 of 64: 1,024 bytes each)."""
    t = _t(gpus=2, precision="bf16")
    plan = make_plan(load_spec(dict(TINY)), MethodSettings(method="qlora", prepare_kbit=False))
    g = group_bytes(plan, t, 2, 0)[0]
    packed = 4 * 1_024 + 3 * 2_048 + 2 * 64
    assert g.sharded_frozen == packed + 4 * (64 + 4 + 4 + 64 + 1_024) + 3 * (128 + 4 + 4 + 64 + 1_024) == 18_680
    assert g.sharded_trainable == 4 * 1_024 and g.all_gather == g.unsharded == 2 * (packed + 4 * 1_024)
    assert g.unsharded_grads == 4 * 2_048


def test_qlora_traced_rank0_peaks():
    """tiny-llama QLoRA (bf16, NF4 packed in bf16, no prepare_model_for_kbit_training) traced on the fake process
    group (measure/dist.py _sharded_qlora; rows of reports/data/dist.jsonl), to the byte."""
    plan = make_plan(load_spec(dict(TINY)), MethodSettings(method="qlora", prepare_kbit=False))
    r = rank_memory(plan, _t(gpus=2, precision="bf16"), 0)
    assert (r.peak_bytes, r.peak_phase) == (989720, "backward:loss")


def test_sharded_qlora_skips_prepare_kbit_by_default_as_trl_does():
    """TRL's SFTTrainer skips prepare_model_for_kbit_training for a sharded QLoRA model (sft_trainer.py
    _prepare_peft_model: is_sharded_qlora), so under FSDP2 QLoRA's default is prepare_kbit off: the default
    estimate is the committed fake-group trace of Llama-3.2-1B QLoRA bf16 at 8 ranks (dist.jsonl, recorded with
    qlora_prepare_kbit false), 3,788,820,936 bytes; asked for explicitly, prepare_kbit is still refused."""
    kw = dict(method="qlora", precision="bf16", optimizer="adamw-fused", batch_size=1, seq_len=1024,
              max_grad_norm=1.0, gpus=8, sharding="fsdp", device="cpu")
    assert estimate("llama-3.2-1b", **kw).memory.peak_bytes == 3_788_820_936
    with pytest.raises(CombinationError, match="prepare_model_for_kbit_training"):
        estimate("llama-3.2-1b", prepare_kbit=True, **kw)
    one_gpu = {k: estimate("llama-3.2-1b", method="qlora", prepare_kbit=k).memory.peak_bytes for k in (None, True, False)}
    assert one_gpu[None] == one_gpu[True] != one_gpu[False]  # on one GPU the default stays on


def test_root_reduce_under_mixed_bf16_traced_rank0_peaks():
    """tiny-llama-v4k (vocabulary 4,096) full fine-tuning under mixed-bf16 at batch 1, sequence 8, traced on the
    fake process group (the last rows of reports/data/dist.jsonl), to the byte. The peak is the root's final
    reduce-scatter: _fsdp_collectives.py ``foreach_reduce`` allocates the float32 output (at 3 ranks 1,366 +
    1,366 + 22 padded rows of 64 -> 174,870 elements, 699,480 B) after ``unsharded_grads.clear()`` while the
    float32 input (3 x 174,870 x 4 = 2,098,440 B) and lm_head's bf16 full gradient (4,096 x 64 x 2 = 524,288 B,
    held by the loop variable of the Shard(i > 0) check) are alive; the copy-in moment before it, with all of the
    root's bf16 full gradients (2 x 524,288 + 128 B) in place of the output and lm_head's gradient, is 175,064 B
    smaller. The same with the chunked loss and with reshard_after_forward off."""
    config = dict(TINY, vocab_size=4096)
    plan = make_plan(load_spec(config), MethodSettings(method="full"))
    base = dict(batch_size=1, seq_len=8, precision="mixed-bf16", optimizer="adamw-fused")
    for kw, peak in ((dict(gpus=3), 5868740), (dict(gpus=8), 4097212), (dict(gpus=3, loss="chunked"), 5868740),
                     (dict(gpus=3, reshard_after_forward=False), 5868740)):
        r = rank_memory(plan, _t(**base, **kw), 0)
        assert (r.peak_bytes, r.peak_phase) == (peak, "backward:reduce"), kw
    reduce = {name: p for name, _, p in fsdp_events(plan, _t(**base, gpus=3))}["backward:reduce"]
    assert reduce["reduce_scatter_buffers"] == 3 * 174870 * 4 and reduce["unsharded_gradients"] == 4096 * 64 * 2
    assert reduce["gradients"] == 174870 * 4 + 2 * 13996 * 4  # the root's shards and the two blocks'
