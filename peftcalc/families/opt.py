"""OPT (transformers models/opt/modeling_opt.py), the language model inside BLIP-2.
"""

from __future__ import annotations

from peftcalc.families.record import Family, config_dropout
from peftcalc.ops.attention import attention, math_path
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import add, dropout, heads_view, scale
from peftcalc.spec import ModelSpec

__all__ = [
    "DROPOUT",
    "OPT",
    "opt_block",
]


def opt_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """OPTDecoderLayer (transformers models/opt/modeling_opt.py, do_layer_norm_before=True): LayerNorm,
    q_proj(x) * scaling (a multiply by a Python scalar saves nothing), k_proj, v_proj, attention,
    out_proj, dropout, residual; LayerNorm on the (tokens, hidden) reshape, fc1, activation, fc2, dropout,
    residual. The LayerNorm's output is the attention's argument until it returns; each MLP
    intermediate is dropped when `hidden_states` is rebound. With the harness's use_cache the keys and
    values SDPA saves are the DynamicCache's concatenated copies instead of views of the projections:
    the same bytes, counted as the projections."""
    ctx = rec.ctx
    h = spec.hidden_size
    p = config_dropout(spec, DROPOUT, "resid")
    reshaped = math_path(ctx, config_dropout(spec, DROPOUT, "attn")) or ctx.attention == "eager"
    n = layer_norm(rec, x, sites.norm_trains("self_attn_layer_norm"), h, "self_attn_layer_norm", sites.norm_params("self_attn_layer_norm"))
    ql = sites.linear(rec, n, "self_attn.q_proj", h, h)
    qs = scale(rec, ql)
    rec.free(ql)
    kl = sites.linear(rec, n, "self_attn.k_proj", h, h)
    vl = sites.linear(rec, n, "self_attn.v_proj", h, h)
    q, k, v = (heads_view(rec, t, clone=reshaped) for t in (qs, kl, vl))
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "self_attn.attention", fp32_softmax=True)
    rec.free(qs, kl, vl)
    o = sites.linear(rec, a, "self_attn.out_proj", h, h)
    rec.free(a, n)
    od = dropout(rec, o, p, "self_attn.dropout")
    if od is not o:
        rec.free(o)
    x2 = add(rec, x, od, x.dtype)
    rec.free(od)
    n2 = layer_norm(rec, x2, sites.norm_trains("final_layer_norm"), h, "final_layer_norm", sites.norm_params("final_layer_norm"))
    f = sites.linear(rec, n2, "fc1", h, spec.intermediate_size)
    rec.free(n2)
    act = activation(rec, f, spec.hidden_act, "activation_fn")
    rec.free(f)
    d = sites.linear(rec, act, "fc2", spec.intermediate_size, h)
    rec.free(act)
    dd = dropout(rec, d, p, "dropout")
    if dd is not d:
        rec.free(d)
    out = add(rec, x2, dd, x2.dtype)
    rec.free(dd, x2)
    return out


# Dropout probabilities during training (OPTConfig: dropout after the attention output and after fc2).
DROPOUT = {
    "opt": {"attn": ("attention_dropout", 0.0), "resid": ("dropout", 0.1)},
}

# Inside BLIP-2 only for now (no standalone layout); learned positions (OPTLearnedPositionalEmbedding).
OPT = Family("opt", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/opt/modeling_opt.py",
             None, opt_block, DROPOUT["opt"], learned_positions=True)
