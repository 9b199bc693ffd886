"""Shared pieces of the planners: parameter groups from a layout, peft's target matching and
modules_to_save copies of a classification head.
"""

from __future__ import annotations

from peftcalc.errors import CombinationError
from peftcalc.families import family
from peftcalc.families.llava import LANGUAGE_MODEL
from peftcalc.layout import LINEAR_KINDS, Layout, Module, param_names
from peftcalc.plan import MethodSettings, ParamGroup
from peftcalc.spec import ModelSpec

__all__ = [
    "PEFT_MOE_CONVERTED",
    "SEQ_CLS_HEAD_NAMES",
    "all_linear",
    "base_groups",
    "head_copy",
    "head_trainable_fn",
    "module_matches",
    "modules_by_path",
    "param_shape",
    "peft_task_type",
    "resolve_targets",
    "seq_cls_head_fn",
    "shape_numel",
    "under",
]


# peft's PeftModelForSequenceClassification adds these to modules_to_save.
SEQ_CLS_HEAD_NAMES = ("classifier", "score")


def peft_task_type(spec: ModelSpec) -> str | None:
    """The peft task type users set for this architecture: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM (an encoder-decoder,
    traced only), or none."""
    return {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM"}.get(spec.task)


def module_matches(path: str, keys) -> bool:
    """peft's target matching for a list of names: an exact name or a dotted suffix
    (peft tuners_utils.check_target_module_exists)."""
    return any(path == key or path.endswith("." + key) for key in keys)


def under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def param_shape(module: Module, name: str) -> tuple:
    """Shape of one of `module`'s parameters (`name` as param_names gives it)."""
    if name.endswith(".bias") and module.kind != "param":
        return (module.bias_numel,)
    return module.shape


def base_groups(layout: Layout, trainable_fn) -> list[ParamGroup]:
    groups = []
    for m in layout.modules:
        for name, numel in param_names(m):
            groups.append(ParamGroup(name, numel, bool(trainable_fn(m, name)), "base", m.layer,
                                     shape=param_shape(m, name)))
    return groups


def head_copy(layout: Layout, spec: ModelSpec) -> list[ParamGroup]:
    """peft SEQ_CLS: the head (classifier/score) is wrapped in ModulesToSaveWrapper, whose trainable
    copy adds its parameters once more (peft utils/other.py ModulesToSaveWrapper)."""
    if peft_task_type(spec) != "SEQ_CLS":
        return []
    copies = []
    for m in layout.modules:
        if under(m.path, SEQ_CLS_HEAD_NAMES):
            for name, numel in param_names(m):
                copies.append(ParamGroup(f"{name}#modules_to_save", numel, True, "head_copy",
                                         shape=param_shape(m, name)))
    return copies


def head_trainable_fn(layout: Layout, extra_prefixes=()):
    prefixes = tuple(layout.head_paths) + tuple(extra_prefixes)
    if layout.head_tied_to_embedding:
        prefixes += (layout.embedding_path,)
    return lambda m, name: under(m.path, prefixes)


def seq_cls_head_fn(spec, layout):
    """Methods that are not peft's still train a fresh classification head, as peft's SEQ_CLS does."""
    if spec.task == "seq_cls":
        return lambda m, name: under(m.path, layout.head_paths)
    return lambda m, name: False


def modules_by_path(layout: Layout) -> dict[str, Module]:
    return {m.path: m for m in layout.modules}


def shape_numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# Model types whose peft config peft 0.21 rewrites for transformers 5's fused experts
# (utils/transformers_weight_conversion.py _convert_peft_config_moe: transformers' conversion pattern of the model
# type is mixtral's or qwen2_moe's; Qwen2-MoE itself maps to none).
PEFT_MOE_CONVERTED = ("mixtral", "qwen3_moe")


def resolve_targets(spec: ModelSpec, layout: Layout, s: MethodSettings) -> tuple[str, ...]:
    """The module paths peft would wrap (tuners_utils.BaseTuner.inject_adapter)."""
    if s.method == "ia3":
        keys = s.targets if s.targets is not None else family(spec).ia3_targets
    else:
        keys = s.targets if s.targets is not None else family(spec).lora_targets
    if keys == "all-linear" and spec.model_type in PEFT_MOE_CONVERTED:
        raise CombinationError(f"peft 0.21 turns all-linear on {spec.model_type} into LoRA on the router and the fused "
                               "experts (target_parameters, peft utils/transformers_weight_conversion.py), which is not "
                               "modelled; name the targets (e.g. --targets q_proj,k_proj,v_proj,o_proj)")
    if keys == "all-linear":
        paths = all_linear(spec, layout)
    else:
        # a fused experts parameter is targeted by its name (peft target_parameters: "mlp.experts.gate_up_proj")
        params = [k for k in keys if "experts." in k]
        paths = tuple(m.path for m in layout.modules if (m.kind != "param" and module_matches(m.path, keys))
                      or (m.role == "experts" and module_matches(m.path, params)))
    if spec.is_vlm:  # LoRA on a VLM wraps the language model only (measure.build.vlm_lora_config)
        paths = tuple(p for p in paths if under(p, (LANGUAGE_MODEL,)))
    if peft_task_type(spec) == "SEQ_CLS":  # modules_to_save (the head) is copied whole, never wrapped
        paths = tuple(p for p in paths if not under(p, SEQ_CLS_HEAD_NAMES))
    if not paths:
        raise CombinationError(f"target modules {', '.join(keys)} match no module of {spec.name}")
    return paths


def all_linear(spec: ModelSpec, layout: Layout) -> tuple[str, ...]:
    """peft tuners_utils._maybe_include_all_linear_layers: every Linear/Conv1D except the output
    embedding (causal/masked LM) or, for SEQ_CLS, the head module named classifier/score itself."""
    exclude = set()
    if layout.output_embedding_path:
        exclude.add(layout.output_embedding_path)
    elif peft_task_type(spec) == "SEQ_CLS":
        exclude.update(SEQ_CLS_HEAD_NAMES)
    return tuple(m.path for m in layout.modules if m.kind in LINEAR_KINDS and m.path not in exclude)
