"""Mixture-of-experts ops: the top-k router (transformers models/mixtral/modeling_mixtral.py MixtralTopKRouter and
its kin) and the experts as transformers 5.x runs them by default, ``grouped_mm`` (integrations/moe.py
grouped_mm_experts_forward: every (token, expert) pair sorted by expert, two ``torch._grouped_mm`` calls over
the fused 3-D ``gate_up_proj``/``down_proj`` parameters). Each op records the autograd node whose backward
follows torch's tools/autograd/derivatives.yaml, as a storage tracer sees it (traced on CPU and fake tensors,
torch 2.13: tests/peftcalc/ops/test_moe.py).

Routing does not change these bytes: grouped_mm processes the S = tokens x top_k pairs as one (S, .)
tensor whatever expert each goes to, and the weights' gradients are the whole (E, ., .) tensors.
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import cast, mul, promote
from peftcalc.settings import DTYPE_BYTES

__all__ = [
    "add_bias_",
    "bias_gather",
    "clamped_swiglu",
    "drop_router_logits",
    "experts_batched_mm",
    "experts_grouped_mm",
    "gather_rows",
    "grouped_mm",
    "router_top_k",
    "router_top_k_softmax",
]


def router_top_k(rec: Recorder, x: SymTensor, hidden: int, experts: int, top_k: int, trains: bool, norm_topk: bool,
                 tag: str, scores_in_logits_dtype: bool = False) -> tuple[SymTensor, SymTensor, SymTensor]:
    """MixtralTopKRouter.forward (Qwen3-MoE's and Qwen2-MoE's routers alike): ``F.linear(x, weight)`` (an mm:
    the logits in the compute dtype), ``softmax(logits.float())`` (saves its fp32 output), ``topk`` (saves
    the int64 indices; its backward scatters into new zeros: two (T, E) fp32 buffers) and, with
    `norm_topk`, ``top /= top.sum(-1, keepdim=True)``: the sum (T, 1) is saved, and so is a clone of the
    values the in-place division overwrites (autograd's original self for the divisor's gradient). Returns
    (logits, top-k weights fp32, indices int64); the caller frees them where the model drops them (the
    weights may be a view: free their base). `scores_in_logits_dtype`: Qwen3MoeTopKRouter's
    ``softmax(logits, dtype=torch.float)`` (the same cast and softmax on the CPU) and its last
    ``router_top_value.to(router_logits.dtype)`` (the fp32 values go when the name is rebound)."""
    tokens = x.numel // hidden
    logits = linear(rec, x, hidden, experts, trains, f"{tag}.router")
    lf = cast(rec, logits, "float32")
    probs = rec.new(tokens * experts, "float32", lf.requires_grad)
    if lf.requires_grad:
        rec.node(probs, [("new", "d", probs.nbytes)], [(lf.id, "d")], [rec.save(probs, f"{tag}.router_probs")])
    if lf is not logits:
        rec.free(lf)
    grad = probs.requires_grad
    top = rec.new(tokens * top_k, "float32", grad)
    idx = rec.new(tokens * top_k, "int64", False)
    saved = [rec.save(idx, f"{tag}.router_indices")] if grad else []
    rec.node(top, [("new", "z", probs.nbytes), ("new", "d", probs.nbytes), ("free", "z")],
             [(probs.id, "d")] if grad else [], saved)
    rec.free(probs)
    weights = _normalized(rec, top, tokens, tag) if norm_topk else top
    if scores_in_logits_dtype and logits.dtype != weights.dtype:
        scores = cast(rec, weights, logits.dtype)
        rec.free(top)
        return logits, scores, idx
    return logits, weights, idx


def router_top_k_softmax(rec: Recorder, x: SymTensor, hidden: int, experts: int, top_k: int, trains: bool,
                         tag: str) -> tuple[SymTensor, SymTensor, SymTensor]:
    """GptOssTopKRouter.forward (models/gpt_oss/modeling_gpt_oss.py): ``F.linear(x, weight, bias)`` (the logits in
    the compute dtype), ``topk(logits, top_k)`` first (saves the int64 indices; its backward scatters into new zeros:
    two (T, E) buffers), then ``softmax(top_values, dim=1, dtype=top_values.dtype)`` over the k values only (saves
    its output; the top values go when the router returns). Returns (logits, scores, indices)."""
    tokens = x.numel // hidden
    logits = linear(rec, x, hidden, experts, trains, f"{tag}.router", bias=True, bias_trains=trains)
    grad = logits.requires_grad
    top = rec.new(tokens * top_k, logits.dtype, grad)
    idx = rec.new(tokens * top_k, "int64", False)
    if grad:
        rec.node(top, [("new", "z", logits.nbytes), ("new", "d", logits.nbytes), ("free", "z")], [(logits.id, "d")],
                 [rec.save(idx, f"{tag}.router_indices")])
    scores = rec.new(top.numel, top.dtype, grad)
    if grad:
        rec.node(scores, *input_grads(top), saved=[rec.save(scores, f"{tag}.router_scores")])
    rec.free(top)
    return logits, scores, idx


def drop_router_logits(rec: Recorder, logits: SymTensor) -> None:
    """The block drops its router's logits when it returns; under output_router_logits (StepContext.router_aux_loss)
    transformers' OutputRecorder (utils/output_capturing.py, ``_can_record_outputs["router_logits"]``: the
    router's output 0) keeps them in the model's ``router_logits`` tuple until the model's forward has returned,
    and load_balancing_loss_func (models/mixtral/modeling_mixtral.py) reads them: their gradient comes from the
    auxiliary loss, whose backward runs before the cross-entropy's (its nodes are younger), and waits in the
    router's node until the block's backward (sim.blocks.simulate_block: an incoming gradient)."""
    if rec.ctx.router_aux_loss:
        rec.returned.append(logits)
    else:
        rec.free(logits)


def _normalized(rec: Recorder, top: SymTensor, tokens: int, tag: str) -> SymTensor:
    """``top /= top.sum(dim=-1, keepdim=True)`` (see router_top_k): a view of the top-k values."""
    grad = top.requires_grad
    total = rec.new(tokens, "float32", grad)  # SumBackward0 expands the gradient: a view
    rec.node(total, outputs=[(top.id, GRAD)])
    saved = [rec.save(total, f"{tag}.router_sum")] if grad else []
    if grad:
        saved.append(rec.save_new(top.numel, "float32", f"{tag}.router_top_original"))
    n = top.nbytes
    # div_tensor_self_backward, then div_tensor_other_backward's -grad * ((self / other) / other): every
    # temporary of the full expression lives until it ends; the divisor's gradient is summed down to (T, 1)
    steps = [("new", "ds", n), ("new", "a", n), ("new", "b", n), ("new", "c", n), ("new", "d", n),
             ("free", "a"), ("free", "b"), ("free", "c"), ("returned",), ("new", "do", total.nbytes), ("free", "d")]
    normed = rec.view(top, top.numel)  # div_ writes into the top-k values: no new storage
    rec.node(normed, steps, [(top.id, "ds"), (total.id, "do")] if grad else [], saved)
    rec.free(total)
    return normed


def gather_rows(rec: Recorder, x: SymTensor, rows: int, row_numel: int, index: SymTensor, tag: str) -> SymTensor:
    """``x[index]`` (aten.index): `rows` rows of x gathered; IndexBackward saves the int64 index and, backward,
    fills new zeros like x and index_puts the gradient into a second new tensor (the zeros go at its return)."""
    saved = [rec.save(index, f"{tag}.index")] if x.requires_grad else []  # packed before the op runs
    out = rec.new(rows * row_numel, x.dtype, x.requires_grad)
    if x.requires_grad:
        rec.node(out, [("new", "z", x.nbytes), ("new", "d", x.nbytes), ("free", "z")], [(x.id, "d")], saved)
    return out


def grouped_mm(rec: Recorder, x: SymTensor, in_f: int, out_f: int, experts: int, trains: bool,
               offsets: SymTensor, tag: str, weight: SymTensor | None = None) -> SymTensor:
    """``torch._grouped_mm(x, weight.transpose(-2, -1), offs)`` (integrations/moe.py _grouped_linear): the
    (S, out) output in x's dtype; the node saves x (when the weight needs a gradient: traced), the weight when x
    needs one (a parameter: no bytes; peft's LoRA-merged `weight`, an activation) and the int32 offsets; its
    backward makes the weight's gradient first (a whole (E, in, out) tensor: the .grad, or a gradient for
    `weight`), then x's."""
    rows = x.numel // in_f
    trains = trains or (weight is not None and weight.requires_grad)
    grad = x.requires_grad or trains
    saved = ([rec.save(x, f"{tag}.input")] if trains else []) + ([rec.save(offsets, f"{tag}.offsets")] if grad else [])
    if weight is not None and x.requires_grad:
        saved.append(rec.save(weight, f"{tag}.lora_weight"))
    elif grad:
        rec.save_param()
    out = rec.new(rows * out_f, x.dtype, grad)
    if weight is not None:
        steps, outputs = ([("new", "dw", weight.nbytes)], [(weight.id, "dw")]) if weight.requires_grad else ([], [])
    else:
        steps, outputs = ([("param", experts * in_f * out_f * DTYPE_BYTES[rec.ctx.weight_dtype])] if trains else []), []
    s, o = input_grads(x)
    rec.node(out, steps + s, outputs + o, saved)
    return out


