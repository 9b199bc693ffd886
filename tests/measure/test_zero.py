"""measure.zero: rank 0 of a DeepSpeed ZeRO job on torch's fake process group (skipped without deepspeed)."""

import pytest

from peftcalc.methods import MethodSettings
from peftcalc.settings import TrainingSettings

from measure.run import measure_one
from measure.zero import deepspeed_config

pytest.importorskip("deepspeed")


def test_deepspeed_config_is_the_defaults():
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", gpus=8, sharding="zero2")
    assert deepspeed_config(t) == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                   "zero_optimization": {"stage": 2}}
    bf16 = TrainingSettings(precision="mixed-bf16", gpus=8, sharding="zero3", offload="params")
    assert deepspeed_config(bf16)["bf16"] == {"enabled": True}
    assert deepspeed_config(bf16)["zero_optimization"]["offload_param"] == {"device": "cpu"}
    recipe = TrainingSettings(gpus=8, sharding="zero1", grad_accum=4, max_grad_norm=1.0)
    assert (deepspeed_config(recipe)["gradient_accumulation_steps"], deepspeed_config(recipe)["gradient_clipping"]) == (4, 1.0)


def test_zero2_rank0_trace_equals_prediction(tiny):
    """Full fine-tuning at 3 ranks: the 5e8-element fp32 reduce bucket (2,000,000,000 bytes) and partitions of
    147,780 / 3 = 49,260 elements (147,776 padded to a multiple of 6); the harness runs the client torch AdamW
    under DeepSpeedZeroOptimizer. Traced: 2,001,960,312 bytes."""
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu", gpus=3,
                         sharding="zero2")
    row = measure_one(run.spec, MethodSettings(method="full"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m, p = row["measured"], row["predicted"]
    assert m["peak_bytes"] == p["peak_bytes"] == 2_001_960_312 and m["peak_phase"] == "backward"
    assert row["harness"]["zero_optimizer"] == "DeepSpeedZeroOptimizer" and row["harness"]["client_optimizer"] == "AdamW"


def test_zero2_fused_adamw_with_checkpointing_trace_equals_prediction(tiny):
    """The HF Trainer's usual run: fused AdamW (torch.optim.AdamW(fused=True) as the client optimizer) and
    gradient checkpointing, full fp32 at 3 ranks. The activations are small, so the peak is backward's epilogue
    (average_tensor: the bucket's gradients flattened beside the bucket), 2,001,773,940 bytes traced; the step's
    phase tops at the norm's fp64 copy of the 32,768-element embedding piece (1,674,352 bytes)."""
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw-fused", device="cpu", gpus=3,
                         sharding="zero2", grad_checkpointing=True)
    row = measure_one(run.spec, MethodSettings(method="full"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m, p = row["measured"], row["predicted"]
    assert m["peak_bytes"] == p["peak_bytes"] == 2_001_773_940 and m["peak_phase"] == "backward"
    assert m["steps"][-1]["phases"]["optimizer"]["peak_bytes"] == 1_674_352


def test_zero1_trainer_loop_with_accumulation_trace_equals_prediction(tiny):
    """The HF Trainer's DeepSpeed step (engine.set_gradient_accumulation_boundary, engine.backward(loss,
    scale_wrt_gas=False), engine.step() at the boundary while the loss is held) with gradient_accumulation_steps
    2 under ZeRO-1, full fp32 at 3 ranks: micro-batch 2 runs beside the bucket and autograd's accumulated
    gradients; traced 2,002,813,556 bytes in its backward."""
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu", gpus=3,
                         sharding="zero1", grad_accum=2, trainer_loop=True)
    row = measure_one(run.spec, MethodSettings(method="full"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m, p = row["measured"], row["predicted"]
    assert m["peak_bytes"] == p["peak_bytes"] == 2_002_813_556


def test_zero3_lora_rank0_trace_equals_prediction(tiny):
    """ZeRO-3, LoRA fp32 at 8 ranks (every tiny-llama parameter persistent): the harness runs
    DeepSpeedZeroOptimizer_Stage3 over the client AdamW; the steady-state peak, 2,001,641,469 bytes in backward,
    equals peftcalc.sharding.zero3's, frozen Linears' saved inputs (ZeRO-3's linear) included."""
    run = tiny("tiny-llama", method="lora")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu", gpus=8,
                         sharding="zero3")
    row = measure_one(run.spec, MethodSettings(method="lora"), t, device="fake", steps=2)
    assert row["outcome"] == "ok", row["error"]
    m, p = row["measured"], row["predicted"]
    assert m["peak_bytes"] == p["peak_bytes"] == 2_001_641_469 and m["peak_phase"] == "backward"
    assert row["harness"]["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"


def test_released_zero3_parameter_is_not_held_by_the_saved_tensor():
    """ZeRO-3 frees a gathered parameter by swapping its .data while its linear has saved it (a Function that
    saves input and weight as deepspeed/runtime/zero/linear.py LinearFunctionForZeroStage3 does): under
    ZeroTracer's saving() the storage goes at the swap, as without any saved-tensors hook (autograd saves a
    leaf as itself); StorageTracer's detach() alias would keep its 64 x 64 x 4 bytes to backward."""
    import torch

    from measure.tracer import StorageTracer
    from measure.zero import ZeroTracer

    class SavesWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return x.matmul(weight.t())

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            return grad.matmul(weight), grad.t().matmul(x)

    def held_after_release(tracer):
        weight = torch.nn.Parameter(torch.zeros(64, 64))
        x = torch.zeros(2, 64, requires_grad=True)
        with tracer:
            tracer.mark(weight, "parameters")
            with tracer.saving():
                out = SavesWeight.apply(x, weight)
            before = tracer.live_bytes
            weight.data = torch.empty(0)
            held = tracer.live_bytes - (before - 64 * 64 * 4)
            del out
        return held

    assert held_after_release(ZeroTracer()) == 0
    assert held_after_release(StorageTracer()) == 64 * 64 * 4
