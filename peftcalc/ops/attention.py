"""Scaled dot-product attention as transformers' attention interface runs it: SDPA's fused kernels, the
CPU math path, eager attention, GQA's repeat_kv and prefix tuning's cache concatenation.
"""

from __future__ import annotations

from peftcalc.backward import GRAD
from peftcalc.ops.context import StepContext
from peftcalc.ops.nonlinear import tanh
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import autocast_in, cast, dropout, promote, scale
from peftcalc.settings import DTYPE_BYTES
from peftcalc.spec import ModelSpec

__all__ = [
    "attention",
    "layer_windows",
    "mask_bytes_by_window",
    "math_path",
    "model_masks_bytes",
    "window_mask",
]


def layer_windows(spec: ModelSpec) -> tuple:
    """Each block's attention window in tokens, 0 for full causal attention (ModelSpec.layer_windows, which the
    family's config reader takes from `sliding_window` and `layer_types`: transformers' decoder layers pick
    `config.layer_types[i]`'s mask from the model forward's causal_mask_mapping)."""
    return spec.layer_windows or (0,) * spec.num_layers


def window_mask(ctx: StepContext, window: int) -> bool:
    """Whether a sliding-window layer (`window` tokens; 0: none) gets an explicit mask under SDPA, where a full
    layer relies on SDPA's is_causal: transformers masking_utils.create_sliding_window_causal_mask calls
    sdpa_mask with local_size=window, and _ignore_causal_mask_sdpa refuses the is_causal skip once the keys
    reach the window (``local_attention_size is not None and kv_length >= local_attention_size``): at
    seq == window the mask equals the plain causal one, but it is built all the same. Below the window the
    mask is skipped and the layer runs as a full one. Eager attention always adds a mask (eager_mask), the
    same size with or without a window, so the window changes none of its ops."""
    return window > 0 and ctx.attention != "eager" and ctx.kv_seq >= window


def model_masks_bytes(spec: ModelSpec, ctx: StepContext) -> int:
    """The masks the model's forward builds once per mask type and hands every layer of that type
    (causal_mask_mapping: "full_attention" from create_causal_mask, "sliding_attention" from
    create_sliding_window_causal_mask): the sum of mask_bytes_by_window."""
    return sum(mask_bytes_by_window(spec, ctx).values())


def mask_bytes_by_window(spec: ModelSpec, ctx: StepContext) -> dict:
    """Per layer type (its window, 0: full attention), the bytes of the mask the model's forward builds for it.
    SDPA: sdpa_mask's mask_function broadcasts the query and key positions to a (1, 1, seq, kv) bool tensor,
    then ``expand(batch, ...)`` (a view: seq x kv bytes whatever the batch); the full layers' mask exists when
    prefix tuning's past keys make kv != seq, the sliding layers' then too or when window_mask says so. Eager:
    eager_mask always builds it and turns it into a float mask, ``torch.where(mask, 0, min)`` on the expanded
    view, a (batch, 1, seq, kv) tensor in inputs_embeds' dtype."""
    out = {}
    for w in set(layer_windows(spec)):
        if ctx.attention == "eager":
            out[w] = ctx.batch * ctx.seq * ctx.kv_seq * DTYPE_BYTES[ctx.weight_dtype]
        elif ctx.kv_seq != ctx.seq or window_mask(ctx, w):
            out[w] = ctx.seq * ctx.kv_seq
    return out


