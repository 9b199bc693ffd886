"""BLIP-2 (transformers models/blip_2/modeling_blip_2.py): a frozen EVA vision tower, the Q-Former with its
learned query tokens, the language projection and an OPT language model.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from peftcalc.errors import InputError
from peftcalc.families.opt import opt_decoder_modules
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module
from peftcalc.ops.attention import attention
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import dropout
from peftcalc.spec import ModelSpec, check_divisible, config_bool, optional_config_int

__all__ = [
    "BLIP2",
    "BLIP2_QFORMER",
    "BLIP2_QFORMER_DEFAULTS",
    "BLIP2_VISION",
    "BLIP2_VISION_DEFAULTS",
    "DROPOUT",
    "LANGUAGE_PROJECTION",
    "OPT_DEFAULTS",
    "QFORMER",
    "QUERY_TOKENS",
    "blip2_config",
    "blip2_image_tokens",
    "blip2_layout",
    "blip2_parts",
    "blip2_vision_tokens",
    "qformer_attention",
    "qformer_layer",
    "qformer_linear",
]


QFORMER = "qformer"

QUERY_TOKENS = "query_tokens"

LANGUAGE_PROJECTION = "language_projection"


def blip2_layout(spec: ModelSpec) -> Layout:
    """Blip2ForConditionalGeneration (transformers 5.x modeling_blip_2.py), in named_parameters() order:
    `query_tokens` (1, queries, q), `vision_model` (Blip2VisionModel: class/position embeddings as bare
    parameters, a patch conv with bias, layers with one fused qkv Linear (bias 3 x width), `projection`, layer_norm1, mlp.fc1/fc2, layer_norm2;
    post_layernorm), `qformer` (layernorm, then per layer self-attention, a cross-attention to the vision
    width every `cross_attention_frequency` layers (layer i with i % freq == 0), the query FFN), the
    `language_projection` q -> text width, and `language_model` (OPTForCausalLM: embed_tokens, learned
    positions with OPT's offset of 2, final_layer_norm, layers with q/k/v/out_proj, fc1/fc2 and their
    LayerNorms; lm_head tied to embed_tokens). The OPT blocks carry the block index; the tower and the
    Q-Former carry none."""
    b = dict(spec.blip2)
    hv, iv = b["vision_hidden_size"], b["vision_intermediate_size"]
    hq, iq = b["qformer_hidden_size"], b["qformer_intermediate_size"]
    h = spec.hidden_size
    num_patches = (spec.image_size // spec.patch_size) ** 2
    mods = [Module(QUERY_TOKENS, "param", (1, b["num_query_tokens"], hq), False, None, "projector")]
    e = "vision_model.embeddings"
    mods += [
        Module(f"{e}.class_embedding", "param", (1, 1, hv), False, None, "vision"),
        Module(f"{e}.position_embedding", "param", (1, num_patches + 1, hv), False, None, "vision"),
        Module(f"{e}.patch_embedding", "conv2d", (hv, spec.num_channels, spec.patch_size, spec.patch_size), True,
               None, "vision"),
    ]
    for i in range(b["vision_num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}"
        mods += [
            Module(f"{p}.self_attn.qkv", "linear", (3 * hv, hv), bool(b["vision_qkv_bias"]), None, "vision"),
            Module(f"{p}.self_attn.projection", "linear", (hv, hv), True, None, "vision"),
            Module(f"{p}.layer_norm1", "norm", (hv,), True, None, "vision"),
            Module(f"{p}.mlp.fc1", "linear", (iv, hv), True, None, "vision"),
            Module(f"{p}.mlp.fc2", "linear", (hv, iv), True, None, "vision"),
            Module(f"{p}.layer_norm2", "norm", (hv,), True, None, "vision"),
        ]
    mods.append(Module("vision_model.post_layernorm", "norm", (hv,), True, None, "vision"))
    mods.append(Module(f"{QFORMER}.layernorm", "norm", (hq,), True, None, "projector"))
    for i in range(b["qformer_num_hidden_layers"]):
        p = f"{QFORMER}.encoder.layer.{i}"
        blocks = [("attention", hq)]
        if i % b["qformer_cross_attention_frequency"] == 0:
            blocks.append(("crossattention", hv))
        for att, kv_in in blocks:
            mods += [
                Module(f"{p}.{att}.attention.query", "linear", (hq, hq), True, None, "projector"),
                Module(f"{p}.{att}.attention.key", "linear", (hq, kv_in), True, None, "projector"),
                Module(f"{p}.{att}.attention.value", "linear", (hq, kv_in), True, None, "projector"),
                Module(f"{p}.{att}.output.dense", "linear", (hq, hq), True, None, "projector"),
                Module(f"{p}.{att}.output.LayerNorm", "norm", (hq,), True, None, "projector"),
            ]
        mods += [
            Module(f"{p}.intermediate_query.dense", "linear", (iq, hq), True, None, "projector"),
            Module(f"{p}.output_query.dense", "linear", (hq, iq), True, None, "projector"),
            Module(f"{p}.output_query.LayerNorm", "norm", (hq,), True, None, "projector"),
        ]
    mods.append(Module(LANGUAGE_PROJECTION, "linear", (h, hq), True, None, "projector"))
    d = "language_model.model.decoder"
    mods += opt_decoder_modules(spec, d)
    return Layout(tuple(mods), f"{d}.layers", f"{d}.embed_tokens", ("language_model.lm_head",),
                  "language_model.lm_head", True, f"{d}.final_layer_norm")


@lru_cache(maxsize=256)
def blip2_parts(spec: ModelSpec) -> tuple[ModelSpec, ModelSpec, ModelSpec]:
    """The three models inside Blip2ForConditionalGeneration as specs the simulator reads: the EVA vision
    tower (Blip2VisionModel), the Q-Former (Blip2QFormerModel) and the language model (OPTForCausalLM),
    each with its sub-config (for dropouts and activations; configuration_blip_2.py, configuration_opt.py)."""
    b = dict(spec.blip2)
    cfg = spec.hf_config

    def part(prefix: str, model_type: str, arch: str, sub: dict, act_key: str, **extra) -> ModelSpec:
        hidden, heads = b[f"{prefix}_hidden_size"], b[f"{prefix}_num_attention_heads"]
        return ModelSpec(name=f"{spec.name}/{model_type}", model_type=model_type, task="base", architecture=arch,
                         hidden_size=hidden, num_layers=b[f"{prefix}_num_hidden_layers"], num_heads=heads,
                         num_kv_heads=heads, head_dim=hidden // heads,
                         intermediate_size=b[f"{prefix}_intermediate_size"], hidden_act=str(sub.get(act_key, "gelu")),
                         hf_config=sub, **extra)

    vision = part("vision", "blip_2_vision_model", "Blip2VisionModel", cfg.get("vision_config") or {}, "hidden_act",
                  image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.num_channels)
    qformer = part("qformer", "blip_2_qformer", "Blip2QFormerModel", cfg.get("qformer_config") or {}, "hidden_act")
    text_cfg = cfg.get("text_config") or {}
    text = replace(spec, name=f"{spec.name}/opt", model_type="opt", task="causal_lm", architecture="OPTForCausalLM",
                   hidden_act=str(text_cfg.get("activation_function", "relu")), blip2=(), hf_config=text_cfg)
    return vision, qformer, text


def blip2_image_tokens(spec: ModelSpec) -> int:
    """The query tokens the language model sees before the text (num_query_tokens, 32 for BLIP-2 OPT)."""
    return dict(spec.blip2)["num_query_tokens"]


def blip2_vision_tokens(spec: ModelSpec) -> int:
    """Tokens of the EVA tower: the patches plus the class token (Blip2VisionEmbeddings: 257 at 224 px, patch 14)."""
    return (spec.image_size // spec.patch_size) ** 2 + 1


def qformer_attention(rec: Recorder, qspec: ModelSpec, trains: frozenset, path: str, x: SymTensor, kv: SymTensor, kv_in: int,
                      kv_tokens: int) -> SymTensor:
    """Blip2QFormerAttention: query/key/value Linears (keys and values from `kv`: the hidden states, or the
    image features in a cross-attention), attention with attention_probs_dropout_prob (Blip2QFormer-
    MultiHeadAttention), then Blip2QFormerSelfOutput: dense, dropout, LayerNorm(dense + input). Post-LayerNorm
    like BertLayer: under autocast the residual sum and the LayerNorm are fp32."""
    ctx = rec.ctx
    hq = qspec.hidden_size
    q = qformer_linear(rec, trains, x, hq, hq, f"{path}.attention.query")
    k = qformer_linear(rec, trains, kv, kv_in, hq, f"{path}.attention.key")
    v = qformer_linear(rec, trains, kv, kv_in, hq, f"{path}.attention.value")
    rec.ctx = replace(ctx, kv_seq=kv_tokens)
    a = attention(rec, qspec, q, k, v, config_dropout(qspec, DROPOUT, "attn"), f"{path}.attention", cross=kv is not x)
    rec.ctx = ctx
    o = qformer_linear(rec, trains, a, hq, hq, f"{path}.output.dense")
    o = dropout(rec, o, config_dropout(qspec, DROPOUT, "resid"), f"{path}.output.dropout")
    s = rec.new(x.numel, o.dtype if ctx.autocast is None else x.dtype, x.requires_grad or o.requires_grad)
    return layer_norm(rec, s, f"{path}.output.LayerNorm" in trains, hq, f"{path}.output.LayerNorm")


def qformer_layer(rec: Recorder, spec: ModelSpec, trains: frozenset, i: int, x: SymTensor, image: SymTensor) -> SymTensor:
    """Blip2QFormerLayer.forward with query_length = the whole sequence (no text input): self-attention,
    the cross-attention to the image features in layers i % cross_attention_frequency == 0, then
    feed_forward_chunk_query: intermediate_query (dense, activation), output_query (dense, dropout,
    LayerNorm(dense + input)). `spec` is the BLIP-2 model's."""
    ctx = rec.ctx
    vspec, qspec, _ = blip2_parts(spec)
    hq, iq = qspec.hidden_size, qspec.intermediate_size
    p = f"{QFORMER}.encoder.layer.{i}"
    x = qformer_attention(rec, qspec, trains, f"{p}.attention", x, x, hq, ctx.seq)
    if i % dict(spec.blip2)["qformer_cross_attention_frequency"] == 0:
        x = qformer_attention(rec, qspec, trains, f"{p}.crossattention", x, image, vspec.hidden_size,
                              blip2_vision_tokens(spec))
    f = qformer_linear(rec, trains, x, hq, iq, f"{p}.intermediate_query.dense")
    f = activation(rec, f, qspec.hidden_act, f"{p}.intermediate_query.intermediate_act_fn")
    d = qformer_linear(rec, trains, f, iq, hq, f"{p}.output_query.dense")
    d = dropout(rec, d, config_dropout(qspec, DROPOUT, "resid"), f"{p}.output_query.dropout")
    s = rec.new(x.numel, d.dtype if ctx.autocast is None else x.dtype, x.requires_grad or d.requires_grad)
    return layer_norm(rec, s, f"{p}.output_query.LayerNorm" in trains, hq, f"{p}.output_query.LayerNorm")


