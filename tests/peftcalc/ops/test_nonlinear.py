"""peftcalc.ops.nonlinear: the MLP activations and tanh, by hand (derivatives.yaml) and against real CPU traces
of torch's and transformers' (transformers.activations) modules.

x is 2 x 8 x 16 fp32: U = 1,024 bytes; every intermediate is one U."""

import pytest
from opkit import F32, context, replay_peak, trace

from peftcalc.ops.nonlinear import activation, tanh
from peftcalc.ops.recorder import Recorder

U = 2 * 8 * 16 * F32


def _module(kind):
    import torch
    from transformers.activations import NewGELUActivation, QuickGELUActivation

    return {"gelu": torch.nn.GELU(), "silu": torch.nn.SiLU(), "relu": torch.nn.ReLU(), "gelu_new": NewGELUActivation(),
            "quick_gelu": QuickGELUActivation(), "tanh": torch.tanh}[kind]


def _traced(kind, x_grad=True):
    import torch

    return trace(_module(kind), lambda: (torch.randn(2, 8, 16, requires_grad=x_grad),), backward=x_grad)


def _run(kind, x_grad=True):
    rec = Recorder(context())
    x = rec.new(2 * 8 * 16, "float32", x_grad)
    out = tanh(rec, x, "act") if kind == "tanh" else activation(rec, x, kind, "act")
    return rec, out


# kind -> (saved tags, forward peak, backward peak), in U
HAND = {
    # gelu: GeluBackward0 saves self (gelu_backward(grad, self)); silu: SiluBackward0 saves self. Forward:
    # x and y. Backward: saved x, grad, grad_x.
    "gelu": ({"act.input": 1}, 2, 3),
    "silu": ({"act.input": 1}, 2, 3),
    # relu: ReluBackward0 saves result (threshold_backward(grad, result, 0)); tanh: TanhBackward0 saves
    # result (tanh_backward(grad, result)).
    "relu": ({"act.output": 1}, 2, 3),
    "tanh": ({"act.output": 1}, 2, 3),
    # quick_gelu, x * sigmoid(1.702 * x): 1.702 x (freed once sigmoid has run), sigmoid's output (saved by
    # SigmoidBackward0 and by the mul), the product saves x and the sigmoid. Forward peak: x, 1.702 x, the
    # sigmoid; and again x, the sigmoid, y. Backward peak, in the product's MulBackward0: saved x and the
    # sigmoid, the incoming gradient, the two gradients it makes: 5.
    "quick_gelu": ({"act.input": 1, "act.sigmoid": 1}, 3, 5),
    # gelu_new, 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x ** 3))), left to right: 0.5 x (kept
    # for the last product); x ** 3 (PowBackward0 saves x), 0.044715 * _, x + _, sqrt(2/pi) * _ (each
    # freeing its operand); tanh (saves its result); 1 + tanh; the product saves 0.5 x and 1 + tanh.
    # Saved: x, tanh, 0.5 x, 1 + tanh. Forward peak at y: x, 0.5 x, tanh, 1 + tanh, y: 5. Backward peak, in
    # the product's MulBackward0: the four saved, the incoming gradient and the two it makes: 7.
    "gelu_new": ({"act.input": 1, "act.tanh": 1, "act.half_x": 1, "act.one_plus_tanh": 1}, 5, 7),
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_activation_saves_and_peaks(kind):
    tags, forward, backward = HAND[kind]
    rec, out = _run(kind)
    assert rec.bytes_by_tag() == {tag: n * U for tag, n in tags.items()}
    assert rec.forward_peak == forward * U
    assert replay_peak(rec, out).total == backward * U
    t = _traced(kind)
    assert (t.forward_peak, t.saved, t.backward_peak) == (forward * U, sum(tags.values()) * U, backward * U)


@pytest.mark.parametrize("kind,forward", [("gelu", 2), ("silu", 2), ("gelu_new", 4), ("quick_gelu", 3)])
def test_activation_without_a_gradient_keeps_only_its_temporaries(kind, forward):
    """No gradient: nothing saved, no node. gelu_new's formula still runs step by step: x, 0.5 x, x ** 3
    and 0.044715 * _ at once (4 U; every later step frees its operand as it makes its result); quick_gelu:
    x, 1.702 x and the sigmoid (3 U)."""
    rec, _ = _run(kind, x_grad=False)
    assert (rec.saved_bytes(), rec.nodes, rec.forward_peak) == ({}, [], forward * U)
    t = _traced(kind, x_grad=False)
    assert (t.forward_peak, t.saved) == (forward * U, 0)
