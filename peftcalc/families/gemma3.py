"""Gemma 3's text model (transformers models/gemma3/modeling_gemma3.py, model_type "gemma3_text": Gemma3ForCausalLM,
the 1B checkpoint, and the text_config of the 4B/12B/27B Gemma3ForConditionalGeneration): Gemma 2's block
(families.gemma2) with q_norm/k_norm (Gemma RMSNorm over head_dim) before RoPE, five sliding-window layers
(512 or 1,024 tokens) to one global, local RoPE (rope_local_base_freq, 10,000) on the sliding layers and the
global base on the others (Gemma3RotaryEmbedding: a cos/sin per layer type), a 262k vocabulary, and no
soft-capping by default (Gemma3Attention never passes a softcap to the attention interface). SDPA is the
default attention (_supports_sdpa True).
"""

from __future__ import annotations

from peftcalc.families.gemma2 import gemma_family

__all__ = [
    "GEMMA3_TEXT",
]

GEMMA3_TEXT = gemma_family("gemma3_text", "Gemma3Text", "Gemma3")
