"""Mixtral (transformers models/mixtral/modeling_mixtral.py): Mistral's attention with a sparse mixture-of-experts
MLP. Each block's ``mlp`` is a MixtralSparseMoeBlock: a top-k router (``mlp.gate.weight``, E x hidden, a bare
parameter used through F.linear) and MixtralExperts, the experts stored fused as two 3-D parameters
(``mlp.experts.gate_up_proj`` E x 2I x hidden, ``mlp.experts.down_proj`` E x hidden x I), run by transformers'
default experts implementation, ``grouped_mm``, ``batched_mm`` or the eager loop (--experts; peftcalc.ops.experts.experts_forward).
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.errors import InputError
from peftcalc.families.llama import llama_attention_half, llama_config, rotary_buffer_bytes
from peftcalc.families.record import Family
from peftcalc.layout import Layout, Module, attention_modules, decoder_head, norm_module
from peftcalc.ops.experts import experts_forward
from peftcalc.ops.moe import drop_router_logits, router_top_k
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import add
from peftcalc.spec import ModelSpec, config_bool, config_int, optional_window

__all__ = [
    "DROPOUT",
    "MIXTRAL",
    "attention_modules",
    "experts_lora",
    "experts_modules",
    "experts_training",
    "mixtral_block",
    "mixtral_config",
    "mixtral_layout",
    "moe_mlp",
    "moe_settings",
]


def experts_modules(spec: ModelSpec, p: str, i: int) -> list[Module]:
    """The router's weight and the fused experts of one sparse MoE block at prefix `p` (bare parameters:
    kind "param", the path is the parameter's name): gate (E, hidden), gate_up_proj (E, 2I, hidden), down_proj
    (E, hidden, I)."""
    e, h, inter = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
    return [
        Module(f"{p}.gate.weight", "param", (e, h), False, i, "router"),
        Module(f"{p}.experts.gate_up_proj", "param", (e, 2 * inter, h), False, i, "experts"),
        Module(f"{p}.experts.down_proj", "param", (e, h, inter), False, i, "experts"),
    ]


def mixtral_layout(spec: ModelSpec) -> Layout:
    """MixtralForCausalLM (modeling_mixtral.py): per block self_attn (q/k/v/o, no biases), mlp (gate, experts),
    input_layernorm, post_attention_layernorm (RMSNorm, weight only)."""
    base = "" if spec.task == "base" else "model."
    h = spec.hidden_size
    mods = [Module(f"{base}embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed")]
    for i in range(spec.num_layers):
        p = f"{base}layers.{i}"
        mods += attention_modules(spec, p, i)
        mods += experts_modules(spec, f"{p}.mlp", i)
        mods += [norm_module(f"{p}.input_layernorm", h, False, i), norm_module(f"{p}.post_attention_layernorm", h, False, i)]
    mods.append(norm_module(f"{base}norm", h, False))
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}layers", f"{base}embed_tokens", head, out_emb, tied, f"{base}norm")


def moe_mlp(rec: Recorder, spec: ModelSpec, sites, x: SymTensor, prefix: str = "mlp") -> SymTensor:
    """MixtralSparseMoeBlock.forward (router_jitter_noise 0, the default): the router on the flattened tokens,
    then the experts (ops.experts.experts_forward: grouped_mm, the default experts implementation, batched_mm or the eager loop); the router's logits, the top-k weights
    and indices are locals of the block until it returns."""
    logits, weights, idx = router_top_k(rec, x, spec.hidden_size, spec.num_experts, spec.experts_per_token,
                                        sites.param_trains(f"{prefix}.gate.weight"), spec.norm_topk_prob,
                                        f"{prefix}.gate")
    out = experts_forward(rec, x, weights, idx, spec.hidden_size, spec.expert_intermediate_size, spec.num_experts,
                             *experts_training(sites, f"{prefix}.experts"), spec.hidden_act, f"{prefix}.experts",
                             **experts_lora(sites, f"{prefix}.experts"))
    rec.free(weights.base or weights, idx)
    drop_router_logits(rec, logits)
    return out


def experts_training(sites, prefix: str) -> tuple:
    """(whether gate_up_proj and down_proj train,) of the fused experts at `prefix`."""
    return ((sites.param_trains(f"{prefix}.gate_up_proj"), sites.param_trains(f"{prefix}.down_proj")),)


def experts_lora(sites, prefix: str) -> dict:
    """The LoRA ranks on the fused experts at `prefix` (peft target_parameters) and LoRA's scaling."""
    lora = (sites.param_lora(f"{prefix}.gate_up_proj"), sites.param_lora(f"{prefix}.down_proj"))
    return {"lora": lora, "scaling": sites.lora_scaling()} if any(lora) else {}


