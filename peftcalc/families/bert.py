"""BERT and RoBERTa (transformers models/bert/modeling_bert.py, models/roberta/modeling_roberta.py):
post-LayerNorm encoder blocks, token-type and learned position embeddings, MLM and classifier heads.
"""

from __future__ import annotations

from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, linear_module, norm_module
from peftcalc.ops.attention import attention, math_path
from peftcalc.ops.context import StepContext
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import activation, tanh
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor, first_node_since
from peftcalc.ops.tensor_ops import add, dropout, first_token, heads_view
from peftcalc.spec import ModelSpec, config_bool, config_str, divided, encoder_sizes, optional_config_int, config_int

__all__ = [
    "BERT",
    "DROPOUT",
    "ROBERTA",
    "bert_block",
    "bert_buffer_bytes",
    "bert_config",
    "bert_embedding_indices",
    "bert_embeddings",
    "bert_layout",
    "bert_mlm_head",
    "bert_pooler_head",
    "mlm_decoder_bias",
    "roberta_classification_head",
]


def bert_layout(spec: ModelSpec) -> Layout:
    """BertFor*/RobertaFor* (modeling_bert.py, modeling_roberta.py). The pooler exists in BertModel,
    RobertaModel and BertForSequenceClassification; RobertaForSequenceClassification and both
    ForMaskedLM classes build the encoder with add_pooling_layer=False."""
    fam = "bert" if spec.model_type == "bert" else "roberta"
    base = "" if spec.task == "base" else f"{fam}."
    h, inter = spec.hidden_size, spec.intermediate_size
    e = f"{base}embeddings"
    mods = [
        Module(f"{e}.word_embeddings", "embedding", (spec.vocab_size, h), False, None, "embed"),
        Module(f"{e}.position_embeddings", "embedding", (spec.max_positions, h), False, None, "embed"),
        Module(f"{e}.token_type_embeddings", "embedding", (spec.type_vocab_size, h), False, None, "embed"),
        norm_module(f"{e}.LayerNorm", h, True),
    ]
    for i in range(spec.num_layers):
        p = f"{base}encoder.layer.{i}"
        mods += [
            linear_module(f"{p}.attention.self.query", h, h, True, i, "attn"),
            linear_module(f"{p}.attention.self.key", h, h, True, i, "attn"),
            linear_module(f"{p}.attention.self.value", h, h, True, i, "attn"),
            linear_module(f"{p}.attention.output.dense", h, h, True, i, "attn_out"),
            norm_module(f"{p}.attention.output.LayerNorm", h, True, i),
            linear_module(f"{p}.intermediate.dense", inter, h, True, i, "mlp"),
            linear_module(f"{p}.output.dense", h, inter, True, i, "mlp_out"),
            norm_module(f"{p}.output.LayerNorm", h, True, i),
        ]
    has_pooler = spec.task == "base" or (spec.task == "seq_cls" and fam == "bert")
    if has_pooler:
        mods.append(linear_module(f"{base}pooler.dense", h, h, True, None, "pooler"))
    head: tuple[str, ...] = ()
    out_emb = None
    tied = False
    if spec.task == "masked_lm":
        c = "cls.predictions" if fam == "bert" else "lm_head"
        dense = f"{c}.transform.dense" if fam == "bert" else f"{c}.dense"
        norm = f"{c}.transform.LayerNorm" if fam == "bert" else f"{c}.layer_norm"
        mods += [
            Module(f"{c}.bias", "param", (spec.vocab_size,), False, None, "head"),
            linear_module(dense, h, h, True, None, "head"),
            norm_module(norm, h, True),
        ]
        tied = spec.tie_embeddings
        if not tied:  # the decoder gets its own weight and its own bias
            mods.append(linear_module(f"{c}.decoder", spec.vocab_size, h, True, None, "head"))
        head = ("cls",) if fam == "bert" else ("lm_head",)
        out_emb = f"{c}.decoder"
    elif spec.task == "seq_cls":
        if fam == "bert":
            mods.append(linear_module("classifier", spec.num_labels, h, True, None, "head"))
        else:  # RobertaClassificationHead
            mods += [
                linear_module("classifier.dense", h, h, True, None, "head"),
                linear_module("classifier.out_proj", spec.num_labels, h, True, None, "head"),
            ]
        head = ("classifier",)
    return Layout(tuple(mods), f"{base}encoder.layer", f"{e}.word_embeddings", head, out_emb, tied, None)


