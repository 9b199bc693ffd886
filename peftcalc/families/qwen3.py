"""Qwen3 (transformers models/qwen3/modeling_qwen3.py): Llama's decoder block with a per-head RMSNorm on the
queries and keys (q_norm, k_norm over head_dim) before RoPE, an explicit head_dim (128 by default) and
attention_bias on all four attention projections.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.llama import config_kv_heads, llama_mlp_half, llama_windows, rotary_buffer_bytes
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, attention_modules, decoder_layout, gated_mlp_modules, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.rotary import rope
from peftcalc.ops.tensor_ops import add, heads_view
from peftcalc.spec import ModelSpec, config_bool, config_int, config_str, encoder_sizes, optional_config_int

__all__ = [
    "DROPOUT",
    "QWEN3",
    "head_normed",
    "qwen3_block",
    "qwen3_config",
    "qwen3_layout",
]


def qwen3_layout(spec: ModelSpec) -> Layout:
    """Qwen3ForCausalLM (modeling_qwen3.py), in named_modules() order: embed_tokens; per layer
    Qwen3Attention's q/k/v/o_proj (a bias on each when attention_bias), q_norm and k_norm (RMSNorm over
    head_dim), Qwen3MLP's gate/up/down_proj (no bias), input_layernorm, post_attention_layernorm; norm;
    lm_head (tied when tie_word_embeddings, as in Qwen3-0.6B)."""
    return decoder_layout(spec, _qwen3_block_modules)


def _qwen3_block_modules(spec: ModelSpec, p: str, i: int) -> list[Module]:
    h, hd, bias = spec.hidden_size, spec.head_dim, spec.attention_bias
    return attention_modules(spec, p, i, bias, bias) + [
        norm_module(f"{p}.self_attn.q_norm", hd, False, i),
        norm_module(f"{p}.self_attn.k_norm", hd, False, i),
    ] + gated_mlp_modules(spec, p, i) + [
        norm_module(f"{p}.input_layernorm", h, False, i),
        norm_module(f"{p}.post_attention_layernorm", h, False, i),
    ]


def head_normed(rec: Recorder, spec: ModelSpec, sites, n: SymTensor, proj: str, norm: str, out_f: int) -> SymTensor:
    """``self.<norm>(self.<proj>(hidden_states).view(hidden_shape))`` (Qwen3Attention.forward): the
    projection, viewed as (b, s, heads, head_dim), normed per head (one RMSNorm row per token and head).
    The view's backward copies the gradient: it comes back through the transpose in (b, heads, s, d)
    layout, which the norm's backward keeps. The projection's output is dropped once the norm returns."""
    lin = sites.linear(rec, n, proj, spec.hidden_size, out_f)
    normed = rms_norm(rec, heads_view(rec, lin, clone=True), sites.norm_trains(norm), norm, dim=spec.head_dim)
    rec.free(lin)
    return normed


def qwen3_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """Qwen3DecoderLayer: LlamaDecoderLayer's ops (families.llama.llama_block) with q_norm and k_norm
    between the q/k projections and RoPE (head_normed); the normed queries and keys are transposed (a view
    whose backward transposes the gradient back, no copy) and dropped when RoPE's results rebind them; the MLP
    half is LlamaDecoderLayer's (families.llama.llama_mlp_half)."""
    ctx = rec.ctx
    h = spec.hidden_size
    n = rms_norm(rec, x, sites.norm_trains("input_layernorm"), "input_layernorm")
    qn = head_normed(rec, spec, sites, n, "self_attn.q_proj", "self_attn.q_norm", spec.q_dim)
    kn = head_normed(rec, spec, sites, n, "self_attn.k_proj", "self_attn.k_norm", spec.kv_dim)
    vl = sites.linear(rec, n, "self_attn.v_proj", h, spec.kv_dim)
    q, k = heads_view(rec, qn, clone=False), heads_view(rec, kn, clone=False)
    v = heads_view(rec, vl, clone=ctx.attention == "eager")
    cos = ctx.seq * spec.rope_dim  # (1, seq, head_dim): the rotary cos and sin
    q, k = rope(rec, q, cos_numel=cos), rope(rec, k, cos_numel=cos)
    rec.free(qn, kn)
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "self_attn.attention", replaced=(k, vl),
                  fp32_softmax=True, window=sites.window)
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q, k, vl, n)
    x2 = add(rec, x, o, x.dtype)
    rec.free(o)
    return llama_mlp_half(rec, spec, sites, x2)


def qwen3_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Qwen3Config (configuration_qwen3.py): head_dim 128 unless given (not hidden / heads), GQA,
    attention_bias (q/k/v/o), tie_word_embeddings; sliding-window layers as Qwen2Config has them
    (use_sliding_window, max_window_layers, layer_types: families.llama.llama_windows; the published Qwen3
    configs have none)."""
    hidden, heads, layers, intermediate = encoder_sizes(config, where)
    kv_heads = config_kv_heads(config, heads, where)
    act = config_str(config, "hidden_act", "silu", where)
    if act != "silu":
        raise InputError(f"{where}: hidden_act {act!r} is not supported for qwen3; silu only")
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=optional_config_int(config, "head_dim", 128, where, null_is_default=True),
        intermediate_size=intermediate,
        vocab_size=config_int(config, "vocab_size", where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", False, where),
        attention_bias=config_bool(config, "attention_bias", False, where),
        hidden_act=act,
        layer_windows=llama_windows(config, "qwen2", layers, where),  # Qwen3Config.__post_init__ is Qwen2Config's
        **common,
    )


# Dropout probabilities during training (Qwen3Config: attention only).
DROPOUT = {"qwen3": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 utils/constants.py: LoRA on q_proj, v_proj; IA3 on q_proj, v_proj, down_proj (down_proj feed-forward).
QWEN3 = Family("qwen3", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3/modeling_qwen3.py",
               qwen3_layout, qwen3_block, DROPOUT["qwen3"], ("q_proj", "v_proj"), ("q_proj", "v_proj", "down_proj"),
               ("down_proj",),
               architectures={"Qwen3ForCausalLM": "causal_lm", "Qwen3ForSequenceClassification": "seq_cls",
                              "Qwen3Model": "base"},
               default_task="causal_lm", read_config=qwen3_config, decoder=True, gated_mlp=True, final_norm="rms",
               buffer_bytes=rotary_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True)
