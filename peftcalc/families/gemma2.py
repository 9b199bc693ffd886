"""Gemma 2 (transformers models/gemma2/modeling_gemma2.py): RoPE decoder blocks with four Gemma RMSNorms
(1 + weight, in fp32) around attention and MLP, a GeGLU MLP (gelu_pytorch_tanh), embeddings scaled by
sqrt(hidden), tanh soft-capping of the attention logits and of the final logits, and sliding-window (4,096)
layers alternating with global ones. Gemma 3's text model (families.gemma3) runs the same block with q/k
norms and without soft-capping.

Attention implementations (transformers 5.23): Gemma2PreTrainedModel sets ``_supports_sdpa = False``
("sdpa does not support softcapping": sdpa_attention_forward raises on a `softcap`), so
``from_config(attn_implementation="sdpa")`` refuses the model and the default is eager, which computes the
(batch, heads, seq, seq) scores, soft-caps them (/ cap, tanh, * cap) and adds the mask. peftcalc models
eager for Gemma 2 whatever --attention says (Family.attentions); flash_attention_2 and flex_attention
(which take softcap) are not modelled.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.llama import config_kv_heads, gated_mlp
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, attention_modules, decoder_layout, gated_mlp_modules, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.norms import gemma_rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.rotary import rope
from peftcalc.ops.tensor_ops import add, heads_view
from peftcalc.spec import (FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec, config_bool, config_str, optional_config_int,
                           optional_window, sliding_windows)

__all__ = [
    "DROPOUT",
    "GEMMA2",
    "gemma_block",
    "gemma_buffer_bytes",
    "gemma_config",
    "gemma_embeddings",
    "gemma_family",
    "gemma_final_norm",
    "gemma_layout",
]

# Gemma2Config / Gemma3TextConfig defaults (configuration_gemma2.py, configuration_gemma3.py) for the fields
# a config may omit: (vocab, hidden, intermediate, layers, heads, kv heads, head_dim, final softcap, attn softcap,
# the sliding-window pattern: every `pattern`-th layer global)
DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, pattern=2),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, final_logit_softcapping=None,
                        attn_logit_softcapping=None, pattern=6),
}


def gemma_layout(spec: ModelSpec) -> Layout:
    """Gemma2ForCausalLM / Gemma3ForCausalLM (and their ForSequenceClassification, Model): q/k/v/o (bias when
    attention_bias), Gemma3's q_norm/k_norm over head_dim, gated MLP, four RMSNorms per block, weight only;
    lm_head tied to the embeddings by default."""
    return decoder_layout(spec, _gemma_block_modules)


def _gemma_block_modules(spec: ModelSpec, p: str, i: int) -> list[Module]:
    h, hd = spec.hidden_size, spec.head_dim
    mods = attention_modules(spec, p, i, spec.attention_bias, spec.attention_bias)
    if spec.model_type == "gemma3_text":
        mods += [norm_module(f"{p}.self_attn.q_norm", hd, False, i), norm_module(f"{p}.self_attn.k_norm", hd, False, i)]
    return mods + gated_mlp_modules(spec, p, i) + [norm_module(f"{p}.{n}", h, False, i) for n in NORMS]


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _norm(rec: Recorder, sites, x: SymTensor, name: str, dim: int) -> SymTensor:
    return gemma_rms_norm(rec, x, sites.norm_trains(name), name, dim)


def gemma_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """Gemma2DecoderLayer / Gemma3DecoderLayer: input norm, attention, post-attention norm, residual add,
    pre-feedforward norm, GeGLU MLP (down(gelu_tanh(gate(x)) * up(x))), post-feedforward norm, residual add.
    Each tensor is freed where the modeling code drops it (``hidden_states`` rebound)."""
    h = spec.hidden_size
    n = _norm(rec, sites, x, "input_layernorm", h)
    o = _attention(rec, spec, sites, n)
    rec.free(n)
    a = _norm(rec, sites, o, "post_attention_layernorm", h)
    rec.free(o)
    x2 = add(rec, x, a, x.dtype)
    rec.free(a)
    n2 = _norm(rec, sites, x2, "pre_feedforward_layernorm", h)
    d = gated_mlp(rec, spec, sites, n2, "gelu_pytorch_tanh")
    rec.free(n2)
    m = _norm(rec, sites, d, "post_feedforward_layernorm", h)
    rec.free(d)
    out = add(rec, x2, m, x2.dtype)
    rec.free(m, x2)
    return out


def _attention(rec: Recorder, spec: ModelSpec, sites, n: SymTensor) -> SymTensor:
    """Gemma2Attention / Gemma3Attention.forward: q/k/v projections viewed as heads, Gemma 3's q_norm and
    k_norm on the (b, heads, s, head_dim) views, RoPE (the layer type's cos/sin), the attention interface
    with scaling query_pre_attn_scalar ** -0.5 (a scalar: no memory of its own) and, in Gemma 2,
    softcap = attn_logit_softcapping (eager: ops.attention's soft-capping), then o_proj."""
    ctx = rec.ctx
    h = spec.hidden_size
    eager = ctx.attention == "eager"
    qk_norm = spec.model_type == "gemma3_text"
    ql = sites.linear(rec, n, "self_attn.q_proj", h, spec.q_dim)
    kl = sites.linear(rec, n, "self_attn.k_proj", h, spec.kv_dim)
    vl = sites.linear(rec, n, "self_attn.v_proj", h, spec.kv_dim)
    # the views' backward copies a gradient that comes back as (b, heads, s, d): from RoPE, or from the
    # q/k norms' fp32 products cast back (Gemma 3); v's from eager's matmul only
    q, k, v = heads_view(rec, ql, clone=True), heads_view(rec, kl, clone=True), heads_view(rec, vl, clone=eager)
    if qk_norm:
        qn = _norm(rec, sites, q, "self_attn.q_norm", spec.head_dim)
        kn = _norm(rec, sites, k, "self_attn.k_norm", spec.head_dim)
        q, k = rope(rec, qn), rope(rec, kn)
        rec.free(qn, kn)
    else:
        q, k = rope(rec, q), rope(rec, k)
    rec.free(ql, kl)
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "self_attn.attention", replaced=(k, vl),
                  fp32_softmax=True, window=sites.window, softcap=spec.attn_logit_softcap if eager and not qk_norm else 0.0)
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q, k, vl)
    return o


