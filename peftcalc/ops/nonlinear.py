"""Activations (silu, gelu, gelu_new, quick_gelu, relu) and tanh.
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import add, mul_node, scale

__all__ = [
    "activation",
    "activation_without_grad",
    "gelu_new",
    "tanh",
]


def activation(rec: Recorder, x: SymTensor, kind: str, tag: str) -> SymTensor:
    """The MLP activation. silu/gelu save their input (silu_backward / gelu_backward: one new
    gradient); gelu_new (NewGELUActivation, a Python formula) saves input, tanh output, 0.5*x and
    1+tanh; quick_gelu (x * sigmoid(1.702 x)) saves input and sigmoid output; relu saves its output
    (derivatives.yaml: threshold_backward(grad, result, 0))."""
    if not x.requires_grad:
        return activation_without_grad(rec, x, kind)
    if kind == "relu":
        y = rec.new(x.numel, x.dtype, True)
        rec.node(y, *input_grads(x), saved=[rec.save(y, f"{tag}.output")])
        return y
    if kind == "gelu_new":
        return gelu_new(rec, x, tag)
    if kind == "quick_gelu":
        rec.save(x, f"{tag}.input")
        z = scale(rec, x)  # 1.702 * x
        sg = rec.new(x.numel, x.dtype, True)
        sid = rec.save(sg, f"{tag}.sigmoid")
        rec.node(sg, *input_grads(z), saved=[sid])  # sigmoid_backward(grad, output)
        rec.free(z)
        saved = [rec.save(x, f"{tag}.input"), rec.save(sg, f"{tag}.sigmoid")]  # x * sigmoid saves both
        y = rec.new(x.numel, x.dtype, True)
        mul_node(rec, y, x, sg, saved)
        return y
    saved = [rec.save(x, f"{tag}.input")]
    y = rec.new(x.numel, x.dtype, True)
    rec.node(y, *input_grads(x), saved=saved)
    return y


def gelu_new(rec: Recorder, x: SymTensor, tag: str) -> SymTensor:
    """transformers NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))."""
    xs = rec.save(x, f"{tag}.input")
    half = scale(rec, x)  # 0.5 * x, evaluated first
    cube = rec.new(x.numel, x.dtype, True)  # pow(x, 3): grad * 3 x^2 (x.pow(2), 3 * _ temporaries)
    n = x.nbytes
    rec.node(cube, [("new", "t", n), ("new", "u", n), ("new", "d", n), ("free", "t"), ("free", "u")],
             [(x.id, "d")], [xs])
    c2 = scale(rec, cube)
    rec.free(cube)
    inner = add(rec, x, c2)
    rec.free(c2)
    c3 = scale(rec, inner)
    rec.free(inner)
    th = rec.new(x.numel, x.dtype, True)
    tid = rec.save(th, f"{tag}.tanh")
    rec.node(th, *input_grads(c3), saved=[tid])  # tanh_backward(grad, output)
    rec.free(c3)
    one_plus = rec.new(x.numel, x.dtype, True)
    rec.node(one_plus, outputs=[(th.id, GRAD)])
    saved = [rec.save(half, f"{tag}.half_x"), rec.save(one_plus, f"{tag}.one_plus_tanh")]
    y = rec.new(x.numel, x.dtype, True)
    mul_node(rec, y, half, one_plus, saved)
    return y


def activation_without_grad(rec: Recorder, x: SymTensor, kind: str) -> SymTensor:
    """An activation on a tensor that needs no gradient: only its forward's intermediates (gelu_new:
    0.5 x, x^3, then each step of the formula; quick_gelu: 1.702 x and the sigmoid)."""
    if kind == "gelu_new":
        half = rec.new(x.numel, x.dtype, False)
        t = rec.new(x.numel, x.dtype, False)
        u = rec.new(x.numel, x.dtype, False)
        rec.free(t)
        rec.free(u)
        y = rec.new(x.numel, x.dtype, False)
        rec.free(half)
        return y
    if kind == "quick_gelu":
        z = rec.new(x.numel, x.dtype, False)
        sg = rec.new(x.numel, x.dtype, False)
        rec.free(z)
        y = rec.new(x.numel, x.dtype, False)
        rec.free(sg)
        return y
    return rec.new(x.numel, x.dtype, False)


def tanh(rec: Recorder, x: SymTensor, tag: str) -> SymTensor:
    """tanh saves its output; tanh_backward makes a new gradient."""
    out = rec.new(x.numel, x.dtype, x.requires_grad)
    if x.requires_grad:
        rec.node(out, *input_grads(x), saved=[rec.save(out, f"{tag}.output")])
    return out
