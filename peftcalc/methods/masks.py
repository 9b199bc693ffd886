"""Methods that only choose which base parameters train (requires_grad masks): full fine-tuning, a frozen
backbone with its task head (linear probe), freezing the bottom blocks, BitFit (biases only).
"""

from __future__ import annotations

from peftcalc.errors import CombinationError
from peftcalc.layout import Layout
from peftcalc.methods.groups import base_groups, head_trainable_fn, seq_cls_head_fn
from peftcalc.spec import ModelSpec

__all__ = [
    "default_trainable_layers",
    "plan_bitfit",
    "plan_freeze",
    "plan_frozen",
    "plan_full",
]


def plan_full(spec, layout, s):
    return base_groups(layout, lambda m, name: True)


def plan_frozen(spec, layout, s):
    if not layout.head_paths:
        raise CombinationError(
            f"method 'frozen' trains the task head, and {spec.architecture} has none; "
            "use a config whose architectures name a head (ForCausalLM, ForSequenceClassification, ...)"
        )
    return base_groups(layout, head_trainable_fn(layout))


def default_trainable_layers(spec: ModelSpec) -> int:
    """Train the top quarter (the layer-freezing seed: freeze the bottom 50-75%)."""
    return max(1, spec.num_layers // 4)


def plan_freeze(spec, layout, s):
    k = s.trainable_layers if s.trainable_layers is not None else default_trainable_layers(spec)
    first = spec.num_layers - k
    above_blocks = [m.path for m in layout.modules if m.layer is None and m.role in ("head", "pooler", "norm")
                    and m.path != _embedding_norm(layout)]
    head = head_trainable_fn(layout, above_blocks)
    return base_groups(layout, lambda m, name: (m.layer is not None and m.layer >= first) or head(m, name))


def _embedding_norm(layout: Layout) -> str:
    """The LayerNorm inside the embeddings (BERT/RoBERTa) or before the blocks (CLIP) stays frozen."""
    for m in layout.modules:
        if m.role == "norm" and m.layer is None and ("embeddings" in m.path or m.path == "pre_layrnorm"):
            return m.path
    return ""


def plan_bitfit(spec, layout, s):
    head = seq_cls_head_fn(spec, layout)
    groups = base_groups(layout, lambda m, name: name.endswith(".bias") or head(m, name) or
                          (m.kind == "param" and m.path.endswith(".bias")))
    if not any(g.trainable for g in groups):
        raise CombinationError(f"method 'bitfit' needs bias terms, and {spec.name} has none")
    return groups
