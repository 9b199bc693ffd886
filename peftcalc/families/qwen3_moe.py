"""Qwen3-MoE (transformers models/qwen3_moe/modeling_qwen3_moe.py): Qwen3's attention (per-head RMSNorm ``q_norm`` and
``k_norm`` over head_dim before RoPE, no biases) with a sparse MoE block in every layer: Qwen3MoeSparseMoeBlock holds
``experts`` (fused 3-D gate_up_proj / down_proj of moe_intermediate_size) before ``gate`` (Qwen3MoeTopKRouter:
softmax in fp32, top-k, renormalized when norm_topk_prob, then cast back to the logits' dtype), run by transformers'
default experts implementation, grouped_mm, batched_mm or the eager loop (--experts; peftcalc.ops.experts.experts_forward).
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.errors import InputError
from peftcalc.families.llama import llama_config, rotary_buffer_bytes
from peftcalc.families.mixtral import experts_lora, experts_modules, experts_training, moe_settings
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, attention_modules, decoder_head, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.experts import experts_forward
from peftcalc.ops.moe import drop_router_logits, router_top_k
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.rotary import rope
from peftcalc.ops.tensor_ops import add, heads_view
from peftcalc.spec import ModelSpec

__all__ = [
    "DROPOUT",
    "QWEN3_MOE",
    "qwen3_attention_half",
    "qwen3_moe_block",
    "qwen3_moe_config",
    "qwen3_moe_layout",
]


def qwen3_moe_layout(spec: ModelSpec) -> Layout:
    """Qwen3MoeForCausalLM: per block self_attn (q/k/v/o, then q_norm and k_norm of head_dim), mlp (experts, then
    the router's gate), input_layernorm, post_attention_layernorm."""
    base = "" if spec.task == "base" else "model."
    h, hd = spec.hidden_size, spec.head_dim
    bias = spec.attention_bias
    mods = [Module(f"{base}embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed")]
    for i in range(spec.num_layers):
        p = f"{base}layers.{i}"
        mods += attention_modules(spec, p, i, bias, bias) + [
            norm_module(f"{p}.self_attn.q_norm", hd, False, i),
            norm_module(f"{p}.self_attn.k_norm", hd, False, i),
        ]
        router, *experts = experts_modules(spec, f"{p}.mlp", i)
        mods += experts + [router]
        mods += [norm_module(f"{p}.input_layernorm", h, False, i), norm_module(f"{p}.post_attention_layernorm", h, False, i)]
    mods.append(norm_module(f"{base}norm", h, False))
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}layers", f"{base}embed_tokens", head, out_emb, tied, f"{base}norm")


def qwen3_attention_half(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """``residual + self_attn(input_layernorm(x))`` of Qwen3MoeAttention: ``q_norm(q_proj(x).view(..., head_dim))``
    then ``.transpose(1, 2)`` (a new normalized tensor whose transposed gradient needs no copy back), the same for
    k; v as Llama's; the q/k projections go once their norm has returned, the normalized q/k once RoPE has made
    its own."""
    eager = rec.ctx.attention == "eager"
    h, hd = spec.hidden_size, spec.head_dim
    n = rms_norm(rec, x, sites.norm_trains("input_layernorm"), "input_layernorm")
    ql = sites.linear(rec, n, "self_attn.q_proj", h, spec.q_dim)
    qn = rms_norm(rec, ql, sites.norm_trains("self_attn.q_norm"), "self_attn.q_norm", dim=hd)
    rec.free(ql)
    kl = sites.linear(rec, n, "self_attn.k_proj", h, spec.kv_dim)
    kn = rms_norm(rec, kl, sites.norm_trains("self_attn.k_norm"), "self_attn.k_norm", dim=hd)
    rec.free(kl)
    vl = sites.linear(rec, n, "self_attn.v_proj", h, spec.kv_dim)
    q, k, v = heads_view(rec, qn, clone=False), heads_view(rec, kn, clone=False), heads_view(rec, vl, clone=eager)
    q2, k2 = rope(rec, q), rope(rec, k)
    rec.free(qn, kn)
    a = attention(rec, spec, q2, k2, v, config_dropout(spec, DROPOUT, "attn"), "self_attn.attention",
                  replaced=(k2, vl), fp32_softmax=True, window=sites.window)
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q2, k2, vl, n)
    x2 = add(rec, x, o, x.dtype)
    rec.free(o)
    return x2


def qwen3_moe_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """Qwen3MoeDecoderLayer.forward with a sparse MoE block (Qwen3MoeSparseMoeBlock.forward: the router on the
    flattened tokens, its scores in the logits' dtype, then the experts)."""
    x2 = qwen3_attention_half(rec, spec, sites, x)
    n2 = rms_norm(rec, x2, sites.norm_trains("post_attention_layernorm"), "post_attention_layernorm")
    logits, weights, idx = router_top_k(rec, n2, spec.hidden_size, spec.num_experts, spec.experts_per_token,
                                        sites.param_trains("mlp.gate.weight"), spec.norm_topk_prob, "mlp.gate",
                                        scores_in_logits_dtype=True)
    m = experts_forward(rec, n2, weights, idx, spec.hidden_size, spec.expert_intermediate_size, spec.num_experts,
                           *experts_training(sites, "mlp.experts"), spec.hidden_act, "mlp.experts",
                           **experts_lora(sites, "mlp.experts"))
    rec.free(weights.base or weights, idx, n2)
    drop_router_logits(rec, logits)
    out = add(rec, x2, m, x2.dtype)
    rec.free(m, x2)
    return out


def qwen3_moe_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Qwen3MoeConfig: Qwen3's attention fields (head_dim, attention_bias), num_experts (default 128),
    num_experts_per_tok (8), moe_intermediate_size (768), norm_topk_prob (false). Only models whose every layer is
    sparse are modelled (decoder_sparse_step 1, no mlp_only_layers: Qwen3-30B-A3B, Qwen3-235B-A22B)."""
    if config.get("use_sliding_window") is True:
        raise InputError(f"{where}: a Qwen3-MoE with use_sliding_window is not modelled")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise InputError(f"{where}: dense layers inside a Qwen3-MoE (mlp_only_layers, decoder_sparse_step != 1) are "
                         "not modelled")
    config = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, **config}
    spec = llama_config(config, common, where)
    if config.get("attention_bias") is True:
        spec = replace(spec, attention_bias=True)
    return replace(spec, **moe_settings(config, where, "num_experts", "moe_intermediate_size", None))


# Dropout probabilities during training, from the transformers config defaults (attention only).
DROPOUT = {"qwen3_moe": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 has no default LoRA targets for qwen3_moe (constants.py): the harness names Qwen3's q_proj, v_proj
QWEN3_MOE = Family(
    "qwen3_moe",
    "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_moe/modeling_qwen3_moe.py",
    qwen3_moe_layout, qwen3_moe_block, DROPOUT["qwen3_moe"], ("q_proj", "v_proj"),
    architectures={"Qwen3MoeForCausalLM": "causal_lm", "Qwen3MoeForSequenceClassification": "seq_cls",
                   "Qwen3MoeModel": "base"},
    default_task="causal_lm", read_config=qwen3_moe_config, decoder=True, final_norm="rms",
    buffer_bytes=rotary_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True)
