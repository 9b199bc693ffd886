"""Step 1 of the model: every parameter-holding module of the transformers model, by path.

Each family function mirrors the module tree of the transformers 5.x modeling file it names, so
that ``sum(numel)`` over the modules equals ``sum(p.numel() for p in model.parameters())`` of the
real model (tied weights counted once, as ``parameters()`` does) and the paths equal
``model.named_modules()`` names (which is what peft's ``target_modules`` matching sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod

from peftcalc.spec import ModelSpec

# Module kinds. `linear` stores (out, in) like nn.Linear; `conv1d` stores (in, out) like
# transformers' Conv1D (GPT-2); `embedding` (num, dim); `norm` (dim,); `conv2d` (out, in, k, k);
# `param` a bare nn.Parameter whose path is the parameter name itself.
LINEAR_KINDS = ("linear", "conv1d")


@dataclass(frozen=True)
class Module:
    path: str
    kind: str
    shape: tuple
    bias: bool = False
    layer: int | None = None
    role: str = ""  # embed | attn | attn_out | mlp | mlp_out | norm | head | pooler | vision | projector

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.kind == "conv1d" else self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.kind == "conv1d" else self.shape[0]

    @property
    def weight_numel(self) -> int:
        return prod(self.shape)

    @property
    def bias_numel(self) -> int:
        if not self.bias:
            return 0
        return self.out_features if self.kind in LINEAR_KINDS else self.shape[0]

    @property
    def numel(self) -> int:
        return self.weight_numel + self.bias_numel

    @property
    def name(self) -> str:
        """The last component of the path, as peft's target matching sees it."""
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True, eq=False)
class Layout:
    """The modules of one model, plus what peft and the methods need to know about its head.
    Hashed by identity: build_layout caches one Layout per spec."""

    modules: tuple[Module, ...]
    block_prefix: str  # e.g. "model.layers" (block i is f"{block_prefix}.{i}")
    embedding_path: str  # the input token/patch embedding module
    head_paths: tuple[str, ...]  # the task head's modules (empty for a bare model)
    output_embedding_path: str | None  # get_output_embeddings() name, excluded by peft's all-linear
    head_tied_to_embedding: bool  # the head's weight is the input embedding's
    final_norm_path: str | None

    @property
    def total_params(self) -> int:
        return sum(m.numel for m in self.modules)

    def blocks(self, index: int) -> tuple[Module, ...]:
        return tuple(m for m in self.modules if m.layer == index)


def _lin(path, out_f, in_f, bias, layer=None, role=""):
    return Module(path, "linear", (out_f, in_f), bias, layer, role)


def _norm(path, dim, bias, layer=None):
    return Module(path, "norm", (dim,), bias, layer, "norm")


