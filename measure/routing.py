"""Drive a mixture-of-experts model's routers to a stated routing (peftcalc.settings.ROUTINGS), so a traced run and
the calculator see the same assignment of tokens to experts.

A forward hook on every top-k router (MixtralTopKRouter, Qwen3MoeTopKRouter, Qwen2MoeTopKRouter, GptOssTopKRouter:
their forward returns ``(router_logits, router_scores, router_indices)``) overwrites the (tokens, top_k) int64
indices in place, through ``.data`` (the same storage: no new tensor the calculator would have to count, and
autograd's version counter of the tensor TopkBackward saved is left alone, so its backward scatters the
gradient to the driven experts). The routing weights are the router's own top-k values: the bytes do not
depend on which expert a weight belongs to. The writes are in place (``arange(out=)``, ``remainder_``); "skewed"
makes one (tokens / 2, top_k) int64 temporary for its odd tokens, freed before the experts run.
"""

from __future__ import annotations

import torch

__all__ = ["drive_routing", "drive_indices", "router_modules"]


def router_modules(model) -> list:
    """The top-k routers of a model: the modules whose class name ends in 'TopKRouter'."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def drive_indices(indices: torch.Tensor, experts: int, routing: str) -> None:
    """Write `routing` into a (tokens, top_k) index tensor, in place: balanced, pair (t, j) -> (t * top_k + j)
    mod E; worst, (t, j) -> j; skewed, even tokens as worst, odd tokens as balanced."""
    data = indices.data
    top_k = data.shape[-1]
    flat = data.view(-1)
    torch.arange(flat.numel(), out=flat)
    if routing == "balanced":
        flat.remainder_(experts)
    elif routing == "worst":
        flat.remainder_(top_k)
    elif routing == "skewed":
        data[0::2].remainder_(top_k)
        odd = data[1::2]  # the u-th odd token: (u * top_k + j) mod E (a small int64 temporary, made and freed here)
        odd.copy_(torch.arange(odd.numel(), device=data.device).view(odd.shape).remainder_(experts))
    else:
        raise ValueError(f"unknown routing {routing!r}")


def drive_routing(model, experts: int, routing: str) -> list:
    """Hook every router of `model` so its indices follow `routing`; returns the hook handles."""

    def hook(_module, _args, output):
        drive_indices(output[-1], experts, routing)

    return [m.register_forward_hook(hook) for m in router_modules(model)]
