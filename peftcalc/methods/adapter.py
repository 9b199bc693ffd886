"""Bottleneck adapters: Houlsby (after the attention and FFN output projections), Pfeiffer (after the FFN)
and, in a vision-language model's vision tower, a bottleneck adapter with LayerNorm after each block;
their parameters and their ops (as measure.adapters builds them).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.llava import PROJECTOR
from peftcalc.layout import Layout, Module
from peftcalc.methods.groups import base_groups, seq_cls_head_fn, shape_numel, under
from peftcalc.methods.vlm import VISION_LAYERS, vision_layers_used
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import add, dropout
from peftcalc.plan import MethodSettings, ParamGroup
from peftcalc.spec import ModelSpec

__all__ = [
    "ADAPTER_ATTRIBUTE",
    "ADAPTER_KINDS",
    "BLOCK_ADAPTER_BOTTLENECK",
    "BLOCK_ADAPTER_DROPOUT",
    "BLOCK_ADAPTER_TAG",
    "VLM_ADAPTER_KINDS",
    "adapter_block",
    "adapter_hidden",
    "adapter_numel",
    "adapter_shapes",
    "adapter_sites",
    "block_adapter",
    "plan_adapter",
    "resolve_adapter_kind",
    "resolve_bottleneck",
    "vision_adapter_sites",
]


ADAPTER_KINDS = ("houlsby", "pfeiffer")

# A vision-language model's vision tower also takes the block adapter: a bottleneck adapter after each encoder block.
VLM_ADAPTER_KINDS = ("block",) + ADAPTER_KINDS

# The block adapter's defaults (a post-block bottleneck adapter in the style of Houlsby et al. 2019, as frozen-backbone
# VLM recipes put after each vision encoder block): bottleneck_dim=256, dropout=0.1.
BLOCK_ADAPTER_BOTTLENECK = 256

BLOCK_ADAPTER_DROPOUT = 0.1

# The attribute the harness (measure.adapters) puts an adapter under, part of its parameter names.
ADAPTER_ATTRIBUTE = "adapter_bottleneck"


def resolve_adapter_kind(spec: ModelSpec, s: MethodSettings) -> str:
    """The adapter kind a setting means: the one asked for; else the block (post-block) adapter for
    --method adapter on a vision-language model, and houlsby otherwise (the kind of every other method's
    settings too, where it is unused: measure.record records it so)."""
    if s.adapter_kind is not None:
        return s.adapter_kind
    return "block" if spec.is_vlm and s.method == "adapter" else "houlsby"


def adapter_hidden(spec: ModelSpec) -> int:
    """Width of the hidden states an adapter transforms: a VLM's adapters sit in its vision tower."""
    return spec.vision.hidden_size if spec.is_vlm else spec.hidden_size


