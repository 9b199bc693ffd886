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
from peftcalc.ops.moe import _split_gate, _weigh, clamped_swiglu, gather_rows
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
    num_classes=E + 1)`` (_expert_mask), alive to the end; then for each expert hit, in order: ``expert_idx ==
    num_experts`` (a bool scalar), ``torch.where(expert_mask[expert_idx])`` (one (n, 2) int64 nonzero whose two
    columns are top_k_pos and token_idx), ``hidden_states[token_idx]``, the expert's MLP on its n tokens
    (_expert_mlp), the product with ``top_k_weights[token_idx, top_k_pos, None]``, ``.to(final.dtype)`` and
    ``final.index_add_(0, token_idx, .)``. A local keeps its tensor until the next iteration rebinds it (or the
    function returns). Each expert's slice of a fused parameter is a select: its backward makes a whole (E, ., .)
    gradient, summed in the parameter's AccumulateGrad buffer, which becomes its .grad after the last.
    `biases` (gpt-oss's experts: whether gate_up_proj_bias and down_proj_bias train): GptOssExperts.forward, the
    same loop with ``one_hot(router_indices, num_classes=E)`` and the MLP of _gpt_oss_expert_mlp.
    Not modelled: LoRA on the experts (peft target_parameters), autocast."""
    ctx = rec.ctx
    if any(lora) or ctx.autocast:
        what = "LoRA on the experts (target_parameters)" if any(lora) else "autocast"
        raise CombinationError(f"the eager experts loop with {what} is not modelled; --experts grouped_mm "
                               "(transformers' default) or batched_mm")
    tokens = x.numel // hidden
    top_k = top.numel // tokens
    counts = expert_token_counts(tokens, top_k, experts, ctx.routing)
    final = rec.new(x.numel, x.dtype, False)  # zeros_like(hidden_states)
    classes = experts if biases is not None else experts + 1
    mask, hit = _expert_mask(rec, tokens, top_k, classes, sum(1 for n in counts if n))
    sinks = [None] * 4  # each trained parameter's AccumulateGrad, made before its first slice
    held: dict = {}  # the loop's locals: name -> the tensor it holds
    for n in (c for c in counts if c):
        rec.free(rec.new(1, "uint8", False))  # expert_idx == self.num_experts
        nz = rec.new(n * 2, "int64", False)  # torch.where: nonzero, its two columns as views
        _rebind(rec, held, "nz", nz)
        cs = gather_rows(rec, x, n, hidden, nz, f"{tag}.gather_tokens")
        _rebind(rec, held, "cs", cs)
        if biases is None:
            d = _expert_mlp(rec, held, cs, n, hidden, inter, experts, trains, sinks, act, tag)
        else:
            d = _gpt_oss_expert_mlp(rec, held, cs, n, hidden, inter, experts, trains + biases, sinks, tag)
        w = gather_rows(rec, top, n, 1, nz, f"{tag}.gather_weights")
        m = _weigh(rec, d, w, f"{tag}.routing_weights")
        rec.free(w)
        _rebind(rec, held, "weighted", m)
        final = _index_add(rec, final, m, nz, f"{tag}.index_add")
    rec.free(mask, hit, *held.values())
    return final


def _expert_mlp(rec: Recorder, held: dict, cs: SymTensor, n: int, hidden: int, inter: int, experts: int,
                trains: tuple, sinks: list, act: str, tag: str) -> SymTensor:
    """MixtralExperts.forward's MLP: ``gate, up = F.linear(current_state, gate_up_proj[e]).chunk(2, -1)``,
    ``current_hidden_states = act_fn(gate) * up``, then ``F.linear(current_hidden_states, down_proj[e])``, which
    rebinds the same local (so does the routing-weighted product after it)."""
    gu = _slice_linear(rec, cs, (hidden, 2 * inter), trains[0], sinks, 0, experts, f"{tag}.gate_up_proj")
    _rebind(rec, held, "gu", gu)
    p = _split_gate(rec, gu, n, inter, act, tag)
    _rebind(rec, held, "weighted", p)
    d = _slice_linear(rec, p, (inter, hidden), trains[1], sinks, 1, experts, f"{tag}.down_proj")
    _rebind(rec, held, "weighted", d)
    return d


def _gpt_oss_expert_mlp(rec: Recorder, held: dict, cs: SymTensor, n: int, hidden: int, inter: int, experts: int,
                        trains: tuple, sinks: list, tag: str) -> SymTensor:
    """GptOssExperts.forward's MLP: ``gate_up = current_state @ gate_up_proj[e] + gate_up_proj_bias[e]`` (the
    mm's output a temporary), ``gated_output = _apply_gate(gate_up)`` (ops.moe.clamped_swiglu), ``out =
    gated_output @ down_proj[e] + down_proj_bias[e]``, each its own local. `trains`: gate_up_proj, down_proj and
    their biases."""
    mm = _slice_linear(rec, cs, (hidden, 2 * inter), trains[0], sinks, 0, experts, f"{tag}.gate_up_proj")
    gate_up = _bias_add(rec, mm, 2 * inter, trains[2], sinks, 2, experts)
    rec.free(mm)
    _rebind(rec, held, "gate_up", gate_up)
    gated = clamped_swiglu(rec, gate_up, n, inter, tag)
    _rebind(rec, held, "gated", gated)
    mm = _slice_linear(rec, gated, (inter, hidden), trains[1], sinks, 1, experts, f"{tag}.down_proj")
    out = _bias_add(rec, mm, hidden, trains[3], sinks, 3, experts)
    rec.free(mm)
    _rebind(rec, held, "out", out)
    return out


def _bias_add(rec: Recorder, mm: SymTensor, width: int, trains: bool, sinks: list, which: int,
              experts: int) -> SymTensor:
    """``mm + bias[e]`` (a new tensor): AddBackward0 hands the incoming gradient to the mm as it is and, when the
    bias trains, the engine sums it down to the (width,) slice (validate_outputs), whose SelectBackward makes a
    whole (E, width) gradient for the bias's AccumulateGrad buffer."""
    out = rec.new(mm.numel, mm.dtype, mm.requires_grad or trains)
    if not trains:
        rec.node(out, outputs=[(mm.id, GRAD)] if mm.requires_grad else [])
        return out
    wb = DTYPE_BYTES[rec.ctx.weight_dtype]
    if sinks[which] is None:
        sinks[which] = _accumulate_grad(rec, experts * width * wb)
    sel = _select(rec, width, experts * width * wb, sinks[which])
    # the bias slice's select node is made before the add's (the operands are evaluated first)
    rec.node(out, [("returned",), ("new", "b", width * DTYPE_BYTES[mm.dtype])],
             [(t, name) for t, name in ((mm.id, GRAD), (sel.id, "b")) if t != mm.id or mm.requires_grad])
    return out


def _select(rec: Recorder, numel: int, full_bytes: int, sink: int) -> SymTensor:
    """``param[expert_idx]``: a view of the parameter; SelectBackward makes a new zero-filled gradient the size of
    the whole parameter (select_backward) for its AccumulateGrad buffer."""
    rec.next_id += 1
    sel = SymTensor(numel, rec.ctx.weight_dtype, True, rec.next_id)
    rec.node(sel, [("new", "d", full_bytes)], [(sink, "d")])
    return sel


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
        sel = _select(rec, in_f * out_f, experts * wbytes, sinks[which])
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

