"""SmolLM3 (transformers models/smollm3/modeling_smollm3.py): Llama's decoder in which every fourth layer (by
default) applies no rotary embedding (NoPE: SmolLM3Attention's ``if self.use_rope``), with an optional sliding
window on those layers.
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.errors import InputError
from peftcalc.families.llama import llama_attention_half, llama_config, llama_layout, llama_mlp_half, rotary_buffer_bytes
from peftcalc.families.record import Family
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.spec import (FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec, config_bool, optional_window,
                           sliding_windows)

__all__ = [
    "DROPOUT",
    "SMOLLM3",
    "smollm3_block",
    "smollm3_config",
]


def smollm3_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """SmolLM3DecoderLayer: LlamaDecoderLayer's ops; its attention applies RoPE only where BlockSites.rope says
    (SmolLM3Attention.use_rope = no_rope_layers[layer_idx]), the NoPE layers' q and k staying views of their
    projections (families.llama.llama_attention_half)."""
    x2 = llama_attention_half(rec, spec, sites, x, DROPOUT)
    return llama_mlp_half(rec, spec, sites, x2)


def smollm3_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """SmolLM3Config (configuration_smollm3.py): LlamaConfig's fields (attention_bias on q/k/v/o, mlp_bias,
    tie_word_embeddings), `no_rope_layers` (1: the layer applies RoPE; default ``int((i + 1) %
    no_rope_layer_interval != 0)``, interval 4: layers 3, 7, ... are NoPE; ModelSpec.rope_layers), and
    __post_init__'s layer_types: "sliding_attention" on the NoPE layers when use_sliding_window and a
    sliding_window are set (the modeling file slides only then), else full attention."""
    spec = llama_config(config, common, where, read_part)
    layers = spec.num_layers
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = config.get("no_rope_layer_interval", 4)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise InputError(f"{where}: 'no_rope_layer_interval' must be a positive integer, got {interval!r}")
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(flags, list) or len(flags) != layers or any(f not in (0, 1) for f in flags):
        raise InputError(f"{where}: 'no_rope_layers' must list {layers} entries, each 0 or 1")
    sliding = config_bool(config, "use_sliding_window", False, where)
    window = optional_window(config, None, where) if sliding else None
    default = [SLIDING_ATTENTION if window is not None and not f else FULL_ATTENTION for f in flags]
    return replace(spec, rope_layers=tuple(bool(f) for f in flags),
                   layer_windows=sliding_windows(config, layers, window, default, where))


# Dropout probabilities during training (SmolLM3Config: attention only).
DROPOUT = {"smollm3": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 has no smollm3 entry in its target mappings: the record takes peft's llama choice (LoRA on q_proj,
# v_proj; IA3 on k_proj, v_proj, down_proj, down_proj feed-forward), which the harness passes to peft.
SMOLLM3 = Family("smollm3", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/smollm3/"
                 "modeling_smollm3.py",
                 llama_layout, smollm3_block, DROPOUT["smollm3"], ("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"),
                 ("down_proj",),
                 architectures={"SmolLM3ForCausalLM": "causal_lm", "SmolLM3ForSequenceClassification": "seq_cls",
                                "SmolLM3Model": "base"},
                 default_task="causal_lm", read_config=smollm3_config, decoder=True, gated_mlp=True, final_norm="rms",
                 buffer_bytes=rotary_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True)
