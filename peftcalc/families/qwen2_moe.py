"""Qwen2-MoE (transformers models/qwen2_moe/modeling_qwen2_moe.py; Qwen1.5-MoE-A2.7B): Qwen2's attention (q/k/v
biases with qkv_bias, none on o_proj) and in every layer a Qwen2MoeSparseMoeBlock: the router (``gate``, softmax in
fp32, top-k, scores cast back to the logits' dtype), the routed experts (fused 3-D parameters, grouped_mm or
--experts batched_mm or eager), and a shared expert every token goes through (a gated SiLU MLP of nn.Linear,
shared_expert_intermediate_size) scaled by ``sigmoid(shared_expert_gate(x))`` (a Linear hidden -> 1).
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.errors import InputError
from peftcalc.families.llama import llama_attention_half, llama_config, rotary_buffer_bytes
from peftcalc.families.mixtral import attention_modules, experts_lora, experts_modules, experts_training, moe_settings
from peftcalc.families.record import Family
from peftcalc.layout import Layout, Module, decoder_head, linear_module, norm_module
from peftcalc.ops.experts import experts_forward
from peftcalc.ops.moe import drop_router_logits, router_top_k
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor, input_grads
from peftcalc.ops.tensor_ops import add, mul
from peftcalc.spec import ModelSpec, config_bool, config_int

__all__ = [
    "DROPOUT",
    "QWEN2_MOE",
    "qwen2_moe_block",
    "qwen2_moe_config",
    "qwen2_moe_layout",
    "shared_expert",
]


def qwen2_moe_layout(spec: ModelSpec) -> Layout:
    """Qwen2MoeForCausalLM: per block self_attn (q/k/v with biases, o without), mlp (gate, experts, shared_expert's
    gate_proj/up_proj/down_proj, shared_expert_gate), input_layernorm, post_attention_layernorm."""
    base = "" if spec.task == "base" else "model."
    h, si = spec.hidden_size, spec.shared_expert_intermediate_size
    mods = [Module(f"{base}embed_tokens", "embedding", (spec.vocab_size, h), False, None, "embed")]
    for i in range(spec.num_layers):
        p = f"{base}layers.{i}"
        mods += attention_modules(spec, p, i, spec.attention_bias)
        mods += experts_modules(spec, f"{p}.mlp", i)
        mods += [
            linear_module(f"{p}.mlp.shared_expert.gate_proj", si, h, False, i, "mlp"),
            linear_module(f"{p}.mlp.shared_expert.up_proj", si, h, False, i, "mlp"),
            linear_module(f"{p}.mlp.shared_expert.down_proj", h, si, False, i, "mlp_out"),
            linear_module(f"{p}.mlp.shared_expert_gate", 1, h, False, i, "mlp"),
            norm_module(f"{p}.input_layernorm", h, False, i),
            norm_module(f"{p}.post_attention_layernorm", h, False, i),
        ]
    mods.append(norm_module(f"{base}norm", h, False))
    head, out_emb, tied = decoder_head(spec, mods)
    return Layout(tuple(mods), f"{base}layers", f"{base}embed_tokens", head, out_emb, tied, f"{base}norm")


def shared_expert(rec: Recorder, spec: ModelSpec, sites, x: SymTensor, prefix: str) -> SymTensor:
    """Qwen2MoeMLP.forward: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, each intermediate going as the
    expression proceeds (the ops of families.llama.llama_mlp_half's MLP)."""
    h, inter = spec.hidden_size, spec.shared_expert_intermediate_size
    g = sites.linear(rec, x, f"{prefix}.gate_proj", h, inter)
    act = activation(rec, g, spec.hidden_act, f"{prefix}.act_fn")
    rec.free(g)
    u = sites.linear(rec, x, f"{prefix}.up_proj", h, inter)
    p = mul(rec, act, u, f"{prefix}.act_mul")
    rec.free(act, u)
    d = sites.linear(rec, p, f"{prefix}.down_proj", inter, h)
    rec.free(p)
    return d


def _sigmoid(rec: Recorder, x: SymTensor, tag: str) -> SymTensor:
    """F.sigmoid: saves its output (sigmoid_backward(grad, result)), a new gradient like x."""
    y = rec.new(x.numel, x.dtype, x.requires_grad)
    if x.requires_grad:
        rec.node(y, *input_grads(x), saved=[rec.save(y, f"{tag}.output")])
    return y


def qwen2_moe_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """Qwen2MoeDecoderLayer.forward with Qwen2MoeSparseMoeBlock.forward: the shared expert first, then the router
    and the routed experts, then ``sigmoid(shared_expert_gate(x)) * shared`` (the shared output goes once the
    product is made) and the sum of the two."""
    h = spec.hidden_size
    x2 = llama_attention_half(rec, spec, sites, x, DROPOUT)
    n2 = rms_norm(rec, x2, sites.norm_trains("post_attention_layernorm"), "post_attention_layernorm")
    shared = shared_expert(rec, spec, sites, n2, "mlp.shared_expert")
    logits, weights, idx = router_top_k(rec, n2, h, spec.num_experts, spec.experts_per_token,
                                        sites.param_trains("mlp.gate.weight"), spec.norm_topk_prob, "mlp.gate",
                                        scores_in_logits_dtype=True)
    routed = experts_forward(rec, n2, weights, idx, h, spec.expert_intermediate_size, spec.num_experts,
                                *experts_training(sites, "mlp.experts"), spec.hidden_act, "mlp.experts",
                                **experts_lora(sites, "mlp.experts"))
    gl = sites.linear(rec, n2, "mlp.shared_expert_gate", h, 1)
    sg = _sigmoid(rec, gl, "mlp.shared_expert_gate.sigmoid")
    rec.free(gl)
    scaled = mul(rec, sg, shared, "mlp.shared_expert_scale")
    rec.free(sg, shared)
    m = add(rec, routed, scaled)
    rec.free(routed, scaled, weights.base or weights, idx, n2)
    drop_router_logits(rec, logits)
    out = add(rec, x2, m, x2.dtype)
    rec.free(m, x2)
    return out


def qwen2_moe_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Qwen2MoeConfig: Qwen2's attention (qkv_bias, default true), num_experts (60), num_experts_per_tok (4),
    moe_intermediate_size (1408), shared_expert_intermediate_size (5632), norm_topk_prob (false). Only models whose
    every layer is sparse are modelled (decoder_sparse_step 1, no mlp_only_layers: Qwen1.5-MoE-A2.7B)."""
    if config.get("use_sliding_window") is True:
        raise InputError(f"{where}: a Qwen2-MoE with use_sliding_window is not modelled")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise InputError(f"{where}: dense layers inside a Qwen2-MoE (mlp_only_layers, decoder_sparse_step != 1) are "
                         "not modelled")
    config = {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
              "shared_expert_intermediate_size": 5632, **config}
    spec = llama_config(config, common, where)
    return replace(spec, attention_bias=config_bool(config, "qkv_bias", True, where),
                   shared_expert_intermediate_size=config_int(config, "shared_expert_intermediate_size", where),
                   **moe_settings(config, where, "num_experts", "moe_intermediate_size", None))


# Dropout probabilities during training, from the transformers config defaults (attention only).
DROPOUT = {"qwen2_moe": {"attn": ("attention_dropout", 0.0)}}

# peft 0.21 has no default LoRA targets for qwen2_moe (constants.py): the harness names Qwen2's q_proj, v_proj
QWEN2_MOE = Family(
    "qwen2_moe",
    "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_moe/modeling_qwen2_moe.py",
    qwen2_moe_layout, qwen2_moe_block, DROPOUT["qwen2_moe"], ("q_proj", "v_proj"),
    architectures={"Qwen2MoeForCausalLM": "causal_lm", "Qwen2MoeForSequenceClassification": "seq_cls",
                   "Qwen2MoeModel": "base"},
    default_task="causal_lm", read_config=qwen2_moe_config, decoder=True, final_norm="rms",
    buffer_bytes=rotary_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True)
