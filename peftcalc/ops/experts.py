"""The experts as the step's experts implementation runs them (StepContext.experts; transformers 5.x ExpertsInterface in
integrations/moe.py, which ``use_experts_implementation`` puts in front of every MoE experts class here: Mixtral,
Qwen2-MoE, Qwen3-MoE, gpt-oss)."""

from __future__ import annotations

from peftcalc.ops.moe import experts_batched_mm, experts_grouped_mm
from peftcalc.ops.moe_eager import experts_eager
from peftcalc.ops.recorder import Recorder, SymTensor

__all__ = ["experts_forward"]

IMPLEMENTATIONS = {"grouped_mm": experts_grouped_mm, "batched_mm": experts_batched_mm, "eager": experts_eager}


def experts_forward(rec: Recorder, *args, **kwargs) -> SymTensor:
    """grouped_mm by default (ops.moe.experts_grouped_mm), batched_mm (ops.moe.experts_batched_mm) or the experts
    module's own loop, ``eager`` (ops.moe_eager.experts_eager); the arguments are theirs."""
    return IMPLEMENTATIONS[rec.ctx.experts](rec, *args, **kwargs)