def bert_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """BertLayer / RobertaLayer: post-LayerNorm; dropout after attention output and FFN output. The
    forward frees q, k, v when BertSelfAttention returns, the attention output when BertAttention
    does, the intermediate output and the attention block's output when the layer returns (traced)."""
    ctx = rec.ctx
    h = spec.hidden_size
    reshaped = math_path(ctx, config_dropout(spec, DROPOUT, "attn")) or ctx.attention == "eager"
    mark = len(rec.nodes)
    ql = sites.linear(rec, x, "attention.self.query", h, h)
    query_node = first_node_since(rec, mark)
    kl = sites.linear(rec, x, "attention.self.key", h, h)
    vl = sites.linear(rec, x, "attention.self.value", h, h)
    q, k, v = (heads_view(rec, t, clone=reshaped) for t in (ql, kl, vl))
    # BertSelfAttention: `key_layer, value_layer = past_key_values.update(...)` drops the key and value
    # projections (views of them were the only references; traced, tiny-bert-cls prefix bf16)
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "attention.self", hold=query_node,
                  replaced=(kl, vl))
    rec.free(ql, kl, vl)
    o = sites.linear(rec, a, "attention.output.dense", h, h)
    o = sites.adapt(rec, o, "attn_out", "attention.output.dense")
    od = dropout(rec, o, config_dropout(spec, DROPOUT, "resid"), "attention.output.dropout")
    if od is not o:
        rec.free(o)
    s1 = add(rec, od, x, od.dtype if ctx.autocast is None else x.dtype)
    n1 = layer_norm(rec, s1, sites.norm_trains("attention.output.LayerNorm"), h, "attention.output.LayerNorm", sites.norm_params("attention.output.LayerNorm"))
    rec.free(s1, od, a)
    f = sites.linear(rec, n1, "intermediate.dense", h, spec.intermediate_size)
    act = activation(rec, f, "gelu", "intermediate.act")
    rec.free(f)
    d = sites.linear(rec, act, "output.dense", spec.intermediate_size, h)
    d = sites.adapt(rec, d, "mlp_out", "output.dense")
    dd = dropout(rec, d, config_dropout(spec, DROPOUT, "resid"), "output.dropout")
    if dd is not d:
        rec.free(d)
    s2 = add(rec, dd, n1, n1.dtype)
    out = layer_norm(rec, s2, sites.norm_trains("output.LayerNorm"), h, "output.LayerNorm", sites.norm_params("output.LayerNorm"))
    rec.free(s2, dd, act, n1)
    return out


def mlm_decoder_bias(spec: ModelSpec, layout: Layout) -> str:
    """The masked-LM decoder's bias parameter: BertLMPredictionHead's / RobertaLMHead's ``bias``, which
    ``decoder.bias`` is (the layout's "<head>.bias"), or an untied decoder's own."""
    c = "cls.predictions" if spec.model_type == "bert" else "lm_head"
    names = {m.path for m in layout.modules}
    return f"{c}.bias" if f"{c}.bias" in names else f"{c}.decoder.bias"


def bert_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """BertConfig, RobertaConfig: learned positions (max_position_embeddings), token types."""
    hidden, heads, layers, intermediate = encoder_sizes(config, where)
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=divided(hidden, heads, "hidden_size", "num_attention_heads", where),
        intermediate_size=intermediate,
        vocab_size=config_int(config, "vocab_size", where),
        max_positions=config_int(config, "max_position_embeddings", where),
        type_vocab_size=optional_config_int(config, "type_vocab_size", 2, where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", True, where),
        attention_bias=True,
        mlp_bias=True,
        hidden_act=config_str(config, "hidden_act", "gelu", where),
        **common,
    )


# Dropout probabilities during training, from the transformers config defaults.
DROPOUT = {
    "bert": {"embd": ("hidden_dropout_prob", 0.1), "attn": ("attention_probs_dropout_prob", 0.1),
             "resid": ("hidden_dropout_prob", 0.1)},
    "roberta": {"embd": ("hidden_dropout_prob", 0.1), "attn": ("attention_probs_dropout_prob", 0.1),
                "resid": ("hidden_dropout_prob", 0.1)},
}

def bert_embeddings(rec: Recorder, spec: ModelSpec, layout: Layout, sites, x: SymTensor) -> SymTensor:
    """BertEmbeddings / RobertaEmbeddings.forward after the three lookups are summed: LayerNorm, dropout."""
    norm = f"{layout.embedding_path.rsplit('.', 1)[0]}.LayerNorm"
    x = layer_norm(rec, x, sites.trains(norm), spec.hidden_size, "embeddings.LayerNorm", sites.norm_params(norm))
    return dropout(rec, x, config_dropout(spec, DROPOUT, "embd"), "embeddings.dropout")


