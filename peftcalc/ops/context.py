"""What the ops need to know about the step: batch, sequence lengths, the dtypes of the stream, the
weights and the adapters, autocast, device, attention implementation and a 4-bit base's dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "StepContext",
]


@dataclass(frozen=True)
class StepContext:
    """What the ops need to know about the step."""

    batch: int
    seq: int  # query length (prompt tuning adds its virtual tokens here)
    kv_seq: int  # key length (prefix tuning adds its virtual tokens here)
    compute_dtype: str  # dtype activations come out of matmuls in
    weight_dtype: str  # dtype of base weights
    autocast: str | None
    adapter_dtype: str  # dtype of peft's adapter weights
    device: str
    attention: str
    training_dropout: bool = True
    quant_compute: str = ""  # bnb_4bit_compute_dtype of a QLoRA base ("" without one)
    quant_source: str = ""  # the dtype its NF4 weights were quantized from (the loaded dtype: QuantState.dtype)
    quant_nested: bool = False  # double quantization (QuantState.nested: an 8-bit absmax)
    # a micro-batch after the first of an optimizer step (gradient accumulation): every trainable parameter
    # already has its .grad, so each new gradient is added into it and freed (peftcalc.backward)
    accumulating: bool = False
    fused_loss: str = ""  # "liger", "cce" (sim.head.fused_loss_head) or "trl" (sim.trl_head): no logits
    experts: str = "grouped_mm"  # a mixture-of-experts model's experts implementation (settings.EXPERTS)
    routing: str = "balanced"  # how its router spreads the tokens (settings.ROUTINGS)
    router_aux_loss: bool = False  # output_router_logits: the routers' logits go to the auxiliary loss (ops.moe)
    # activation offloading (torch.autograd.graph.save_on_cpu) around these ops: a saved tensor goes to host
    # memory (the Recorder's offload mode); False inside a checkpointed block, whose own hooks are innermost
    offload: bool = False
    # DeepSpeed ZeRO-3's torch.nn.functional.linear (deepspeed/runtime/zero/linear.py LinearFunctionForZeroStage3,
    # installed by zero.Init): every Linear saves its input, the frozen ones too (ops.linear.linear)
    linear_saves_input: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq
