"""Model specs: a Hugging Face ``config.json`` normalised into the few numbers the calculator needs.

A spec is data. Registry entries (``peftcalc/data/models/*.json``) are trimmed copies of real
``config.json`` files, each with the URL it came from in ``_source``; a user's own ``config.json``
goes through exactly the same reader. No torch, no transformers.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from peftcalc.errors import InputError, read_text

MODELS_DIR = Path(__file__).parent / "data" / "models"

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "gpt2",
    "bert",
    "roberta",
    "vit",
    "clip_vision_model",
    "llava",
    "blip-2",
)
DECODER_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
VISION_FAMILIES = ("vit", "clip_vision_model")
# Vision-language models: a vision tower, a projector and a language model (LlavaForConditionalGeneration).
VLM_FAMILIES = ("llava",)
# The families a VLM's sub-configs may name (what the calculator has a layout for).
VLM_VISION_TYPES = ("clip_vision_model",)
VLM_TEXT_TYPES = ("llama",)

# The five tasks a model class can have, decided by the config's `architectures` as transformers
# builds it (AutoModelForCausalLM / ForMaskedLM / ForSequenceClassification / ForImageClassification /
# AutoModel).
TASKS = ("causal_lm", "masked_lm", "seq_cls", "image_cls", "base", "image_text_to_text")

# Which task each `architectures` class name means, per family.
ARCHITECTURE_TASKS = {
    "LlamaForCausalLM": "causal_lm",
    "LlamaForSequenceClassification": "seq_cls",
    "LlamaModel": "base",
    "MistralForCausalLM": "causal_lm",
    "MistralForSequenceClassification": "seq_cls",
    "MistralModel": "base",
    "Qwen2ForCausalLM": "causal_lm",
    "Qwen2ForSequenceClassification": "seq_cls",
    "Qwen2Model": "base",
    "GPT2LMHeadModel": "causal_lm",
    "GPT2ForSequenceClassification": "seq_cls",
    "GPT2Model": "base",
    "BertForMaskedLM": "masked_lm",
    "BertForSequenceClassification": "seq_cls",
    "BertModel": "base",
    "RobertaForMaskedLM": "masked_lm",
    "RobertaForSequenceClassification": "seq_cls",
    "RobertaModel": "base",
    "ViTForImageClassification": "image_cls",
    "ViTModel": "base",
    "CLIPVisionModel": "base",
    "LlavaForConditionalGeneration": "image_text_to_text",
    "Blip2ForConditionalGeneration": "image_text_to_text",
}

# The modules a model class keeps in fp32 when loaded in half precision, as (`_keep_in_fp32_modules`,
# `_keep_in_fp32_modules_strict`) of the transformers class (5.23; PreTrainedModel.post_init gathers both
# from the submodels). from_pretrained applies the first only for dtype=float16, the second for float16
# and bfloat16 (modeling_utils.py PreTrainedModel._get_dtype_plan). Every other class of ARCHITECTURE_TASKS
# has neither (tests/measure/test_build.py checks this table against transformers).
KEEP_IN_FP32_MODULES = {
    "Blip2ForConditionalGeneration": (("query_tokens", "qformer"), ()),  # modeling_blip_2.py
}


def kept_in_fp32(spec: "ModelSpec", name: str, weight_dtype: str) -> bool:
    """Whether from_pretrained(..., dtype=weight_dtype) loads the parameter `name` in fp32: its class's
    keep-in-fp32 patterns for that dtype (see KEEP_IN_FP32_MODULES) matched the way transformers 5.x
    core_model_loading.py convert_and_load_state_dict_in_model does, ``build_glob_alternation(...).search``
    on the state-dict key (a substring search, '*' a wildcard)."""
    if weight_dtype not in ("float16", "bfloat16"):
        return False
    modules, strict = KEEP_IN_FP32_MODULES.get(spec.architecture, ((), ()))
    patterns = strict + (modules if weight_dtype == "float16" else ())
    return any(re.search(p.replace("*", ".*"), name) for p in patterns)


DEFAULT_TASK = {
    "llama": "causal_lm",
    "mistral": "causal_lm",
    "qwen2": "causal_lm",
    "gpt2": "causal_lm",
    "bert": "masked_lm",
    "roberta": "masked_lm",
    "vit": "base",
    "clip_vision_model": "base",
    "llava": "image_text_to_text",
    "blip-2": "image_text_to_text",
}

# The transformers Auto class that builds each task (used by the harness and shown to users).
AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "image_cls": "AutoModelForImageClassification",
    "base": "AutoModel",
    "image_text_to_text": "AutoModelForImageTextToText",
}

# Config defaults of the transformers configuration classes (transformers 5.x), used where a
# config.json leaves a field out.
TIE_DEFAULT = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "gpt2": True,
    "bert": True,
    "roberta": True,
    "vit": False,
    "clip_vision_model": False,
    "llava": False,
    "blip-2": True,
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
    # BLIP-2: (name, value) pairs of the vision tower, Q-Former and query tokens (see _blip2_spec)
    blip2: tuple = ()
    hf_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def is_decoder(self) -> bool:
        return self.model_type in DECODER_FAMILIES

    @property
    def is_vision(self) -> bool:
        return self.model_type in VISION_FAMILIES

    @property
    def is_vlm(self) -> bool:
        return self.model_type in VLM_FAMILIES

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

    @property
    def gated_mlp(self) -> bool:
        return self.model_type in ("llama", "mistral", "qwen2")


def _require(config: dict, key: str, where: str) -> int:
    if key not in config or config[key] is None:
        raise InputError(f"{where}: config has no '{key}'")
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _task_of(config: dict, model_type: str, where: str) -> tuple[str, str]:
    architectures = config.get("architectures") or []
    if not architectures:
        task = DEFAULT_TASK[model_type]
        return task, f"{AUTO_CLASS[task]}({model_type})"
    arch = architectures[0]
    if arch not in ARCHITECTURE_TASKS:
        known = sorted(a for a in ARCHITECTURE_TASKS if ARCHITECTURE_TASKS[a] and _family_of(a) == model_type)
        raise InputError(
            f"{where}: architecture '{arch}' is not supported for model_type '{model_type}'; "
            f"supported: {', '.join(known)}"
        )
    return ARCHITECTURE_TASKS[arch], arch


def _family_of(arch: str) -> str:
    prefixes = {
        "Llama": "llama",
        "Mistral": "mistral",
        "Qwen2": "qwen2",
        "GPT2": "gpt2",
        "Bert": "bert",
        "Roberta": "roberta",
        "ViT": "vit",
        "CLIPVision": "clip_vision_model",
        "Llava": "llava",
        "Blip2": "blip-2",
    }
    for prefix, family in prefixes.items():
        if arch.startswith(prefix):
            return family
    return ""


def _num_labels(config: dict) -> int:
    id2label = config.get("id2label")
    if id2label:
        return len(id2label)
    return int(config.get("num_labels", 2))


def spec_from_config(config: dict, name: str = "", where: str = "config") -> ModelSpec:
    """Normalise a Hugging Face config dict into a :class:`ModelSpec`.

    Field names and defaults mirror the transformers configuration classes
    (LlamaConfig, MistralConfig, Qwen2Config, GPT2Config, BertConfig, RobertaConfig, ViTConfig,
    CLIPVisionConfig).
    """
    if not isinstance(config, dict):
        raise InputError(f"{where}: a config must be a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    task, arch = _task_of(config, model_type, where)
    name = name or config.get("_name_or_path") or model_type
    if model_type == "llava":
        return _llava_spec(config, name, task, arch, where)
    if model_type == "blip-2":
        return _blip2_spec(config, name, task, arch, where)
    common = dict(
        name=name,
        model_type=model_type,
        task=task,
        architecture=arch,
        num_labels=_num_labels(config) if task in ("seq_cls", "image_cls") else 0,
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        source=config.get("_source", ""),
        hf_config=config,
    )
    if model_type == "gpt2":
        hidden = _require(config, "n_embd", where)
        heads = _require(config, "n_head", where)
        _check_divisible(hidden, heads, "n_embd", "n_head", where)
        return ModelSpec(
            hidden_size=hidden,
            num_layers=_require(config, "n_layer", where),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=config.get("n_inner") or 4 * hidden,
            vocab_size=_require(config, "vocab_size", where),
            max_positions=_require(config, "n_positions", where),
            tie_embeddings=bool(config.get("tie_word_embeddings", TIE_DEFAULT[model_type])),
            attention_bias=True,
            mlp_bias=True,
            hidden_act=config.get("activation_function", "gelu_new"),
            **common,
        )
    hidden = _require(config, "hidden_size", where)
    heads = _require(config, "num_attention_heads", where)
    layers = _require(config, "num_hidden_layers", where)
    intermediate = _require(config, "intermediate_size", where)
    if model_type in ("llama", "mistral", "qwen2"):
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or _divided(hidden, heads, "hidden_size", "num_attention_heads", where)
        if heads % kv_heads:
            raise InputError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        if model_type == "qwen2":
            attention_bias = True  # Qwen2Attention: q/k/v carry biases, o_proj does not
        elif model_type == "llama":
            attention_bias = bool(config.get("attention_bias", False))
        else:
            attention_bias = False
        return ModelSpec(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
            vocab_size=_require(config, "vocab_size", where),
            tie_embeddings=bool(config.get("tie_word_embeddings", TIE_DEFAULT[model_type])),
            attention_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)) if model_type == "llama" else False,
            hidden_act=config.get("hidden_act", "silu"),
            **common,
        )
    head_dim = _divided(hidden, heads, "hidden_size", "num_attention_heads", where)
    if model_type in ("bert", "roberta"):
        return ModelSpec(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
            vocab_size=_require(config, "vocab_size", where),
            max_positions=_require(config, "max_position_embeddings", where),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            tie_embeddings=bool(config.get("tie_word_embeddings", TIE_DEFAULT[model_type])),
            attention_bias=True,
            mlp_bias=True,
            hidden_act=config.get("hidden_act", "gelu"),
            **common,
        )
    image = _require(config, "image_size", where)
    patch = _require(config, "patch_size", where)
    if image % patch:
        raise InputError(f"{where}: image_size ({image}) must be a multiple of patch_size ({patch})")
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        attention_bias=bool(config.get("qkv_bias", True)) if model_type == "vit" else True,
        mlp_bias=True,
        image_size=image,
        patch_size=patch,
        num_channels=int(config.get("num_channels", 3)),
        hidden_act=config.get("hidden_act", "gelu" if model_type == "vit" else "quick_gelu"),
        **common,
    )


def _llava_spec(config: dict, name: str, task: str, arch: str, where: str) -> ModelSpec:
    """LlavaConfig (transformers models/llava/configuration_llava.py): `vision_config` (a CLIP vision
    tower), `text_config` (the language model), `projector_hidden_act`, `vision_feature_layer` (an
    int: the hidden state the projector reads) and `vision_feature_select_strategy` ("default" drops
    the class token). The spec's scalar fields are the language model's."""
    parts = {}
    for key, allowed in (("vision_config", VLM_VISION_TYPES), ("text_config", VLM_TEXT_TYPES)):
        sub = config.get(key)
        if not isinstance(sub, dict):
            raise InputError(f"{where}: a llava config needs a '{key}' object")
        if sub.get("model_type") not in allowed:
            raise InputError(f"{where}: {key}.model_type {sub.get('model_type')!r} is not supported; "
                             f"supported: {', '.join(allowed)}")
        sub = {k: v for k, v in sub.items() if k != "architectures"}
        parts[key] = spec_from_config(sub, name=f"{name}/{key}", where=f"{where}: {key}")
    vision, text = parts["vision_config"], parts["text_config"]
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool) or not -vision.num_layers - 1 <= layer <= vision.num_layers:
        raise InputError(f"{where}: vision_feature_layer must be one hidden-state index of the vision tower, "
                         f"got {layer!r}")
    select = config.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise InputError(f"{where}: vision_feature_select_strategy must be 'default' or 'full', got {select!r}")
    tied = bool(config.get("tie_word_embeddings", text.tie_embeddings))
    if tied:
        raise InputError(f"{where}: a llava model with lm_head tied to the input embeddings is not supported")
    fields = {f: getattr(text, f) for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                            "intermediate_size", "vocab_size", "max_positions", "attention_bias",
                                            "mlp_bias", "hidden_act")}
    return ModelSpec(
        name=name,
        model_type="llava",
        task=task,
        architecture=arch,
        tie_embeddings=tied,
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        source=config.get("_source", ""),
        vision=vision,
        text=text,
        projector_act=str(config.get("projector_hidden_act", "gelu")),
        vision_feature_layer=layer,
        vision_feature_select=select,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
        hf_config=config,
        **fields,
    )


# The transformers 5.x defaults of the BLIP-2 sub-configs (Blip2VisionConfig, Blip2QFormerConfig, OPTConfig).
BLIP2_VISION_DEFAULTS = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                         "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "num_channels": 3,
                         "qkv_bias": True}
BLIP2_QFORMER_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072, "cross_attention_frequency": 2, "use_qformer_text_input": False}
OPT_DEFAULTS = {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True,
                "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True}


def _blip2_spec(config: dict, name: str, task: str, arch: str, where: str) -> ModelSpec:
    """Blip2Config (transformers models/blip_2/configuration_blip_2.py): `vision_config` (the EVA ViT-g
    tower), `qformer_config` (the Q-Former, whose encoder_hidden_size Blip2Config sets to the vision
    width), `num_query_tokens`, `text_config` (an OPT decoder). The spec's scalar fields are OPT's; the
    tower and Q-Former sizes go in `blip2` (peftcalc.activations.blip2_parts makes specs of the three parts).
    The shapes the layout cannot mirror exactly (OPT's project_in/out, a Q-Former with text input, an
    encoder-decoder language model) are refused."""
    subs = {}
    for key, mt, defaults in (("vision_config", "blip_2_vision_model", BLIP2_VISION_DEFAULTS),
                              ("qformer_config", "blip_2_qformer", BLIP2_QFORMER_DEFAULTS),
                              ("text_config", "opt", OPT_DEFAULTS)):
        sub = config.get(key) or {}
        if not isinstance(sub, dict) or sub.get("model_type", mt) != mt:
            raise InputError(f"{where}: {key} must be a {mt} config object; got model_type "
                             f"{sub.get('model_type') if isinstance(sub, dict) else sub!r}")
        subs[key] = {k: sub.get(k, v) for k, v in defaults.items()}
    v, q, t = subs["vision_config"], subs["qformer_config"], subs["text_config"]
    if not config.get("use_decoder_only_language_model", True):
        raise InputError(f"{where}: BLIP-2 with an encoder-decoder language model (T5) is not supported; OPT only")
    if q["use_qformer_text_input"]:
        raise InputError(f"{where}: a Q-Former with text input (use_qformer_text_input) is not supported")
    word_dim = (config.get("text_config") or {}).get("word_embed_proj_dim") or t["hidden_size"]  # OPTConfig's default
    if word_dim != t["hidden_size"] or not t["do_layer_norm_before"] or not t["enable_bias"] \
            or not t["layer_norm_elementwise_affine"]:
        raise InputError(f"{where}: OPT with word_embed_proj_dim != hidden_size, post-LayerNorm, no biases or "
                         "non-affine LayerNorms is not supported")
    if not bool(config.get("tie_word_embeddings", t["tie_word_embeddings"])):
        raise InputError(f"{where}: a BLIP-2 OPT with lm_head untied from the input embeddings is not supported")
    h, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    _check_divisible(h, heads, "text_config.hidden_size", "num_attention_heads", where)
    blip2 = tuple(sorted({**{f"vision_{k}": v[k] for k in v}, **{f"qformer_{k}": q[k] for k in q},
                          "num_query_tokens": int(config.get("num_query_tokens", 32))}.items()))
    return ModelSpec(
        name=name, model_type="blip-2", task=task, architecture=arch,
        hidden_size=h, num_layers=int(t["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads,
        head_dim=h // heads, intermediate_size=int(t["ffn_dim"]), vocab_size=int(t["vocab_size"]),
        max_positions=int(t["max_position_embeddings"]), tie_embeddings=True, attention_bias=True, mlp_bias=True,
        image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), num_channels=int(v["num_channels"]),
        hidden_act="relu", torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        source=config.get("_source", ""), blip2=blip2, hf_config=config,
    )


def _divided(a: int, b: int, name_a: str, name_b: str, where: str) -> int:
    _check_divisible(a, b, name_a, name_b, where)
    return a // b


def _check_divisible(a: int, b: int, name_a: str, name_b: str, where: str) -> None:
    if a % b:
        raise InputError(f"{where}: {name_a} ({a}) is not divisible by {name_b} ({b})")


@lru_cache(maxsize=None)
def registry_configs() -> dict[str, dict]:
    """Every registry entry: name -> its trimmed config.json (with `_source`)."""
    configs = {}
    for path in sorted(MODELS_DIR.glob("*.json")):
        configs[path.stem] = json.loads(path.read_text())
    return configs


def registry_names() -> list[str]:
    return list(registry_configs())


@lru_cache(maxsize=None)
def registry_aliases() -> dict[str, str]:
    """Hugging Face repo ids (lower case) -> registry name."""
    return {alias: name for name, cfg in registry_configs().items() for alias in cfg.get("_aliases", [])}


def transformers_config_kwargs(spec: ModelSpec) -> dict:
    """The config as `transformers.AutoConfig.for_model(model_type, **kwargs)` takes it: the
    registry's bookkeeping keys (`_source`, `_aliases`, `_note`) dropped."""
    return {k: v for k, v in spec.hf_config.items() if not k.startswith("_") and k != "model_type"}


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a config.json given as a file or as a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    text = read_text(p, "config")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed config file {p}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(config, dict):
        raise InputError(f"malformed config file {p}: expected a JSON object")
    return config