def resolve_bottleneck(spec: ModelSpec, s: MethodSettings) -> int:
    """--bottleneck, else 256 for the block adapter, else reduction factor 16 (Houlsby et al.
    2019, section 3.6, and Pfeiffer et al. 2021 use hidden/16 among their sizes)."""
    if s.bottleneck is not None:
        return s.bottleneck
    if resolve_adapter_kind(spec, s) == "block":
        return BLOCK_ADAPTER_BOTTLENECK
    return max(1, adapter_hidden(spec) // 16)


def adapter_numel(hidden: int, bottleneck: int) -> int:
    """One bottleneck adapter: down (hidden -> b, with bias) and up (b -> hidden, with bias).
    Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", section 2.1: 2md + d + m."""
    return 2 * hidden * bottleneck + bottleneck + hidden


def adapter_sites(spec: ModelSpec, layout: Layout, kind: str) -> list[Module]:
    """Where adapters go: after the attention output projection and after the FFN output projection
    (Houlsby), or after the FFN output projection only (Pfeiffer et al. 2021, AdapterFusion, section 3)."""
    roles = ("attn_out", "mlp_out") if kind == "houlsby" else ("mlp_out",)
    return [m for m in layout.modules if m.role in roles]


def adapter_shapes(kind: str, hidden: int, bottleneck: int) -> list[tuple[str, tuple]]:
    """The parameters of one adapter, as measure.adapters builds it: Houlsby/Pfeiffer down (b x h) and up
    (h x b) with biases; the block adapter's down_proj and up_proj with biases and a LayerNorm (weight,
    bias) over the hidden size."""
    h, b = hidden, bottleneck
    if kind == "block":
        return [("down_proj.weight", (b, h)), ("down_proj.bias", (b,)), ("up_proj.weight", (h, b)),
                ("up_proj.bias", (h,)), ("layer_norm.weight", (h,)), ("layer_norm.bias", (h,))]
    return [("down.weight", (b, h)), ("down.bias", (b,)), ("up.weight", (h, b)), ("up.bias", (h,))]


def vision_adapter_sites(spec: ModelSpec, kind: str) -> list[str]:
    """Where --method adapter puts its adapters in a VLM's vision tower: in each encoder layer the projector
    reads (hidden_states[vision_feature_layer]: layers 0-22 of LLaVA-1.5's 24; the layers above never get a
    gradient, so an adapter there would train nothing). The block adapter transforms the layer's
    output (AdaptedVisionEncoder: "Add adapters after each transformer block"), so the path is the layer
    itself; Houlsby/Pfeiffer adapters sit after the layer's out_proj and fc2 / after fc2."""
    modules = {"block": ("",), "houlsby": (".self_attn.out_proj", ".mlp.fc2"), "pfeiffer": (".mlp.fc2",)}[kind]
    return [f"{VISION_LAYERS}{i}{m}" for i in range(vision_layers_used(spec)) for m in modules]


def plan_adapter(spec, layout, s):
    kind = resolve_adapter_kind(spec, s)
    kinds = VLM_ADAPTER_KINDS if spec.is_vlm else ADAPTER_KINDS
    if kind not in kinds:
        if kind in VLM_ADAPTER_KINDS:
            raise InputError(f"adapter kind '{kind}' (a bottleneck adapter after each vision block) applies to a "
                             f"vision-language model's vision tower; {spec.name} is not one")
        raise InputError(f"unknown adapter kind '{kind}'; choose from {', '.join(kinds)}")
    b = resolve_bottleneck(spec, s)
    h = adapter_hidden(spec)
    if b < 1 or b > h:
        where = "the vision tower's hidden size" if spec.is_vlm else "the hidden size"
        default = ""
        if s.bottleneck is None:
            default = " (the block adapter's default)" if kind == "block" else " (hidden/16)"
        raise InputError(f"bottleneck must be between 1 and {where} {h}, got {b}{default}", names=("bottleneck",))
    if spec.is_vlm:  # the vision tower and the language model frozen, the projector trains
        groups = base_groups(layout, lambda m, name: under(m.path, (PROJECTOR,)))
        sites = [(path, None) for path in vision_adapter_sites(spec, kind)]
    else:
        groups = base_groups(layout, seq_cls_head_fn(spec, layout))
        sites = [(m.path, m.layer) for m in adapter_sites(spec, layout, kind)]
    for path, layer in sites:
        for name, shape in adapter_shapes(kind, h, b):
            groups.append(ParamGroup(f"{path}.{ADAPTER_ATTRIBUTE}.{name}", shape_numel(shape), True, "adapter", layer,
                                     shape=shape))
    return groups


def adapter_block(rec: Recorder, x: SymTensor, hidden: int, bottleneck: int, tag: str) -> SymTensor:
    """measure.adapters.BottleneckAdapter: x + up(gelu(down(x))), two trainable Linears around a GELU,
    applied by a forward hook to the output projection's output, before the block's dropout."""
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.adapter.down", bias_trains=True)
    act = activation(rec, down, "gelu", f"{tag}.adapter.act")
    rec.free(down)
    up = linear(rec, act, bottleneck, hidden, True, f"{tag}.adapter.up", bias_trains=True)
    rec.free(act)
    out = add(rec, x, up, up.dtype if rec.ctx.autocast is None else x.dtype)
    rec.free(up)
    return out


# Tags of what the block adapter saves: it runs outside its encoder layer's checkpointed forward.
BLOCK_ADAPTER_TAG = "block_adapter"


def block_adapter(rec: Recorder, x: SymTensor, hidden: int, bottleneck: int, p_drop: float) -> SymTensor:
    """measure.adapters.BlockAdapter (the block adapter: a Houlsby-style bottleneck with a residual LayerNorm,
    after each encoder layer): layer_norm(x + dropout(up_proj(dropout(gelu(
    down_proj(x)))))), a forward hook on the encoder layer. The trainable Linears save their inputs, GELU
    its input, each dropout its noise, the trainable LayerNorm its input (the sum: fp32 under autocast,
    x + a bf16 tensor) with mean and rstd; each intermediate is dropped when `x` is rebound."""
    tag = BLOCK_ADAPTER_TAG
    down = linear(rec, x, hidden, bottleneck, True, f"{tag}.down_proj", bias_trains=True)
    act = activation(rec, down, "gelu", f"{tag}.activation")
    rec.free(down)
    d1 = dropout(rec, act, p_drop, f"{tag}.dropout1")
    if d1 is not act:
        rec.free(act)
    up = linear(rec, d1, bottleneck, hidden, True, f"{tag}.up_proj", bias_trains=True)
    rec.free(d1)
    d2 = dropout(rec, up, p_drop, f"{tag}.dropout2")
    if d2 is not up:
        rec.free(up)
    total = add(rec, d2, x)
    rec.free(d2)
    out = layer_norm(rec, total, True, hidden, f"{tag}.layer_norm")
    rec.free(total)
    return out
