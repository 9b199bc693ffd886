"""Checkpointing every N blocks (transformers activation_checkpointing_enable(every_n_layers=N)) and
reentrant checkpointing (use_reentrant=True) against traced steps.

Every traced figure is a committed row of reports/data/ckpt-modes.jsonl (its key is given), measured by

    python -c "from measure.matrix import run_matrix; run_matrix('ckpt-modes', 'reports/data/ckpt-modes.jsonl')"

(two steps, the steady-state step's peak; the tiny models are measure/matrices/ckpt-modes.toml's
[models.*]). A single row is re-measured with measure.run.measure_one(spec, MethodSettings(...),
TrainingSettings(..., grad_checkpointing=True, checkpoint_every=N, checkpoint_reentrant=R), device,
steps=2); what was live at its peak with measure.tracer.StorageTracer.live_records(peak_seq)."""


import pytest

from peftcalc import estimate, sweep
from peftcalc.api import plan_for
from peftcalc.activations import activation_profile
from peftcalc.checkpointing import checkpointed_layers, checkpointing_layer_stacks
from peftcalc.errors import CombinationError, InputError
from peftcalc.hardware import step_flops
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from matrix_models import matrix_spec



def tiny(name: str):
    return matrix_spec(name, "ckpt-modes")


def ckpt(every: int = 1, reentrant: bool = False, precision: str = "fp32", batch: int = 2, seq: int = 64,
         device: str = "cpu") -> dict:
    return dict(batch_size=batch, seq_len=seq, precision=precision, grad_checkpointing=True, checkpoint_every=every,
                checkpoint_reentrant=reentrant, device=device)


def test_which_layers_are_wrapped():
    """Hand derivation from transformers' _set_gradient_checkpointing: layer_index counts every
    GradientCheckpointingLayer in model.modules() order and wraps those with index % N == 0. tiny-llava3:
    3 CLIP layers (indices 0-2), then 4 Llama blocks (3-6): every 2 wraps vision 0 and 2, text 1 and 3;
    every 3 wraps vision 0, text 0 and 3. tiny-blip2: 2 EVA layers, 2 Q-Former layers, 2 OPT blocks:
    every 3 wraps EVA 0 and Q-Former 1, no OPT block. (tests/measure/test_checkpoint_harness.py checks the
    same flags on the real models.)"""
    llava, blip2 = tiny("tiny-llava3"), tiny("tiny-blip2")
    assert checkpointing_layer_stacks(llava) == (("vision", 3), ("text", 4))
    t2, t3 = TrainingSettings(**ckpt(2)), TrainingSettings(**ckpt(3))
    assert checkpointed_layers(llava, t2, "vision") == (True, False, True)
    assert checkpointed_layers(llava, t2, "text") == (False, True, False, True)
    assert checkpointed_layers(llava, t3, "text") == (True, False, False, True)
    assert checkpointing_layer_stacks(blip2) == (("vision", 2), ("qformer", 2), ("text", 2))
    assert checkpointed_layers(blip2, t3, "qformer") == (False, True)
    assert checkpointed_layers(blip2, t3, "text") == (False, False)
    assert checkpointed_layers(tiny("tiny-llama4"), TrainingSettings(**ckpt(3)), "text") == (True, False, False, True)
    assert checkpointed_layers(tiny("tiny-llama4"), TrainingSettings(grad_checkpointing=False)) == ()


# (model, method, settings, ckpt-modes.jsonl key, traced peak on the CPU)
TRACED = [
    ("tiny-llama4", "lora", ckpt(), "ab4d1a8daa4b9aa3", 2_239_368),
    ("tiny-llama4", "lora", ckpt(2), "3d238083adf4e2d3", 2_807_688),
    ("tiny-llama4", "lora", ckpt(3), "1964631d6e789109", 3_376_008),
    ("tiny-llama4", "lora", ckpt(1, True), "c3c7ba68a3d9b798", 2_272_136),
    ("tiny-llama4", "lora", ckpt(2, True), "3e8465f56622e5e7", 2_814_856),
    ("tiny-llama4", "lora", ckpt(3, True), "af85689447f9aa56", 3_408_776),
    ("tiny-gpt2-4", "full", ckpt(2), "4d93a33c1c9ef760", 5_916_888),
    ("tiny-gpt2-4", "full", ckpt(3, True), "60b7df1e5cf4f380", 7_128_024),
    ("tiny-bert-3", "lora", ckpt(1, True, "amp-bf16"), "afb11f252a214c83", 1_903_416),
    ("tiny-bert-3", "lora", ckpt(1, False, "amp-bf16"), "92937b29cb7de069", 1_919_800),
    ("tiny-vit4", "lora", ckpt(), "3564c4f46808ebc8", 1_843_776),
    ("tiny-vit4", "lora", ckpt(1, True), "48a29a2e5d1d96b4", 1_909_824),
    ("tiny-vit4", "lora", ckpt(2, True), "88d77e403272aaf0", 2_230_016),
    ("tiny-llava3", "lora", ckpt(2, seq=32), "e8ef656e17f0e864", 3_418_560),
    ("tiny-llava3", "lora", ckpt(2, True, seq=32), "c6ff67241462c60c", 3_443_136),
    ("tiny-blip2", "qformer", ckpt(3, seq=16), "2c6e8c0193adcb11", 2_302_452),
    ("tiny-blip2", "qformer", ckpt(1, True, seq=16), "e2f6796ec28a6432", 1_956_084),
    ("tiny-qwen2-3", "qlora", ckpt(1, True, "bf16"), "089b6da0e47e7701", 1_336_736),
    ("tiny-qwen2-3", "qlora", ckpt(2, True, "bf16"), "dca5610c280d4e53", 1_905_056),
]


