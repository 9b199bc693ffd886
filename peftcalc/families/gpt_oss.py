"""gpt-oss (transformers models/gpt_oss/modeling_gpt_oss.py): GQA attention with biases and a learned sink logit per
head (``self_attn.sinks``), layers alternating between a 128-token sliding window and full attention, YaRN RoPE
applied to the two halves of each head (cos and sin half a head wide), and a sparse MoE MLP in every layer:
GptOssTopKRouter (``mlp.router.weight`` E x hidden and ``mlp.router.bias``; top-k on the logits, then softmax over
the k values) and GptOssExperts, fused 3-D ``gate_up_proj`` (E, hidden, 2I, gate and up interleaved) and
``down_proj`` (E, I, hidden) with their biases (E, 2I) and (E, hidden), run by transformers' default experts
implementation, grouped_mm (or batched_mm or the eager loop: --experts), with gpt-oss's clamped SwiGLU (ops.moe). RMSNorm's weight product runs in fp32
(``(self.weight * x).to(input_dtype)``).

Checkpoint and precision: openai/gpt-oss-20b and -120b ship the experts in MXFP4 (peftcalc.storage.mxfp4); the
fine-tuning recipes (OpenAI cookbook "Fine-tuning with gpt-oss and Hugging Face Transformers", TRL's gpt-oss
recipe) load it with ``Mxfp4Config(dequantize=True)`` in bfloat16: every parameter bf16, which is what is modelled.

Attention implementations (transformers 5.23): GptOssPreTrainedModel sets ``_supports_sdpa = False`` (SDPA has no
sink logit), so the default is eager (ops.sink_attention: the (batch, heads, seq, seq + 1) scores, probabilities
saved); ``flash_attention_*`` runs only through hub kernels that take the sinks (``kernels-community/
vllm-flash-attn3``: no scores kept) and ``flex_attention`` builds a score_mod for them; neither is modelled, so
peftcalc runs eager whatever --attention says (Family.attentions).
"""

from __future__ import annotations

from peftcalc.errors import CombinationError
from peftcalc.families.mixtral import experts_lora, experts_training
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, decoder_head, linear_module, norm_module
from peftcalc.ops.experts import experts_forward
from peftcalc.ops.moe import drop_router_logits, router_top_k_softmax
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.rotary import rope_halves
from peftcalc.ops.sink_attention import sink_attention
from peftcalc.ops.tensor_ops import add, heads_view
from peftcalc.spec import (FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec, config_bool, config_int, optional_window,
                           sliding_windows)

__all__ = [
    "DEFAULTS",
    "DROPOUT",
    "GPT_OSS",
    "gpt_oss_block",
    "gpt_oss_buffer_bytes",
    "gpt_oss_config",
    "gpt_oss_layout",
]

# GptOssConfig's defaults (configuration_gpt_oss.py, transformers 5.23) for the fields a config may omit
DEFAULTS = dict(num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880,
                intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
                tie_word_embeddings=False, num_experts_per_tok=4, attention_bias=True)


def gpt_oss_layout(spec: ModelSpec) -> Layout:
    """GptOssForCausalLM (and GptOssModel, GptOssForSequenceClassification) in named_parameters() order: per block
    self_attn.sinks (its own parameter, listed before the projections), q/k/v/o with biases (attention_bias), the
    router's weight and bias, the experts' gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, then the two
    norms. The experts are stored (E, in, out) (is_transposed); their Module shape is (E, out, in) as Mixtral's
    (same numel; peft's ParamWrapper makes lora_A (E r, in) and lora_B (out, E r) for either)."""
    base = "" if spec.task == "base" else "model."
    h, hd, e, inter = spec.hidden_size, spec.head_dim, spec.num_experts, spec.expert_intermediate_size
    bias = spec.attention_bias
    mods = [Module(f"{base}embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed")]
    for i in range(spec.num_layers):
        p = f"{base}layers.{i}"
        mods += [
            Module(f"{p}.self_attn.sinks", "param", (spec.num_heads,), False, i, "sinks"),
            linear_module(f"{p}.self_attn.q_proj", spec.num_heads * hd, h, bias, i, "attn"),
            linear_module(f"{p}.self_attn.k_proj", spec.num_kv_heads * hd, h, bias, i, "attn"),
            linear_module(f"{p}.self_attn.v_proj", spec.num_kv_heads * hd, h, bias, i, "attn"),
            linear_module(f"{p}.self_attn.o_proj", h, spec.num_heads * hd, bias, i, "attn_out"),
            Module(f"{p}.mlp.router.weight", "param", (e, h), False, i, "router"),
            Module(f"{p}.mlp.router.bias", "param", (e,), False, i, "router_bias"),
            Module(f"{p}.mlp.experts.gate_up_proj", "param", (e, 2 * inter, h), False, i, "experts"),
            Module(f"{p}.mlp.experts.gate_up_proj_bias", "param", (e, 2 * inter), False, i, "experts_bias"),
            Module(f"{p}.mlp.experts.down_proj", "param", (e, h, inter), False, i, "experts"),
            Module(f"{p}.mlp.experts.down_proj_bias", "param", (e, h), False, i, "experts_bias"),
            norm_module(f"{p}.input_layernorm", h, False, i),
            norm_module(f"{p}.post_attention_layernorm", h, False, i),
        ]
    mods.append(norm_module(f"{base}norm", h, False))
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}layers", f"{base}embed_tokens", head, out_emb, tied, f"{base}norm")