def lora_factors(rec: Recorder, experts: int, in_f: int, out_f: int, rank: int) -> tuple:
    """peft ParamWrapper.get_delta_factors (tuners/lora/layer.py) when its forward starts: lora_B (out, E*r) as
    (E, out, r) and lora_A (E*r, in) as (E, r, in), each ``.to(param.dtype)``: a copy when the adapters' fp32
    differs from the weights' dtype, else a view of the adapter. Backward, a copy's gradient is cast to fp32; B's,
    permuted back, is reshaped by a copy into its .grad; A's is its .grad as it is. Then register_parametrization
    evaluates the parametrization once (an (E, out, in) baddbmm output, dropped at once). Returns (lhs, rhs,
    whether they are copies)."""
    ctx = rec.ctx
    wd, ad = ctx.weight_dtype, ctx.adapter_dtype
    b_bytes, a_bytes = experts * out_f * rank * DTYPE_BYTES[ad], experts * rank * in_f * DTYPE_BYTES[ad]
    copies = wd != ad
    if copies:
        lhs = rec.new(experts * out_f * rank, wd, True)
        rhs = rec.new(experts * rank * in_f, wd, True)
        rec.node(lhs, [("new", "f", b_bytes), ("new", "c", b_bytes), ("param", b_bytes), ("free", "f"), ("free", "c")])
    else:  # views of the fp32 adapters: no storage of their own
        rec.next_id += 2
        lhs = SymTensor(experts * out_f * rank, ad, True, rec.next_id - 1)
        rhs = SymTensor(experts * rank * in_f, ad, True, rec.next_id)
        rec.node(lhs, [("new", "c", b_bytes), ("param", b_bytes), ("free", "c")])
    rec.node(rhs, [("param", a_bytes)])
    rec.free(rec.new(experts * out_f * in_f, wd, False))  # register_parametrization's check of the proxy
    return lhs, rhs, copies