def qformer_linear(rec: Recorder, trains: frozenset, x: SymTensor, in_f: int, out_f: int, path: str) -> SymTensor:
    weight, bias = f"{path}.weight" in trains, f"{path}.bias" in trains
    return linear(rec, x, in_f, out_f, weight, path, bias=True, bias_trains=bias)


# The transformers 5.x defaults of the BLIP-2 sub-configs (Blip2VisionConfig, Blip2QFormerConfig, OPTConfig).
BLIP2_VISION_DEFAULTS = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                         "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "num_channels": 3,
                         "qkv_bias": True}
BLIP2_QFORMER_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072, "cross_attention_frequency": 2, "use_qformer_text_input": False}
OPT_DEFAULTS = {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True,
                "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True}


def blip2_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Blip2Config (transformers models/blip_2/configuration_blip_2.py): `vision_config` (the EVA ViT-g
    tower), `qformer_config` (the Q-Former, whose encoder_hidden_size Blip2Config sets to the vision
    width), `num_query_tokens`, `text_config` (an OPT decoder). The spec's scalar fields are OPT's; the
    tower and Q-Former sizes go in `blip2` (families.blip2.blip2_parts makes specs of the three parts).
    The shapes the layout cannot mirror exactly (OPT's project_in/out, a Q-Former with text input, an
    encoder-decoder language model) are refused."""
    subs = {}
    for key, mt, defaults in (("vision_config", "blip_2_vision_model", BLIP2_VISION_DEFAULTS),
                              ("qformer_config", "blip_2_qformer", BLIP2_QFORMER_DEFAULTS),
                              ("text_config", "opt", OPT_DEFAULTS)):
        sub = config.get(key) or {}
        if not isinstance(sub, dict) or sub.get("model_type", mt) != mt:
            raise InputError(f"{where}: {key} must be a {mt} config object; got model_type "
                             f"{sub.get('model_type') if isinstance(sub, dict) else sub!r}")
        subs[key] = {k: config_bool(sub, k, v, f"{where}: {key}") if isinstance(v, bool)
                     else optional_config_int(sub, k, v, f"{where}: {key}") for k, v in defaults.items()}
    v, q, t = subs["vision_config"], subs["qformer_config"], subs["text_config"]
    if not config_bool(config, "use_decoder_only_language_model", True, where):
        raise InputError(f"{where}: BLIP-2 with an encoder-decoder language model (T5) is not supported; OPT only")
    if q["use_qformer_text_input"]:
        raise InputError(f"{where}: a Q-Former with text input (use_qformer_text_input) is not supported")
    word_dim = (config.get("text_config") or {}).get("word_embed_proj_dim") or t["hidden_size"]  # OPTConfig's default
    if word_dim != t["hidden_size"] or not t["do_layer_norm_before"] or not t["enable_bias"] \
            or not t["layer_norm_elementwise_affine"]:
        raise InputError(f"{where}: OPT with word_embed_proj_dim != hidden_size, post-LayerNorm, no biases or "
                         "non-affine LayerNorms is not supported")
    if not config_bool(config, "tie_word_embeddings", t["tie_word_embeddings"], where):
        raise InputError(f"{where}: a BLIP-2 OPT with lm_head untied from the input embeddings is not supported")
    h, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    check_divisible(h, heads, "text_config.hidden_size", "num_attention_heads", where)
    blip2 = tuple(sorted({**{f"vision_{k}": v[k] for k in v}, **{f"qformer_{k}": q[k] for k in q},
                          "num_query_tokens": optional_config_int(config, "num_query_tokens", 32, where)}.items()))
    return ModelSpec(
        hidden_size=h, num_layers=int(t["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads,
        head_dim=h // heads, intermediate_size=int(t["ffn_dim"]), vocab_size=int(t["vocab_size"]),
        max_positions=int(t["max_position_embeddings"]), tie_embeddings=True, attention_bias=True, mlp_bias=True,
        image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), num_channels=int(v["num_channels"]),
        hidden_act="relu", blip2=blip2, **common,
    )


# Dropout probabilities of BLIP-2's parts (blip2_parts), from their sub-configs: Blip2QFormerConfig (BERT's
# keys) and Blip2VisionConfig.
DROPOUT = {
    "blip_2_qformer": {"embd": ("hidden_dropout_prob", 0.1), "attn": ("attention_probs_dropout_prob", 0.1),
                       "resid": ("hidden_dropout_prob", 0.1)},
    "blip_2_vision_model": {"attn": ("attention_dropout", 0.0)},
}

_SOURCE = "https://github.com/huggingface/transformers/blob/main/src/transformers/models/blip_2/modeling_blip_2.py"
BLIP2 = Family("blip-2", _SOURCE, blip2_layout, None, {}, learned_positions=True,
               architectures={"Blip2ForConditionalGeneration": "image_text_to_text"}, default_task="image_text_to_text",
               read_config=blip2_config,
               # modeling_blip_2.py Blip2ForConditionalGeneration._keep_in_fp32_modules
               keep_in_fp32={"Blip2ForConditionalGeneration": (("query_tokens", "qformer"), ())})
BLIP2_QFORMER = Family("blip_2_qformer", _SOURCE, None, None, DROPOUT["blip_2_qformer"])
BLIP2_VISION = Family("blip_2_vision_model", _SOURCE, None, None, DROPOUT["blip_2_vision_model"])
