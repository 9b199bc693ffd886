"""Models of a family peftcalc does not model analytically: a :class:`peftcalc.spec.ModelSpec` read from any
transformers config (:func:`generic_spec`) and the methods applied without a Family record
(:func:`apply_generic_method`), so that :mod:`measure.traced` can trace their training step on fake tensors.

What the harness needs of a spec is the model_type, the config (``AutoConfig.for_model``), the task (which Auto
class builds it, which batch and loss it gets) and the few sizes the batch and the header read; transformers'
own configuration class reads them, so every name a family gives them (``d_model``, ``n_embd``, ``dim``, ...)
resolves through its ``attribute_map`` (transformers configuration_utils.py ``PretrainedConfig.__getattribute__``).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families import FAMILIES
from peftcalc.plan import MethodSettings
from peftcalc.spec import AUTO_CLASS, ModelSpec

__all__ = ["GENERIC_METHODS", "GENERIC_TASKS", "apply_generic_method", "generic_spec", "generic_task", "head_params",
           "is_unmodelled"]

# The model-class suffixes the traced route builds, and their task (the Auto class: peftcalc.spec.AUTO_CLASS).
GENERIC_TASKS = (("ForCausalLM", "causal_lm"), ("ForMaskedLM", "masked_lm"),
                 ("ForSequenceClassification", "seq_cls"), ("Model", "base"))
# The methods the traced route applies without a Family record (freeze and adapter need its block layout).
GENERIC_METHODS = ("full", "frozen", "bitfit", "lora", "qlora", "ia3", "prefix", "prompt")


def is_unmodelled(spec: ModelSpec) -> bool:
    """A spec whose model_type has no Family record (built by :func:`generic_spec`)."""
    return spec.model_type not in FAMILIES


def generic_task(config: dict, where: str) -> tuple[str, str]:
    """(task, model class) from the first of the config's `architectures`, by its suffix (GENERIC_TASKS); a
    config without one is built as a causal LM (AutoModelForCausalLM), the usual fine-tuning target."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise InputError(f"{where}: 'architectures' must be a list of model class names, got {architectures!r}")
    if not architectures:
        return "causal_lm", f"{AUTO_CLASS['causal_lm']}({config.get('model_type')})"
    arch = architectures[0]
    for suffix, task in GENERIC_TASKS:
        if arch.endswith(suffix):
            return task, arch
    if arch.endswith("ForConditionalGeneration") and _is_seq2seq(config.get("model_type")):
        return "seq2seq_lm", arch
    raise InputError(f"{where}: the traced route builds model classes ending in "
                     f"{', '.join(s for s, _ in GENERIC_TASKS)} (and an encoder-decoder's ForConditionalGeneration);"
                     f" '{arch}' is none of them (edit 'architectures')")


def _is_seq2seq(model_type) -> bool:
    """An encoder-decoder language model (T5, BART, ...): AutoModelForSeq2SeqLM builds it (transformers
    models/auto/modeling_auto.py MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def _is_decoder(model_type: str, task: str) -> bool:
    """A causal decoder: the task is causal LM, or the family has a causal LM class and no masked-LM one
    (transformers models/auto/modeling_auto.py MODEL_FOR_CAUSAL_LM_MAPPING_NAMES / MODEL_FOR_MASKED_LM_...)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if task == "causal_lm":
        return True
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _size(hf, name: str) -> int:
    value = getattr(hf, name, None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def generic_spec(config: dict, name: str = "", where: str = "config") -> ModelSpec:
    """A ModelSpec of any transformers config: the sizes as its configuration class reads them
    (``AutoConfig.for_model(model_type, **config)``), the task by the model class's suffix."""
    import transformers

    model_type = config.get("model_type")
    task, arch = generic_task(config, where)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    try:
        hf = transformers.AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise InputError(f"{where}: transformers cannot read this {model_type!r} config: {message}") from None
    heads = _size(hf, "num_attention_heads")
    hidden = _size(hf, "hidden_size")
    head_dim = _size(hf, "head_dim") or (hidden // heads if heads else 0)
    return ModelSpec(
        name=name or config.get("_name_or_path") or model_type, model_type=model_type, task=task, architecture=arch,
        hidden_size=hidden, num_layers=_size(hf, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=_size(hf, "num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=_size(hf, "intermediate_size"), vocab_size=_size(hf, "vocab_size"),
        num_labels=int(hf.num_labels) if task == "seq_cls" else 0,
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        source=config.get("_source", ""), hf_config=config, is_decoder=_is_decoder(model_type, task),
    )


def head_params(model) -> set[int]:
    """ids of the task head's parameters: every parameter outside the base model
    (``model.base_model_prefix``: lm_head, classifier, score, pre_classifier, ...), with a tied output
    embedding's weight, which is the input embedding's (``named_parameters(remove_duplicate=False)``); a model
    without a base-model submodule: its output embedding's."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                if not (n == prefix or n.startswith(prefix + "."))}
    # no base-model submodule (T5ForConditionalGeneration: shared, encoder, decoder, lm_head): the output embedding
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {id(p) for p in output.parameters()} if output is not None else set()


def apply_generic_method(model, spec: ModelSpec, settings: MethodSettings):
    """The requires_grad masks of full, frozen (the task head: :func:`head_params`) and bitfit (every
    ``.bias``, and a classifier's head, which a fine-tuned classifier always trains) on any model; the peft
    methods go through measure.build.apply_method's peft path (peft's own default targets)."""
    method = settings.method
    if method not in GENERIC_METHODS:
        raise InputError(f"method '{method}' needs peftcalc's model of the {spec.model_type} blocks; on the traced "
                         f"route of an unmodelled family choose from {', '.join(GENERIC_METHODS)}")
    head = head_params(model) if method == "frozen" or spec.task == "seq_cls" else set()
    if method == "frozen" and not head:
        raise InputError(f"method 'frozen' trains the task head, and {spec.architecture} has none")
    for name, param in model.named_parameters():
        trains = (method == "full" or id(param) in head
                  or (method == "bitfit" and name.endswith(".bias")))
        param.requires_grad_(trains)
    if method == "bitfit" and not any(n.endswith(".bias") for n, _ in model.named_parameters()):
        raise InputError(f"method 'bitfit' needs bias terms, and {spec.name} has none")
    return model