def attention(rec: Recorder, spec: ModelSpec, q: SymTensor, k: SymTensor, v: SymTensor, p_drop: float, tag: str, hold: int = 0,
              cross: bool = False, replaced: tuple = (), fp32_softmax: bool = False, window: int = 0,
              softcap: float = 0.0) -> SymTensor:
    """Scaled dot-product attention over heads.

    sdpa (torch.nn.functional.scaled_dot_product_attention): the fused kernels (flash/memory-efficient
    on CUDA, the flash kernel on CPU) save q, k, v, the output and a logsumexp (fp32, batch x heads x
    query length); their backward makes the three input gradients at once. eager (transformers
    eager_attention_forward): q @ k^T saves q and k (keys/values repeated to all heads for GQA by
    repeat_kv), softmax in fp32 saves its output, the cast to the compute dtype is saved by the matmul
    with v, and dropout (p > 0) saves its mask. `hold`: the node after which the CPU math path's
    incoming gradient is freed (traced: the query projection's) when bmm reads it without a reshape copy
    (_bmm_output_backward). `cross`: keys and values come from
    another sequence of ctx.kv_seq tokens (the BLIP-2 Q-Former's cross-attention to the image
    features), with no mask and no virtual tokens. `replaced`: what the modeling code drops when its
    key/value locals are rebound to the cache update's concatenations (prefix tuning only).
    `fp32_softmax`: eager attention's softmax runs in fp32 (modeling_llama.py eager_attention_forward and
    the ViT/CLIP/OPT copies); GPT-2/BERT/RoBERTa and BLIP-2's own take it in the scores' dtype.
    `window`: the layer's sliding window (0: none); with an explicit mask (window_mask) SDPA runs as with
    prefix tuning's mask below, without the cache. `softcap`: Gemma 2's soft-capping of the eager scores
    (modeling_gemma2.py eager_attention_forward: / softcap, tanh, * softcap; 0: none).
    """
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    prefix = kv != s and not cross
    if not prefix and not (window_mask(ctx, window) and not cross):
        return _attend(rec, spec, q, k, v, p_drop, tag, hold, False, fp32_softmax, softcap=softcap)
    # an explicit mask: prefix tuning's cache update concatenates the trainable past keys/values, and the
    # causal mask cannot be skipped; a sliding window's mask is built from the window on. Transformers
    # (sdpa_attention_forward: use_gqa_in_sdpa is False with a mask) then repeats keys/values to every head
    # (repeat_kv, locals dropped when it returns) and SDPA saves the float mask it converts the bool one to
    # (aten scaled_dot_product_attention: convert_boolean_attn_mask, a (b, 1, s, kv) where())
    if prefix:
        kc, vc = _cache_keys(rec, k, b * kv * spec.kv_dim), _cache_keys(rec, v, b * kv * spec.kv_dim)
        rec.free(*replaced)
    else:
        kc, vc = k, v
    kr, vr = _repeat_kv(rec, spec, kc), _repeat_kv(rec, spec, vc)
    cpu_math = p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout
    float_mask = None
    if ctx.attention != "eager" and not cpu_math:  # eager and the math path add it to the scores
        # in SDPA's (autocast) query dtype, saved where the kernel's node exists
        float_mask = rec.new(b * s * kv, ctx.autocast or q.dtype, False)
        if q.requires_grad or kr.requires_grad or vr.requires_grad:
            rec.save(float_mask, f"{tag}.attn_mask")
    # the values bmm gets on the math path are contiguous as (b, heads, s, d) where the cache concatenated them
    # or repeat_kv copied them, not where repeat_kv's reshape is a view (a single key/value head) or no-op
    single_kv = spec.num_kv_heads == 1 and spec.num_heads > 1
    v_contiguous = not single_kv and (prefix or spec.num_heads > spec.num_kv_heads)
    out = _attend(rec, spec, q, kr, vr, p_drop, tag, hold, True, fp32_softmax, v_contiguous, softcap)
    rec.free(float_mask)
    for r, c in ((kr, kc), (vr, vc)):
        if r is not c:
            rec.free(r)
    return out


