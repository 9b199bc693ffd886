"""Elementwise and layout ops: add, cast (and autocast's casts and cached weight copies), scalar products, clones, products of two tensors, head views, dropout, token selection.
Each mirrors the forward of one torch function and records the node whose backward follows torch's
tools/autograd/derivatives.yaml.
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "add",
    "autocast_in",
    "autocast_weight_copy",
    "cast",
    "clone",
    "dropout",
    "first_token",
    "heads_view",
    "mul",
    "mul_node",
    "promote",
    "scale",
]


def promote(a: str, b: str) -> str:
    """torch's type promotion between two floating dtypes: the wider one (fp32 over bf16/fp16)."""
    return a if DTYPE_BYTES[a] >= DTYPE_BYTES[b] else b


def add(rec: Recorder, a: SymTensor, b: SymTensor, dtype: str | None = None) -> SymTensor:
    """a + b (the residual stream, LoRA's result + delta): AddBackward hands the incoming gradient to
    both inputs as it is; where an input has another dtype (type promotion), the engine casts it
    (validate_outputs: a new gradient in the input's dtype)."""
    out = rec.new(max(a.numel, b.numel), dtype or promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)
    steps, outputs = [], []
    for i, t in enumerate((a, b)):
        if not t.requires_grad:
            continue
        if t.dtype == out.dtype:
            outputs.append((t.id, GRAD))
        else:
            steps.append(("new", f"c{i}", t.nbytes))
            outputs.append((t.id, f"c{i}"))
    rec.node(out, steps, outputs)
    return out


def cast(rec: Recorder, x: SymTensor, dtype: str) -> SymTensor:
    """Tensor.to(dtype): a no-op returning the same tensor when the dtype already matches; else a
    copy whose backward (ToCopyBackward) casts the gradient back: a new gradient like x."""
    if x.dtype == dtype:
        return x
    y = rec.new(x.numel, dtype, x.requires_grad)
    rec.node(y, *input_grads(x))
    return y


def autocast_in(rec: Recorder, x: SymTensor) -> SymTensor:
    """torch.autocast casts the inputs of matmul-like ops to the autocast dtype. The cast of a leaf that
    requires grad (and is no view) is cached until the autocast region exits (aten/src/ATen/
    autocast_mode.cpp cached_cast, as for the weights: autocast_weight_copy), so every op casting it shares one
    copy; besides the parameters such a leaf is a reentrant checkpoint's detached input (Recorder.leaf_casts)."""
    if not rec.ctx.autocast:
        return x
    if x.id in rec.leaf_casts:
        if rec.leaf_casts[x.id] is None:
            rec.leaf_casts[x.id] = cast(rec, x, rec.ctx.autocast)
        return rec.leaf_casts[x.id]
    return cast(rec, x, rec.ctx.autocast)


def autocast_weight_copy(rec: Recorder, numel: int, trains: bool, param_dtype: str | None = None,
                 grad_pending: bool = False) -> SymTensor:
    """autocast's lower-precision copy of a weight. The cast of a leaf that requires grad is cached until
    the autocast region exits (torch aten/src/ATen/autocast_mode.cpp cached_cast): alive to the end of
    the forward (Recorder.cached). When the weight trains, its gradient comes back in the autocast dtype
    and ToCopyBackward makes the .grad (in `param_dtype`, the weights' by default) from it; with
    `grad_pending`, the weight's gradient waits for another use's (see linear)."""
    w = rec.new(numel, rec.ctx.autocast, trains)
    if trains:
        rec.node(w, [("pending" if grad_pending else "param", numel * DTYPE_BYTES[param_dtype or rec.ctx.weight_dtype])])
        rec.cached.append(w)
    return w


def scale(rec: Recorder, x: SymTensor) -> SymTensor:
    """x * a Python number: MulBackward saves nothing and makes a new gradient (grad * scalar)."""
    y = rec.new(x.numel, x.dtype, x.requires_grad)
    rec.node(y, *input_grads(x))
    return y


def clone(rec: Recorder, x: SymTensor) -> SymTensor:
    """Tensor.clone(): a copy; CloneBackward hands the incoming gradient on."""
    y = rec.new(x.numel, x.dtype, x.requires_grad)
    rec.node(y, outputs=[(x.id, GRAD)] if x.requires_grad else [])
    return y


