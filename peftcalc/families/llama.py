"""Llama, Mistral and Qwen2 (transformers models/llama/modeling_llama.py, models/mistral/modeling_mistral.py,
models/qwen2/modeling_qwen2.py): pre-RMSNorm decoder blocks with RoPE, GQA and a gated SiLU MLP.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, attention_modules, decoder_layout, gated_mlp_modules, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.rotary import rope
from peftcalc.ops.tensor_ops import add, heads_view, mul, scale
from peftcalc.spec import (SLIDING_ATTENTION, FULL_ATTENTION, ModelSpec, config_bool, config_int, config_str, divided,
                           encoder_sizes, optional_config_int, optional_window, sliding_windows)

__all__ = [
    "DROPOUT",
    "LLAMA",
    "MISTRAL",
    "QWEN2",
    "config_head_dim",
    "config_kv_heads",
    "gated_mlp",
    "llama_attention_half",
    "llama_block",
    "llama_block_modules",
    "llama_config",
    "llama_layout",
    "llama_mlp_half",
    "llama_windows",
    "residual_scaled",
    "rotary_buffer_bytes",
]


def llama_layout(spec: ModelSpec) -> Layout:
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (modeling_llama.py, modeling_mistral.py,
    modeling_qwen2.py; GraniteForCausalLM, modeling_granite.py, alike): q/k/v/o, gated MLP, RMSNorm (weight only)."""
    return decoder_layout(spec, llama_block_modules)


def llama_block_modules(spec: ModelSpec, p: str, i: int) -> list[Module]:
    """One LlamaDecoderLayer's modules at prefix `p`: q/k/v/o (biases on q/k/v with attention_bias, on o_proj too
    but in Qwen2), the gated MLP (mlp_bias), input_layernorm, post_attention_layernorm."""
    h = spec.hidden_size
    o_bias = spec.attention_bias and spec.model_type in ("llama", "granite", "smollm3")  # Qwen2's o_proj has none
    return attention_modules(spec, p, i, spec.attention_bias, o_bias) + gated_mlp_modules(spec, p, i, spec.mlp_bias) + [
        norm_module(f"{p}.input_layernorm", h, False, i),
        norm_module(f"{p}.post_attention_layernorm", h, False, i),
    ]


def llama_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """LlamaDecoderLayer (also Mistral, Qwen2): pre-RMSNorm attention with RoPE, gated SiLU MLP.
    The forward frees each tensor when modeling_llama.py drops it: the attention's q, k, v at its
    return, the MLP's gate/up/act intermediates as the expression proceeds, the normed inputs when
    `hidden_states` is rebound, the residual at the block's return."""
    x2 = llama_attention_half(rec, spec, sites, x)
    return llama_mlp_half(rec, spec, sites, x2)


def llama_attention_half(rec: Recorder, spec: ModelSpec, sites, x: SymTensor, dropout: dict | None = None,
                         residual_multiplier: bool = False) -> SymTensor:
    """The first half of LlamaDecoderLayer.forward: ``residual + self_attn(input_layernorm(x))`` (the
    residual stream after attention; also the first half of the MoE decoder layers, families.mixtral and
    kin, whose `dropout` table names their config key, and of GraniteDecoderLayer, whose
    ``residual + hidden_states * self.residual_multiplier`` scales the attention output first:
    `residual_multiplier`, residual_scaled)."""
    ctx = rec.ctx
    h = spec.hidden_size
    eager = ctx.attention == "eager"
    n = rms_norm(rec, x, sites.norm_trains("input_layernorm"), "input_layernorm")
    # q_proj(x).view().transpose(1, 2), then k, then v; RoPE on q and k (its gradients come back laid
    # out as (b, heads, s, d), so the views' backward copies them; SDPA's come back in v's layout)
    ql = sites.linear(rec, n, "self_attn.q_proj", h, spec.q_dim)
    kl = sites.linear(rec, n, "self_attn.k_proj", h, spec.kv_dim)
    vl = sites.linear(rec, n, "self_attn.v_proj", h, spec.kv_dim)
    if sites.rope:
        q, k, v = heads_view(rec, ql, clone=True), heads_view(rec, kl, clone=True), heads_view(rec, vl, clone=eager)
        cos = rec.ctx.seq * spec.rope_dim  # (1, seq, head_dim): LlamaRotaryEmbedding's cos and sin
        q, k = rope(rec, q, cos_numel=cos), rope(rec, k, cos_numel=cos)
        rec.free(ql, kl)
    else:  # SmolLM3's NoPE layers (``if self.use_rope``): q and k stay views of the projections, as v is
        q, k, v = (heads_view(rec, t, clone=eager) for t in (ql, kl, vl))
    # `key_states, value_states = past_key_values.update(...)` drops RoPE's keys and the value projection
    a = attention(rec, spec, q, k, v, config_dropout(spec, dropout or DROPOUT, "attn"), "self_attn.attention",
                  replaced=(k if sites.rope else kl, vl), fp32_softmax=True, window=sites.window)
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q, k, vl, n, ql, kl)
    return residual_scaled(rec, x, o, residual_multiplier)


