"""Granite 3.x (transformers models/granite/modeling_granite.py): Llama's decoder with IBM's muP multipliers:
the token embeddings times `embedding_multiplier`, each block's attention and MLP outputs times
`residual_multiplier` before their residual adds, the attention scores scaled by `attention_multiplier` (SDPA's
`scale` argument or eager's product: no tensor of its own), and the logits divided by `logits_scaling`.
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.families.llama import llama_attention_half, llama_config, llama_layout, llama_mlp_half, rotary_buffer_bytes
from peftcalc.families.record import Family
from peftcalc.layout import Layout
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import scale
from peftcalc.spec import ModelSpec

__all__ = [
    "DROPOUT",
    "GRANITE",
    "granite_block",
    "granite_config",
    "granite_embeddings",
]


def granite_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """GraniteDecoderLayer.forward: LlamaDecoderLayer's ops with ``residual + hidden_states *
    self.residual_multiplier`` after the attention and after the MLP (families.llama.residual_scaled)."""
    x2 = llama_attention_half(rec, spec, sites, x, DROPOUT, residual_multiplier=True)
    return llama_mlp_half(rec, spec, sites, x2, residual_multiplier=True)


def granite_embeddings(rec: Recorder, spec: ModelSpec, layout: Layout, sites, x: SymTensor) -> SymTensor:
    """GraniteModel.forward's ``inputs_embeds = inputs_embeds * self.embedding_multiplier``: a new tensor (the
    lookup dropped when rebound); its backward scales the gradient (a new one)."""
    y = scale(rec, x)
    rec.free(x)
    return y


def granite_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """GraniteConfig (configuration_granite.py): LlamaConfig's fields (GQA, attention_bias on q/k/v/o, mlp_bias,
    tie_word_embeddings default false) and the four multipliers, of which only the logits' division makes a
    tensor the other three do not already have (ModelSpec.logits_scaled); GraniteForCausalLM divides whatever
    logits_scaling is (1.0 by default)."""
    return replace(llama_config(config, common, where, read_part), logits_scaled=True)


# Dropout probabilities during training (GraniteConfig: attention only).
DROPOUT = {"granite": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 has no granite entry in its target mappings: the record takes peft's llama choice (LoRA on q_proj,
# v_proj; IA3 on k_proj, v_proj, down_proj, down_proj feed-forward), which the harness passes to peft.
# embeddings_add_positions: the model's forward makes a new tensor from inputs_embeds (the product), so peft's
# hooked lookup and prompt tuning's concatenation are held beside the tensor the blocks get, as OPT's sum is.
GRANITE = Family("granite", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/granite/"
                 "modeling_granite.py",
                 llama_layout, granite_block, DROPOUT["granite"], ("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"),
                 ("down_proj",),
                 architectures={"GraniteForCausalLM": "causal_lm", "GraniteModel": "base"},
                 default_task="causal_lm", read_config=granite_config, decoder=True, gated_mlp=True, final_norm="rms",
                 embeddings=granite_embeddings, buffer_bytes=rotary_buffer_bytes, rotary=True, passes_position_ids=True,
                 embeddings_add_positions=True, prefix_kv_dim=True)
