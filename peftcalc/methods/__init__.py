"""Step 2 of the model: which parameters train, and which ones a method adds.

Each method is a plain function from a Layout and MethodSettings to a list of ParamGroup rows, in its
own module (masks, lora, ia3, adapter, prompt, vlm); PLANNERS maps a method name to it. The peft methods
mirror what ``peft.get_peft_model`` creates (peft 0.21: ``tuners/lora/layer.py``, ``tuners/ia3/layer.py``,
``tuners/prefix_tuning/model.py``, ``tuners/prompt_tuning/model.py``,
``peft_model.PeftModelForSequenceClassification``); the others (full, frozen, freeze, bitfit, adapter) are
``requires_grad`` masks or the bottleneck module described in adapter.adapter_numel. Adding a method: one
module with its planner (and its ops, if it adds any), one line in PLANNERS and METHODS.
"""

from __future__ import annotations

from functools import lru_cache

from peftcalc.checks import require_bool, require_int, require_number
from peftcalc.errors import CombinationError, InputError
from peftcalc.families import FAMILIES, build_layout, family
from peftcalc.families.llava import PROJECTOR
from peftcalc.spec import ModelSpec
from peftcalc.methods.adapter import (ADAPTER_ATTRIBUTE, ADAPTER_KINDS, BLOCK_ADAPTER_BOTTLENECK, BLOCK_ADAPTER_DROPOUT,
                                      VLM_ADAPTER_KINDS, adapter_hidden, adapter_numel, adapter_shapes, adapter_sites,
                                      plan_adapter, resolve_adapter_kind, resolve_bottleneck, vision_adapter_sites)
from peftcalc.methods.groups import SEQ_CLS_HEAD_NAMES, module_matches, param_shape, peft_task_type, resolve_targets
from peftcalc.methods.ia3 import plan_ia3
from peftcalc.methods.lora import lora_numel, lora_shapes, plan_lora
from peftcalc.methods.masks import default_trainable_layers, plan_bitfit, plan_freeze, plan_frozen, plan_full
from peftcalc.methods.prompt import plan_prompt_learning, prompt_token_dim
from peftcalc.methods.vlm import (VISION_LAYERS, plan_projector, plan_projector_llm, plan_qformer,
                                  unfrozen_vision_layers, vision_layer_of, vision_layers_used)
from peftcalc.plan import MethodSettings, ParamGroup, Plan

__all__ = [
    "ADAPTER_ATTRIBUTE",
    "ADAPTER_KINDS",
    "ALL_METHODS",
    "BLIP2_METHODS",
    "BLOCK_ADAPTER_BOTTLENECK",
    "BLOCK_ADAPTER_DROPOUT",
    "IA3_DEFAULT_TARGETS",
    "KNOWN_METHODS",
    "LORA_DEFAULT_TARGETS",
    "METHODS",
    "METHOD_HELP",
    "MethodSettings",
    "PEFT_METHODS",
    "PLANNERS",
    "ParamGroup",
    "Plan",
    "SEQ_CLS_HEAD_NAMES",
    "VISION_LAYERS",
    "VLM_ADAPTER_KINDS",
    "VLM_METHODS",
    "VLM_ONLY_METHODS",
    "adapter_hidden",
    "adapter_numel",
    "adapter_shapes",
    "adapter_sites",
    "METHOD_KNOBS",
    "applicable_knobs",
    "check_applies",
    "check_combination",
    "check_method_values",
    "check_settings",
    "default_trainable_layers",
    "lora_numel",
    "lora_shapes",
    "make_plan",
    "max_seq_len",
    "methods_for",
    "module_matches",
    "normalize_targets",
    "param_shape",
    "peft_task_type",
    "plan_adapter",
    "plan_bitfit",
    "plan_freeze",
    "plan_frozen",
    "plan_full",
    "plan_ia3",
    "plan_lora",
    "plan_projector",
    "plan_projector_llm",
    "plan_prompt_learning",
    "plan_qformer",
    "position_limit",
    "prepare_kbit_default",
    "prompt_token_dim",
    "resolve_adapter_kind",
    "resolve_bottleneck",
    "resolve_targets",
    "unfrozen_vision_layers",
    "vision_adapter_sites",
    "vision_layer_of",
    "vision_layers_used",
]