def llama_mlp_half(rec: Recorder, spec: ModelSpec, sites, x2: SymTensor, residual_multiplier: bool = False) -> SymTensor:
    """The second half of LlamaDecoderLayer.forward: ``residual + mlp(post_attention_layernorm(x2))`` (Granite's
    with the MLP output scaled by the residual multiplier: residual_scaled)."""
    n2 = rms_norm(rec, x2, sites.norm_trains("post_attention_layernorm"), "post_attention_layernorm")
    d = gated_mlp(rec, spec, sites, n2, "silu")
    rec.free(n2)
    out = residual_scaled(rec, x2, d, residual_multiplier)
    rec.free(x2)
    return out


def gated_mlp(rec: Recorder, spec: ModelSpec, sites, n: SymTensor, act_fn: str) -> SymTensor:
    """LlamaMLP.forward, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (modeling_llama.py; Qwen3MLP, Olmo2MLP
    and Gemma2MLP, with gelu_pytorch_tanh, run the same ops) on the block's input `n`, down_proj's output through
    its bottleneck adapter where the method put one (BlockSites.adapt): each intermediate is dropped as the
    expression proceeds, the product once down_proj has taken it. The caller drops `n` (a local of the block)."""
    h = spec.hidden_size
    g = sites.linear(rec, n, "mlp.gate_proj", h, spec.intermediate_size)
    act = activation(rec, g, act_fn, "mlp.act_fn")
    rec.free(g)
    u = sites.linear(rec, n, "mlp.up_proj", h, spec.intermediate_size)
    p = mul(rec, act, u, "mlp.act_mul")
    rec.free(act, u)
    d = sites.linear(rec, p, "mlp.down_proj", spec.intermediate_size, h)
    d = sites.adapt(rec, d, "mlp_out", "mlp.down_proj")
    rec.free(p)
    return d


def residual_scaled(rec: Recorder, residual: SymTensor, y: SymTensor, multiplied: bool) -> SymTensor:
    """``residual + y`` (the residual stream's dtype), or GraniteDecoderLayer's ``residual + y *
    self.residual_multiplier`` when `multiplied`: the product by a Python number is a new tensor (its backward a
    new gradient: ops.tensor_ops.scale), dropped once summed. `y` is dropped after the sum."""
    if multiplied:
        scaled = scale(rec, y)
        rec.free(y)
        y = scaled
    out = add(rec, residual, y, residual.dtype)
    rec.free(y)
    return out


def llama_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """LlamaConfig, MistralConfig, Qwen2Config: GQA (num_key_value_heads), an optional head_dim, q/k/v
    biases in Qwen2 (Qwen2Attention: o_proj has none), attention_bias and mlp_bias in Llama."""
    model_type = common["model_type"]
    hidden, heads, layers, intermediate = encoder_sizes(config, where)
    kv_heads = config_kv_heads(config, heads, where)
    head_dim = config_head_dim(config, hidden, heads, where)
    if model_type == "qwen2":
        attention_bias = True  # Qwen2Attention: q/k/v carry biases, o_proj does not
    elif model_type in ("llama", "granite", "smollm3"):
        attention_bias = config_bool(config, "attention_bias", False, where)
    else:
        attention_bias = False
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=config_int(config, "vocab_size", where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", False, where),
        attention_bias=attention_bias,
        mlp_bias=config_bool(config, "mlp_bias", False, where) if model_type in ("llama", "granite", "smollm3") else False,
        hidden_act=config_str(config, "hidden_act", "silu", where),
        layer_windows=llama_windows(config, model_type, layers, where),
        **common,
    )