def _llama_like(spec: ModelSpec) -> Layout:
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (modeling_llama.py, modeling_mistral.py,
    modeling_qwen2.py): q/k/v/o, gated MLP, RMSNorm (weight only)."""
    base = "" if spec.task == "base" else "model."
    h, hd = spec.hidden_size, spec.head_dim
    qkv_bias = spec.attention_bias
    o_bias = spec.attention_bias and spec.model_type == "llama"
    mods = [Module(f"{base}embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed")]
    for i in range(spec.num_layers):
        p = f"{base}layers.{i}"
        mods += [
            _lin(f"{p}.self_attn.q_proj", spec.num_heads * hd, h, qkv_bias, i, "attn"),
            _lin(f"{p}.self_attn.k_proj", spec.num_kv_heads * hd, h, qkv_bias, i, "attn"),
            _lin(f"{p}.self_attn.v_proj", spec.num_kv_heads * hd, h, qkv_bias, i, "attn"),
            _lin(f"{p}.self_attn.o_proj", h, spec.num_heads * hd, o_bias, i, "attn_out"),
            _lin(f"{p}.mlp.gate_proj", spec.intermediate_size, h, spec.mlp_bias, i, "mlp"),
            _lin(f"{p}.mlp.up_proj", spec.intermediate_size, h, spec.mlp_bias, i, "mlp"),
            _lin(f"{p}.mlp.down_proj", h, spec.intermediate_size, spec.mlp_bias, i, "mlp_out"),
            _norm(f"{p}.input_layernorm", h, False, i),
            _norm(f"{p}.post_attention_layernorm", h, False, i),
        ]
    mods.append(_norm(f"{base}norm", h, False))
    head, out_emb, tied = _decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}layers", f"{base}embed_tokens", head, out_emb, tied, f"{base}norm")


def _decoder_head(spec: ModelSpec, mods: list) -> tuple[tuple[str, ...], str | None, bool]:
    """The head of a decoder: lm_head (tied or not) for causal LM, `score` (no bias) for
    sequence classification (LlamaForSequenceClassification, GPT2ForSequenceClassification)."""
    h = spec.hidden_size
    if spec.task == "causal_lm":
        if not spec.tie_embeddings:
            mods.append(_lin("lm_head", spec.vocab_size, h, False, None, "head"))
        return ("lm_head",), "lm_head", spec.tie_embeddings
    if spec.task == "seq_cls":
        mods.append(_lin("score", spec.num_labels, h, False, None, "head"))
        return ("score",), None, False
    return (), None, False


def _gpt2(spec: ModelSpec) -> Layout:
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
            _norm(f"{p}.ln_1", h, True, i),
            Module(f"{p}.attn.c_attn", "conv1d", (h, 3 * h), True, i, "attn"),
            Module(f"{p}.attn.c_proj", "conv1d", (h, h), True, i, "attn_out"),
            _norm(f"{p}.ln_2", h, True, i),
            Module(f"{p}.mlp.c_fc", "conv1d", (h, inner), True, i, "mlp"),
            Module(f"{p}.mlp.c_proj", "conv1d", (inner, h), True, i, "mlp_out"),
        ]
    mods.append(_norm(f"{base}ln_f", h, True))
    head, out_emb, tied = _decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}h", f"{base}wte", head, out_emb, tied, f"{base}ln_f")


def _bert_like(spec: ModelSpec) -> Layout:
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
        _norm(f"{e}.LayerNorm", h, True),
    ]
    for i in range(spec.num_layers):
        p = f"{base}encoder.layer.{i}"
        mods += [
            _lin(f"{p}.attention.self.query", h, h, True, i, "attn"),
            _lin(f"{p}.attention.self.key", h, h, True, i, "attn"),
            _lin(f"{p}.attention.self.value", h, h, True, i, "attn"),
            _lin(f"{p}.attention.output.dense", h, h, True, i, "attn_out"),
            _norm(f"{p}.attention.output.LayerNorm", h, True, i),
            _lin(f"{p}.intermediate.dense", inter, h, True, i, "mlp"),
            _lin(f"{p}.output.dense", h, inter, True, i, "mlp_out"),
            _norm(f"{p}.output.LayerNorm", h, True, i),
        ]
    has_pooler = spec.task == "base" or (spec.task == "seq_cls" and fam == "bert")
    if has_pooler:
        mods.append(_lin(f"{base}pooler.dense", h, h, True, None, "pooler"))
    head: tuple[str, ...] = ()
    out_emb = None
    tied = False
    if spec.task == "masked_lm":
        c = "cls.predictions" if fam == "bert" else "lm_head"
        dense = f"{c}.transform.dense" if fam == "bert" else f"{c}.dense"
        norm = f"{c}.transform.LayerNorm" if fam == "bert" else f"{c}.layer_norm"
        mods += [
            Module(f"{c}.bias", "param", (spec.vocab_size,), False, None, "head"),
            _lin(dense, h, h, True, None, "head"),
            _norm(norm, h, True),
        ]
        tied = spec.tie_embeddings
        if not tied:  # the decoder gets its own weight and its own bias
            mods.append(_lin(f"{c}.decoder", spec.vocab_size, h, True, None, "head"))
        head = ("cls",) if fam == "bert" else ("lm_head",)
        out_emb = f"{c}.decoder"
    elif spec.task == "seq_cls":
        if fam == "bert":
            mods.append(_lin("classifier", spec.num_labels, h, True, None, "head"))
        else:  # RobertaClassificationHead
            mods += [
                _lin("classifier.dense", h, h, True, None, "head"),
                _lin("classifier.out_proj", spec.num_labels, h, True, None, "head"),
            ]
        head = ("classifier",)
    return Layout(tuple(mods), f"{base}encoder.layer", f"{e}.word_embeddings", head, out_emb, tied, None)


def _vit(spec: ModelSpec) -> Layout:
    """ViTModel / ViTForImageClassification (modeling_vit.py, transformers 5.x names: layers.i.attention.
    q_proj/k_proj/v_proj/o_proj, mlp.fc1/fc2). ViTModel adds a pooler; the classifier builds the
    encoder with add_pooling_layer=False."""
    base = "" if spec.task == "base" else "vit."
    h, inter = spec.hidden_size, spec.intermediate_size
    e = f"{base}embeddings"
    mods = [
        Module(f"{e}.cls_token", "param", (1, 1, h), False, None, "embed"),
        Module(f"{e}.position_embeddings", "param", (1, spec.vision_seq_len, h), False, None, "embed"),
        Module(f"{e}.patch_embeddings.projection", "conv2d",
               (h, spec.num_channels, spec.patch_size, spec.patch_size), True, None, "embed"),
    ]
    for i in range(spec.num_layers):
        p = f"{base}layers.{i}"
        mods += [
            _lin(f"{p}.attention.q_proj", h, h, spec.attention_bias, i, "attn"),
            _lin(f"{p}.attention.k_proj", h, h, spec.attention_bias, i, "attn"),
            _lin(f"{p}.attention.v_proj", h, h, spec.attention_bias, i, "attn"),
            _lin(f"{p}.attention.o_proj", h, h, True, i, "attn_out"),
            _norm(f"{p}.layernorm_before", h, True, i),
            _norm(f"{p}.layernorm_after", h, True, i),
            _lin(f"{p}.mlp.fc1", inter, h, True, i, "mlp"),
            _lin(f"{p}.mlp.fc2", h, inter, True, i, "mlp_out"),
        ]
    mods.append(_norm(f"{base}layernorm", h, True))
    head: tuple[str, ...] = ()
    if spec.task == "base":
        mods.append(_lin("pooler.dense", h, h, True, None, "pooler"))
    elif spec.task == "image_cls":
        mods.append(_lin("classifier", spec.num_labels, h, True, None, "head"))
        head = ("classifier",)
    return Layout(tuple(mods), f"{base}layers", f"{e}.patch_embeddings.projection", head, None, False,
                  f"{base}layernorm")


def _clip_vision(spec: ModelSpec) -> Layout:
    """CLIPVisionModel (modeling_clip.py): class embedding, bias-free patch conv, pre/post LayerNorm."""
    h, inter = spec.hidden_size, spec.intermediate_size
    e = "embeddings"
    mods = [
        Module(f"{e}.class_embedding", "param", (h,), False, None, "embed"),
        Module(f"{e}.patch_embedding", "conv2d",
               (h, spec.num_channels, spec.patch_size, spec.patch_size), False, None, "embed"),
        Module(f"{e}.position_embedding", "embedding", (spec.vision_seq_len, h), False, None, "embed"),
        _norm("pre_layrnorm", h, True),
    ]
    for i in range(spec.num_layers):
        p = f"encoder.layers.{i}"
        mods += [
            _lin(f"{p}.self_attn.k_proj", h, h, True, i, "attn"),
            _lin(f"{p}.self_attn.v_proj", h, h, True, i, "attn"),
            _lin(f"{p}.self_attn.q_proj", h, h, True, i, "attn"),
            _lin(f"{p}.self_attn.out_proj", h, h, True, i, "attn_out"),
            _norm(f"{p}.layer_norm1", h, True, i),
            _lin(f"{p}.mlp.fc1", inter, h, True, i, "mlp"),
            _lin(f"{p}.mlp.fc2", h, inter, True, i, "mlp_out"),
            _norm(f"{p}.layer_norm2", h, True, i),
        ]
    mods.append(_norm("post_layernorm", h, True))
    return Layout(tuple(mods), "encoder.layers", f"{e}.patch_embedding", (), None, False, "post_layernorm")


def _prefixed(layout: Layout, old: str, new: str, role: str | None = None, keep_layers: bool = True):
    """The modules of a sub-model under another prefix (paths starting with `old` get `new` instead;
    `old` == "" prefixes every path); `role` replaces their role; `keep_layers` False drops the block
    index (the blocks of a tower that is not the model's main stack)."""
    out = []
    for m in layout.modules:
        path = new + m.path[len(old):] if m.path.startswith(old) else m.path
        out.append(Module(path, m.kind, m.shape, m.bias, m.layer if keep_layers else None, role or m.role))
    return out


VISION_TOWER = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LANGUAGE_MODEL = "model.language_model"


def _llava(spec: ModelSpec) -> Layout:
    """LlavaForConditionalGeneration (transformers 5.x modeling_llava.py): `model.vision_tower` (a
    CLIPVisionModel: all its layers are built, even those above `vision_feature_layer`, and its
    post_layernorm), `model.multi_modal_projector` (linear_1: vision hidden -> text hidden, the
    activation, linear_2: text hidden -> text hidden, both with biases), `model.language_model` (the
    bare LlamaModel) and `lm_head`. The vision tower's modules carry role "vision" and no block index;
    the block indices are the language model's."""
    vision = _prefixed(_clip_vision(spec.vision), "", VISION_TOWER + ".", role="vision", keep_layers=False)
    h_v, h = spec.vision.hidden_size, spec.hidden_size
    projector = [_lin(f"{PROJECTOR}.linear_1", h, h_v, True, None, "projector"),
                 _lin(f"{PROJECTOR}.linear_2", h, h, True, None, "projector")]
    text = _prefixed(_llama_like(spec.text), "model.", LANGUAGE_MODEL + ".")
    lm = LANGUAGE_MODEL
    return Layout(tuple(vision + projector + text), f"{lm}.layers", f"{lm}.embed_tokens", ("lm_head",), "lm_head",
                  False, f"{lm}.norm")


QFORMER = "qformer"
QUERY_TOKENS = "query_tokens"
LANGUAGE_PROJECTION = "language_projection"


def _blip2(spec: ModelSpec) -> Layout:
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
    mods += [
        Module(f"{d}.embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed"),
        Module(f"{d}.embed_positions", "embedding", (spec.max_positions + 2, h), False, None, "embed"),
        _norm(f"{d}.final_layer_norm", h, True),
    ]
    for i in range(spec.num_layers):
        p = f"{d}.layers.{i}"
        mods += [
            _lin(f"{p}.self_attn.k_proj", h, h, True, i, "attn"),
            _lin(f"{p}.self_attn.v_proj", h, h, True, i, "attn"),
            _lin(f"{p}.self_attn.q_proj", h, h, True, i, "attn"),
            _lin(f"{p}.self_attn.out_proj", h, h, True, i, "attn_out"),
            _norm(f"{p}.self_attn_layer_norm", h, True, i),
            _lin(f"{p}.fc1", spec.intermediate_size, h, True, i, "mlp"),
            _lin(f"{p}.fc2", h, spec.intermediate_size, True, i, "mlp_out"),
            _norm(f"{p}.final_layer_norm", h, True, i),
        ]
    return Layout(tuple(mods), f"{d}.layers", f"{d}.embed_tokens", ("language_model.lm_head",),
                  "language_model.lm_head", True, f"{d}.final_layer_norm")


FAMILY_LAYOUTS = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gpt2": _gpt2,
    "bert": _bert_like,
    "roberta": _bert_like,
    "vit": _vit,
    "clip_vision_model": _clip_vision,
    "llava": _llava,
    "blip-2": _blip2,
}


@lru_cache(maxsize=256)
def build_layout(spec: ModelSpec) -> Layout:
    """The modules of the model class `spec` names."""
    return FAMILY_LAYOUTS[spec.model_type](spec)


def param_names(module: Module) -> list[tuple[str, int]]:
    """(parameter name, numel) of one module, as `named_parameters()` names them."""
    if module.kind == "param":
        return [(module.path, module.weight_numel)]
    names = [(f"{module.path}.weight", module.weight_numel)]
    if module.bias:
        names.append((f"{module.path}.bias", module.bias_numel))
    return names