def mul_node(rec: Recorder, out: SymTensor, a: SymTensor, b: SymTensor, saved: list) -> None:
    """MulBackward0 of out = a * b: grad_a = grad * b, grad_b = grad * a (derivatives.yaml
    mul_tensor_backward), each the size of the output and in the dtype of grad times the other factor;
    then the engine, input by input, sums a broadcast input's gradient down to its shape and casts a
    gradient whose dtype is not its input's (DoRA's fp32 scale times a bf16 LoRA output under autocast)
    to that dtype, each a new tensor that replaces the one before (torch/csrc/autograd/engine.cpp
    call_function: validate_outputs, InputMetadata::reduce_grad, ``grad.to(metadata dtype)``;
    peftcalc.backward's "returned")."""
    steps, outputs, checks = [], [], []
    for i, (t, other) in enumerate(((a, b), (b, a))):
        if not t.requires_grad:
            continue
        grad_dtype = promote(out.dtype, other.dtype)
        if t.numel == out.numel and grad_dtype == t.dtype:
            steps.append(("new", f"d{i}", t.nbytes))
        else:
            steps.append(("new", f"t{i}", out.numel * DTYPE_BYTES[grad_dtype]))
            last = f"t{i}"
            if t.numel != out.numel:
                checks += [("new", f"r{i}", t.numel * DTYPE_BYTES[grad_dtype]), ("free", last)]
                last = f"r{i}"
            if grad_dtype != t.dtype:
                checks += [("new", f"d{i}", t.nbytes), ("free", last)]
            else:
                checks[-2] = ("new", f"d{i}", t.nbytes)
        outputs.append((t.id, f"d{i}"))
    rec.node(out, steps + ([("returned",)] + checks if checks else []), outputs, saved)


def mul(rec: Recorder, a: SymTensor, b: SymTensor, tag: str) -> SymTensor:
    """a * b saves b when a needs a gradient and a when b does."""
    saved = []
    if b.requires_grad:
        saved.append(rec.save(a, f"{tag}.a"))
    if a.requires_grad:
        saved.append(rec.save(b, f"{tag}.b"))
    out = rec.new(max(a.numel, b.numel), a.dtype, a.requires_grad or b.requires_grad)
    mul_node(rec, out, a, b, saved)
    return out


def heads_view(rec: Recorder, x: SymTensor, clone: bool) -> SymTensor:
    """x.view(b, s, heads, d).transpose(1, 2): a view; its backward reshapes the gradient back,
    which copies it (clone) when the gradient arrives laid out as (b, heads, s, d) - from the CPU math
    path, eager matmuls or RoPE - and not when a fused kernel returns it in the input's layout."""
    v = rec.view(x, x.numel)
    if clone:
        rec.node(v, *input_grads(x))
    else:
        rec.node(v, outputs=[(x.id, GRAD)])
    return v


def dropout(rec: Recorder, x: SymTensor, p: float, tag: str) -> SymTensor:
    """F.dropout in training. p == 0 returns the input itself (ATen _dropout). On CUDA p > 0 runs
    native_dropout and saves a bool mask; on CPU (ATen _dropout_impl) an empty_like noise tensor of the
    input's dtype is filled and multiplied in, and the mul saves it (the backward is grad * noise)."""
    if p <= 0.0 or not rec.ctx.training_dropout:
        return x
    noise = rec.new(x.numel, "uint8" if rec.ctx.device == "cuda" else x.dtype, False)
    saved = [rec.save(noise, f"{tag}.dropout_mask")] if x.requires_grad else []
    y = rec.new(x.numel, x.dtype, x.requires_grad)
    if x.requires_grad:
        rec.node(y, *input_grads(x), saved=saved)
    rec.free(noise)
    return y


def first_token(rec: Recorder, x: SymTensor, batch: int) -> SymTensor:
    """x[:, 0]: a view; saving it keeps x's whole storage. Its backward (select_backward) makes a new
    gradient like x (zeros, then the copy)."""
    v = rec.view(x, batch * (x.numel // rec.ctx.tokens))
    rec.node(v, *input_grads(x))
    return v
