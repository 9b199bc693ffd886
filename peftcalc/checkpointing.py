"""Which blocks gradient checkpointing wraps.

transformers 5.x ``PreTrainedModel._set_gradient_checkpointing`` (modeling_utils.py, what
``activation_checkpointing_enable(every_n_layers=N)`` and ``gradient_checkpointing_enable`` run) walks
``self.modules()`` and gives every ``GradientCheckpointingLayer`` (modeling_layers.py) the flag
``layer_index % every_n_layers == 0``, ``layer_index`` counting those layers in module order over the
whole model. A vision-language model's vision and Q-Former layers are GradientCheckpointingLayers too
(CLIPEncoderLayer, Blip2EncoderLayer, Blip2QFormerLayer), registered before its language model
(LlavaModel.__init__: vision_tower, multi_modal_projector, language_model; Blip2ForConditionalGeneration:
vision_model, qformer, language_projection, language_model), so they shift the language model's count.
"""

from __future__ import annotations

from peftcalc.settings import TrainingSettings
from peftcalc.spec import ModelSpec

__all__ = ["checkpointed_layers", "checkpointing_layer_stacks"]


def checkpointing_layer_stacks(spec: ModelSpec) -> tuple[tuple[str, int], ...]:
    """(part, layers) of every stack of GradientCheckpointingLayers, in ``model.modules()`` order: 'text'
    is the model's own blocks (a VLM's language model), 'vision' a VLM's vision tower (all its encoder
    layers, those above the feature layer included), 'qformer' BLIP-2's Q-Former."""
    if spec.is_vlm:
        return (("vision", spec.vision.num_layers), ("text", spec.num_layers))
    if spec.is_blip2:  # Blip2VisionModel's and Blip2QFormerModel's layers (spec.blip2)
        b = dict(spec.blip2)
        return (("vision", b["vision_num_hidden_layers"]), ("qformer", b["qformer_num_hidden_layers"]),
                ("text", spec.num_layers))
    return (("text", spec.num_layers),)


def checkpointed_layers(spec: ModelSpec, t: TrainingSettings, part: str = "text") -> tuple[bool, ...]:
    """Per layer of `part` (checkpointing_layer_stacks): whether gradient checkpointing wraps it; empty
    without checkpointing. Layer j of a part whose stacks before it hold `offset` layers is checkpointed
    when (offset + j) % t.checkpoint_every == 0."""
    if not t.grad_checkpointing:
        return ()
    offset = 0
    for name, layers in checkpointing_layer_stacks(spec):
        if name == part:
            return tuple((offset + j) % t.checkpoint_every == 0 for j in range(layers))
        offset += layers
    raise ValueError(f"{spec.name} has no '{part}' layers")