def lora_weight(rec: Recorder, factors: tuple, experts: int, in_f: int, out_f: int, scaling: float,
                tag: str) -> SymTensor:
    """_LoraFactorsProxy.forward, when the experts read the parameter: ``baddbmm(W, lhs, rhs, alpha=scaling)``, a
    whole (E, out, in) weight in the weights' dtype, cached until the wrapper's forward ends. BaddbmmBackward saves
    lhs and rhs (copies: activations; views of the adapters: no bytes) and makes grad @ rhs^T and lhs^T @ grad, each
    times `scaling` (a second tensor) unless it is 1."""
    lhs, rhs, copies = factors
    saved = [rec.save(t, f"{tag}.lora_factor") for t in (lhs, rhs)] if copies else []
    if not copies:
        rec.save_param()
    w = rec.new(experts * out_f * in_f, rec.ctx.weight_dtype, True)
    steps = []
    for name, t in (("dl", lhs), ("dr", rhs)):
        nbytes = t.numel * DTYPE_BYTES[rec.ctx.weight_dtype]
        steps += [("new", "m", nbytes), ("new", name, nbytes), ("free", "m")] if scaling != 1 else [("new", name, nbytes)]
    rec.node(w, steps, [(lhs.id, "dl"), (rhs.id, "dr")], saved, saves_param=not copies)
    return w


