"""The experts module's own forward, transformers' ``eager`` experts implementation (--experts eager): a Python loop
over the experts the router hit, each on its own tokens (models/mixtral/modeling_mixtral.py MixtralExperts.forward;
Qwen2MoeExperts and Qwen3MoeExperts are the same code). Unlike grouped_mm and batched_mm, whose tensors are
(tokens x top_k, .) whatever the routing, every tensor of the loop is sized by one expert's token count, so the
bytes depend on the routing (StepContext.routing, which the harness drives the router to: measure/routing.py
drive_indices); expert_token_counts gives each expert's count under it. Each op records the autograd node whose
backward follows torch's tools/autograd/derivatives.yaml, as a storage tracer sees it (traced on the CPU, torch
2.13: tests/peftcalc/ops/test_experts_impls.py; the loop cannot run on fake tensors, whose ``nonzero`` has no
data to size its output).
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.errors import CombinationError
from peftcalc.ops.moe import _split_gate, _weigh, gather_rows
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import cast
from peftcalc.settings import DTYPE_BYTES

__all__ = ["expert_token_counts", "experts_eager"]


def expert_token_counts(tokens: int, top_k: int, experts: int, routing: str) -> list[int]:
    """How many (token, expert) pairs each expert gets under `routing` (settings.ROUTINGS, as measure/routing.py
    drive_indices writes it): balanced, pair p = t * top_k + j goes to expert p mod E; worst, (t, j) to expert j;
    skewed, even tokens as worst and the u-th odd token's pairs (u * top_k + j) mod E."""
    counts = [0] * experts

    def spread(pairs: int) -> None:
        for e in range(experts):
            counts[e] += pairs // experts + (1 if e < pairs % experts else 0)

    if routing == "balanced":
        spread(tokens * top_k)
    elif routing in ("worst", "skewed"):
        firsts = tokens if routing == "worst" else (tokens + 1) // 2
        for j in range(top_k):
            counts[j] += firsts
        if routing == "skewed":
            spread(tokens // 2 * top_k)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    return counts


def experts_eager(rec: Recorder, x: SymTensor, top: SymTensor, idx: SymTensor, hidden: int, inter: int,
                  experts: int, trains: tuple, act: str, tag: str, lora: tuple = (0, 0), scaling: float = 2.0,
                  biases: tuple | None = None) -> SymTensor:
    """MixtralExperts.forward, op by op: ``zeros_like(hidden_states)``; under no_grad ``one_hot(top_k_index,
    num_classes=E + 1)`` (on the CPU its ``aminmax`` check first: two int64 scalars), an int64 (T, k, E + 1)
    tensor alive to the end, ``expert_mask.sum((-1, -2))`` (int64), ``greater(.., 0)`` (bool) and ``nonzero``
    (the experts hit); then for each expert hit, in order: ``expert_idx == num_experts`` (a bool scalar), ``torch.where
    (expert_mask[expert_idx])`` (one (n, 2) int64 nonzero whose two columns are top_k_pos and token_idx),
    ``hidden_states[token_idx]``, the gate/up linear on the expert's slice of the fused parameter (a select: its
    backward makes a whole (E, 2I, h) gradient), ``act_fn(gate) * up``, the down linear, the product with
    ``top_k_weights[token_idx, top_k_pos, None]``, ``.to(final.dtype)`` and ``final.index_add_(0, token_idx, .)``.
    A local keeps its tensor until the next iteration rebinds it (or the function returns). The E slices' gradients
    are summed in the parameter's AccumulateGrad buffer, which becomes its .grad after the last.
    Not modelled: LoRA on the experts (peft target_parameters), gpt-oss's experts (biases), autocast."""
    ctx = rec.ctx
    if any(lora) or biases is not None or ctx.autocast:
        what = "LoRA on the experts" if any(lora) else "gpt-oss's experts" if biases is not None else "autocast"
        raise CombinationError(f"the eager experts loop with {what} is not modelled; --experts grouped_mm "
                               "(transformers' default) or batched_mm")
    tokens = x.numel // hidden
    top_k = top.numel // tokens
    counts = expert_token_counts(tokens, top_k, experts, ctx.routing)
    final = rec.new(x.numel, x.dtype, False)  # zeros_like(hidden_states)
    mask, hit = _expert_mask(rec, tokens, top_k, experts + 1, sum(1 for n in counts if n))
    shapes = ((hidden, 2 * inter), (inter, hidden))  # (in, out) of gate_up_proj and down_proj
    sinks = [None, None]  # each trained parameter's AccumulateGrad, made before its first slice
    held: dict = {}  # the loop's locals: name -> the tensor it holds
    for n in (c for c in counts if c):
        rec.free(rec.new(1, "uint8", False))  # expert_idx == self.num_experts
        nz = rec.new(n * 2, "int64", False)  # torch.where: nonzero, its two columns as views
        _rebind(rec, held, "nz", nz)
        cs = _gather(rec, x, n, hidden, nz, f"{tag}.gather_tokens")
        _rebind(rec, held, "cs", cs)
        gu = _slice_linear(rec, cs, shapes[0], trains[0], sinks, 0, experts, f"{tag}.gate_up_proj")
        _rebind(rec, held, "gu", gu)
        p = _split_gate(rec, gu, n, inter, act, tag)
        _rebind(rec, held, "chs", p)
        d = _slice_linear(rec, p, shapes[1], trains[1], sinks, 1, experts, f"{tag}.down_proj")
        _rebind(rec, held, "chs", d)
        w = _gather(rec, top, n, 1, nz, f"{tag}.gather_weights")
        m = _weigh(rec, d, w, f"{tag}.routing_weights")
        rec.free(w)
        _rebind(rec, held, "chs", m)
        final = _index_add(rec, final, m, nz, f"{tag}.index_add")
    rec.free(mask, hit, *held.values())
    return final


def _expert_mask(rec: Recorder, tokens: int, top_k: int, classes: int, hit: int) -> tuple[SymTensor, SymTensor]:
    """The loop's no_grad preamble: ``one_hot`` (on the CPU after its ``aminmax`` range check, two int64 scalars;
    aten/src/ATen/native/Onehot.cpp skips it on CUDA), ``sum``, ``greater`` and ``nonzero``. Returns (the one-hot
    mask, the (hit, 1) experts hit), both alive until the forward returns."""
    if rec.ctx.device == "cpu":
        lo, hi = rec.new(1, "int64", False), rec.new(1, "int64", False)
        rec.free(lo, hi)
    mask = rec.new(tokens * top_k * classes, "int64", False)
    total = rec.new(classes, "int64", False)
    hit_bool = rec.new(classes, "uint8", False)
    rec.free(total)
    hit_ids = rec.new(hit, "int64", False)
    rec.free(hit_bool)
    return mask, hit_ids


def _rebind(rec: Recorder, held: dict, name: str, t: SymTensor) -> None:
    """A local rebound to `t`: the tensor it held goes (unless autograd saved it)."""
    old = held.get(name)
    held[name] = t
    if old is not None and old is not t:
        rec.free(old.base or old)


def _gather(rec: Recorder, x: SymTensor, rows: int, row_numel: int, index: SymTensor, tag: str) -> SymTensor:
    """``x[index]`` (IndexBackward, ops.moe.gather_rows): backward, new zeros like x and an index_put."""
    return gather_rows(rec, x, rows, row_numel, index, tag)


def _slice_linear(rec: Recorder, x: SymTensor, shape: tuple, trains: bool, sinks: list, which: int, experts: int,
                  tag: str) -> SymTensor:
    """``F.linear(x, param[expert_idx])``: an mm with the expert's slice (a select view of the (E, out, in)
    parameter, no bytes); MmBackward saves x when the parameter trains and the slice (a parameter's storage)
    when x needs a gradient, and makes the slice's (out, in) gradient first, then x's. SelectBackward turns the
    slice's gradient into a new zero-filled (E, out, in) gradient (select_backward), summed into the parameter's
    AccumulateGrad buffer."""
    in_f, out_f = shape
    wbytes = in_f * out_f * DTYPE_BYTES[rec.ctx.weight_dtype]
    grad = x.requires_grad or trains
    saved = [rec.save(x, f"{tag}.input")] if trains else []
    if x.requires_grad:
        rec.save_param()
    sel = None
    if trains:
        if sinks[which] is None:
            sinks[which] = _accumulate_grad(rec, experts * wbytes)
        rec.next_id += 1
        sel = SymTensor(in_f * out_f, rec.ctx.weight_dtype, True, rec.next_id)
        rec.node(sel, [("new", "d", experts * wbytes)], [(sinks[which], "d")])
    out = rec.new(x.numel // in_f * out_f, x.dtype, grad)
    steps, outputs = ([("new", "dw", wbytes)], [(sel.id, "dw")]) if trains else ([], [])
    if x.requires_grad:
        steps.append(("new", "dx", x.nbytes))
        outputs.append((x.id, "dx"))
    rec.node(out, steps, outputs, saved, saves_param=x.requires_grad)
    return out


def _accumulate_grad(rec: Recorder, nbytes: int) -> int:
    """A fused expert parameter's AccumulateGrad: once every slice's gradient has been summed into its input
    buffer, the buffer becomes the .grad (no copy). Returns the id its gradients go to."""
    rec.next_id += 1
    sink = SymTensor(0, "float32", True, rec.next_id)
    rec.node(sink, [("free", GRAD), ("param", nbytes)])
    return sink.id


def _index_add(rec: Recorder, final: SymTensor, m: SymTensor, nz: SymTensor, tag: str) -> SymTensor:
    """``final.index_add_(0, token_idx, m.to(final.dtype))``, in place: a new version of `final` (its storage
    moves to the new id). IndexAddBackward saves the index and the source; backward it hands the incoming gradient
    on to the version before and makes the source's, ``grad.index_select(0, index)``."""
    src = m if m.dtype == final.dtype else cast(rec, m, final.dtype)
    grad = src.requires_grad
    saved = [rec.save(nz, f"{tag}.index"), rec.save(src, f"{tag}.source")] if grad else []
    rec.next_id += 1
    out = SymTensor(final.numel, final.dtype, grad or final.requires_grad, rec.next_id)
    if final.id in rec.live:
        rec.live[out.id] = rec.live.pop(final.id)
    outputs = ([(src.id, "s")] if grad else []) + ([(final.id, GRAD)] if final.requires_grad else [])
    rec.node(out, [("new", "s", src.nbytes)] if grad else [], outputs, saved)
    if src is not m:
        rec.free(src)
    return out

