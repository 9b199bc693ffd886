"""OLMo 2 (transformers models/olmo2/modeling_olmo2.py): a Llama-shaped decoder whose blocks norm their outputs
instead of their inputs (post_attention_layernorm on the attention output, post_feedforward_layernorm on the MLP
output, each before its residual add), with q_norm/k_norm over the whole q and k projections before RoPE, and an
RMSNorm that multiplies its weight in fp32 before casting back (Olmo2RMSNorm), and fp32 rotary cos/sin.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.llama import config_head_dim, config_kv_heads, gated_mlp, rotary_buffer_bytes
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, attention_modules, decoder_layout, gated_mlp_modules, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.rotary import rope
from peftcalc.ops.tensor_ops import add, heads_view
from peftcalc.spec import ModelSpec, config_bool, config_int, config_str, encoder_sizes

__all__ = [
    "DROPOUT",
    "OLMO2",
    "olmo2_block",
    "olmo2_config",
    "olmo2_layout",
    "olmo2_norm",
]


def olmo2_layout(spec: ModelSpec) -> Layout:
    """Olmo2ForCausalLM (modeling_olmo2.py), in named_modules() order: embed_tokens; per layer
    Olmo2Attention's q/k/v/o_proj (a bias on each when attention_bias), q_norm (num_heads x head_dim) and
    k_norm (num_key_value_heads x head_dim), Olmo2MLP's gate/up/down_proj, post_attention_layernorm,
    post_feedforward_layernorm; norm; lm_head (untied by default)."""
    return decoder_layout(spec, _olmo2_block_modules)


def _olmo2_block_modules(spec: ModelSpec, p: str, i: int) -> list[Module]:
    h, bias = spec.hidden_size, spec.attention_bias
    return attention_modules(spec, p, i, bias, bias) + [
        norm_module(f"{p}.self_attn.q_norm", spec.q_dim, False, i),
        norm_module(f"{p}.self_attn.k_norm", spec.kv_dim, False, i),
    ] + gated_mlp_modules(spec, p, i) + [
        norm_module(f"{p}.post_attention_layernorm", h, False, i),
        norm_module(f"{p}.post_feedforward_layernorm", h, False, i),
    ]


def olmo2_norm(rec: Recorder, sites, x: SymTensor, name: str) -> SymTensor:
    """Olmo2RMSNorm on `x`: ``(self.weight * x_normed).to(input_dtype)`` (ops.norms.rms_norm, weight_fp32)."""
    return rms_norm(rec, x, sites.norm_trains(name), name, weight_fp32=True)


def olmo2_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """Olmo2DecoderLayer: the attention on the block's input itself (no input norm): q_norm(q_proj(x)),
    k_norm(k_proj(x)) over the whole projections (each projection dropped once normed), v_proj(x); the
    views to (b, heads, s, d) copy their gradients back (RoPE returns them in that layout); RoPE; attention;
    o_proj; post_attention_layernorm, then the residual add; the gated SiLU MLP on the sum, then
    post_feedforward_layernorm and the residual add. Each output is dropped when `hidden_states` is rebound."""
    ctx = rec.ctx
    h = spec.hidden_size
    ql = sites.linear(rec, x, "self_attn.q_proj", h, spec.q_dim)
    qn = olmo2_norm(rec, sites, ql, "self_attn.q_norm")
    rec.free(ql)
    kl = sites.linear(rec, x, "self_attn.k_proj", h, spec.kv_dim)
    kn = olmo2_norm(rec, sites, kl, "self_attn.k_norm")
    rec.free(kl)
    vl = sites.linear(rec, x, "self_attn.v_proj", h, spec.kv_dim)
    q, k = heads_view(rec, qn, clone=True), heads_view(rec, kn, clone=True)
    v = heads_view(rec, vl, clone=ctx.attention == "eager")
    # Olmo2's cos and sin are fp32 (Olmo2RotaryEmbedding.forward); apply_rotary_pos_emb casts back to q's dtype
    q, k = rope(rec, q, "float32", cast_back=True), rope(rec, k, "float32", cast_back=True)
    rec.free(qn, kn)
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "self_attn.attention", replaced=(k, vl), fp32_softmax=True)
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q, k, vl)
    on = olmo2_norm(rec, sites, o, "post_attention_layernorm")
    rec.free(o)
    x2 = add(rec, x, on, x.dtype)
    rec.free(on)
    d = gated_mlp(rec, spec, sites, x2, "silu")
    dn = olmo2_norm(rec, sites, d, "post_feedforward_layernorm")
    rec.free(d)
    out = add(rec, x2, dn, x2.dtype)
    rec.free(dn, x2)
    return out


def olmo2_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Olmo2Config (configuration_olmo2.py): GQA (num_key_value_heads, default the heads), head_dim (the
    modeling file reads ``getattr(config, "head_dim", hidden / heads)``), attention_bias, tie_word_embeddings
    (false), silu."""
    hidden, heads, layers, intermediate = encoder_sizes(config, where)
    kv_heads = config_kv_heads(config, heads, where)
    act = config_str(config, "hidden_act", "silu", where)
    if act != "silu":
        raise InputError(f"{where}: hidden_act {act!r} is not supported for olmo2; silu only")
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=config_head_dim(config, hidden, heads, where),
        intermediate_size=intermediate,
        vocab_size=config_int(config, "vocab_size", where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", False, where),
        attention_bias=config_bool(config, "attention_bias", False, where),
        hidden_act=act,
        **common,
    )


# Dropout probabilities during training (Olmo2Config: attention only).
DROPOUT = {"olmo2": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 has no olmo2 entry in its target mappings: the record takes peft's llama choice (LoRA on q_proj,
# v_proj; IA3 on k_proj, v_proj, down_proj, down_proj feed-forward), which the harness passes to peft.
OLMO2 = Family("olmo2", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/olmo2/modeling_olmo2.py",
               olmo2_layout, olmo2_block, DROPOUT["olmo2"], ("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"),
               ("down_proj",),
               architectures={"Olmo2ForCausalLM": "causal_lm", "Olmo2Model": "base"},
               default_task="causal_lm", read_config=olmo2_config, decoder=True, gated_mlp=True,
               final_norm="rms_weight_fp32", buffer_bytes=rotary_buffer_bytes, rotary=True, rotary_fp32=True,
               passes_position_ids=True,
               prefix_kv_dim=True)