def _attend(rec: Recorder, spec: ModelSpec, q: SymTensor, k: SymTensor, v: SymTensor, p_drop: float, tag: str, hold: int,
            explicit_mask: bool, fp32_softmax: bool, v_contiguous: bool = False, softcap: float = 0.0) -> SymTensor:
    """The attention kernel transformers' attention interface runs (see attention); `explicit_mask`: keys
    and values come repeated to every head, `v_contiguous`: the values laid out as (b, heads, s, d)."""
    ctx = rec.ctx
    b, s, kv = ctx.batch, ctx.seq, ctx.kv_seq
    heads = spec.num_heads
    needs = q.requires_grad or k.requires_grad or v.requires_grad
    out_numel = b * s * spec.q_dim
    if ctx.attention == "eager":
        return _eager_attention(rec, spec, q, k, v, p_drop, explicit_mask, tag, fp32_softmax, softcap)
    # SDPA is on autocast's lower-precision list: it casts RoPE's wider q, k back, and the q, k, v a QLoRA
    # layer returns in the stream's dtype (bitsandbytes Linear4bit.forward's .to(inp_dtype)), before any
    # kernel (the CPU math path then upcasts the copies)
    qi, ki, vi = autocast_in(rec, q), autocast_in(rec, k), autocast_in(rec, v)
    if p_drop > 0 and ctx.device == "cpu" and ctx.training_dropout:
        # values contiguous as (b, heads, s, d) (attention): bmm takes them as they are
        out = _math_attention(rec, spec, qi, ki, vi, tag, hold, v_contiguous)
        rec.free(*(t for t, orig in ((qi, q), (ki, k), (vi, v)) if t is not orig))
        return out
    saved = []
    if needs:
        saved = [rec.save(qi, f"{tag}.q"), rec.save(ki, f"{tag}.k"), rec.save(vi, f"{tag}.v")]
    out = rec.new(out_numel, qi.dtype, needs)
    lse = rec.new(b * heads * s, "float32", False)
    if needs:
        saved += [rec.save(out, f"{tag}.out"), rec.save(lse, f"{tag}.logsumexp")]
        if p_drop > 0 and ctx.device == "cpu":  # CPU flash has no dropout: the math path keeps the probs
            saved.append(rec.save_new(b * heads * s * kv, q.dtype, f"{tag}.probs"))
        # the backward computes all three gradients (and frees those no input needs)
        steps = [("new", "dq", qi.nbytes), ("new", "dk", ki.nbytes), ("new", "dv", vi.nbytes)]
        outputs = [(t.id, name) for t, name in ((qi, "dq"), (ki, "dk"), (vi, "dv")) if t.requires_grad]
        rec.node(out, steps, outputs, saved)
    rec.free(lse)
    for t, orig in ((qi, q), (ki, k), (vi, v)):
        if t is not orig:
            rec.free(t)
    # The fused kernels lay their output out as (batch, seq, heads, dim): transformers'
    # transpose(1, 2).contiguous() is then a view, and the output projection saves that storage.
    return out


def _cache_keys(rec: Recorder, x: SymTensor, numel: int) -> SymTensor:
    """Prefix tuning's keys/values: cat(past, new) along the sequence (DynamicCache.update: the cache
    keeps the concatenation to the end of the forward), in the promoted dtype of the past (peft's
    prefix encoder, in the weights' dtype) and x (fp32 under autocast); the backward hands on slices of
    the gradient (the new part to x, copied back to x's layout and dtype)."""
    y = rec.new(numel, promote(x.dtype, rec.ctx.weight_dtype), True)
    rec.node(y, *input_grads(x))
    return y


def _repeat_kv(rec: Recorder, spec: ModelSpec, x: SymTensor) -> SymTensor:
    """transformers repeat_kv: x[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, heads, s, d):
    a copy, except with a single key/value head, where the reshape of the expanded tensor is a view
    (stride 0 across the heads); the backward sums the repeats (a new gradient like x)."""
    groups = spec.num_heads // spec.num_kv_heads
    if groups == 1:
        return x
    y = rec.view(x, x.numel * groups) if spec.num_kv_heads == 1 else rec.new(x.numel * groups, x.dtype, x.requires_grad)
    rec.node(y, *input_grads(x))
    return y


