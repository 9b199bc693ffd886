"""LLaVA (transformers models/llava/modeling_llava.py): a CLIP vision tower, a two-Linear projector and a
Llama language model.
"""

from __future__ import annotations

from peftcalc.families.llama import llama_layout
from peftcalc.families.record import Family
from peftcalc.families.vision import clip_vision_layout
from peftcalc.layout import Layout, linear_module, prefixed_modules
from peftcalc.spec import ModelSpec

__all__ = [
    "LANGUAGE_MODEL",
    "LLAVA",
    "PROJECTOR",
    "VISION_TOWER",
    "llava_layout",
]


VISION_TOWER = "model.vision_tower"


PROJECTOR = "model.multi_modal_projector"


LANGUAGE_MODEL = "model.language_model"


def llava_layout(spec: ModelSpec) -> Layout:
    """LlavaForConditionalGeneration (transformers 5.x modeling_llava.py): `model.vision_tower` (a
    CLIPVisionModel: all its layers are built, even those above `vision_feature_layer`, and its
    post_layernorm), `model.multi_modal_projector` (linear_1: vision hidden -> text hidden, the
    activation, linear_2: text hidden -> text hidden, both with biases), `model.language_model` (the
    bare LlamaModel) and `lm_head`. The vision tower's modules carry role "vision" and no block index;
    the block indices are the language model's."""
    vision = prefixed_modules(clip_vision_layout(spec.vision), "", VISION_TOWER + ".", role="vision", keep_layers=False)
    h_v, h = spec.vision.hidden_size, spec.hidden_size
    projector = [linear_module(f"{PROJECTOR}.linear_1", h, h_v, True, None, "projector"),
                 linear_module(f"{PROJECTOR}.linear_2", h, h, True, None, "projector")]
    text = prefixed_modules(llama_layout(spec.text), "model.", LANGUAGE_MODEL + ".")
    lm = LANGUAGE_MODEL
    return Layout(tuple(vision + projector + text), f"{lm}.layers", f"{lm}.embed_tokens", ("lm_head",), "lm_head",
                  False, f"{lm}.norm")


# LoRA on LLaVA targets the language model's q_proj and v_proj (the llama choice); never the vision tower.
LLAVA = Family("llava", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/llava/modeling_llava.py",
               llava_layout, None, {}, ("q_proj", "v_proj"))
