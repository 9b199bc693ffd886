"""Prefix tuning and prompt tuning (peft tuners/prefix_tuning, tuners/prompt_tuning): virtual tokens.
"""

from __future__ import annotations

from peftcalc.errors import CombinationError, InputError
from peftcalc.families import family
from peftcalc.methods.groups import base_groups, head_copy, shape_numel
from peftcalc.plan import ParamGroup
from peftcalc.spec import ModelSpec

__all__ = [
    "plan_prompt_learning",
    "prompt_token_dim",
]


def prompt_token_dim(spec: ModelSpec, method: str) -> int:
    """peft utils/other.py _prepare_prompt_learning_config: token_dim = hidden size; for prefix tuning
    on configs with num_key_value_heads (GQA, peft#1901) it is num_key_value_heads * head_dim."""
    if method == "prefix" and family(spec).prefix_kv_dim:
        return spec.kv_dim
    return spec.hidden_size


def plan_prompt_learning(spec, layout, s):
    if spec.task not in ("causal_lm", "seq_cls"):
        raise CombinationError(
            f"method '{s.method}' needs a causal LM or sequence classifier (peft injects virtual tokens "
            f"only there); {spec.name} is {spec.architecture}"
        )
    if s.num_virtual_tokens < 1:
        raise InputError(f"num_virtual_tokens must be a positive integer, got {s.num_virtual_tokens}",
                         names=("num_virtual_tokens",))
    groups = base_groups(layout, lambda m, name: False)
    dim = prompt_token_dim(spec, s.method)
    if s.method == "prefix":  # PrefixEncoder: Embedding(num_virtual_tokens, num_layers * 2 * token_dim)
        shape = (s.num_virtual_tokens, spec.num_layers * 2 * dim)
    else:  # PromptEmbedding: Embedding(num_virtual_tokens, token_dim)
        shape = (s.num_virtual_tokens, dim)
    groups.append(ParamGroup("prompt_embeddings", shape_numel(shape), True, s.method, shape=shape))
    return groups + head_copy(layout, spec)