@pytest.mark.parametrize("model,method,settings,key,traced", TRACED, ids=[r[3] for r in TRACED])
def test_peak_matches_traced_step_to_the_byte(model, method, settings, key, traced):
    e = estimate(tiny(model), method=method, **settings)
    assert e.memory.peak_bytes == traced


def test_reentrant_adds_the_recomputed_block_output():
    """tiny-llama4 LoRA fp32, batch 2 x 64, hidden 64: reentrant checkpointing peaks 32,768 bytes above
    non-reentrant (traced 2,272,136 vs 2,239,368, rows c3c7ba68a3d9b798 / ab4d1a8daa4b9aa3), one hidden
    state, 2 x 64 x 64 x 4: CheckpointFunction.backward recomputes the whole block, and its `outputs`
    keeps the block's output while torch.autograd.backward runs through the recomputed graph (the
    non-reentrant recompute stops at the last saved tensor and never makes it). On QLoRA with
    prepare_model_for_kbit_training (fp32 hidden states, bf16 policy) the same 32,768 at every 2
    (1,905,056 vs 1,872,288, rows dca5610c280d4e53 / 3c7085a0ac5b44de)."""
    spec = tiny("tiny-llama4")
    plain = estimate(spec, method="lora", **ckpt()).memory
    reentrant = estimate(spec, method="lora", **ckpt(1, True)).memory
    assert reentrant.peak_bytes - plain.peak_bytes == 2 * 64 * 64 * 4
    assert reentrant.peak_phase == plain.peak_phase == "backward:layer3"
    q = tiny("tiny-qwen2-3")
    assert (estimate(q, method="qlora", **ckpt(2, True, "bf16")).memory.peak_bytes
            - estimate(q, method="qlora", **ckpt(2, False, "bf16")).memory.peak_bytes) == 2 * 64 * 64 * 4


def test_reentrant_shares_one_autocast_cast_of_the_detached_input():
    """tiny-bert-3 LoRA amp-bf16 (q and v LoRA, batch 2 x 64, hidden 64): reentrant is 16,384 bytes
    *below* non-reentrant (traced 1,903,416 vs 1,919,800): the recompute's input is a detached leaf that
    requires grad, whose bf16 cast autocast caches, so the two LoRA A Linears reading BERT's block input
    save one 2 x 64 x 64 x 2 copy instead of two; the recomputed output (+32,768 fp32) and the incoming
    gradient are alive in both at that peak."""
    spec = tiny("tiny-bert-3")
    plain = estimate(spec, method="lora", **ckpt(1, False, "amp-bf16")).memory
    reentrant = estimate(spec, method="lora", **ckpt(1, True, "amp-bf16")).memory
    assert plain.peak_bytes - reentrant.peak_bytes == 2 * 64 * 64 * 2
    assert dict(plain.components)["activations"] - dict(reentrant.components)["activations"] == 2 * 64 * 64 * 2


def test_reentrant_vision_model_gets_the_input_hook():
    """tiny-vit4 LoRA fp32 (64 px, patch 8: 64 patches + the class token, hidden 64), batch 2: reentrant
    checkpointing needs an input that requires grad, so the harness hooks the patch embedding (as peft
    does); traced 1,909,824 vs 1,843,776 non-reentrant: 66,048 = the hooked patch-embedding output held
    to the end of backward, 2 x 64 x 64 x 4 = 32,768, plus the recomputed block output, 2 x 65 x 64 x 4
    = 33,280."""
    spec = tiny("tiny-vit4")
    plain = estimate(spec, method="lora", **ckpt()).memory.peak_bytes
    assert estimate(spec, method="lora", **ckpt(1, True)).memory.peak_bytes - plain == 32_768 + 33_280


