"""ViT and the CLIP vision tower (transformers models/vit/modeling_vit.py, models/clip/modeling_clip.py):
pre-LayerNorm encoder blocks over patch embeddings and a class token.
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, linear_module, norm_module
from peftcalc.ops.attention import attention, math_path
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import layer_norm
from peftcalc.ops.recorder import Recorder, SymTensor, first_node_since
from peftcalc.ops.tensor_ops import add, heads_view
from peftcalc.spec import ModelSpec, config_bool, config_str, divided, encoder_sizes, optional_config_int, config_int

__all__ = [
    "CLIP_VISION",
    "DROPOUT",
    "VIT",
    "clip_buffer_bytes",
    "clip_embeddings",
    "clip_vision_layout",
    "vision_block",
    "vision_config",
    "vit_layout",
]


def vit_layout(spec: ModelSpec) -> Layout:
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
            linear_module(f"{p}.attention.q_proj", h, h, spec.attention_bias, i, "attn"),
            linear_module(f"{p}.attention.k_proj", h, h, spec.attention_bias, i, "attn"),
            linear_module(f"{p}.attention.v_proj", h, h, spec.attention_bias, i, "attn"),
            linear_module(f"{p}.attention.o_proj", h, h, True, i, "attn_out"),
            norm_module(f"{p}.layernorm_before", h, True, i),
            norm_module(f"{p}.layernorm_after", h, True, i),
            linear_module(f"{p}.mlp.fc1", inter, h, True, i, "mlp"),
            linear_module(f"{p}.mlp.fc2", h, inter, True, i, "mlp_out"),
        ]
    mods.append(norm_module(f"{base}layernorm", h, True))
    head: tuple[str, ...] = ()
    if spec.task == "base":
        mods.append(linear_module("pooler.dense", h, h, True, None, "pooler"))
    elif spec.task == "image_cls":
        mods.append(linear_module("classifier", spec.num_labels, h, True, None, "head"))
        head = ("classifier",)
    return Layout(tuple(mods), f"{base}layers", f"{e}.patch_embeddings.projection", head, None, False,
                  f"{base}layernorm")


def clip_vision_layout(spec: ModelSpec) -> Layout:
    """CLIPVisionModel (modeling_clip.py): class embedding, bias-free patch conv, pre/post LayerNorm."""
    h, inter = spec.hidden_size, spec.intermediate_size
    e = "embeddings"
    mods = [
        Module(f"{e}.class_embedding", "param", (h,), False, None, "embed"),
        Module(f"{e}.patch_embedding", "conv2d",
               (h, spec.num_channels, spec.patch_size, spec.patch_size), False, None, "embed"),
        Module(f"{e}.position_embedding", "embedding", (spec.vision_seq_len, h), False, None, "embed"),
        norm_module("pre_layrnorm", h, True),
    ]
    for i in range(spec.num_layers):
        p = f"encoder.layers.{i}"
        mods += [
            linear_module(f"{p}.self_attn.k_proj", h, h, True, i, "attn"),
            linear_module(f"{p}.self_attn.v_proj", h, h, True, i, "attn"),
            linear_module(f"{p}.self_attn.q_proj", h, h, True, i, "attn"),
            linear_module(f"{p}.self_attn.out_proj", h, h, True, i, "attn_out"),
            norm_module(f"{p}.layer_norm1", h, True, i),
            linear_module(f"{p}.mlp.fc1", inter, h, True, i, "mlp"),
            linear_module(f"{p}.mlp.fc2", h, inter, True, i, "mlp_out"),
            norm_module(f"{p}.layer_norm2", h, True, i),
        ]
    mods.append(norm_module("post_layernorm", h, True))
    return Layout(tuple(mods), "encoder.layers", f"{e}.patch_embedding", (), None, False, "post_layernorm")


def vision_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """ViTLayer / CLIPEncoderLayer: pre-LayerNorm attention and MLP (gelu / quick_gelu)."""
    ctx = rec.ctx
    h = spec.hidden_size
    vit = spec.model_type == "vit"
    ln1, ln2 = ("layernorm_before", "layernorm_after") if vit else ("layer_norm1", "layer_norm2")
    att = "attention" if vit else "self_attn"
    out_name = f"{att}.o_proj" if vit else f"{att}.out_proj"
    reshaped = math_path(ctx, config_dropout(spec, DROPOUT, "attn")) or ctx.attention == "eager"
    n = layer_norm(rec, x, sites.norm_trains(ln1), h, ln1, sites.norm_params(ln1))
    mark = len(rec.nodes)
    ql = sites.linear(rec, n, f"{att}.q_proj", h, h)
    query_node = first_node_since(rec, mark)
    kl = sites.linear(rec, n, f"{att}.k_proj", h, h)
    vl = sites.linear(rec, n, f"{att}.v_proj", h, h)
    q, k, v = (heads_view(rec, t, clone=reshaped) for t in (ql, kl, vl))
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), att, hold=query_node, fp32_softmax=True)
    rec.free(ql, kl, vl)
    o = sites.linear(rec, a, out_name, h, h)
    o = sites.adapt(rec, o, "attn_out", out_name)
    rec.free(a)
    rec.free(n)
    x2 = add(rec, o, x, x.dtype)
    rec.free(o)
    n2 = layer_norm(rec, x2, sites.norm_trains(ln2), h, ln2, sites.norm_params(ln2))
    f = sites.linear(rec, n2, "mlp.fc1", h, spec.intermediate_size)
    act = activation(rec, f, "quick_gelu" if spec.hidden_act == "quick_gelu" else "gelu", "mlp.act")
    rec.free(f)
    d = sites.linear(rec, act, "mlp.fc2", spec.intermediate_size, h)
    d = sites.adapt(rec, d, "mlp_out", "mlp.fc2")
    rec.free(act)
    rec.free(n2)
    out = add(rec, d, x2, x2.dtype)
    rec.free(d, x2)
    return sites.after_block(rec, out)  # a VLM vision tower's adapter after the layer (a forward hook)


def vision_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """ViTConfig, CLIPVisionConfig: image_size, patch_size, num_channels; ViT's qkv_bias."""
    model_type = common["model_type"]
    hidden, heads, layers, intermediate = encoder_sizes(config, where)
    image = config_int(config, "image_size", where)
    patch = config_int(config, "patch_size", where)
    if image % patch:
        raise InputError(f"{where}: image_size ({image}) must be a multiple of patch_size ({patch})")
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=divided(hidden, heads, "hidden_size", "num_attention_heads", where),
        intermediate_size=intermediate,
        attention_bias=config_bool(config, "qkv_bias", True, where) if model_type == "vit" else True,
        mlp_bias=True,
        image_size=image,
        patch_size=patch,
        num_channels=optional_config_int(config, "num_channels", 3, where),
        hidden_act=config_str(config, "hidden_act", "gelu" if model_type == "vit" else "quick_gelu", where),
        **common,
    )


