"""OPT (transformers models/opt/modeling_opt.py): OPTForCausalLM standalone, and the language model inside
BLIP-2. Pre-LayerNorm blocks with biases, learned positions (offset 2), ReLU MLP, dropout after the attention
and the MLP.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, decoder_head, linear_module, norm_module
from peftcalc.ops.context import StepContext
from peftcalc.ops.attention import attention, math_path
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import add, dropout, heads_view, scale
from peftcalc.spec import ModelSpec, check_divisible, config_bool, config_int, config_str, optional_config_int

__all__ = [
    "DROPOUT",
    "OPT",
    "POSITION_OFFSET",
    "opt_block",
    "opt_config",
    "opt_decoder_modules",
    "opt_embedding_indices",
    "opt_layout",
]

# OPTLearnedPositionalEmbedding: `self.offset = 2`, the table has max_position_embeddings + 2 rows.
POSITION_OFFSET = 2


def opt_layout(spec: ModelSpec) -> Layout:
    """OPTForCausalLM / OPTForSequenceClassification / OPTModel (modeling_opt.py): the decoder's modules
    (opt_decoder_modules), then the lm_head tied to embed_tokens by default (tie_word_embeddings), or `score`
    (no bias)."""
    d = "decoder" if spec.task == "base" else "model.decoder"
    mods = opt_decoder_modules(spec, d)
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{d}.layers", f"{d}.embed_tokens", head, out_emb, tied, f"{d}.final_layer_norm")


def opt_decoder_modules(spec: ModelSpec, d: str) -> list[Module]:
    """OPTDecoder's modules under the prefix `d` (modeling_opt.py OPTDecoder.__init__), in named_modules()
    order: embed_tokens, embed_positions (max_position_embeddings + 2 rows), final_layer_norm, then per layer
    self_attn.k/v/q/out_proj (biases), self_attn_layer_norm, fc1, fc2, final_layer_norm. The standalone
    OPTForCausalLM (opt_layout) and BLIP-2's language model (families.blip2.blip2_layout) share it."""
    h = spec.hidden_size
    mods = [
        Module(f"{d}.embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed"),
        Module(f"{d}.embed_positions", "embedding", (spec.max_positions + POSITION_OFFSET, h), False, None, "embed"),
        norm_module(f"{d}.final_layer_norm", h, True),
    ]
    for i in range(spec.num_layers):
        p = f"{d}.layers.{i}"
        mods += [
            linear_module(f"{p}.self_attn.k_proj", h, h, True, i, "attn"),
            linear_module(f"{p}.self_attn.v_proj", h, h, True, i, "attn"),
            linear_module(f"{p}.self_attn.q_proj", h, h, True, i, "attn"),
            linear_module(f"{p}.self_attn.out_proj", h, h, True, i, "attn_out"),
            norm_module(f"{p}.self_attn_layer_norm", h, True, i),
            linear_module(f"{p}.fc1", spec.intermediate_size, h, True, i, "mlp"),
            linear_module(f"{p}.fc2", h, spec.intermediate_size, True, i, "mlp_out"),
            norm_module(f"{p}.final_layer_norm", h, True, i),
        ]
    return mods


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
    o = sites.adapt(rec, o, "attn_out", "self_attn.out_proj")
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
    d = sites.adapt(rec, d, "mlp_out", "fc2")
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



def opt_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """OPTConfig (configuration_opt.py): hidden_size, ffn_dim, num_attention_heads, num_hidden_layers,
    max_position_embeddings, activation_function (relu), tie_word_embeddings (true). The shapes the layout does
    not mirror are refused, as BLIP-2's reader does: word_embed_proj_dim != hidden_size (OPT-350m's project_in
    and project_out), post-LayerNorm blocks (do_layer_norm_before false, also OPT-350m), no biases
    (enable_bias false), non-affine LayerNorms, and LayerDrop."""
    h, heads = config_int(config, "hidden_size", where), config_int(config, "num_attention_heads", where)
    check_divisible(h, heads, "hidden_size", "num_attention_heads", where)
    word_dim = config.get("word_embed_proj_dim") or h  # OPTConfig: None means hidden_size
    if word_dim != h or not config_bool(config, "do_layer_norm_before", True, where):
        raise InputError(f"{where}: OPT with word_embed_proj_dim != hidden_size or do_layer_norm_before false "
                         "(OPT-350m: project_in/project_out and post-LayerNorm blocks) is not supported")
    if not config_bool(config, "enable_bias", True, where) or not config_bool(
            config, "layer_norm_elementwise_affine", True, where) or config_bool(
            config, "_remove_final_layer_norm", False, where):
        raise InputError(f"{where}: OPT without biases, with non-affine LayerNorms or without the final LayerNorm "
                         "is not supported")
    if float(config.get("layerdrop") or 0.0) > 0.0:
        raise InputError(f"{where}: OPT with layerdrop > 0 is not supported (layers are skipped at random)")
    return ModelSpec(
        hidden_size=h, num_layers=config_int(config, "num_hidden_layers", where), num_heads=heads, num_kv_heads=heads,
        head_dim=h // heads, intermediate_size=config_int(config, "ffn_dim", where),
        vocab_size=config_int(config, "vocab_size", where),
        max_positions=optional_config_int(config, "max_position_embeddings", 2048, where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", True, where), attention_bias=True, mlp_bias=True,
        hidden_act=config_str(config, "activation_function", "relu", where), **common,
    )


def opt_embedding_indices(spec: ModelSpec, layout: Layout, ctx: StepContext, sites) -> list:
    """OPTLearnedPositionalEmbedding.forward's ``position_ids + self.offset`` (b x seq, int64), which the
    table's EmbeddingBackward saves when embed_positions trains (derivatives.yaml embedding: indices)."""
    path = layout.embedding_path.replace("embed_tokens", "embed_positions")
    return [(ctx.tokens, "embed_positions.position_ids")] if sites.trains(path) else []


# Learned positions (OPTLearnedPositionalEmbedding); peft 0.21 utils/constants.py: LoRA on q_proj, v_proj, IA3
# on q_proj, k_proj, fc2 (fc2 feed-forward). The model's forward adds the positions to the token embeddings
# (a new tensor) and passes every layer position_ids.
OPT = Family("opt", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/opt/modeling_opt.py",
             opt_layout, opt_block, DROPOUT["opt"], ("q_proj", "v_proj"), ("q_proj", "k_proj", "fc2"), ("fc2",),
             learned_positions=True,
             architectures={"OPTForCausalLM": "causal_lm", "OPTForSequenceClassification": "seq_cls", "OPTModel": "base"},
             default_task="causal_lm", read_config=opt_config, decoder=True,
             embedding_indices=opt_embedding_indices, passes_position_ids=True, embeddings_add_positions=True,
             position_ids_batched=True)
