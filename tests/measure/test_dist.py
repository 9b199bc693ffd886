"""measure.dist: rank 0 of an FSDP2 job on torch's fake process group, against the calculator and against
what FSDP2 must hold (its sharded parameters are 1/N of the model's)."""

from peftcalc.methods import MethodSettings
from peftcalc import estimate
from peftcalc.settings import TrainingSettings

from measure.run import measure_one


def test_fsdp2_rank0_trace_equals_prediction(tiny):
    run = tiny("tiny-llama", method="lora")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu", gpus=3, sharding="fsdp")
    row = measure_one(run.spec, MethodSettings(method="lora"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m, p = row["measured"], row["predicted"]
    assert m["peak_bytes"] == p["peak_bytes"] == 1492152 and m["peak_phase"] == "backward"
    assert m["step1_peak_bytes"] == 1480344
    # rank 0 holds every parameter's padded shard: tiny-llama has 147,776 base parameters, LoRA r8 on q and v
    # 2 x 2 x (8 x 64 + 64 x 8) = 4,096; the model_bytes add the rotary buffers (2 x 8 fp32)
    assert m["model_bytes"] < (147_776 + 4_096) * 4 // 3 + 4_096
    e = estimate(run.spec, method="lora", precision="fp32", optimizer="adamw", batch_size=2, seq_len=32, device="cpu", gpus=3,
                 sharding="fsdp")
    assert e.memory.step1_peak_bytes == 1480344
    assert row["settings"]["training"]["sharding"] == "fsdp" and row["settings"]["training"]["gpus"] == 3


def test_fused_adamw_lora_bf16_trace(tiny):
    """The defaults under FSDP2: fused AdamW (torch._fused_adamw_ on the local shards) and peft's fp32 adapters beside
    the bf16 base; step 1 holds no global-shape copies of DTensor's sharding propagation (measure.dist
    own_propagation_mode)."""
    run = tiny("tiny-llama", method="lora")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="bf16", optimizer="adamw-fused", device="cpu", gpus=3,
                         sharding="fsdp")
    row = measure_one(run.spec, MethodSettings(method="lora"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m = row["measured"]
    assert m["peak_bytes"] == row["predicted"]["peak_bytes"] == 1043792
    assert m["step1_peak_bytes"] == 1031984


def test_mixed_bf16_clipped_trace(tiny):
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) over fp32 parameters (measure.dist
    shard_fsdp2), gradients clipped to norm 1 (clip_grad_norm_ on the DTensor gradients): rank 0 at 3 ranks."""
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="mixed-bf16", optimizer="adamw-fused", device="cpu", gpus=3,
                         sharding="fsdp", max_grad_norm=1.0)
    row = measure_one(run.spec, MethodSettings(method="full"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m = row["measured"]
    assert m["peak_bytes"] == row["predicted"]["peak_bytes"] == 1573968
    assert m["step1_peak_bytes"] == 1174668


def test_trainer_loop_trace_holds_one_more_loss_scalar(tiny):
    """trainer_loop (measure.loop trainer_backward: accelerate Accelerator.backward's ``loss / accumulation steps``
    beside Trainer.training_step's own loss): the same 3-rank FSDP2 LoRA step as
    test_fsdp2_rank0_trace_equals_prediction peaks one float32 scalar (4 bytes) higher, traced and predicted."""
    run = tiny("tiny-llama", method="lora")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu", gpus=3, sharding="fsdp",
                         trainer_loop=True)
    row = measure_one(run.spec, MethodSettings(method="lora"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    assert row["measured"]["peak_bytes"] == row["predicted"]["peak_bytes"] == 1492152 + 4
    assert row["settings"]["training"]["trainer_loop"] is True


def test_qlora_trace_on_the_fake_group(tiny):
    """QLoRA under FSDP2 (measure.dist _sharded_qlora): NF4 packed in bf16 (bnb_4bit_quant_storage) quantized on fake
    tensors and sharded there, the Linear4bit QuantStates counted whole, bitsandbytes' Params4bit re-wrap of the
    unsharded parameter replaced: rank 0 of 2 traces what peftcalc predicts, to the byte."""
    run = tiny("tiny-llama", method="qlora")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="bf16", optimizer="adamw", device="cpu", gpus=2,
                         sharding="fsdp")
    row = measure_one(run.spec, MethodSettings(method="qlora"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m = row["measured"]
    assert m["peak_bytes"] == row["predicted"]["peak_bytes"] == 989720 and m["step1_peak_bytes"] == 973304
    # the logical parameters, counted before sharding: 147,776 base and LoRA r8 on q and v (4,096)
    assert row["params"] == {"total": 151_872, "trainable": 4_096}