def mixtral_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """MixtralDecoderLayer.forward: Mistral's attention half (families.llama), then ``residual +
    mlp(post_attention_layernorm(x))`` with the sparse MoE block as the MLP."""
    x2 = llama_attention_half(rec, spec, sites, x, DROPOUT)
    n2 = rms_norm(rec, x2, sites.norm_trains("post_attention_layernorm"), "post_attention_layernorm")
    m = moe_mlp(rec, spec, sites, n2)
    rec.free(n2)
    out = add(rec, x2, m, x2.dtype)
    rec.free(m, x2)
    return out


def moe_settings(config: dict, where: str, experts_key: str, inter_key: str, norm_topk: bool | None) -> dict:
    """The MoE fields of a spec (ModelSpec.num_experts ...): the experts (`experts_key`), num_experts_per_tok
    (at most the experts), one expert's intermediate size (`inter_key`), norm_topk_prob (fixed by the model
    when `norm_topk` is not None, else the config's, default false), output_router_logits (default false)."""
    experts = config_int(config, experts_key, where)
    top_k = config_int(config, "num_experts_per_tok", where)
    if top_k > experts:
        raise InputError(f"{where}: num_experts_per_tok ({top_k}) is larger than {experts_key} ({experts})")
    return dict(num_experts=experts, experts_per_token=top_k, expert_intermediate_size=config_int(config, inter_key, where),
                norm_topk_prob=config_bool(config, "norm_topk_prob", False, where) if norm_topk is None else norm_topk,
                output_router_logits=config_bool(config, "output_router_logits", False, where))


def mixtral_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """MixtralConfig: Mistral's fields (num_key_value_heads, head_dim) plus num_local_experts (default 8),
    num_experts_per_tok (2), intermediate_size as each expert's, sliding_window (default none); MixtralTopKRouter
    always renormalizes the top-k weights."""
    config = {"num_local_experts": 8, "num_experts_per_tok": 2, **config}
    spec = llama_config(config, common, where)
    window = optional_window(config, None, where)  # MixtralModel: a sliding-window mask on every layer when set
    return replace(spec, layer_windows=(window,) * spec.num_layers if window else (),
                   **moe_settings(config, where, "num_local_experts", "intermediate_size", True))


# Dropout probabilities during training, from the transformers config defaults (attention only).
DROPOUT = {"mixtral": {"attn": ("attention_dropout", 0.0)}}

MIXTRAL = Family(
    "mixtral", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/mixtral/modeling_mixtral.py",
    mixtral_layout, mixtral_block, DROPOUT["mixtral"], ("q_proj", "v_proj"), ("k_proj", "v_proj", "w2"), ("w2",),
    architectures={"MixtralForCausalLM": "causal_lm", "MixtralForSequenceClassification": "seq_cls", "MixtralModel": "base"},
    default_task="causal_lm", read_config=mixtral_config, decoder=True, final_norm="rms", buffer_bytes=rotary_buffer_bytes,
    rotary=True, passes_position_ids=True, prefix_kv_dim=True)
