"""GPT-2 (transformers models/gpt2/modeling_gpt2.py): Conv1D projections with biases, learned positions,
gelu_new MLP, dropout on embeddings, attention and residuals.
"""

from __future__ import annotations

from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, decoder_head, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.context import StepContext
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import add, dropout, heads_view
from peftcalc.spec import ModelSpec, check_divisible, config_bool, config_str, optional_config_int, config_int

__all__ = [
    "DROPOUT",
    "GPT2",
    "gpt2_block",
    "gpt2_config",
    "gpt2_embedding_indices",
    "gpt2_embeddings",
    "gpt2_layout",
]


def gpt2_layout(spec: ModelSpec) -> Layout:
    """GPT2LMHeadModel (modeling_gpt2.py): Conv1D c_attn/c_proj/c_fc with biases, learned positions,
    LayerNorm with bias, lm_head tied to wte by default."""
    base = "" if spec.task == "base" else "transformer."
    h, inner = spec.hidden_size, spec.intermediate_size
    mods = [
        Module(f"{base}wte", "embedding", (spec.vocab_size, h), False, None, "embed"),
        Module(f"{base}wpe", "embedding", (spec.max_positions, h), False, None, "embed"),
    ]
    for i in range(spec.num_layers):
        p = f"{base}h.{i}"
        mods += [
            norm_module(f"{p}.ln_1", h, True, i),
            Module(f"{p}.attn.c_attn", "conv1d", (h, 3 * h), True, i, "attn"),
            Module(f"{p}.attn.c_proj", "conv1d", (h, h), True, i, "attn_out"),
            norm_module(f"{p}.ln_2", h, True, i),
            Module(f"{p}.mlp.c_fc", "conv1d", (h, inner), True, i, "mlp"),
            Module(f"{p}.mlp.c_proj", "conv1d", (inner, h), True, i, "mlp_out"),
        ]
    mods.append(norm_module(f"{base}ln_f", h, True))
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}h", f"{base}wte", head, out_emb, tied, f"{base}ln_f")


def gpt2_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """GPT2Block: pre-LayerNorm, fused c_attn (Conv1D) split into q, k, v (views of one storage;
    SplitBackward concatenates their gradients into a new one), gelu_new MLP, dropout on attention and
    residuals. GPT2Block.forward's local attn_output (the attention's resid_dropout output) stays
    referenced until the block returns (traced: alive at the peak of mlp.c_proj's DoRA)."""
    h = spec.hidden_size
    n = layer_norm(rec, x, sites.norm_trains("ln_1"), h, "ln_1", sites.norm_params("ln_1"))
    qkv = sites.linear(rec, n, "attn.c_attn", h, 3 * h)
    q, k, v = (rec.view(qkv, qkv.numel // 3) for _ in range(3))
    for part in (q, k, v):
        rec.node(part, [("new", "d", qkv.nbytes)], [(qkv.id, "d")])
    # the views' gradients come back contiguous as (b, heads, s, d) (no kernel can keep the layout of
    # a strided third of c_attn's output), so reshaping them back copies
    q, k, v = (heads_view(rec, t, clone=True) for t in (q, k, v))
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "attn.attention")
    o = sites.linear(rec, a, "attn.c_proj", h, h)
    o = sites.adapt(rec, o, "attn_out", "attn.c_proj")
    rec.free(a)
    od = dropout(rec, o, config_dropout(spec, DROPOUT, "resid"), "attn.resid_dropout")
    if od is not o:
        rec.free(o)
    rec.free(qkv)
    x2 = add(rec, od, x, x.dtype)
    rec.free(n)
    n2 = layer_norm(rec, x2, sites.norm_trains("ln_2"), h, "ln_2", sites.norm_params("ln_2"))
    f = sites.linear(rec, n2, "mlp.c_fc", h, spec.intermediate_size)
    act = activation(rec, f, spec.hidden_act if spec.hidden_act in ("gelu_new", "quick_gelu") else "gelu", "mlp.act")
    rec.free(f)
    d = sites.linear(rec, act, "mlp.c_proj", spec.intermediate_size, h)
    d = sites.adapt(rec, d, "mlp_out", "mlp.c_proj")
    rec.free(act)
    dd = dropout(rec, d, config_dropout(spec, DROPOUT, "resid"), "mlp.dropout")
    if dd is not d:
        rec.free(d)
    rec.free(n2)
    out = add(rec, x2, dd, x2.dtype)
    rec.free(dd, x2, od)
    return out


def gpt2_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """GPT2Config: n_embd, n_head, n_layer, n_inner (default 4 x n_embd), n_positions; Conv1D biases."""
    hidden = config_int(config, "n_embd", where)
    heads = config_int(config, "n_head", where)
    check_divisible(hidden, heads, "n_embd", "n_head", where)
    return ModelSpec(
        hidden_size=hidden,
        num_layers=config_int(config, "n_layer", where),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=optional_config_int(config, "n_inner", 4 * hidden, where, null_is_default=True),
        vocab_size=config_int(config, "vocab_size", where),
        max_positions=config_int(config, "n_positions", where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", True, where),
        attention_bias=True,
        mlp_bias=True,
        hidden_act=config_str(config, "activation_function", "gelu_new", where),
        **common,
    )


# Dropout probabilities during training, from the transformers config defaults.
DROPOUT = {
    "gpt2": {"embd": ("embd_pdrop", 0.1), "attn": ("attn_pdrop", 0.1), "resid": ("resid_pdrop", 0.1)},
}

def gpt2_embeddings(rec: Recorder, spec: ModelSpec, layout: Layout, sites, x: SymTensor) -> SymTensor:
    """GPT2Model.forward after wte(input_ids) + wpe(position_ids): self.drop."""
    return dropout(rec, x, config_dropout(spec, DROPOUT, "embd"), "embeddings.dropout")


def gpt2_embedding_indices(spec: ModelSpec, layout: Layout, ctx: StepContext, sites) -> list:
    """GPT2Model.forward's position_ids, arange(seq).unsqueeze(0), which wpe's EmbeddingBackward saves
    when wpe trains (derivatives.yaml embedding: indices)."""
    return [(ctx.seq, "wpe.position_ids")] if sites.trains("transformer.wpe") else []


GPT2 = Family("gpt2", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py",
              gpt2_layout, gpt2_block, DROPOUT["gpt2"], ("c_attn",), ("c_attn", "mlp.c_proj"), ("mlp.c_proj",),
              learned_positions=True,
              architectures={"GPT2LMHeadModel": "causal_lm", "GPT2ForSequenceClassification": "seq_cls", "GPT2Model": "base"},
              default_task="causal_lm", read_config=gpt2_config, decoder=True,
              embeddings=gpt2_embeddings, embedding_indices=gpt2_embedding_indices, passes_position_ids=True,
              embeddings_add_positions=True)