def _math_attention(rec: Recorder, spec: ModelSpec, q: SymTensor, k: SymTensor, v: SymTensor, tag: str, hold: int,
                    v_contiguous: bool = False) -> SymTensor:
    """CPU has no fused kernel with dropout: torch's _scaled_dot_product_attention_math runs, in fp32
    for half types, and saves the scaled q, k^T, v (reshape copies for bmm), the softmax, the dropout
    noise and the dropped probabilities; its (batch, heads, seq, dim) output is copied by
    transpose().contiguous(). Backward (traced): the output gradient is copied for bmm, bmm makes v's
    and the probabilities' gradients, dropout, _safe_softmax_backward, bmm makes q's and k's, the
    scalings make new ones. For causal models (is_causal) the kernel builds a (seq x kv) float mask from
    at::ones().tril() and adds it out of place (a dispatch mode makes the tensors subclass-like; a storage
    tracer is one); it returns the tuple (matmul(attn, v).to(dtype), attn.to(dtype)), evaluated right to
    left: for half types the attention weights' cast (discarded) exists until it returns
    (aten/src/ATen/native/transformers/attention.cpp). The reshape copies are views when the batch and
    head dimensions merge (_bmm_reshape_copies): bmm then saves the scaled q and k^T and v itself (a
    view keeps its whole storage: GPT-2's fused c_attn output in fp32, where v is not cast)."""
    ctx = rec.ctx
    b, s, kv, heads = ctx.batch, ctx.seq, ctx.kv_seq, spec.num_heads
    up = "float32" if (ctx.autocast or q.dtype) in ("bfloat16", "float16") else q.dtype
    ub = DTYPE_BYTES[up]
    nq, nk, sc = b * s * spec.q_dim * ub, b * kv * spec.q_dim * ub, b * heads * s * kv * ub
    qk_rg, needs = q.requires_grad or k.requires_grad, q.requires_grad or k.requires_grad or v.requires_grad
    qu, ku, vu = (cast(rec, t, up) for t in (q, k, v))
    qs = scale(rec, qu)  # q * sqrt(scale), held to the end
    ks = scale(rec, ku)  # k^T * sqrt(scale)
    copies = _bmm_reshape_copies(b, heads)
    qc = rec.new(b * s * spec.q_dim, up, False) if copies else qs  # bmm's reshape copies
    kc = rec.new(b * kv * spec.q_dim, up, False) if copies else ks
    saved1 = []
    if k.requires_grad:
        saved1.append(rec.save(qc, f"{tag}.math_q"))
    if q.requires_grad:
        saved1.append(rec.save(kc, f"{tag}.math_k"))
    scores = rec.new(b * heads * s * kv, up, qk_rg)
    rec.node(scores, [("new", "dk", nk), ("new", "dq", nq)], [(t.id, n) for t, n in ((ks, "dk"), (qs, "dq")) if t.requires_grad],
             saved1)
    rec.free(ks, *((kc, qc) if copies else ()))  # qs is held to the end
    mask = None
    if spec.is_decoder:
        mask = rec.new(s * kv, up, False)
        masked = rec.new(scores.numel, up, qk_rg)
        rec.node(masked, outputs=[(scores.id, GRAD)])
        rec.free(scores)
        scores = masked
    probs = rec.new(b * heads * s * kv, up, qk_rg)  # _safe_softmax, saves its output
    rec.free(scores)
    noise = rec.new(b * heads * s * kv, up, False)
    dropped = rec.new(b * heads * s * kv, up, qk_rg)
    if qk_rg:
        sm, nz = rec.save(probs, f"{tag}.math_softmax_noise"), rec.save(noise, f"{tag}.math_softmax_noise")
        rec.node(probs, [("new", "d", sc)], [(scores.id, "d")], [sm])
        rec.node(dropped, [("new", "d", sc)], [(probs.id, "d")], [nz])
    rec.free(noise, probs)
    weights = rec.new(dropped.numel, q.dtype, False) if up != q.dtype else None  # attn.to(origin_dtype)
    vc = vu if v_contiguous or not copies else rec.new(b * kv * spec.q_dim, up, False)  # bmm's reshape copy of v
    saved2 = []
    if q.requires_grad or k.requires_grad:
        saved2.append(rec.save(vc, f"{tag}.math_v"))
    if v.requires_grad:
        saved2.append(rec.save(dropped, f"{tag}.math_probs"))
    out = rec.new(b * s * spec.q_dim, up, needs)  # bmm(probs, v), reshaped
    rec.node(out, _bmm_output_backward(nq, nk, sc, copies),
             [(t.id, n) for t, n in ((vu, "dv"), (dropped, "dp")) if t.requires_grad], saved2, hold=0 if copies else hold)
    o = cast(rec, out, q.dtype)
    if o is not out:
        rec.free(out)
    # the kernel returns: its locals go
    if vc is not vu:
        rec.free(vc)
    rec.free(qs, dropped, mask, weights)
    for t, orig in ((qu, q), (ku, k), (vu, v)):
        if t is not orig:
            rec.free(t)
    y = rec.new(o.numel, o.dtype, needs)  # transpose(1, 2).contiguous(): a copy, its backward a view
    rec.node(y, outputs=[(o.id, GRAD)])
    rec.free(o)
    return y


