"""The registry of model families: FAMILIES (one Family record per model_type), family(spec), the layout
of a spec and the dropout probabilities its config sets. Adding a family: see families.record.Family.
"""

from __future__ import annotations

from functools import lru_cache

from peftcalc.families.bert import BERT, ROBERTA
from peftcalc.families.blip2 import BLIP2, BLIP2_QFORMER, BLIP2_VISION
from peftcalc.families.gpt2 import GPT2
from peftcalc.families.llama import LLAMA, MISTRAL, QWEN2
from peftcalc.families.llava import LLAVA
from peftcalc.families.opt import OPT
from peftcalc.families.record import Family, config_dropout
from peftcalc.families.vision import CLIP_VISION, VIT
from peftcalc.layout import Layout
from peftcalc.spec import ModelSpec

__all__ = [
    "FAMILIES",
    "annotations",
    "build_layout",
    "dropout_p",
    "family",
]


FAMILIES = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, GPT2, BERT, ROBERTA, VIT, CLIP_VISION, OPT, LLAVA,
                                      BLIP2, BLIP2_QFORMER, BLIP2_VISION)}


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