def gemma_embeddings(rec: Recorder, spec: ModelSpec, layout: Layout, sites, x: SymTensor) -> SymTensor:
    """Gemma2TextScaledWordEmbedding / Gemma3TextScaledWordEmbedding.forward: the lookup times the
    normalizer, ``super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)`` (sqrt(hidden)): a new
    tensor, the lookup dropped when the embedding returns; the backward scales the gradient (a new one)."""
    y = rec.new(x.numel, x.dtype, x.requires_grad)
    rec.node(y, *input_grads(x))
    rec.free(x)
    return y


def gemma_final_norm(rec: Recorder, spec: ModelSpec, trains: bool, x: SymTensor) -> SymTensor:
    """The base model's final Gemma RMSNorm (``self.norm``)."""
    return gemma_rms_norm(rec, x, trains, "norm", spec.hidden_size)


def gemma_buffer_bytes(spec: ModelSpec) -> int:
    """The registered buffers: the rotary embedding's inv_freq and original_inv_freq (head_dim / 2 fp32
    each, kept fp32), one pair per layer type in Gemma 3 (Gemma3RotaryEmbedding: ``{layer_type}_inv_freq``);
    the embedding's embed_scale scalar takes the model's dtype (Family.dtype_buffers)."""
    pairs = len(set(spec.layer_windows)) if spec.model_type == "gemma3_text" and spec.layer_windows else 1
    return pairs * 2 * (spec.head_dim // 2) * 4


def gemma_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Gemma2Config / Gemma3TextConfig: their defaults (DEFAULTS), head_dim given (256 by default, not
    hidden / heads), layer_types defaulting to every `pattern`-th layer global (Gemma 2: alternating; Gemma 3:
    ``sliding_window_pattern`` 6, five local to one global), soft-capping null to disable it. Gemma 3's
    use_bidirectional_attention (an encoder use) is refused."""
    model_type = common["model_type"]
    d = DEFAULTS[model_type]

    def size(key: str) -> int:
        return optional_config_int(config, key, d[key], where)

    layers, heads = size("num_hidden_layers"), size("num_attention_heads")
    kv_heads = config_kv_heads(config, heads, where, d["num_key_value_heads"])
    if config.get("use_bidirectional_attention"):
        raise InputError(f"{where}: use_bidirectional_attention is not supported (a causal decoder is modelled)")
    pattern = d["pattern"]
    if model_type == "gemma3_text":
        pattern = optional_config_int(config, "sliding_window_pattern", pattern, where)
    default_types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)]
    return ModelSpec(
        hidden_size=size("hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=optional_config_int(config, "head_dim", d["head_dim"], where, null_is_default=True),
        intermediate_size=size("intermediate_size"),
        vocab_size=size("vocab_size"),
        tie_embeddings=config_bool(config, "tie_word_embeddings", True, where),
        attention_bias=config_bool(config, "attention_bias", False, where),
        hidden_act=config_str(config, "hidden_activation", "gelu_pytorch_tanh", where),
        layer_windows=sliding_windows(config, layers, optional_window(config, 4096, where), default_types, where),
        attn_logit_softcap=_softcap(config, "attn_logit_softcapping", d, where),
        final_logit_softcap=_softcap(config, "final_logit_softcapping", d, where),
        **common,
    )


def _softcap(config: dict, key: str, defaults: dict, where: str) -> float:
    """A soft-capping value: the class default when absent, 0.0 (none) when null, else a positive number."""
    value = config.get(key, defaults[key])
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InputError(f"{where}: '{key}' must be a positive number or null, got {value!r}")
    return float(value)


# Dropout probabilities during training, from the transformers config defaults (attention only).
DROPOUT = {
    "gemma2": {"attn": ("attention_dropout", 0.0)},
    "gemma3_text": {"attn": ("attention_dropout", 0.0)},
}


def gemma_family(model_type: str, class_prefix: str, lm_prefix: str) -> Family:
    """The Family record of Gemma 2 or Gemma 3's text model: LoRA on q_proj, v_proj, IA3 on q_proj, v_proj,
    down_proj with down_proj the feed-forward one (peft 0.21 utils/constants.py, "gemma2", "gemma3_text")."""
    return Family(model_type,
                  f"https://github.com/huggingface/transformers/blob/main/src/transformers/models/"
                  f"{model_type.split('_')[0]}/modeling_{model_type.split('_')[0]}.py",
                  gemma_layout, gemma_block, DROPOUT[model_type], ("q_proj", "v_proj"), ("q_proj", "v_proj", "down_proj"),
                  ("down_proj",),
                  architectures={f"{lm_prefix}ForCausalLM": "causal_lm",
                                 f"{class_prefix}ForSequenceClassification": "seq_cls", f"{class_prefix}Model": "base"},
                  default_task="causal_lm", read_config=gemma_config, decoder=True, gated_mlp=True, final_norm="gemma",
                  buffer_bytes=gemma_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True,
                  embeddings=gemma_embeddings, attentions=("eager",) if model_type == "gemma2" else ("sdpa", "eager"),
                  rotary_per_layer_type=model_type == "gemma3_text", dtype_buffers=1)


GEMMA2 = gemma_family("gemma2", "Gemma2", "Gemma2")