def experts_grouped_mm(rec: Recorder, x: SymTensor, top: SymTensor, idx: SymTensor, hidden: int, inter: int,
                       experts: int, trains: tuple, act: str, tag: str, lora: tuple = (0, 0),
                       scaling: float = 2.0, biases: tuple | None = None) -> SymTensor:
    """grouped_mm_experts_forward (transformers 5.x integrations/moe.py), op by op: ``sort`` the (S,) expert
    ids (values and permutation, int64), gather the tokens (``hidden[perm // top_k]``) and their routing
    weights (``sample_weights[perm]``), ``histc`` over the ids (cast to fp32 on the CPU, int32 on CUDA) and
    its int32 ``cumsum`` (the offsets), the gate/up grouped_mm, ``act(gate) * up`` on its two halves, the down
    grouped_mm, the product with the routing weights (fp32: type promotion), the inverse permutation
    (``empty_like``, ``arange``, ``index_put_``), the gather back to token order and the sum over top_k, then
    ``.to(hidden.dtype)``. Every local lives until the function returns. `trains`: (gate_up_proj, down_proj).
    `lora`: the LoRA ranks on (gate_up_proj, down_proj) through peft's target_parameters (0: none): peft wraps the
    experts in a ParamWrapper per parameter (down_proj's outermost, as the harness lists them), whose forward makes
    the factors (lora_factors) and, when the experts read the parameter, the merged weight (lora_weight).
    `biases`: (whether gate_up_proj_bias trains, whether down_proj_bias does) of experts with biases (gpt-oss:
    ``use_experts_implementation(has_bias=True, is_transposed=True)``, whose gate is its own clamped SwiGLU on the
    interleaved halves, clamped_swiglu); None: no biases, ``act(gate) * up`` on the two halves."""
    ctx = rec.ctx
    tokens = x.numel // hidden
    pairs = top.numel
    shapes = ((hidden, 2 * inter), (inter, hidden))  # (in, out) of gate_up_proj and down_proj
    factors = [None, None]
    for i in (1, 0):
        if lora[i]:
            factors[i] = lora_factors(rec, experts, shapes[i][0], shapes[i][1], lora[i])
    ids_sorted = rec.new(pairs, "int64", False)
    perm = rec.new(pairs, "int64", False)
    token_of = rec.new(pairs, "int64", False)  # perm // num_top_k
    xs = gather_rows(rec, x, pairs, hidden, token_of, f"{tag}.gather_tokens")
    rec.free(token_of)
    ws = gather_rows(rec, top, pairs, 1, perm, f"{tag}.gather_weights")
    histc_in = rec.new(pairs, "float32" if ctx.device == "cpu" else "int32", False)
    counts = rec.new(experts, histc_in.dtype, False)
    offsets = rec.new(experts, "int32", False)
    merged = [None, None]
    if factors[0]:
        merged[0] = lora_weight(rec, factors[0], experts, hidden, 2 * inter, scaling, f"{tag}.gate_up_proj")
    bias_rows = bias_gather(rec, ids_sorted, pairs, experts, 2 * inter, biases[0], f"{tag}.gate_up_proj_bias") if biases else None
    gu = grouped_mm(rec, xs, hidden, 2 * inter, experts, trains[0], offsets, f"{tag}.gate_up_proj", merged[0])
    gu = add_bias_(rec, gu, bias_rows)
    p = clamped_swiglu(rec, gu, pairs, inter, tag) if biases else _split_gate(rec, gu, pairs, inter, act, tag)
    rec.free(gu.base or gu)
    if factors[1]:
        merged[1] = lora_weight(rec, factors[1], experts, inter, hidden, scaling, f"{tag}.down_proj")
    down_rows = bias_gather(rec, ids_sorted, pairs, experts, hidden, biases[1], f"{tag}.down_proj_bias") if biases else None
    rec.free(bias_rows)  # selected_biases rebound
    down = grouped_mm(rec, p, inter, hidden, experts, trains[1], offsets, f"{tag}.down_proj", merged[1])
    down = add_bias_(rec, down, down_rows)
    rec.free(p)
    weighted = _weigh(rec, down, ws, f"{tag}.routing_weights")
    rec.free(down.base or down)
    inv_perm = rec.new(pairs, "int64", False)
    rec.free(rec.new(pairs, "int64", False))  # arange, written into inv_perm by index_put_
    restored = gather_rows(rec, weighted, pairs, hidden, inv_perm, f"{tag}.restore_order")
    rec.free(weighted)
    summed = rec.new(tokens * hidden, restored.dtype, restored.requires_grad)
    # SumBackward1 expands the gradient (a view); the view's backward reshapes it to (S, h): a copy
    rec.node(summed, [("new", "d", restored.nbytes)], [(restored.id, "d")])
    out = cast(rec, summed, x.dtype)
    rec.free(ids_sorted, perm, xs, ws, histc_in, counts, offsets, inv_perm, restored, down_rows)
    if out is not summed:
        rec.free(summed)
    for f in factors:  # the wrappers return: their proxies (the factors) go, then the cached merged weights
        if f and f[2]:
            rec.free(f[0], f[1])
    rec.free(*[w for w in merged if w is not None])
    return out


