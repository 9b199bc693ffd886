"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), implemented here because peft has
none and the `adapters` package pins an older transformers.

An adapter is ``x + up(act(down(x)))`` applied to the output of a sublayer's output projection,
before the residual addition: after the attention output projection and the FFN output projection
(Houlsby), or after the FFN output projection only (Pfeiffer). The sites are exactly the modules
:func:`peftcalc.methods.adapter_sites` names, so counts agree with the calculator by construction
and :func:`peftcalc.methods.adapter_numel` is checked against ``numel`` in the tests.

On a vision-language model (LLaVA) the adapters go into the frozen vision tower
(:func:`peftcalc.methods.vision_adapter_sites`): Houlsby/Pfeiffer inside its encoder layers, or the
block adapter (:class:`BlockAdapter`) on each encoder layer's output.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcalc.families import build_layout
from peftcalc.methods import (
    ADAPTER_ATTRIBUTE,
    BLOCK_ADAPTER_DROPOUT,
    adapter_hidden,
    adapter_sites,
    vision_adapter_sites,
)
from peftcalc.spec import ModelSpec

__all__ = ["ATTRIBUTE", "BlockAdapter", "BottleneckAdapter", "add_bottleneck_adapters"]

ATTRIBUTE = ADAPTER_ATTRIBUTE


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        self.act = nn.GELU()
        if device != torch.device("meta"):
            nn.init.zeros_(self.up.weight)  # near-identity at start (Houlsby section 2.1)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class BlockAdapter(nn.Module):
    """The block adapter: a bottleneck adapter after each transformer block of a frozen vision encoder (the
    frozen-backbone VLM recipe, e.g. Lightly AI's "Efficient Training for Multimodal Vision Models", 2024),
    ``layer_norm(x + dropout(up_proj(dropout(gelu(down_proj(x))))))`` with dropout 0.1 and a LayerNorm (eps 1e-5)
    over the hidden size; default init."""

    def __init__(self, hidden: int, bottleneck: int, dtype: torch.dtype, device,
                 dropout: float = BLOCK_ADAPTER_DROPOUT) -> None:
        super().__init__()
        self.down_proj = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.activation = nn.GELU()
        self.up_proj = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.down_proj(x)
        x = self.activation(x)
        x = self.dropout(x)
        x = self.up_proj(x)
        x = self.dropout(x)
        return self.layer_norm(x + residual)


def _apply_adapter(module: nn.Module, inputs, output):
    adapter = getattr(module, ATTRIBUTE)
    if isinstance(output, tuple):
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def _reference_parameter(module: nn.Module) -> torch.Tensor:
    """A parameter whose dtype and device the adapter takes (a Linear's weight; an encoder layer's first)."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else next(module.parameters())


def add_bottleneck_adapters(model: nn.Module, spec: ModelSpec, kind: str, bottleneck: int) -> list[str]:
    """Insert adapters at the calculator's sites; returns their module paths.

    Each adapter runs as a forward hook of its site, registered first (``prepend=True``) so that every
    other hook, such as transformers' hidden-state capture (utils/output_capturing.py, installed on
    CLIPEncoderLayer at the first forward that asks for hidden states), sees the adapted output. An
    encoder layer's hook runs outside its checkpointed ``forward`` (transformers modeling_layers.py
    GradientCheckpointingLayer checkpoints ``forward``, not ``__call__``), so a block adapter is never
    recomputed; adapters on a Linear inside the layer are."""
    if spec.is_vlm:
        paths = vision_adapter_sites(spec, kind)
    else:
        paths = [site.path for site in adapter_sites(spec, build_layout(spec), kind)]
    hidden = adapter_hidden(spec)
    cls = BlockAdapter if kind == "block" else BottleneckAdapter
    added = []
    for path in paths:
        module = model.get_submodule(path)
        ref = _reference_parameter(module)
        setattr(module, ATTRIBUTE, cls(hidden, bottleneck, ref.dtype, ref.device))
        module.register_forward_hook(_apply_adapter, prepend=True)
        added.append(f"{path}.{ATTRIBUTE}")
    return added
