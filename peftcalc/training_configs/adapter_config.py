"""A peft ``adapter_config.json`` (what ``PeftModel.save_pretrained`` writes beside the adapter weights): the
method and its settings.

Field names and defaults are peft 0.21's config classes: ``tuners/lora/config.py`` LoraConfig (r 8,
lora_alpha 8, target_modules None: the model type's default, use_dora / use_rslora False, lora_dropout
0.0, modules_to_save None), ``tuners/ia3/config.py`` IA3Config (target_modules, feedforward_modules),
``tuners/prefix_tuning/config.py`` PrefixTuningConfig (num_virtual_tokens, prefix_projection False),
``tuners/prompt_tuning/config.py`` PromptTuningConfig (num_virtual_tokens).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.training_configs.common import Derived, Keys, load_file

__all__ = ["PEFT_TYPES", "adapter_method", "read_adapter_config"]

# peft PeftType -> peftcalc method
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}


def read_adapter_config(path: str) -> Derived:
    """The method an adapter_config.json describes (InputError naming the peft_type peftcalc cannot model)."""
    return adapter_method(load_file(path, "adapter config"), path)


def adapter_method(data: dict, path: str) -> Derived:
    """The method a peft config's fields describe (an adapter_config.json's, or ``PeftConfig.to_dict()``)."""
    d = Derived(tool="peft adapter_config", path=path)
    k = Keys(data, path)
    peft_type = data.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)  # PeftConfig.to_dict() keeps the PeftType enum
    if peft_type is not None and not isinstance(peft_type, str):
        raise InputError(f"{path}: key 'peft_type' must be a peft type name, got {peft_type!r}")
    if peft_type is None:
        raise InputError(f"{path}: no key 'peft_type'; not a peft adapter_config.json")
    method = PEFT_TYPES.get(peft_type.upper())
    if method is None:
        raise InputError(f"{path}: peft_type {peft_type} is not a method peftcalc models; it models "
                         f"{', '.join(PEFT_TYPES)}")
    d.model = k.str("base_model_name_or_path")
    d.model_key = "base_model_name_or_path"
    d.method = {"method": method}
    if method == "lora":
        _lora(k, d)
    elif method == "ia3":
        targets = _targets(k)
        if targets is not None:
            d.method["targets"] = targets
        if k.data.get("feedforward_modules") is not None:
            d.notes.append("feedforward_modules as peft's default for the model type")
    else:
        d.method["num_virtual_tokens"] = k.int("num_virtual_tokens", 20)
        if k.bool("prefix_projection", False):
            d.warn("prefix_projection=true (the prefix's reparametrization MLP)")
    if k.names("modules_to_save"):
        d.warn(f"modules_to_save={k.names('modules_to_save')} (trainable copies of whole modules)")
    return d


def _targets(k: Keys):
    value = k.data.get("target_modules")
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() in ("all-linear", "all_linear"):
            return "all-linear"
        raise InputError(f"{k.path}: key 'target_modules' is the regular expression {value!r}; give the module "
                         "names as a list (or --targets)")
    return k.names("target_modules")


def _lora(k: Keys, d: Derived) -> None:
    d.method.update(rank=k.int("r", 8), alpha=k.int("lora_alpha", 8), dora=k.bool("use_dora", False) or None)
    targets = _targets(k)
    if targets is not None:
        d.method["targets"] = targets
    if k.number("lora_dropout", 0.0):
        d.warn(f"lora_dropout={k.data['lora_dropout']} (LoRA dropout's mask and dropped input)")
    for key in ("rank_pattern", "alpha_pattern"):
        if k.mapping(key):
            d.warn(f"{key}={k.data[key]} (per-module ranks)")
    if k.data.get("layers_to_transform") is not None:
        d.warn(f"layers_to_transform={k.data['layers_to_transform']} (LoRA on some layers only)")
    if k.str("bias", "none") != "none":
        d.warn(f"bias={k.data['bias']} (trainable biases beside LoRA)")