def experts_batched_mm(rec: Recorder, x: SymTensor, top: SymTensor, idx: SymTensor, hidden: int, inter: int,
                       experts: int, trains: tuple, act: str, tag: str, lora: tuple = (0, 0),
                       scaling: float = 2.0, biases: tuple | None = None) -> SymTensor:
    """batched_mm_experts_forward (transformers 5.x integrations/moe.py), op by op: ``repeat_interleave`` of the tokens
    (an (S, h) copy; its backward sums the pairs' gradients back), each pair's expert weights gathered,
    ``gate_up_proj[expert_ids]`` (an (S, 2I, h) copy: IndexBackward saves the ids, backward new zeros like the
    parameter and index_put into its .grad), ``bmm`` with the tokens (saves both: the gathered weights when the
    tokens need a gradient), the gate (biases and gpt-oss's clamped SwiGLU as under grouped_mm), the down weights
    gathered and ``bmm`` again, the product with the routing weights, ``view(T, k, h).sum(1)``. Its tensors are
    (S, .) whatever the routing, like grouped_mm's, but every pair holds a copy of its expert's weights."""
    tokens = x.numel // hidden
    pairs = top.numel
    shapes = ((hidden, 2 * inter), (inter, hidden))
    factors = [None, None]
    for i in (1, 0):
        if lora[i]:
            factors[i] = lora_factors(rec, experts, shapes[i][0], shapes[i][1], lora[i])
    xs = rec.new(pairs * hidden, x.dtype, x.requires_grad)  # repeat_interleave: expand, then a copy
    rec.node(xs, *input_grads(x))
    merged = [None, None]
    if factors[0]:
        merged[0] = lora_weight(rec, factors[0], experts, hidden, 2 * inter, scaling, f"{tag}.gate_up_proj")
    w_gu = _weight_rows(rec, idx, pairs, experts, hidden * 2 * inter, trains[0], merged[0], f"{tag}.gate_up_proj")
    bias_rows = bias_gather(rec, idx, pairs, experts, 2 * inter, biases[0], f"{tag}.gate_up_proj_bias") if biases else None
    gu = _bmm(rec, xs, w_gu, pairs * 2 * inter, f"{tag}.gate_up_proj")
    gu = add_bias_(rec, gu, bias_rows, on_view=True)
    p = clamped_swiglu(rec, gu, pairs, inter, tag) if biases else _split_gate(rec, gu, pairs, inter, act, tag)
    rec.free(gu.base or gu)
    if factors[1]:
        merged[1] = lora_weight(rec, factors[1], experts, inter, hidden, scaling, f"{tag}.down_proj")
    w_d = _weight_rows(rec, idx, pairs, experts, inter * hidden, trains[1], merged[1], f"{tag}.down_proj")
    down_rows = bias_gather(rec, idx, pairs, experts, hidden, biases[1], f"{tag}.down_proj_bias") if biases else None
    rec.free(bias_rows, w_gu)  # selected_weights / selected_biases rebound
    down = _bmm(rec, p, w_d, pairs * hidden, f"{tag}.down_proj")
    down = add_bias_(rec, down, down_rows, on_view=True)
    rec.free(p)
    weighted = _weigh(rec, down, rec.view(top, pairs), f"{tag}.routing_weights")
    rec.free(down.base or down)
    summed = rec.new(tokens * hidden, weighted.dtype, weighted.requires_grad)
    rec.node(summed, [("new", "d", weighted.nbytes)], [(weighted.id, "d")])  # the view's backward copies
    out = cast(rec, summed, x.dtype)
    if out is not summed:
        rec.free(summed)
    rec.free(xs, w_d, down_rows, weighted)  # the locals go when the function returns
    for f in factors:
        if f and f[2]:
            rec.free(f[0], f[1])
    rec.free(*[w for w in merged if w is not None])
    return out