# peft's default target modules per model type (Family.lora_targets / ia3_targets, ia3_feedforward)
LORA_DEFAULT_TARGETS = {t: f.lora_targets for t, f in FAMILIES.items() if f.lora_targets}
IA3_DEFAULT_TARGETS = {t: (f.ia3_targets, f.ia3_feedforward) for t, f in FAMILIES.items() if f.ia3_targets}

METHODS = ("full", "frozen", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit", "ia3")

# What a vision-language model (llava) supports; projector and projector-llm exist only there.
VLM_METHODS = ("projector", "projector-llm", "lora", "adapter")

VLM_ONLY_METHODS = ("projector", "projector-llm")

ALL_METHODS = METHODS + VLM_ONLY_METHODS

# BLIP-2 (Blip2ForConditionalGeneration): the Q-Former stage
BLIP2_METHODS = ("qformer",)

KNOWN_METHODS = ALL_METHODS + BLIP2_METHODS


def methods_for(spec: ModelSpec) -> tuple[str, ...]:
    """The methods a model takes: METHODS, VLM_METHODS for a LLaVA model, BLIP2_METHODS for BLIP-2."""
    if spec.is_blip2:
        return BLIP2_METHODS
    return VLM_METHODS if spec.is_vlm else METHODS


PEFT_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3")

METHOD_HELP = {
    "full": "every parameter trains",
    "frozen": "backbone frozen, only the task head trains (linear probe)",
    "freeze": "bottom blocks frozen; the top --trainable-layers blocks, final norm and head train",
    "lora": "peft LoRA adapters (A: r x in, B: out x r) on the target modules; base frozen",
    "qlora": "LoRA on a 4-bit NF4 base (bitsandbytes), double quantization by default",
    "adapter": "bottleneck adapters (Houlsby: after attention and FFN; Pfeiffer: after FFN). On a VLM (LLaVA): "
               "adapters in the frozen vision tower's blocks the projector reads (default: block adapters, "
               "LayerNorm(x + up(gelu(down(x)))) after each block, bottleneck 256), the projector trains, the "
               "language model is frozen",
    "prefix": "peft prefix tuning: trainable keys/values for every layer",
    "prompt": "peft prompt tuning: trainable virtual token embeddings",
    "bitfit": "only bias terms train",
    "ia3": "peft IA3: learned scaling vectors on keys, values and the FFN",
    "projector": "VLM (LLaVA stage 1): only the multi-modal projector trains",
    "projector-llm": "VLM (LLaVA stage 2): the projector and the whole language model train; vision tower frozen",
    "qformer": "BLIP-2: the Q-Former, its query tokens and the language projection train; vision tower and LLM frozen",
}


def prepare_kbit_default(method: str, sharding: str = "none") -> bool:
    """Whether `method` runs peft's prepare_model_for_kbit_training when the user does not say: on for
    QLoRA, as the usual recipe does (peft's QLoRA guide and TRL's SFTTrainer call it on every k-bit
    model before get_peft_model), off for everything else (it applies to quantized bases only). It
    upcasts the non-quantized parameters (norms, embeddings, lm_head) to fp32 (peft utils/other.py);
    its use_gradient_checkpointing is --grad-checkpointing here. Under FSDP2 (`sharding` fsdp or hsdp)
    off: TRL's SFTTrainer skips it for a sharded QLoRA model (trl/trainer/sft_trainer.py
    ``_prepare_peft_model``: ``is_sharded_qlora``), which keeps every parameter in the quant storage dtype."""
    return method == "qlora" and sharding not in ("fsdp", "hsdp")


PLANNERS = {
    "full": plan_full,
    "frozen": plan_frozen,
    "freeze": plan_freeze,
    "bitfit": plan_bitfit,
    "adapter": plan_adapter,
    "lora": plan_lora,
    "qlora": plan_lora,
    "ia3": plan_ia3,
    "prefix": plan_prompt_learning,
    "prompt": plan_prompt_learning,
    "projector": plan_projector,
    "projector-llm": plan_projector_llm,
    "qformer": plan_qformer,
}


def position_limit(spec: ModelSpec) -> int:
    """Longest sequence a model with learned positions takes (0: no limit; rotary models have none).
    RoBERTa's positions start after padding_idx (transformers create_position_ids_from_input_ids),
    losing two."""
    if spec.is_vision or not spec.max_positions or not family(spec).learned_positions:
        return 0
    return spec.max_positions - family(spec).position_offset


def _tokens_beside_text(spec: ModelSpec, s: MethodSettings) -> tuple[int, int]:
    """Positions taken beside the text: prefix/prompt tuning's virtual tokens, BLIP-2's query tokens
    (OPT sees them first)."""
    extra = s.num_virtual_tokens if s.method in ("prefix", "prompt") else 0
    queries = dict(spec.blip2)["num_query_tokens"] if spec.is_blip2 else 0
    return extra, queries


def max_seq_len(spec: ModelSpec, s: MethodSettings) -> int:
    """The longest --seq-len the model's learned positions take with method settings `s` (0: no limit)."""
    limit = position_limit(spec)
    return limit - sum(_tokens_beside_text(spec, s)) if limit else 0


def check_combination(spec: ModelSpec, s: MethodSettings, seq_len: int, grad_checkpointing: bool) -> None:
    """Method and training settings the real stack cannot run together (InputError, one line):
    - a sequence (plus prefix/prompt virtual tokens, or BLIP-2's query tokens, which take positions
      too) longer than a model with learned positions has (GPT-2 1024, BERT 512, RoBERTa 514 - 2, OPT
      2048);
    - prefix tuning with gradient checkpointing: peft hands the prefix to the model as a transformers
      Cache, and the checkpoint's recompute of each layer updates it again, so keys and the attention
      mask disagree (peft#869, peft PR #2191; traced here with transformers 5.23 / peft 0.21.2: on cpu
      "The size of tensor a (32) must match the size of tensor b (52)" for tiny-llama 2 x 32)."""
    extra, queries = _tokens_beside_text(spec, s)
    longest = max_seq_len(spec, s)
    if longest and seq_len > longest:
        more = f" + {extra} virtual tokens" if extra else f" + {queries} query tokens" if queries else ""
        raise CombinationError(f"seq_len {seq_len}{more} exceeds {spec.name}'s {position_limit(spec)} positions",
                               names=("seq_len",))
    if s.method == "prefix" and grad_checkpointing:
        raise CombinationError("prefix tuning cannot run with gradient checkpointing: the recompute updates peft's "
                         "prefix cache a second time (peft#869); drop grad_checkpointing or use method prompt",
                               names=("grad_checkpointing",))


# The methods that read each knob of MethodSettings (the others ignore it). vision_layers: the LLaVA methods
# whose planner unfreezes vision layers (methods.vlm.vision_trains_fn); check_settings refuses it on a model
# that is not a vision-language model.
METHOD_KNOBS = {
    "rank": ("lora", "qlora"),
    "alpha": ("lora", "qlora"),
    "dora": ("lora", "qlora"),
    "targets": ("lora", "qlora", "ia3"),
    "double_quant": ("qlora",),
    "prepare_kbit": ("qlora",),
    "bottleneck": ("adapter",),
    "adapter_kind": ("adapter",),
    "num_virtual_tokens": ("prefix", "prompt"),
    "trainable_layers": ("freeze",),
    "vision_layers": ("projector", "projector-llm", "lora"),
}


def check_applies(method: str, given: dict) -> None:
    """InputError naming the first knob in `given` (knob name -> value the user gave; None: not given) that
    `method` does not read: a user's single estimate must not silently drop a setting. Sweeps and
    comparisons, which give one grid of knobs to every method, do not call it."""
    for name, value in given.items():
        methods = METHOD_KNOBS.get(name)
        if value is not None and methods is not None and method not in methods:
            raise InputError(f"{name} applies to {', '.join(methods)}; method '{method}' does not read it",
                             names=(name,))


def applicable_knobs(method: str, knobs: dict) -> dict:
    """The knobs of `knobs` that `method` reads (a recorded MethodSettings holds every field; the ones its
    method ignores are dropped before they are given to estimate)."""
    return {k: v for k, v in knobs.items() if method in METHOD_KNOBS.get(k, (method,))}


def check_method_values(s: MethodSettings) -> None:
    """InputError naming the field unless every knob of `s` has a type and range the calculator takes (ranges
    that depend on the model: check_settings and the planners)."""
    if not isinstance(s.method, str) or s.method not in KNOWN_METHODS:
        raise InputError(f"unknown method {s.method!r}; choose from {', '.join(KNOWN_METHODS)}")
    require_int("rank", s.rank)
    if s.alpha is not None:
        require_number("alpha", s.alpha, 0, low_open=True, what="a positive number")
    for name in ("dora", "double_quant", "prepare_kbit"):
        require_bool(name, getattr(s, name))
    for name in ("bottleneck", "trainable_layers"):
        if getattr(s, name) is not None:
            require_int(name, getattr(s, name))
    require_int("num_virtual_tokens", s.num_virtual_tokens)
    require_int("vision_layers", s.vision_layers, minimum=0)
    if s.adapter_kind is not None and not isinstance(s.adapter_kind, str):
        raise InputError(f"adapter_kind must be a string, got {s.adapter_kind!r}", names=("adapter_kind",))


def check_settings(spec: ModelSpec, s: MethodSettings) -> None:
    if s.method not in KNOWN_METHODS:
        raise InputError(f"unknown method '{s.method}'; choose from {', '.join(KNOWN_METHODS)}")
    if spec.is_blip2 != (s.method in BLIP2_METHODS):
        if spec.is_blip2:
            raise CombinationError(f"method '{s.method}' is not supported for the BLIP-2 model {spec.name}; "
                             f"choose from {', '.join(BLIP2_METHODS)}")
        raise CombinationError(f"method '{s.method}' trains a BLIP-2 Q-Former, and {spec.name} ({spec.architecture}) "
                         "has none")
    if spec.is_vlm and s.method not in VLM_METHODS:
        raise CombinationError(f"method '{s.method}' is not supported for the vision-language model {spec.name}; "
                         f"choose from {', '.join(VLM_METHODS)}")
    if s.vision_layers:
        if not spec.is_vlm:
            raise InputError(f"vision_layers applies to vision-language models; {spec.name} is not one",
                             names=("vision_layers",))
        if not 0 < s.vision_layers <= vision_layers_used(spec):
            raise InputError(f"vision_layers must be between 0 and the {vision_layers_used(spec)} vision "
                             f"layers the projector reads, got {s.vision_layers}", names=("vision_layers",))
    if not spec.is_vlm and s.method in VLM_ONLY_METHODS:
        raise CombinationError(f"method '{s.method}' trains a vision-language model's projector, and {spec.name} "
                         f"({spec.architecture}) has none")
    if s.prepare_kbit and s.method != "qlora":
        raise InputError(f"prepare_kbit applies to qlora (peft.prepare_model_for_kbit_training prepares a "
                         f"quantized base); method '{s.method}' has none", names=("prepare_kbit",))
    if s.method == "freeze":
        k = s.trainable_layers if s.trainable_layers is not None else default_trainable_layers(spec)
        if not 1 <= k <= spec.num_layers:
            raise InputError(f"trainable_layers must be between 1 and the depth {spec.num_layers}, got {k}",
                             names=("trainable_layers",))


@lru_cache(maxsize=4096)
def make_plan(spec: ModelSpec, settings: MethodSettings) -> Plan:
    """Apply a method to a model: every parameter with its trainable flag and origin."""
    check_settings(spec, settings)
    layout = build_layout(spec)
    result = PLANNERS[settings.method](spec, layout, settings)
    targets: tuple[str, ...] = ()
    if isinstance(result, tuple):
        result, targets = result
    groups = tuple(result)
    trainable_layers = [g.layer for g in groups if g.trainable and g.layer is not None]
    embedding_trains = any(
        g.trainable and g.origin == "base" and g.name.startswith(layout.embedding_path + ".") for g in groups
    )
    if spec.is_vlm:  # the projected image features are scattered into the language model's input
        # embeddings (LlavaModel.forward, masked_scatter): a trainable projector makes that input need a
        # gradient, as a trainable embedding does
        embedding_trains = embedding_trains or any(g.trainable and g.name.startswith(PROJECTOR + ".") for g in groups)
    return Plan(
        spec=spec,
        settings=settings,
        groups=groups,
        targets=targets,
        lowest_trainable_layer=min(trainable_layers) if trainable_layers else None,
        embedding_trains=embedding_trains,
    )


def normalize_targets(targets) -> tuple[str, ...] | str | None:
    """`--targets q_proj,v_proj` or `all-linear` (or a list of module names) into what MethodSettings holds;
    an empty value, or one that is not a string or a list of strings, is an InputError."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets.strip().lower() == "all-linear":
            return "all-linear"
        targets = [t for t in (x.strip() for x in targets.split(",")) if t]
    elif isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        targets = [t.strip() for t in targets if t.strip()]
    else:
        raise InputError(f"targets must be comma-separated module names, all-linear or a list of names, got "
                         f"{targets!r}", names=("targets",))
    if not targets:
        raise InputError("targets: empty (leave it out for peft's default modules)", names=("targets",))
    return tuple(targets)