def config_kv_heads(config: dict, heads: int, where: str, default: int = 0) -> int:
    """num_key_value_heads (GQA): the attention heads when absent or null (LlamaConfig.__init__: ``if
    num_key_value_heads is None: num_key_value_heads = num_attention_heads``) unless the config class has its own
    `default` (Gemma2Config's 4), a divisor of num_attention_heads (repeat_kv's ``n_rep = heads // kv_heads``)."""
    kv_heads = optional_config_int(config, "num_key_value_heads", default or heads, where, null_is_default=True)
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    return kv_heads


def config_head_dim(config: dict, hidden: int, heads: int, where: str) -> int:
    """head_dim as given, else hidden_size / num_attention_heads, which must divide (LlamaAttention's
    ``getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)``; Phi-3, OLMo 2 alike)."""
    return optional_config_int(config, "head_dim", 0, where, null_is_default=True) or divided(
        hidden, heads, "hidden_size", "num_attention_heads", where)


def llama_windows(config: dict, model_type: str, layers: int, where: str) -> tuple:
    """Each layer's attention window (ModelSpec.layer_windows). Mistral: every layer slides over
    `sliding_window` tokens (MistralConfig default 4096; null: none; MistralModel.forward builds one
    create_sliding_window_causal_mask for all layers and ignores layer_types). Qwen2: Qwen2Config.__post_init__
    drops the window unless `use_sliding_window`, and its default layer_types slide from layer
    `max_window_layers` (default 28) up. Llama: none."""
    if model_type == "mistral":
        window = optional_window(config, 4096, where)
        return (window,) * layers if window else ()
    if model_type != "qwen2":
        return ()
    window = optional_window(config, 4096, where) if config_bool(config, "use_sliding_window", False, where) else None
    first = config.get("max_window_layers", 28)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise InputError(f"{where}: 'max_window_layers' must be a non-negative integer, got {first!r}")
    default = [SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION for i in range(layers)]
    return sliding_windows(config, layers, window, default, where)


def rotary_buffer_bytes(spec: ModelSpec) -> int:
    """LlamaRotaryEmbedding registers ``inv_freq`` and ``original_inv_freq``, rope_dim / 2 fp32 values each (the
    whole head_dim unless a partial rotary factor narrows it: Phi3RotaryEmbedding.compute_default_rope_parameters'
    ``int(head_dim * partial_rotary_factor)``), kept fp32 whatever the model's dtype (transformers 5.x
    modeling_rope_utils computes them with ``.float()``)."""
    return 2 * (spec.rope_dim // 2) * 4


# Dropout probabilities during training, from the transformers config defaults (attention only).
DROPOUT = {
    "llama": {"attn": ("attention_dropout", 0.0)},
    "mistral": {"attn": ("attention_dropout", 0.0)},
    "qwen2": {"attn": ("attention_dropout", 0.0)},
}

def _llama_like_family(model_type: str, class_prefix: str, ia3_targets: tuple) -> Family:
    """The Family record of a model type that runs LlamaDecoderLayer's ops (Llama, Mistral, Qwen2): LoRA on
    q_proj, v_proj and IA3 on `ia3_targets` with down_proj as the feed-forward one (peft 0.21
    utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING and the IA3 mappings)."""
    return Family(model_type,
                  f"https://github.com/huggingface/transformers/blob/main/src/transformers/models/{model_type}/"
                  f"modeling_{model_type}.py",
                  llama_layout, llama_block, DROPOUT[model_type], ("q_proj", "v_proj"), ia3_targets, ("down_proj",),
                  architectures={f"{class_prefix}ForCausalLM": "causal_lm",
                                 f"{class_prefix}ForSequenceClassification": "seq_cls", f"{class_prefix}Model": "base"},
                  default_task="causal_lm", read_config=llama_config, decoder=True, gated_mlp=True, final_norm="rms",
                  buffer_bytes=rotary_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True)


LLAMA = _llama_like_family("llama", "Llama", ("k_proj", "v_proj", "down_proj"))
MISTRAL = _llama_like_family("mistral", "Mistral", ("k_proj", "v_proj", "down_proj"))
QWEN2 = _llama_like_family("qwen2", "Qwen2", ("q_proj", "v_proj", "down_proj"))