def _weight_rows(rec: Recorder, idx: SymTensor, pairs: int, experts: int, numel: int, trains: bool,
                 merged: SymTensor | None, tag: str) -> SymTensor:
    """``weight[expert_ids]``: each pair's expert's (out, in) weight, a copy in the weights' dtype; IndexBackward saves
    the ids and, backward, new zeros like the (E, out, in) weight and an index_put into its gradient (the .grad, or
    LoRA's merged weight's)."""
    wd = rec.ctx.weight_dtype
    grad = trains or (merged is not None and merged.requires_grad)
    rows = rec.new(pairs * numel, wd, grad)
    if grad:
        nbytes = experts * numel * DTYPE_BYTES[wd]
        saved = [rec.save(idx, f"{tag}.expert_ids")]
        if merged is not None:
            rec.node(rows, [("new", "z", nbytes), ("new", "d", nbytes), ("free", "z")], [(merged.id, "d")], saved)
        else:
            rec.node(rows, [("new", "z", nbytes), ("param", nbytes), ("free", "z")], saved=saved)
    return rows


def _bmm(rec: Recorder, x: SymTensor, w: SymTensor, out_numel: int, tag: str) -> SymTensor:
    """_batched_linear's ``bmm`` of each pair's input with its gathered weight: BmmBackward saves the weights for the
    input's gradient and the input for the weights'; backward, the weights' gradient (the gathered size) and the
    input's."""
    saved = []
    if x.requires_grad:
        saved.append(rec.save(w, f"{tag}.gathered_weight"))
    if w.requires_grad:
        saved.append(rec.save(x, f"{tag}.input"))
    out = rec.new(out_numel, x.dtype, x.requires_grad or w.requires_grad)
    rec.node(out, *input_grads(w, x), saved=saved)
    return out


def _split_gate(rec: Recorder, gu: SymTensor, pairs: int, inter: int, act: str, tag: str) -> SymTensor:
    """_default_apply_gate (integrations/moe.py): ``gate, up = gate_up.chunk(2, -1)``; ``act_fn(gate) * up``."""
    gate = rec.view(gu, pairs * inter)
    up = rec.view(gu, pairs * inter)
    # SplitBackward (one node, two outputs): once both halves' gradients have come, cat makes a new (S, 2I)
    # tensor; the up half's gradient, which comes first, is held until then
    rec.node(gate, [("new", "d", gu.nbytes)], [(gu.id, "d")])
    rec.node(up, hold=gate.id)
    a = activation(rec, gate, act, f"{tag}.act_fn")
    p = mul(rec, a, up, f"{tag}.act_mul")
    rec.free(a)
    return p


def bias_gather(rec: Recorder, ids_sorted: SymTensor, pairs: int, experts: int, width: int, trains: bool,
                tag: str) -> SymTensor:
    """``bias[expert_ids_g]``: each pair's expert's bias row, (S, width) in the weights' dtype; IndexBackward saves
    the sorted expert ids and, backward, fills new zeros like the (E, width) bias and index_puts the gradient into
    the .grad (out of place under a dispatch mode; the zeros go at its return)."""
    rows = rec.new(pairs * width, rec.ctx.weight_dtype, trains)
    if trains:
        nbytes = experts * width * DTYPE_BYTES[rec.ctx.weight_dtype]
        rec.node(rows, [("new", "z", nbytes), ("param", nbytes), ("free", "z")],
                 saved=[rec.save(ids_sorted, f"{tag}.index")])
    return rows