def gpt_oss_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """GptOssDecoderLayer.forward: ``residual + self_attn(input_layernorm(x))``, then ``residual +
    mlp(post_attention_layernorm(x))``. The attention returns (output, weights) into ``hidden_states, _``: the
    weights stay referenced until ``_`` is rebound to the MLP's router scores, which stay until the layer returns;
    GptOssMLP keeps the router's logits in its own ``_`` until it returns."""
    h = spec.hidden_size
    ctx = rec.ctx
    if ctx.kv_seq != ctx.seq:
        raise CombinationError("prefix tuning's past keys on gpt-oss's sink attention are not modelled")
    n = rms_norm(rec, x, sites.norm_trains("input_layernorm"), "input_layernorm", weight_fp32=True)
    ql = sites.linear(rec, n, "self_attn.q_proj", h, spec.q_dim)
    kl = sites.linear(rec, n, "self_attn.k_proj", h, spec.kv_dim)
    vl = sites.linear(rec, n, "self_attn.v_proj", h, spec.kv_dim)
    # eager attention: every gradient comes back laid out as (b, heads, s, d), so each view's backward copies it
    q, k, v = heads_view(rec, ql, clone=True), heads_view(rec, kl, clone=True), heads_view(rec, vl, clone=True)
    q, k = rope_halves(rec, q), rope_halves(rec, k)
    rec.free(ql, kl)
    a, weights = sink_attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"),
                                sites.param_trains("self_attn.sinks"), "self_attn.attention")
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q, k, vl, n)
    x2 = add(rec, x, o, x.dtype)
    rec.free(o)
    n2 = rms_norm(rec, x2, sites.norm_trains("post_attention_layernorm"), "post_attention_layernorm", weight_fp32=True)
    logits, scores, idx = router_top_k_softmax(rec, n2, h, spec.num_experts, spec.experts_per_token,
                                               sites.param_trains("mlp.router.weight"), "mlp.router")
    biases = (sites.param_trains("mlp.experts.gate_up_proj_bias"), sites.param_trains("mlp.experts.down_proj_bias"))
    m = experts_forward(rec, n2, scores, idx, h, spec.expert_intermediate_size, spec.num_experts,
                           *experts_training(sites, "mlp.experts"), "", "mlp.experts", biases=biases,
                           **experts_lora(sites, "mlp.experts"))
    rec.free(idx, n2, weights.base or weights)
    drop_router_logits(rec, logits)
    out = add(rec, x2, m, x2.dtype)
    rec.free(m, x2, scores)
    return out


def gpt_oss_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """GptOssConfig: its defaults (DEFAULTS), head_dim given (64, not hidden / heads), attention_bias (true),
    num_local_experts and num_experts_per_tok, intermediate_size as each expert's, layer_types defaulting to
    sliding on even layers and full on odd ones (``__post_init__``), sliding_window 128 (null: none)."""
    from peftcalc.families.mixtral import moe_settings

    config = {**DEFAULTS, **config}
    layers = config_int(config, "num_hidden_layers", where)
    heads = config_int(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or heads
    default_types = [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(layers)]
    return ModelSpec(
        hidden_size=config_int(config, "hidden_size", where),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config_int({"num_key_value_heads": kv_heads}, "num_key_value_heads", where),
        head_dim=config_int(config, "head_dim", where),
        intermediate_size=config_int(config, "intermediate_size", where),
        vocab_size=config_int(config, "vocab_size", where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", False, where),
        attention_bias=config_bool(config, "attention_bias", True, where),
        hidden_act="silu",
        layer_windows=sliding_windows(config, layers, optional_window(config, 128, where), default_types, where),
        **moe_settings(config, where, "num_local_experts", "intermediate_size", False),
        **common,
    )


def gpt_oss_buffer_bytes(spec: ModelSpec) -> int:
    """GptOssRotaryEmbedding registers ``inv_freq`` and ``original_inv_freq``, head_dim / 2 fp32 values each (YaRN's
    frequencies; kept fp32 whatever the model's dtype)."""
    return 2 * (spec.head_dim // 2) * 4


# Dropout probabilities during training, from the transformers config defaults (attention only).
DROPOUT = {"gpt_oss": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 has no default LoRA targets for gpt_oss (utils/constants.py): the harness names q_proj, v_proj
GPT_OSS = Family(
    "gpt_oss", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt_oss/modeling_gpt_oss.py",
    gpt_oss_layout, gpt_oss_block, DROPOUT["gpt_oss"], ("q_proj", "v_proj"),
    architectures={"GptOssForCausalLM": "causal_lm", "GptOssForSequenceClassification": "seq_cls", "GptOssModel": "base"},
    default_task="causal_lm", read_config=gpt_oss_config, decoder=True, final_norm="rms_weight_fp32",
    buffer_bytes=gpt_oss_buffer_bytes, rotary=True, rotary_half=True, passes_position_ids=True, prefix_kv_dim=True,
    attentions=("eager",),
    # modeling_gpt_oss.py GptOssPreTrainedModel._keep_in_fp32_modules (applied by from_pretrained under fp16 only)
    keep_in_fp32={arch: (("post_attention_layernorm", "input_layernorm", "norm"), ())
                  for arch in ("GptOssForCausalLM", "GptOssForSequenceClassification", "GptOssModel")})
