"""The Family record: what peftcalc knows about one transformers model family, as data plus code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from peftcalc.spec import ModelSpec

__all__ = [
    "Family",
    "config_dropout",
]


@dataclass(frozen=True)
class Family:
    """One model family (one ``model_type`` of transformers), as data plus code.

    Adding a family is one file in peftcalc/families/ and one line in FAMILIES (families/__init__.py):
    1. ``layout(spec) -> Layout``: every parameter-holding module, in ``named_modules()`` order, mirroring
       the modeling file (tests/peftcalc/test_params.py holds the counts to the real model's ``numel``);
    2. ``block(rec, spec, sites, x) -> x``: one block's forward, op by op, copied line for line from the
       modeling file (peftcalc.ops); every Linear goes through ``sites.linear``, every norm asks
       ``sites.norm_trains``, so the methods can put their ops around them (peftcalc.methods.sites);
    3. ``dropout``: where the modeling file applies dropout ('embd', 'attn', 'resid') and the config key
       (with its default) that sets the probability;
    4. peft's default target modules (``lora_targets``; ``ia3_targets`` and IA3's feed-forward subset)
       from peft's utils/constants.py mappings;
    5. ``learned_positions``: the model has a learned position table, which limits the sequence length;
    6. ``read_config``: the config keys and defaults of its transformers configuration class, the model
       classes (``architectures``) and their tasks, what kind of model it is (decoder, vision, vlm);
       ``source``: the modeling file it mirrors.
    7. what runs around the blocks where it is not the default (the embedding lookup alone, a LayerNorm final
       norm, no buffers): ``embeddings``, ``embedding_indices``, ``mlm_head``, ``seq_cls_head`` (hooks that
       get a methods.sites.HeadSites), ``final_norm``, ``buffer_bytes``, and the flags below them.
    Then harness rows (measure/matrices/*.toml) hold it to the traced bytes."""

    model_type: str
    source: str
    layout: Callable | None = None  # None: a part of another model (BLIP-2's Q-Former and tower)
    block: Callable | None = None
    dropout: dict = field(default_factory=dict)
    lora_targets: tuple = ()
    ia3_targets: tuple = ()
    ia3_feedforward: tuple = ()
    learned_positions: bool = False
    # reading its config (peftcalc.config.spec_from_config): the model classes of `architectures` and their
    # task, the task without one, and read_config(config, common fields, where, read_part) -> ModelSpec
    # (read_part reads a sub-config, for models made of others)
    architectures: dict = field(default_factory=dict)
    default_task: str = "base"
    read_config: Callable | None = None
    decoder: bool = False  # ModelSpec.is_decoder
    vision: bool = False  # ModelSpec.is_vision
    vlm: bool = False  # ModelSpec.is_vlm
    gated_mlp: bool = False  # ModelSpec.gated_mlp
    # the modules from_pretrained keeps in fp32 in half precision, per model class: (_keep_in_fp32_modules,
    # _keep_in_fp32_modules_strict) of the transformers class (see families.kept_in_fp32)
    keep_in_fp32: dict = field(default_factory=dict)
    # around the blocks (hooks get a methods.sites.HeadSites as `sites`)
    embeddings: Callable | None = None  # (rec, spec, layout, sites, x) -> x: the embeddings' own ops after the lookup
    embedding_indices: Callable | None = None  # (spec, layout, ctx, sites) -> [(numel, tag)]: int64 indices saved
    mlm_head: Callable | None = None  # (rec, spec, layout, sites, x) -> logits: the masked-LM head
    seq_cls_head: Callable | None = None  # (rec, spec, sites, x) -> logits: an encoder's classification head
    # the base model's final norm: "rms", "rms_weight_fp32" (the weight product before the cast back: Olmo2RMSNorm),
    # "gemma" (ops.norms.gemma_rms_norm), "layer", or "pooled" (the pooled token only)
    final_norm: str = "layer"
    buffer_bytes: Callable | None = None  # (spec) -> bytes of the registered buffers (model.buffers()) kept fp32
    dtype_buffers: int = 0  # elements of registered buffers cast to the model's dtype (Gemma's embed_scale scalar)
    rotary: bool = False  # RoPE: the model's forward makes cos/sin (and cache positions) every layer reads
    rotary_fp32: bool = False  # its cos/sin stay fp32 whatever the hidden states' dtype (Olmo2RotaryEmbedding)
    rotary_half: bool = False  # its cos/sin are half a head wide (GptOssRotaryEmbedding: no cat of the frequencies)
    passes_position_ids: bool = False  # the model passes every layer position_ids as a keyword argument
    embeddings_add_positions: bool = False  # the embeddings make a new tensor from inputs_embeds (+ positions)
    position_offset: int = 0  # positions a learned table loses (RoBERTa's start after padding_idx)
    position_ids_batched: bool = False  # position_ids are b x seq, apart from the indices a position table saves (OPT)
    prefix_kv_dim: bool = False  # peft sizes prefix tuning's keys by num_key_value_heads (GQA configs)
    # the attention implementations transformers builds the model with, its default first: "sdpa" asked of a
    # family without it runs the default (families.attention_for; Gemma 2: eager only, _supports_sdpa False)
    attentions: tuple = ("sdpa", "eager")
    rotary_per_layer_type: bool = False  # one RoPE cos/sin per layer type (Gemma 3's local and global bases)


def config_dropout(spec: ModelSpec, tables: dict, where: str) -> float:
    """The dropout probability a block applies at `where` ('embd', 'attn', 'resid'): the config value
    of the key tables[model_type] names for it (its transformers default when the config omits it);
    0.0 where the family applies none."""
    key = tables[spec.model_type].get(where)
    if key is None:
        return 0.0
    return float(spec.hf_config.get(key[0], key[1]) or 0.0)