def _bmm_output_backward(nq: int, nk: int, sc: int, copies: bool) -> list:
    """The backward of the math path's matmul(probs, v), which at::matmul folded into bmm and
    _unsafe_view (aten/src/ATen/native/LinearAlgebra.cpp _matmul_impl): UnsafeViewBackward0 reshapes the
    incoming gradient to bmm's (batch * heads, seq, dim), a copy when the operands' reshapes were
    (_bmm_reshape_copies: the gradient arrives with the transposed strides of transformers'
    transpose(1, 2), kept by ToCopyBackward0's fp32 upcast, _to_copy's preserve_format), after which the
    engine drops the incoming gradient as that node returns; then BmmBackward0 makes v's and the
    probabilities' gradients from the copy, freed when it returns. Traced (bert-base full bf16 and fp32,
    batch 4 x 512, checkpointing, fake tensors): aten.clone (4, 12, 512, 64), the incoming gradient freed,
    then bmm (48, 512, 64) and bmm (48, 512, 512), then the clone freed. Without the copies the reshape is
    a view and bmm reads the incoming gradient itself."""
    if not copies:
        return [("new", "dv", nk), ("new", "dp", sc)]
    return [("new", "g3", nq), ("free", GRAD), ("new", "dv", nk), ("new", "dp", sc), ("free", "g3")]


def _bmm_reshape_copies(batch: int, heads: int) -> bool:
    """Whether at::matmul copies the math path's (batch, heads, seq, dim) operands to fold them into
    bmm's (batch * heads, seq, dim): it folds with reshape (aten/src/ATen/native/LinearAlgebra.cpp
    _matmul_impl), a view when the two leading dimensions merge, which transformers'
    view(b, s, heads, d).transpose(1, 2) layout (and the scaled copies, which keep it) allows only when
    one of them is 1 (traced: tiny-gpt2 LoRA fp32 batch 1 x 64 on fake tensors, bmm saves the two
    scaled products and c_attn's whole (1, 64, 192) output, no clone)."""
    return batch > 1 and heads > 1


def _eager_attention(rec: Recorder, spec: ModelSpec, q: SymTensor, k: SymTensor, v: SymTensor, p_drop: float, explicit_mask: bool,
                     tag: str, fp32_softmax: bool, softcap: float = 0.0) -> SymTensor:
    """transformers eager_attention_forward: repeat_kv, matmul(q, k^T) * scaling (Gemma 2: / softcap, tanh,
    * softcap; tanh saves its output), (+ mask), softmax
    (fp32 for the Llama family and the vision towers), .to(q dtype), dropout, matmul with v, then
    transpose(1, 2).contiguous()."""
    ctx = rec.ctx
    b, s, kv, heads = ctx.batch, ctx.seq, ctx.kv_seq, spec.num_heads
    k_full, v_full = (k, v) if explicit_mask else (_repeat_kv(rec, spec, k), _repeat_kv(rec, spec, v))
    qi, ki, scores = _scaled_scores(rec, spec, q, k_full, tag)
    qk_rg = q.requires_grad or k.requires_grad
    if softcap:
        capped = scale(rec, scores)  # attn_weights / softcap
        rec.free(scores)
        t = tanh(rec, capped, f"{tag}.softcap_tanh")
        rec.free(capped)
        scores = scale(rec, t)  # * softcap (tanh saved its output)
        rec.free(t)
    if fp32_softmax:  # softmax(..., dtype=float32).to(query.dtype)
        softmax = rec.new(b * heads * s * kv, "float32", qk_rg)
    else:  # softmax(attn_weights, dim=-1) in the scores' dtype
        softmax = rec.new(b * heads * s * kv, q.dtype if not ctx.autocast else "float32", qk_rg)
    if qk_rg:
        rec.node(softmax, *input_grads(scores), saved=[rec.save(softmax, f"{tag}.softmax_out")])
    rec.free(scores)
    chain = [softmax]
    if softmax.dtype != q.dtype and not ctx.autocast:  # .to(query.dtype)
        chain.append(cast(rec, chain[-1], q.dtype))
    chain.append(dropout(rec, chain[-1], p_drop, tag))
    chain.append(autocast_in(rec, chain[-1]))  # autocast's matmul casts fp32 probabilities
    vi, out = _values_matmul(rec, spec, chain[-1], v_full, v, ctx.autocast or q.dtype, tag, "kept")
    rec.free(*chain)
    y = _contiguous_output(rec, out, ((qi, q), (ki, k_full), (vi, v_full), (k_full, k), (v_full, v)))
    rec.free(out)
    return y


