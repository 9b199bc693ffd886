"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), implemented here because peft has
none and the `adapters` package pins an older transformers.

An adapter is ``x + up(act(down(x)))`` applied to the output of a sublayer's output projection,
before the residual addition: after the attention output projection and the FFN output projection
(Houlsby), or after the FFN output projection only (Pfeiffer). The sites are exactly the modules
:func:`peftcalc.methods.adapter_sites` names, so counts agree with the calculator by construction
and :func:`peftcalc.methods.adapter_numel` is checked against ``numel`` in the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcalc.layout import build_layout
from peftcalc.methods import adapter_sites
from peftcalc.spec import ModelSpec

ATTRIBUTE = "adapter_bottleneck"


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


def _apply_adapter(module: nn.Module, inputs, output):
    adapter = getattr(module, ATTRIBUTE)
    if isinstance(output, tuple):
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def add_bottleneck_adapters(model: nn.Module, spec: ModelSpec, kind: str, bottleneck: int) -> list[str]:
    """Insert adapters at the calculator's sites; returns their module paths."""
    layout = build_layout(spec)
    paths = []
    for site in adapter_sites(spec, layout, kind):
        module = model.get_submodule(site.path)
        weight = module.weight
        setattr(module, ATTRIBUTE, BottleneckAdapter(spec.hidden_size, bottleneck, weight.dtype, weight.device))
        module.register_forward_hook(_apply_adapter)
        paths.append(f"{site.path}.{ATTRIBUTE}")
    return paths
