"""LLaVA (transformers models/llava/modeling_llava.py): a CLIP vision tower, a two-Linear projector and a
Llama language model.
"""

from __future__ import annotations

from peftcalc.families.llama import llama_layout
from peftcalc.errors import InputError
from peftcalc.families.record import Family
from peftcalc.families.vision import clip_vision_layout
from peftcalc.layout import Layout, linear_module, prefixed_modules
from peftcalc.spec import ModelSpec, config_bool

__all__ = [
    "LANGUAGE_MODEL",
    "LLAVA",
    "PROJECTOR",
    "TEXT_TYPES",
    "VISION_TOWER",
    "VISION_TYPES",
    "llava_config",
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


# The families a LLaVA config's sub-configs may name (what the calculator has a layout for).
VISION_TYPES = ("clip_vision_model",)
TEXT_TYPES = ("llama",)


def llava_config(config: dict, common: dict, where: str, read_part) -> ModelSpec:
    """LlavaConfig (transformers models/llava/configuration_llava.py): `vision_config` (a CLIP vision
    tower), `text_config` (the language model), `projector_hidden_act`, `vision_feature_layer` (an
    int: the hidden state the projector reads) and `vision_feature_select_strategy` ("default" drops
    the class token). The spec's scalar fields are the language model's."""
    name = common["name"]
    parts = {}
    for key, allowed in (("vision_config", VISION_TYPES), ("text_config", TEXT_TYPES)):
        sub = config.get(key)
        if not isinstance(sub, dict):
            raise InputError(f"{where}: a llava config needs a '{key}' object")
        if sub.get("model_type") not in allowed:
            raise InputError(f"{where}: {key}.model_type {sub.get('model_type')!r} is not supported; "
                             f"supported: {', '.join(allowed)}")
        sub = {k: v for k, v in sub.items() if k != "architectures"}
        parts[key] = read_part(sub, name=f"{name}/{key}", where=f"{where}: {key}")
    vision, text = parts["vision_config"], parts["text_config"]
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool) or not -vision.num_layers - 1 <= layer <= vision.num_layers:
        raise InputError(f"{where}: vision_feature_layer must be one hidden-state index of the vision tower, "
                         f"got {layer!r}")
    select = config.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise InputError(f"{where}: vision_feature_select_strategy must be 'default' or 'full', got {select!r}")
    tied = config_bool(config, "tie_word_embeddings", text.tie_embeddings, where)
    if tied:
        raise InputError(f"{where}: a llava model with lm_head tied to the input embeddings is not supported")
    fields = {f: getattr(text, f) for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                            "intermediate_size", "vocab_size", "max_positions", "attention_bias",
                                            "mlp_bias", "hidden_act")}
    return ModelSpec(
        tie_embeddings=tied,
        vision=vision,
        text=text,
        projector_act=str(config.get("projector_hidden_act", "gelu")),
        vision_feature_layer=layer,
        vision_feature_select=select,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
        **common,
        **fields,
    )


# LoRA on LLaVA targets the language model's q_proj and v_proj (the llama choice); never the vision tower.
LLAVA = Family("llava", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/llava/modeling_llava.py",
               llava_layout, None, {}, ("q_proj", "v_proj"),
               architectures={"LlavaForConditionalGeneration": "image_text_to_text"}, default_task="image_text_to_text",
               read_config=llava_config, vlm=True)
