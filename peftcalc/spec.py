"""The model spec: the numbers of one model class that decide parameter counts, activations and FLOPs
(ModelSpec), and the checks every family's config reader applies to a config's fields.

A spec is read from a Hugging Face config by its family's reader (peftcalc.families, Family.read_config)
through peftcalc.config.spec_from_config / load_spec.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field

from peftcalc.errors import InputError

__all__ = ["AUTO_CLASS", "FULL_ATTENTION", "MAX_LAYERS", "ModelSpec", "SLIDING_ATTENTION", "TASKS", "check_divisible",
           "config_bool", "config_int", "config_str", "divided", "encoder_sizes", "optional_config_int", "optional_window",
           "sliding_windows", "transformers_config_kwargs"]

# The tasks a model class can have, decided by the config's `architectures` as transformers
# builds it (AutoModelForCausalLM / ForMaskedLM / ForSequenceClassification / ForImageClassification /
# AutoModel; seq2seq_lm, AutoModelForSeq2SeqLM: families peftcalc traces only, measure.generic).
TASKS = ("causal_lm", "masked_lm", "seq_cls", "image_cls", "base", "image_text_to_text", "seq2seq_lm")

# The transformers Auto class that builds each task (used by the harness and shown to users).
AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "image_cls": "AutoModelForImageClassification",
    "base": "AutoModel",
    "image_text_to_text": "AutoModelForImageTextToText",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
}


@dataclass(frozen=True)
class ModelSpec:
    """The numbers that decide parameter counts, activations and FLOPs of one model class."""

    name: str
    model_type: str
    task: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 0
    max_positions: int = 0
    type_vocab_size: int = 0
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    num_labels: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 3
    hidden_act: str = ""
    torch_dtype: str = "float32"
    source: str = ""
    # A VLM (llava): its vision tower and language model as specs of their own; the scalar fields
    # above are the language model's.
    vision: "ModelSpec | None" = None
    text: "ModelSpec | None" = None
    projector_act: str = ""
    vision_feature_layer: int = 0
    vision_feature_select: str = ""
    # BLIP-2: (name, value) pairs of the vision tower, Q-Former and query tokens (families.blip2.blip2_config)
    blip2: tuple = ()
    hf_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # what kind of model the family is (peftcalc.families.record.Family: decoder, vision, vlm, gated_mlp)
    is_decoder: bool = False  # a causal decoder (causal mask, a score head on every position)
    is_vision: bool = False  # a vision encoder over patches and a class token
    is_vlm: bool = False  # a vision-language model (a vision tower, a projector, a language model)
    gated_mlp: bool = False  # a gated MLP (gate_proj, up_proj, down_proj)
    # per layer, the sliding window of its attention in tokens (0: full causal attention); () when every
    # layer attends fully (read by the family's config reader, e.g. with sliding_windows)
    layer_windows: tuple = ()
    # mixture-of-experts (peftcalc.families.moe): experts per MoE layer, experts each token is routed to, one
    # expert's intermediate size, the shared expert's (Qwen2-MoE; 0: none), top-k weights renormalized
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    # the config's output_router_logits: a model loaded from it returns every router's logits and adds the auxiliary
    # load-balancing loss in training (TrainingSettings.router_aux_loss takes it as its default)
    output_router_logits: bool = False

    attn_logit_softcap: float = 0.0  # tanh soft-capping of the attention scores (Gemma 2; 0: none)
    final_logit_softcap: float = 0.0  # tanh soft-capping of the logits (Gemma 2; 0: none)
    # the leading dims of each head RoPE rotates, where not all of head_dim (Phi-4-mini's partial_rotary_factor
    # 0.75: 96 of 128); 0: the whole head (see rope_dim)
    rotary_dim: int = 0
    # per layer, whether its attention applies RoPE (SmolLM3's no_rope_layers: 0 on every fourth); (): every layer
    rope_layers: tuple = ()
    logits_scaled: bool = False  # the logits divided by a number after lm_head (GraniteForCausalLM's logits_scaling)

    @property
    def rope_dim(self) -> int:
        """The dims of a head RoPE rotates: cos and sin are seq x rope_dim, inv_freq rope_dim / 2."""
        return self.rotary_dim or self.head_dim

    @property
    def is_blip2(self) -> bool:
        """A BLIP-2 model: a vision tower, a Q-Former with learned query tokens (their sizes in `blip2`) and a
        language model; the spec of one of its parts has none."""
        return bool(self.blip2)

    @property
    def image_tokens(self) -> int:
        """Tokens one image adds to the language model's sequence: the vision tower's patches
        (`vision_feature_select_strategy` "default" drops the class token, "full" keeps it;
        LlavaModel.get_image_features). LLaVA-1.5 at 336 px, patch 14: 24 x 24 = 576."""
        if not self.is_vlm:
            return 0
        return self.vision.num_patches + (1 if self.vision_feature_select == "full" else 0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.is_vision else 0

    @property
    def vision_seq_len(self) -> int:
        """Tokens a vision encoder sees: the patches plus the class token."""
        return self.num_patches + 1

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def config_int(config: dict, key: str, where: str) -> int:
    """config[key], which must be a positive integer (InputError naming `where` otherwise)."""
    if key not in config or config[key] is None:
        raise InputError(f"{where}: config has no '{key}'")
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    if "layers" in key and value > MAX_LAYERS:
        raise InputError(f"{where}: '{key}' is {value:,}; at most {MAX_LAYERS:,} layers are supported")
    return value


# Deeper than any published model: a config asking for more is a typo, and would take minutes to simulate.
MAX_LAYERS = 1024


def optional_config_int(config: dict, key: str, default: int, where: str, null_is_default: bool = False) -> int:
    """config[key] (`default` when absent; also when null, where the transformers config class computes
    its default from null, as LlamaConfig does for head_dim and num_key_value_heads), which must be a
    positive integer (InputError otherwise)."""
    if key not in config or (null_is_default and config[key] is None):
        return default
    return config_int(config, key, where)


def config_str(config: dict, key: str, default: str, where: str) -> str:
    """config[key] (`default` when absent), which must be a string (an activation's name, ...)."""
    value = config.get(key, default)
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def config_bool(config: dict, key: str, default: bool, where: str) -> bool:
    """config[key] (`default` when absent), which must be a JSON boolean: transformers' config classes refuse
    "yes", 1 or null for their bool fields (StrictDataclassFieldValidationError), so counting one as true
    would estimate a model transformers cannot build."""
    if key not in config:
        return default
    value = config[key]
    if not isinstance(value, bool):
        raise InputError(f"{where}: '{key}' must be true or false (a JSON boolean), got {value!r}")
    return value


def divided(a: int, b: int, name_a: str, name_b: str, where: str) -> int:
    """a // b, which must divide evenly (InputError naming both fields otherwise)."""
    check_divisible(a, b, name_a, name_b, where)
    return a // b


def check_divisible(a: int, b: int, name_a: str, name_b: str, where: str) -> None:
    """InputError unless b divides a."""
    if a % b:
        raise InputError(f"{where}: {name_a} ({a}) is not divisible by {name_b} ({b})")


def encoder_sizes(config: dict, where: str) -> tuple[int, int, int, int]:
    """(hidden_size, num_attention_heads, num_hidden_layers, intermediate_size) of a BERT-style config."""
    return (config_int(config, "hidden_size", where), config_int(config, "num_attention_heads", where),
            config_int(config, "num_hidden_layers", where), config_int(config, "intermediate_size", where))


SLIDING_ATTENTION, FULL_ATTENTION = "sliding_attention", "full_attention"


def sliding_windows(config: dict, layers: int, window: int | None, default_types: list, where: str) -> tuple:
    """Each layer's attention window as the model runs it: `window` tokens on the layers whose type is
    "sliding_attention", 0 (full causal attention) on the "full_attention" ones. The types are the config's
    `layer_types` where it lists them (the transformers config classes keep a given list: Qwen2Config,
    Gemma2Config, Gemma3TextConfig, GptOssConfig), else `default_types` (the class's __post_init__
    default, computed by the caller); a null `window` (sliding disabled: Qwen2Config without
    use_sliding_window, a Mistral config with "sliding_window": null) makes every layer full.
    () when no layer slides, as for a model without windows."""
    types = config.get("layer_types")
    if types is None:
        types = default_types
    if not isinstance(types, list) or len(types) != layers or any(t not in (SLIDING_ATTENTION, FULL_ATTENTION) for t in types):
        raise InputError(f"{where}: 'layer_types' must list {layers} entries, each {SLIDING_ATTENTION!r} or {FULL_ATTENTION!r}")
    if not window or SLIDING_ATTENTION not in types:
        return ()
    return tuple(window if t == SLIDING_ATTENTION else 0 for t in types)


def optional_window(config: dict, default: int | None, where: str) -> int | None:
    """config["sliding_window"]: `default` when absent (the config class's default: MistralConfig 4096),
    None when null, else a positive integer (InputError otherwise)."""
    if "sliding_window" not in config:
        return default
    if config["sliding_window"] is None:
        return None
    return config_int(config, "sliding_window", where)


def transformers_config_kwargs(spec: ModelSpec) -> dict:
    """The config as `transformers.AutoConfig.for_model(model_type, **kwargs)` takes it: the
    registry's bookkeeping keys (`_source`, `_aliases`, `_note`) dropped, every value a copy (transformers 5.x
    standardizes a config's rope_scaling dict in place, adding rope_theta to it: the spec's own config, and the
    config sha rows are keyed by, would change after the first model built)."""
    return {k: copy.deepcopy(v) for k, v in spec.hf_config.items() if not k.startswith("_") and k != "model_type"}