# Dropout probabilities during training, from the transformers config defaults.
DROPOUT = {
    "vit": {"embd": ("hidden_dropout_prob", 0.0), "attn": ("attention_probs_dropout_prob", 0.0),
            "resid": ("hidden_dropout_prob", 0.0)},
    "clip_vision_model": {"attn": ("attention_dropout", 0.0)},
}

# peft has no LoRA/IA3 entry for vit (transformers 5 names) or clip_vision_model: peftcalc takes the
# llama choice (q_proj, v_proj; IA3 on keys, values and the FFN output) and passes it to peft explicitly.
def clip_embeddings(rec: Recorder, spec: ModelSpec, layout: Layout, sites, x: SymTensor) -> SymTensor:
    """CLIPVisionTransformer.forward after the embeddings: pre_layrnorm."""
    return layer_norm(rec, x, sites.trains("pre_layrnorm"), spec.hidden_size, "pre_layrnorm",
                      sites.norm_params("pre_layrnorm"))


def clip_buffer_bytes(spec: ModelSpec) -> int:
    """CLIPVisionEmbeddings registers ``position_ids``, (1, patches + 1) int64."""
    return spec.vision_seq_len * 8


VIT = Family("vit", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/vit/modeling_vit.py",
             vit_layout, vision_block, DROPOUT["vit"], ("q_proj", "v_proj"), ("k_proj", "v_proj", "fc2"), ("fc2",),
             architectures={"ViTForImageClassification": "image_cls", "ViTModel": "base"},
             read_config=vision_config, vision=True)
CLIP_VISION = Family("clip_vision_model",
                     "https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py",
                     clip_vision_layout, vision_block, DROPOUT["clip_vision_model"], ("q_proj", "v_proj"),
                     ("k_proj", "v_proj", "fc2"), ("fc2",), architectures={"CLIPVisionModel": "base"},
                     read_config=vision_config, vision=True, embeddings=clip_embeddings,
                     buffer_bytes=clip_buffer_bytes, final_norm="pooled")
