"""torch.autocast's cache of the lower-precision copies of trainable weights, alive to the end of forward.
"""

from __future__ import annotations

from functools import lru_cache

from peftcalc.families import build_layout
from peftcalc.families.bert import mlm_decoder_bias
from peftcalc.layout import LINEAR_KINDS
from peftcalc.ops.context import StepContext
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "autocast_cached_by_layer",
    "autocast_cached_numel",
    "autocast_weight_cache_bytes",
]


def autocast_weight_cache_bytes(plan: Plan, ctx: StepContext) -> int:
    """torch.autocast caches the lower-precision copy of every leaf weight that requires grad (the
    autocast weight cache, cleared when the autocast region exits), so the copies of all trainable
    matmul weights are alive at the end of the forward even where checkpointing saves none of them.
    (activation_profile subtracts the copies the head saves anyway, which are one tensor with the
    cached ones.) The matmuls' trainable biases are cast too (addmm's bias argument) and cached alike
    (traced: fake tiny-qwen2 full amp-bf16 b3 s48 ckpt, the q/k/v biases' bf16 copies at the loss)."""
    if not ctx.autocast:
        return 0
    return autocast_cached_numel(plan) * DTYPE_BYTES[ctx.autocast]


@lru_cache(maxsize=1024)
def autocast_cached_numel(plan: Plan) -> int:
    """Elements of the weights autocast caches a copy of (autocast_weight_cache_bytes), from the plan alone."""
    layout = build_layout(plan.spec)
    matmul_params = {f"{m.path}.{p}" for m in layout.modules if m.kind in LINEAR_KINDS for p in ("weight", "bias")}
    if plan.spec.task == "masked_lm":  # the decoder's bias, a parameter of the head (mlm_decoder_bias)
        matmul_params.add(mlm_decoder_bias(plan.spec, layout))
    numel = sum(g.numel for g in plan.groups if g.trainable and (g.name in matmul_params or g.origin == "lora"))
    if layout.head_tied_to_embedding and plan.embedding_trains:
        numel += plan.spec.vocab_size * plan.spec.hidden_size
    return numel


def autocast_cached_by_layer(plan: Plan, ctx: StepContext) -> tuple:
    """Per block, the bytes of autocast's cached copies of its trainable matmul weights and biases (the
    part of autocast_weight_cache_bytes each block owns; 0 without autocast)."""
    if not ctx.autocast:
        return (0,) * plan.spec.num_layers
    return tuple(n * DTYPE_BYTES[ctx.autocast] for n in _autocast_cached_numel_by_layer(plan))


@lru_cache(maxsize=1024)
def _autocast_cached_numel_by_layer(plan: Plan) -> tuple:
    layout = build_layout(plan.spec)
    matmul_params = {f"{m.path}.{p}" for m in layout.modules if m.kind in LINEAR_KINDS for p in ("weight", "bias")}
    numel = [0] * plan.spec.num_layers
    for g in plan.groups:
        if g.trainable and g.layer is not None and (g.name in matmul_params or g.origin == "lora"):
            numel[g.layer] += g.numel
    return tuple(numel)