def test_unwrapped_blocks_keep_what_they_save():
    """tiny-llama4 LoRA fp32 every 2: blocks 0 and 2 keep their input (2 x 64 x 64 x 4 each), blocks 1 and
    3 everything they save; at the start of backward what the blocks keep is the every-block figure
    less two inputs plus two blocks' saves."""
    plan = make_plan(tiny("tiny-llama4"), MethodSettings("lora"))
    every2 = activation_profile(plan, TrainingSettings(**ckpt(2)))
    assert every2.checkpointed == (True, False, True, False)
    one_input = 2 * 64 * 64 * 4
    assert every2.checkpoint_inputs == 2 * one_input
    e1 = estimate(tiny("tiny-llama4"), method="lora", **ckpt()).memory.events["backward:loss"]
    e2 = estimate(tiny("tiny-llama4"), method="lora", **ckpt(2)).memory.events["backward:loss"]
    assert e2 - e1 == every2.per_layer[1] + every2.per_layer[3] - 2 * one_input


def test_reentrant_keyword_arguments_live_to_the_end_of_backward():
    """A reentrant checkpoint's function (partial(forward, **kwargs), with LlamaModel's 1 x seq int64
    position_ids) is ctx.run_function of its autograd node, which lives with the graph until the loss
    is dropped after backward (checked on the real model: the nodes' run_function.keywords['position_ids']
    exist after loss.backward()); non-reentrant, the checkpoint's frame goes with block 0's backward."""
    spec = tiny("tiny-llama4")
    end = {r: estimate(spec, method="lora", **ckpt(1, r)).memory.events["backward:end"] for r in (False, True)}
    assert end[True] - end[False] == 64 * 8


def test_real_shape_every_n_traced_on_fake_tensors():
    """Llama-3.1-8B LoRA (r 8, q/v) bf16, batch 1 x 4096, on fake tensors (rows 'llama-3.1-8b' of
    ckpt-modes.jsonl): every block 23,548,486,664 bytes, every 2nd 34,299,012,104, every 4th
    39,674,274,824, reentrant every block 23,548,486,664 (the loss's fp32 logits decide the peak)."""
    for settings, traced in ((ckpt(1, seq=4096, batch=1, precision="bf16"), 23_548_486_664),
                             (ckpt(2, seq=4096, batch=1, precision="bf16"), 34_299_012_104),
                             (ckpt(4, seq=4096, batch=1, precision="bf16"), 39_674_274_824),
                             (ckpt(1, True, seq=4096, batch=1, precision="bf16"), 23_548_486_664)):
        assert estimate("llama-3.1-8b", method="lora", **settings).memory.peak_bytes == traced


def test_only_wrapped_blocks_recompute():
    """Llama-3.2-1B (16 blocks) LoRA: every block re-runs block 0 (whose q/v LoRA train; nothing below
    needs a gradient, so its other matmuls do not count) and 15 full blocks, every 2nd block 0 and 7,
    every 4th block 0 and 3: the every-2 recompute is 8 full blocks below every block's, every 4 four
    more."""
    plan = plan_for("llama-3.2-1b", "lora")
    r = {n: step_flops(plan, TrainingSettings(seq_len=1024, grad_checkpointing=True, checkpoint_every=n), 1024).recompute
         for n in (1, 2, 4)}
    assert r[1] - r[2] == pytest.approx(2 * (r[2] - r[4]))
    assert r[4] < r[2] < r[1]


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError, match="checkpoint_every must be a positive integer, got 0"):
        estimate(tiny("tiny-llama4"), method="lora", **ckpt(0))
    with pytest.raises(CombinationError, match="add grad_checkpointing"):
        estimate(tiny("tiny-llama4"), method="lora", checkpoint_every=2)
    with pytest.raises(CombinationError, match="checkpoint_reentrant chooses"):
        estimate(tiny("tiny-llama4"), method="lora", checkpoint_reentrant=True)


def test_sweep_keeps_modes_without_checkpointing_as_rows():
    df = sweep(tiny("tiny-llama4"), method="lora", grad_checkpointing=[False, True], checkpoint_every=[1, 2],
               checkpoint_reentrant=[False, True])
    assert len(df) == 8
    assert df["error"].notna().sum() == 3  # every 2 or reentrant without checkpointing
    ok = df[df["error"].isna()]
    assert ok["peak_bytes"].nunique() > 1
