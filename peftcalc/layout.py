"""Step 1 of the model: every parameter-holding module of the transformers model, by path.

Each family's layout function (peftcalc.families) mirrors the module tree of the transformers 5.x modeling file it names, so
that ``sum(numel)`` over the modules equals ``sum(p.numel() for p in model.parameters())`` of the
real model (tied weights counted once, as ``parameters()`` does) and the paths equal
``model.named_modules()`` names (which is what peft's ``target_modules`` matching sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from peftcalc.spec import ModelSpec

__all__ = ["LINEAR_KINDS", "Layout", "Module", "attention_modules", "decoder_head", "decoder_layout",
           "gated_mlp_modules", "linear_module", "norm_module", "param_names", "prefixed_modules"]

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


def linear_module(path: str, out_f: int, in_f: int, bias: bool, layer: int | None = None, role: str = "") -> Module:
    """An nn.Linear: weight (out, in), a bias when `bias`."""
    return Module(path, "linear", (out_f, in_f), bias, layer, role)


def norm_module(path: str, dim: int, bias: bool, layer: int | None = None) -> Module:
    """A LayerNorm/RMSNorm: weight (dim,), a bias when `bias`."""
    return Module(path, "norm", (dim,), bias, layer, "norm")


def attention_modules(spec: ModelSpec, p: str, i: int, bias: bool = False, out_bias: bool = False) -> list[Module]:
    """``self_attn``'s q_proj, k_proj, v_proj, o_proj of block `i` at prefix `p`, in that order, as LlamaAttention
    defines them (modeling_llama.py; the Mistral, Qwen2/3, Gemma 2/3, OLMo 2 and MoE attentions alike): queries of
    num_heads x head_dim, keys and values of num_key_value_heads x head_dim; biases on q/k/v with `bias`, on o_proj
    with `out_bias`."""
    h = spec.hidden_size
    return [
        linear_module(f"{p}.self_attn.q_proj", spec.q_dim, h, bias, i, "attn"),
        linear_module(f"{p}.self_attn.k_proj", spec.kv_dim, h, bias, i, "attn"),
        linear_module(f"{p}.self_attn.v_proj", spec.kv_dim, h, bias, i, "attn"),
        linear_module(f"{p}.self_attn.o_proj", h, spec.q_dim, out_bias, i, "attn_out"),
    ]


def gated_mlp_modules(spec: ModelSpec, p: str, i: int, bias: bool = False) -> list[Module]:
    """``mlp``'s gate_proj, up_proj (hidden -> intermediate) and down_proj (intermediate -> hidden) of block `i` at
    prefix `p`, in that order, as LlamaMLP defines them (modeling_llama.py; Qwen3MLP, Olmo2MLP, Gemma2MLP alike);
    biases on all three with `bias` (LlamaConfig.mlp_bias)."""
    h, inter = spec.hidden_size, spec.intermediate_size
    return [
        linear_module(f"{p}.mlp.gate_proj", inter, h, bias, i, "mlp"),
        linear_module(f"{p}.mlp.up_proj", inter, h, bias, i, "mlp"),
        linear_module(f"{p}.mlp.down_proj", h, inter, bias, i, "mlp_out"),
    ]


def decoder_head(spec: ModelSpec, mods: list) -> tuple[tuple[str, ...], str | None, bool]:
    """The head of a decoder: lm_head (tied or not) for causal LM, `score` (no bias) for
    sequence classification (LlamaForSequenceClassification, GPT2ForSequenceClassification)."""
    h = spec.hidden_size
    if spec.task == "causal_lm":
        if not spec.tie_embeddings:
            mods.append(linear_module("lm_head", spec.vocab_size, h, False, None, "head"))
        return ("lm_head",), "lm_head", spec.tie_embeddings
    if spec.task == "seq_cls":
        mods.append(linear_module("score", spec.num_labels, h, False, None, "head"))
        return ("score",), None, False
    return (), None, False


def decoder_layout(spec: ModelSpec, block_modules) -> Layout:
    """A decoder's modules in named_modules() order, as LlamaForCausalLM nests them (modeling_llama.py; the
    decoders built like it alike): ``model.embed_tokens``, each block's modules (``block_modules(spec, prefix,
    index)``, prefix ``model.layers.<index>``), the final norm ``model.norm`` (weight only), then the task's head
    (decoder_head); a bare model (task "base") has no ``model.`` prefix."""
    base = "" if spec.task == "base" else "model."
    h = spec.hidden_size
    mods = [Module(f"{base}embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed")]
    for i in range(spec.num_layers):
        mods += block_modules(spec, f"{base}layers.{i}", i)
    mods.append(norm_module(f"{base}norm", h, False))
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}layers", f"{base}embed_tokens", head, out_emb, tied, f"{base}norm")


def prefixed_modules(layout: Layout, old: str, new: str, role: str | None = None, keep_layers: bool = True):
    """The modules of a sub-model under another prefix (paths starting with `old` get `new` instead;
    `old` == "" prefixes every path); `role` replaces their role; `keep_layers` False drops the block
    index (the blocks of a tower that is not the model's main stack)."""
    out = []
    for m in layout.modules:
        path = new + m.path[len(old):] if m.path.startswith(old) else m.path
        out.append(Module(path, m.kind, m.shape, m.bias, m.layer if keep_layers else None, role or m.role))
    return out


def param_names(module: Module) -> list[tuple[str, int]]:
    """(parameter name, numel) of one module, as `named_parameters()` names them."""
    if module.kind == "param":
        return [(module.path, module.weight_numel)]
    names = [(f"{module.path}.weight", module.weight_numel)]
    if module.bias:
        names.append((f"{module.path}.bias", module.bias_numel))
    return names