@lru_cache(maxsize=256)
def _load_registry_spec(name: str) -> ModelSpec:
    return spec_from_config(registry_configs()[name], name=name, where=name)


def load_spec(model: str | ModelSpec | dict) -> ModelSpec:
    """A spec from a registry name, a path to a config.json (file or directory), or a config dict."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return spec_from_config(model)
    key = model.strip().lower()
    key = registry_aliases().get(key, key)
    if key in registry_configs():
        return _load_registry_spec(key)
    if Path(model).exists() or model.endswith(".json"):
        return spec_from_config(read_config_file(model), name=str(model), where=str(model))
    raise InputError(f"unknown model '{model}'{_suggestion(key)}")


def _suggestion(key: str) -> str:
    """Close registry names, matching a Hugging Face repo id by its name part too."""
    candidates = {name: name for name in registry_names()}
    candidates.update({alias.rsplit("/", 1)[-1]: name for alias, name in registry_aliases().items()})
    close = difflib.get_close_matches(key.rsplit("/", 1)[-1], list(candidates), n=5, cutoff=0.5)
    names = list(dict.fromkeys(candidates[c] for c in close))[:3]
    if names:
        return f"; did you mean {', '.join(names)}?"
    hint = "; run `peftcalc models` for the list"
    if "/" in key:
        hint += ", or pass a local config.json (peftcalc reads no hub)"
    return hint