def bert_embedding_indices(spec: ModelSpec, layout: Layout, ctx: StepContext, sites) -> list:
    """(numel, tag) of the int64 indices the embeddings' forward makes, which their EmbeddingBackward saves
    when the embedding trains (derivatives.yaml embedding: indices): BertEmbeddings.forward's token types,
    gathered from the registered all-zeros buffer at the position ids, 1 x seq; RobertaEmbeddings.forward's,
    batch x seq, gathered at the batch x seq position ids create_position_ids_from_input_ids makes
    (position_embeddings). BERT's position ids are a slice of its registered buffer (counted with the
    buffers)."""
    roberta = spec.model_type == "roberta"
    embeddings = layout.embedding_path.rsplit(".", 1)[0]
    rows = ctx.batch if roberta else 1
    out = []
    if sites.trains(f"{embeddings}.token_type_embeddings"):
        out.append((rows * ctx.seq, "token_type_embeddings.token_type_ids"))
    if roberta and sites.trains(f"{embeddings}.position_embeddings"):
        out.append((rows * ctx.seq, "position_embeddings.position_ids"))
    return out


def bert_mlm_head(rec: Recorder, spec: ModelSpec, layout: Layout, sites, x: SymTensor) -> SymTensor:
    """BertOnlyMLMHead (cls.predictions: transform.dense, gelu, transform.LayerNorm, decoder) and
    RobertaLMHead (lm_head: dense, gelu, layer_norm, decoder); the decoder's weight is the word
    embeddings' when tied (its gradient then waits for the lookup's) and its bias the head's ``bias``."""
    h = spec.hidden_size
    bert = spec.model_type == "bert"
    c = "cls.predictions" if bert else "lm_head"
    dense = f"{c}.transform.dense" if bert else f"{c}.dense"
    norm = f"{c}.transform.LayerNorm" if bert else f"{c}.layer_norm"
    d = sites.linear(rec, x, dense, h, h, "mlm.dense")
    d = activation(rec, d, "gelu", "mlm.act")
    d = layer_norm(rec, d, sites.trains(norm), h, "mlm.layer_norm", sites.norm_params(norm))
    tied = layout.head_tied_to_embedding and sites.embedding_trains  # its gradient waits for the lookup's
    return linear(rec, d, h, spec.vocab_size, sites.trains(f"{c}.decoder", True) or tied, "mlm.decoder",
                  grad_pending=tied, bias=True, bias_trains=sites.trains(mlm_decoder_bias(spec, layout)))


def bert_pooler_head(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """BertForSequenceClassification: BertPooler (dense, tanh) on the first token, dropout, classifier."""
    h, p = spec.hidden_size, config_dropout(spec, DROPOUT, "resid")
    pooled = sites.linear(rec, first_token(rec, x, rec.ctx.batch), "bert.pooler.dense", h, h, "pooler.dense")
    pooled = tanh(rec, pooled, "pooler.tanh")
    pooled = dropout(rec, pooled, p, "classifier.dropout")
    return sites.linear(rec, pooled, "classifier", h, spec.num_labels, "classifier")


def roberta_classification_head(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """RobertaClassificationHead on the first token: dropout, dense, tanh, dropout, out_proj."""
    h, p = spec.hidden_size, config_dropout(spec, DROPOUT, "resid")
    d = dropout(rec, first_token(rec, x, rec.ctx.batch), p, "classifier.dropout")
    d = sites.linear(rec, d, "classifier.dense", h, h, "classifier.dense")
    d = tanh(rec, d, "classifier.tanh")
    d = dropout(rec, d, p, "classifier.dropout2")
    return sites.linear(rec, d, "classifier.out_proj", h, spec.num_labels, "classifier.out_proj")


def bert_buffer_bytes(spec: ModelSpec) -> int:
    """BertEmbeddings / RobertaEmbeddings register ``position_ids`` and ``token_type_ids``,
    (1, max_position_embeddings) int64 each."""
    return 2 * spec.max_positions * 8


BERT = Family("bert", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/bert/modeling_bert.py",
              bert_layout, bert_block, DROPOUT["bert"], ("query", "value"), ("key", "value", "output.dense"),
              ("output.dense",), learned_positions=True,
              architectures={"BertForMaskedLM": "masked_lm", "BertForSequenceClassification": "seq_cls", "BertModel": "base"},
              default_task="masked_lm", read_config=bert_config, embeddings=bert_embeddings,
              embedding_indices=bert_embedding_indices, mlm_head=bert_mlm_head, seq_cls_head=bert_pooler_head,
              buffer_bytes=bert_buffer_bytes, embeddings_add_positions=True)
ROBERTA = Family("roberta", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/roberta/modeling_roberta.py",
                 bert_layout, bert_block, DROPOUT["roberta"], ("query", "value"), ("key", "value", "output.dense"),
                 ("output.dense",), learned_positions=True,
                 architectures={"RobertaForMaskedLM": "masked_lm", "RobertaForSequenceClassification": "seq_cls",
                                "RobertaModel": "base"},
                 default_task="masked_lm", read_config=bert_config, embeddings=bert_embeddings,
                 embedding_indices=bert_embedding_indices, mlm_head=bert_mlm_head,
                 seq_cls_head=roberta_classification_head, buffer_bytes=bert_buffer_bytes,
                 embeddings_add_positions=True, position_offset=2)