def clamped_swiglu(rec: Recorder, gu: SymTensor, pairs: int, inter: int, tag: str) -> SymTensor:
    """GptOssExperts._apply_gate (models/gpt_oss/modeling_gpt_oss.py): ``gate, up = gate_up[..., ::2],
    gate_up[..., 1::2]`` (strided views: each SliceBackward makes a new (S, 2I) gradient), ``gate.clamp(max=limit)``
    and ``up.clamp(-limit, limit)`` (each saves its input, a view: gate_up's whole storage), ``glu = gate *
    sigmoid(gate * alpha)`` (quick_gelu's ops), ``(up + 1) * glu`` (saves both). The clamped up half stays
    referenced by the local ``up`` until the function returns."""
    n = pairs * inter
    gate_v, up_v = rec.view(gu, n), rec.view(gu, n)
    for v in (gate_v, up_v):
        rec.node(v, [("new", "d", gu.nbytes)], [(gu.id, "d")])
    gate = _clamp(rec, gate_v, False, f"{tag}.gate_clamp")
    up = _clamp(rec, up_v, True, f"{tag}.up_clamp")
    glu = activation(rec, gate, "quick_gelu", f"{tag}.glu")
    up1 = rec.new(n, up.dtype, up.requires_grad)  # up + 1: AddBackward hands the gradient on
    rec.node(up1, outputs=[(up.id, GRAD)])
    out = mul(rec, up1, glu, f"{tag}.glu_mul")
    rec.free(up1, glu, gate, up)
    return out


def _clamp(rec: Recorder, x: SymTensor, both: bool, tag: str) -> SymTensor:
    """``x.clamp(...)``: a new tensor; ClampBackward saves x. Backward (torch FunctionsManual clamp_backward): a
    scalar zero, the bool mask (``self >= min`` and ``self <= max``, joined in place, with both bounds) and
    ``where(mask, grad, zero)``."""
    y = rec.new(x.numel, x.dtype, x.requires_grad)
    if x.requires_grad:
        scalar = DTYPE_BYTES[x.dtype]
        if both:
            steps = [("new", "z", scalar), ("new", "ge", x.numel), ("new", "le", x.numel), ("free", "le"),
                     ("new", "d", x.nbytes), ("free", "ge"), ("free", "z")]
        else:
            steps = [("new", "z", scalar), ("new", "le", x.numel), ("new", "d", x.nbytes), ("free", "le"), ("free", "z")]
        rec.node(y, steps, [(x.id, "d")], [rec.save(x, f"{tag}.input")])
    return y


def add_bias_(rec: Recorder, out: SymTensor, rows: SymTensor | None, on_view: bool = False) -> SymTensor:
    """``out.add_(bias_rows)`` (integrations/moe.py _grouped_linear): in place, no new storage; AddBackward hands the
    incoming gradient to the grouped_mm's output and to the gathered rows. `on_view`: _batched_linear adds into
    ``bmm(...).squeeze()``, a view, so autograd's CopySlices runs the add's backward (traced: new zeros the view's
    size, the incoming gradient dropped, then a copy of it for the bmm and a clone for the add, the zeros freed)."""
    if rows is None:
        return out
    y = rec.view(out, out.numel)
    y.requires_grad = out.requires_grad or rows.requires_grad
    if on_view and y.requires_grad:
        n = out.nbytes
        rec.node(y, [("new", "z", n), ("free", GRAD), ("new", "r", n), ("new", "c", n), ("free", "z")],
                 [(t.id, name) for t, name in ((out, "r"), (rows, "c")) if t.requires_grad])
        return y
    rec.node(y, outputs=[(t.id, GRAD) for t in (out, rows) if t.requires_grad])
    return y


def _weigh(rec: Recorder, down: SymTensor, ws: SymTensor, tag: str) -> SymTensor:
    """``proj_out * sample_weights_g.unsqueeze(-1)``: an (S, h) product in the wider dtype (fp32 where the routing
    weights are fp32, Mixtral's); MulBackward0 saves both. Backward: grad * weights (cast back to proj_out's dtype by
    the engine) and grad * proj_out, summed down to the weights' (S, 1) shape."""
    out = rec.new(down.numel, promote(down.dtype, ws.dtype), down.requires_grad or ws.requires_grad)
    saved = []
    if ws.requires_grad:
        saved.append(rec.save(down, f"{tag}.a"))
    if down.requires_grad:
        saved.append(rec.save(ws, f"{tag}.b"))
    steps, outputs, after = [], [], []
    if down.requires_grad:
        steps.append(("new", "d0", out.nbytes))
        if down.dtype != out.dtype:
            after += [("new", "c0", down.nbytes), ("free", "d0")]
            outputs.append((down.id, "c0"))
        else:
            outputs.append((down.id, "d0"))
    if ws.requires_grad:
        steps.append(("new", "t1", out.nbytes))
        after += [("new", "d1", ws.nbytes), ("free", "t1")]
        outputs.append((ws.id, "d1"))
    rec.node(out, steps + ([("returned",)] + after if after else []), outputs, saved)
    return out
