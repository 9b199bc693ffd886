"""Vision-language stages: LLaVA's projector-only (stage 1) and projector + language model (stage 2), BLIP-2's
Q-Former stage, and which vision-tower layers the projector reads and --vision-layers trains.
"""

from __future__ import annotations

from peftcalc.families.blip2 import LANGUAGE_PROJECTION, QFORMER, QUERY_TOKENS
from peftcalc.families.llava import LANGUAGE_MODEL, PROJECTOR
from peftcalc.layout import Layout, param_names
from peftcalc.methods.groups import base_groups, param_shape, under
from peftcalc.plan import MethodSettings, ParamGroup
from peftcalc.spec import ModelSpec

__all__ = [
    "VISION_LAYERS",
    "plan_projector",
    "plan_projector_llm",
    "plan_qformer",
    "projector_copy",
    "unfrozen_vision_layers",
    "vision_layer_of",
    "vision_layers_used",
    "vision_trains_fn",
]


def projector_copy(layout: Layout, spec: ModelSpec) -> list[ParamGroup]:
    """LoRA on a VLM trains the projector whole through peft's modules_to_save=["multi_modal_projector"]:
    the original stays (frozen) and ModulesToSaveWrapper adds a trainable copy (peft utils/other.py)."""
    if not spec.is_vlm:
        return []
    return [ParamGroup(f"{name}#modules_to_save", numel, True, "head_copy", shape=param_shape(m, name))
            for m in layout.modules if under(m.path, (PROJECTOR,)) for name, numel in param_names(m)]


VISION_LAYERS = "model.vision_tower.encoder.layers."


def vision_layers_used(spec: ModelSpec) -> int:
    """How many vision-tower layers feed the hidden state the projector reads: hidden_states[i] is the
    output of layer i - 1 (index 0: the embeddings), so vision_feature_layer -2 of 24 layers uses 23."""
    layer = spec.vision_feature_layer
    return layer if layer >= 0 else spec.vision.num_layers + 1 + layer


def vision_layer_of(path: str) -> int | None:
    """The vision-tower layer a VLM parameter or module path belongs to (None: not in a vision layer)."""
    if not path.startswith(VISION_LAYERS):
        return None
    return int(path[len(VISION_LAYERS):].split(".", 1)[0])


def unfrozen_vision_layers(spec: ModelSpec, s: MethodSettings) -> range:
    """--vision-layers N: the top N of the layers the projector reads (the layers above the
    feature layer never get a gradient, so unfreezing them would train nothing)."""
    used = vision_layers_used(spec) if spec.is_vlm else 0
    return range(used - s.vision_layers, used) if s.vision_layers else range(0)


def vision_trains_fn(spec: ModelSpec, s: MethodSettings):
    layers = unfrozen_vision_layers(spec, s)
    return lambda m, name: vision_layer_of(m.path) in layers


def plan_projector(spec, layout, s):
    """LLaVA stage 1 (Liu et al. 2023, Visual Instruction Tuning, section 4.2 "pre-training for feature
    alignment"): vision tower and language model frozen, the projector trains."""
    vision = vision_trains_fn(spec, s)
    return base_groups(layout, lambda m, name: under(m.path, (PROJECTOR,)) or vision(m, name))


def plan_projector_llm(spec, layout, s):
    """LLaVA stage 2 ("fine-tuning end-to-end"): the vision tower stays frozen; the projector and the
    whole language model (embeddings, blocks, final norm, lm_head) train."""
    vision = vision_trains_fn(spec, s)
    return base_groups(layout, lambda m, name: under(m.path, (PROJECTOR, LANGUAGE_MODEL, "lm_head")) or vision(m, name))


def plan_qformer(spec, layout, s):
    """BLIP-2 (Li et al. 2023, section 3: "a lightweight Querying Transformer" between a frozen image encoder
    and a frozen LLM): the Q-Former, the learned query tokens and the language projection train."""
    trains = (QFORMER, LANGUAGE_PROJECTION)
    return base_groups(layout, lambda m, name: m.path == QUERY_TOKENS or under(m.path, trains))
