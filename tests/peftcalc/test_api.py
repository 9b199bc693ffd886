"""The Python API: estimate's GPU fit and batch limits, FLOPs by hand, sweep."""

from dataclasses import replace

import pytest

import peftcalc
from peftcalc.api import RANK_METHODS, gpu_max_batch
from peftcalc.hardware import find_gpu, step_flops
from peftcalc.memory import reserved_bytes, timeline
from peftcalc.errors import InputError
from peftcalc.methods import MethodSettings, make_plan, methods_for
from peftcalc.settings import TrainingSettings
from peftcalc.config import load_spec


def test_max_batch_is_the_largest_batch_that_fits():
    """The closed form (memory is linear in the batch at every event) against a direct search."""
    plan = make_plan(load_spec("llama-3.1-8b"), MethodSettings("qlora"))
    t = TrainingSettings(seq_len=2048, grad_checkpointing=True)
    for name in ("RTX 4090", "A100 80GB"):
        gpu = find_gpu(name)
        b = gpu_max_batch(plan, t, gpu)
        assert b >= 1
        assert reserved_bytes(timeline(plan, replace(t, batch_size=b)).peak_bytes) <= gpu.memory_bytes
        assert reserved_bytes(timeline(plan, replace(t, batch_size=b + 1)).peak_bytes) > gpu.memory_bytes


def test_full_finetune_flops_are_6n_per_token_plus_attention():
    """Full fine-tuning of GPT-2 small: every matmul weight (the 12 x (3+1+4+4) x 768^2 block weights
    and the tied 768 x 50257 lm_head) costs 2 FLOPs per token forward and 4 backward (input and weight
    gradients); attention adds 4 * s * d per token and layer forward and twice that backward."""
    spec = load_spec("gpt2")
    plan = make_plan(spec, MethodSettings("full"))
    b, s, d = 2, 256, 768
    matmul_weights = 12 * (3 + 1 + 4 + 4) * d * d + d * 50257
    attention = 12 * 4 * b * s * s * d
    f = step_flops(plan, TrainingSettings(batch_size=b, seq_len=s, precision="fp32"), s)
    assert f.forward == 2 * matmul_weights * b * s + attention
    assert f.backward == 4 * matmul_weights * b * s + 2 * attention
    assert f.recompute == 0


def test_lora_backward_skips_weight_gradients_of_frozen_layers():
    """LoRA on q,v of every layer: frozen matmuls run backward once (input gradient) above layer 0;
    layer 0's frozen matmuls run no backward, its LoRA pair does."""
    spec = load_spec("llama-2-7b")
    plan = make_plan(spec, MethodSettings("lora", rank=8))
    b, s = 1, 128
    f = step_flops(plan, TrainingSettings(batch_size=b, seq_len=s), s)
    h, inter, v, layers = 4096, 11008, 32000, 32
    per_layer = 4 * h * h + 3 * h * inter
    lora = 2 * 8 * (h + h)
    attention = 4 * b * s * s * h
    fwd = 2 * (layers * (per_layer + lora) + h * v) * b * s + layers * attention
    bwd = (2 * ((layers - 1) * per_layer + h * v) + 2 * 2 * layers * lora) * b * s + 2 * layers * attention
    assert f.forward == fwd and f.backward == bwd


