"""The registry of model families: FAMILIES (one Family record per model_type), family(spec), the layout
of a spec and the dropout probabilities its config sets. Adding a family: see families.record.Family.
"""

from __future__ import annotations

import re

from functools import lru_cache

from peftcalc.families.bert import BERT, ROBERTA
from peftcalc.families.gemma2 import GEMMA2
from peftcalc.families.gemma3 import GEMMA3_TEXT
from peftcalc.families.blip2 import BLIP2, BLIP2_QFORMER, BLIP2_VISION
from peftcalc.families.gpt2 import GPT2
from peftcalc.families.gpt_oss import GPT_OSS
from peftcalc.families.granite import GRANITE
from peftcalc.families.llama import LLAMA, MISTRAL, QWEN2
from peftcalc.families.llava import LLAVA
from peftcalc.families.olmo2 import OLMO2
from peftcalc.families.opt import OPT
from peftcalc.families.phi3 import PHI3
from peftcalc.families.qwen3 import QWEN3
from peftcalc.families.mixtral import MIXTRAL
from peftcalc.families.qwen2_moe import QWEN2_MOE
from peftcalc.families.qwen3_moe import QWEN3_MOE
from peftcalc.families.record import Family, config_dropout
from peftcalc.families.smollm3 import SMOLLM3
from peftcalc.families.vision import CLIP_VISION, VIT
from peftcalc.layout import Layout
from peftcalc.spec import ModelSpec

__all__ = [
    "ARCHITECTURE_TASKS",
    "attention_for",
    "FAMILIES",
    "KEEP_IN_FP32_MODULES",
    "SUPPORTED_MODEL_TYPES",
    "build_layout",
    "dropout_p",
    "family",
    "kept_in_fp32",
]


FAMILIES = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, GPT2, BERT, ROBERTA, VIT, CLIP_VISION, OPT, LLAVA,
                                      BLIP2, BLIP2_QFORMER, BLIP2_VISION)}
FAMILIES.update({f.model_type: f for f in (QWEN3, OLMO2, PHI3)})  # issue 12's dense families
FAMILIES.update({f.model_type: f for f in (MIXTRAL, QWEN3_MOE, QWEN2_MOE, GPT_OSS)})  # mixture-of-experts

FAMILIES.update({f.model_type: f for f in (GEMMA2, GEMMA3_TEXT)})  # issue 12: Gemma 2 and Gemma 3 text
FAMILIES.update({f.model_type: f for f in (GRANITE, SMOLLM3)})  # issue 12: Granite 3.x's multipliers, SmolLM3's NoPE


def attention_for(spec: ModelSpec, requested: str) -> str:
    """The attention implementation the model runs when `requested` is asked for: `requested` where the
    family's transformers class supports it, else its default (Family.attentions: Gemma 2 has no SDPA path,
    its soft-capping needs eager, so it runs eager); `requested` for a family peftcalc does not model (a trace)."""
    if spec.model_type not in FAMILIES:
        return requested
    supported = FAMILIES[spec.model_type].attentions
    return requested if requested in supported else supported[0]


def family(spec: ModelSpec) -> Family:
    """The Family record of a spec's model_type."""
    return FAMILIES[spec.model_type]


@lru_cache(maxsize=256)
def build_layout(spec: ModelSpec) -> Layout:
    """The modules of the model class `spec` names."""
    return FAMILIES[spec.model_type].layout(spec)


def dropout_p(spec: ModelSpec, where: str) -> float:
    """The dropout probability the model applies at `where` ('embd', 'attn', 'resid'; Family.dropout)."""
    return config_dropout(spec, {spec.model_type: FAMILIES[spec.model_type].dropout}, where)


# The model types a config may name (peftcalc.config.spec_from_config), in the order users see them.
SUPPORTED_MODEL_TYPES = tuple(t for t, f in FAMILIES.items() if f.read_config is not None)
# Which task each model class (a config's `architectures`) means, over every family.
ARCHITECTURE_TASKS = {arch: task for f in FAMILIES.values() for arch, task in f.architectures.items()}
# The modules each model class keeps in fp32 when loaded in half precision (Family.keep_in_fp32).
KEEP_IN_FP32_MODULES = {arch: kept for f in FAMILIES.values() for arch, kept in f.keep_in_fp32.items()}


def kept_in_fp32(spec: ModelSpec, name: str, weight_dtype: str) -> bool:
    """Whether from_pretrained(..., dtype=weight_dtype) loads the parameter `name` in fp32: its class's
    keep-in-fp32 patterns for that dtype (Family.keep_in_fp32: (_keep_in_fp32_modules,
    _keep_in_fp32_modules_strict) of the transformers class, 5.23; PreTrainedModel.post_init gathers both from
    the submodels). from_pretrained applies the first only for dtype=float16, the second for float16 and
    bfloat16 (modeling_utils.py PreTrainedModel._get_dtype_plan), matched the way transformers 5.x
    core_model_loading.py convert_and_load_state_dict_in_model does, ``build_glob_alternation(...).search`` on
    the state-dict key (a substring search, '*' a wildcard). Every other class has neither
    (tests/measure/test_build.py checks this against transformers)."""
    if weight_dtype not in ("float16", "bfloat16"):
        return False
    modules, strict = KEEP_IN_FP32_MODULES.get(spec.architecture, ((), ()))
    patterns = strict + (modules if weight_dtype == "float16" else ())
    return any(re.search(p.replace("*", ".*"), name) for p in patterns)