def _scaled_scores(rec: Recorder, spec: ModelSpec, q: SymTensor, k_full: SymTensor, tag: str) -> tuple:
    """eager_attention_forward's ``torch.matmul(query, key_states.transpose(2, 3)) * scaling`` on the keys repeat_kv
    returned (modeling_llama.py; gpt-oss's alike): autocast casts both in, the matmul saves q for k's gradient and
    k for q's, its (b, heads, s, kv) scores come in the compute dtype, and the scaling makes new ones (the
    matmul's dropped; MulBackward makes a new gradient). Returns (q as cast, k as cast, the scaled scores)."""
    ctx = rec.ctx
    qi, ki = autocast_in(rec, q), autocast_in(rec, k_full)
    saved = []
    if k_full.requires_grad:
        saved.append(rec.save(qi, f"{tag}.q"))
    if q.requires_grad:
        saved.append(rec.save(ki, f"{tag}.k"))
    raw = rec.new(ctx.batch * spec.num_heads * ctx.seq * ctx.kv_seq, ctx.autocast or q.dtype,
                  q.requires_grad or k_full.requires_grad)
    rec.node(raw, *input_grads(qi, ki), saved=saved)
    scores = scale(rec, raw)
    rec.free(raw)
    return qi, ki, scores


def _values_matmul(rec: Recorder, spec: ModelSpec, probs: SymTensor, v_full: SymTensor, v: SymTensor, dtype: str,
                   tag: str, grad_copy: str) -> tuple:
    """eager_attention_forward's ``torch.matmul(attn_weights, value_states)``: autocast casts the values in, the
    matmul saves the probabilities for v's gradient and v for theirs, its (b, s, heads x head_dim) output in
    `dtype`. Its backward makes the probabilities' and v's gradients from a copy of the incoming gradient,
    `grad_copy`: "kept" (the incoming gradient held until the node returns: _eager_attention), "freed" (dropped
    once copied: UnsafeViewBackward's reshape copy, _bmm_output_backward) or "" (no copy: bmm reads it). Returns
    (the values as cast, the output)."""
    ctx = rec.ctx
    vi = autocast_in(rec, v_full)
    saved = []
    if v.requires_grad:
        saved.append(rec.save(probs, f"{tag}.probs"))
    if probs.requires_grad:
        saved.append(rec.save(vi, f"{tag}.v"))
    out = rec.new(ctx.batch * ctx.seq * spec.q_dim, dtype, probs.requires_grad or v.requires_grad)
    steps, outputs = input_grads(probs, vi)
    if grad_copy == "kept":
        steps = [("new", "g", out.nbytes)] + steps + [("free", "g")]
    elif grad_copy == "freed":
        steps = [("new", "c", out.nbytes), ("free", GRAD)] + steps + [("free", "c")]
    rec.node(out, steps, outputs, saved)
    return vi, out


def _contiguous_output(rec: Recorder, out: SymTensor, casts: tuple) -> SymTensor:
    """The end of eager_attention_forward: its locals go (of each (tensor, original) pair in `casts`, the
    autocast casts and repeat_kv's copies, where they are not the original), then ``attn_output.transpose(1,
    2).contiguous()`` copies the output; its backward a view."""
    for t, orig in casts:
        if t is not orig:
            rec.free(t)
    y = rec.new(out.numel, out.dtype, out.requires_grad)
    rec.node(y, outputs=[(out.id, GRAD)])
    return y


def math_path(ctx: StepContext, attention_dropout: float) -> bool:
    """Attention takes torch's math path (not a fused kernel) on the CPU in training with dropout."""
    return ctx.attention != "eager" and attention_dropout > 0 and ctx.device == "cpu" and ctx.training_dropout