def test_estimate_fits_and_cost():
    e = peftcalc.estimate("llama-3.1-8b", method="qlora", rank=16, batch_size=4, seq_len=4096,
                          grad_checkpointing=True, gpu="A100 80GB", price=2.0, dataset_tokens=1_000_000)
    assert e.params.trainable == 32 * 16 * ((4096 + 4096) + (4096 + 1024))  # q_proj and v_proj (GQA: 1024 out)
    assert e.cost.gpu == "A100 80GB" and e.cost.price_per_hour == 2.0
    assert e.cost.steps_per_epoch == -(-1_000_000 // (4 * 4096))
    assert abs(e.cost.epoch_cost_usd - e.cost.epoch_hours * 2.0) < 1e-9
    fit = {g.name: g for g in e.gpus}
    assert fit["H200"].fits and fit["H200"].max_batch_size >= 4


def test_sweep_returns_one_row_per_combination():
    df = peftcalc.sweep("llama-3.2-1b", method=["lora", "full"], batch_size=[1, 2, 4], seq_len=[256, 1024])
    assert len(df) == 12
    assert set(df["method"]) == {"lora", "full"}
    one = df[(df.method == "lora") & (df.batch_size == 1) & (df.seq_len == 256)].iloc[0]
    e = peftcalc.estimate("llama-3.2-1b", method="lora", batch_size=1, seq_len=256)
    assert one.peak_bytes == e.memory.peak_bytes and one.params_trainable == e.params.trainable
    assert (df.groupby(["method", "seq_len"])["peak_bytes"].apply(lambda s: s.is_monotonic_increasing)).all()


def _clear_calculator_caches():
    """Empty every lru_cache of the calculator, so what runs next recomputes from scratch."""
    import sys

    for name, module in list(sys.modules.items()):
        if not name.startswith("peftcalc"):
            continue
        for obj in vars(module).values():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()


CONFIGS = __import__("pathlib").Path(__file__).parent / "configs"
SWEEP_FIGURES = ("params_total", "params_trainable", "peak_bytes", "peak_phase", "reserved_bytes", "step1_peak_bytes")


@pytest.mark.parametrize("model", ["gpt2", "llama-3.2-1b", str(CONFIGS / "llava_tiny.json"),
                                   str(CONFIGS / "blip2_tiny.json")])
def test_sweep_rows_are_the_estimates(model):
    """A sweep computes each distinct configuration once (api._memory_key: the rank of a method without
    LoRA layers is never read, so full/adapter/ia3/... at ranks 4 and 16 share one computation) and its
    timelines in one pass; every row must still be what estimate() gives for that configuration alone,
    computed from empty caches: every method the model takes, checkpointing off and on, four precisions."""
    spec = load_spec(model)
    methods = []
    for method in methods_for(spec):
        try:
            make_plan(spec, MethodSettings(method, rank=4))
            methods.append(method)
        except InputError:  # e.g. bitfit on a model without biases
            pass
    grid = dict(method=methods, rank=[4, 16], batch_size=[1, 3], seq_len=[48], grad_checkpointing=[False, True],
                precision=["fp32", "bf16", "amp-bf16", "amp-fp16"])
    df = peftcalc.sweep(model, **grid)
    assert len(df) == len(methods) * 2 * 2 * 2 * 4
    _clear_calculator_caches()
    for row in df.to_dict("records"):
        if isinstance(row["error"], str):  # the one combination that cannot run (peft#869)
            assert row["method"] == "prefix" and row["grad_checkpointing"], row
            continue
        rank = {"rank": row["rank"]} if row["method"] in RANK_METHODS else {}  # estimate refuses a rank it ignores
        e = peftcalc.estimate(model, method=row["method"], **rank, batch_size=row["batch_size"],
                              seq_len=row["seq_len"], grad_checkpointing=row["grad_checkpointing"],
                              precision=row["precision"])
        expected = dict(zip(SWEEP_FIGURES, (e.params.total, e.params.trainable, e.memory.peak_bytes,
                                            e.memory.peak_phase, e.memory.reserved_bytes, e.memory.step1_peak_bytes)))
        expected.update({f"mem_{k}": v for k, v in e.memory.components.items()})
        assert {k: row[k] for k in expected} == expected, row


def test_sweep_keeps_impossible_combinations_as_rows_with_the_reason():
    """GPT-2 has 1,024 learned positions: 1,020 tokens plus prefix tuning's 20 virtual ones do not fit;
    prefix tuning cannot run with checkpointing (peft#869). Those rows carry the reason, no figures."""
    df = peftcalc.sweep("gpt2", method=["lora", "prefix"], seq_len=[512, 1020], grad_checkpointing=[False, True])
    assert len(df) == 8
    bad = df[df["error"].notna()]
    assert [(r.method, r.seq_len, r.grad_checkpointing) for r in bad.itertuples()] == [
        ("prefix", 512, True), ("prefix", 1020, False), ("prefix", 1020, True)]
    assert bad["peak_bytes"].isna().all()
    assert "exceeds gpt2's 1024 positions" in bad["error"].iloc[1]
    ok = df[df["error"].isna()]
    assert str(ok["peak_bytes"].dtype) == "Int64" and ok["peak_bytes"].notna().all()
    with pytest.raises(InputError, match="unknown precision"):  # a bad value still fails the sweep
        peftcalc.sweep("gpt2", precision=["bf16", "bf17"])


@pytest.mark.parametrize("model,kw,message", [
    ("gpt2", dict(seq_len=1025), "seq_len 1025 exceeds gpt2's 1024 positions"),
    ("gpt2", dict(method="prompt", seq_len=1005), "seq_len 1005 \\+ 20 virtual tokens exceeds gpt2's 1024"),
    ("bert-base", dict(method="full", seq_len=513), "exceeds bert-base's 512 positions"),
    ("roberta-base", dict(method="full", seq_len=513), "exceeds roberta-base's 512 positions"),
    ("blip2-opt-2.7b", dict(seq_len=2017), "seq_len 2017 \\+ 32 query tokens exceeds blip2-opt-2.7b's 2048"),
    ("llama-3.2-1b", dict(method="prefix", grad_checkpointing=True), "peft#869"),
])
def test_combinations_the_real_stack_cannot_run_are_input_errors(model, kw, message):
    """Learned positions (GPT2Config n_positions 1024, BERT max_position_embeddings 512, RoBERTa 514 minus
    padding_idx + 1, OPT 2048 with BLIP-2's 32 queries first), and prefix tuning with gradient
    checkpointing, which fails in transformers 5.23 / peft 0.21.2 on a real CPU step (tiny-llama 2 x 32:
    "The size of tensor a (32) must match the size of tensor b (52) at non-singleton dimension 3")."""
    with pytest.raises(InputError, match=message):
        peftcalc.estimate(model, **kw)
    assert peftcalc.estimate("gpt2", seq_len=1024).memory.peak_bytes > 0  # the limit itself fits
