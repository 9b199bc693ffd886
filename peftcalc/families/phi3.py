"""Phi-3 and Phi-4 (transformers models/phi3/modeling_phi3.py): Llama's pre-RMSNorm decoder with the q/k/v
projections fused into one `qkv_proj` and the gate/up projections into one `gate_up_proj` (LoRA on a fused
module adapts all its outputs at once), residual dropout (resid_pdrop), RoPE applied through a rotary/pass
split, and a sliding window on every layer when the config has one (Phi-3-mini-4k: 2,047).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.families.llama import config_head_dim, config_kv_heads, rotary_buffer_bytes
from peftcalc.families.record import Family, config_dropout
from peftcalc.layout import Layout, Module, decoder_layout, linear_module, norm_module
from peftcalc.ops.attention import attention
from peftcalc.ops.nonlinear import activation
from peftcalc.ops.norms import rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.rotary import rope
from peftcalc.ops.tensor_ops import add, clone, dropout, heads_view, mul
from peftcalc.spec import ModelSpec, config_bool, config_int, config_str, encoder_sizes, optional_window

__all__ = [
    "DROPOUT",
    "PHI3",
    "phi3_block",
    "phi3_buffer_bytes",
    "phi3_config",
    "phi3_layout",
    "phi3_mlp",
    "phi3_rope",
    "sliced",
]


def phi3_layout(spec: ModelSpec) -> Layout:
    """Phi3ForCausalLM (modeling_phi3.py), in named_modules() order: embed_tokens; per layer Phi3Attention's
    o_proj (defined first) and qkv_proj (q_dim + 2 kv_dim outputs), Phi3MLP's gate_up_proj (2 x intermediate)
    and down_proj, no biases; input_layernorm, post_attention_layernorm; norm; lm_head (untied)."""
    return decoder_layout(spec, _phi3_block_modules)


def _phi3_block_modules(spec: ModelSpec, p: str, i: int) -> list[Module]:
    h = spec.hidden_size
    return [
        linear_module(f"{p}.self_attn.o_proj", h, spec.q_dim, False, i, "attn_out"),
        linear_module(f"{p}.self_attn.qkv_proj", spec.q_dim + 2 * spec.kv_dim, h, False, i, "attn"),
        linear_module(f"{p}.mlp.gate_up_proj", 2 * spec.intermediate_size, h, False, i, "mlp"),
        linear_module(f"{p}.mlp.down_proj", h, spec.intermediate_size, False, i, "mlp_out"),
        norm_module(f"{p}.input_layernorm", h, False, i),
        norm_module(f"{p}.post_attention_layernorm", h, False, i),
    ]


def sliced(rec: Recorder, x: SymTensor, numel: int) -> SymTensor:
    """x[..., a:b]: a view; its backward (slice_backward) makes zeros like x and copies the gradient in."""
    v = rec.view(x, numel)
    rec.node(v, [("new", "d", x.nbytes)], [(x.id, "d")])
    return v


def phi3_rope(rec: Recorder, spec: ModelSpec, x: SymTensor) -> SymTensor:
    """Phi-3's apply_rotary_pos_emb: ``cat([rope(x[..., :rotary_dim]), x[..., rotary_dim:]], dim=-1)`` with
    rotary_dim = cos.shape[-1] (ModelSpec.rope_dim: head_dim unless partial_rotary_factor < 1, Phi-4-mini's 96
    of 128): both slices are views whose backward makes a gradient like x (the pass-through slice's too: zeros
    where the rotary dims are, even when it is empty), the rotated part is ops.rotary.rope on its slice (its
    products and rotate_half's cat the slice's size), the cat a new tensor whose backward hands views of its
    gradient on; the rotated tensor is dropped once concatenated."""
    rotated = x.numel // spec.head_dim * spec.rope_dim
    rot, passed = sliced(rec, x, rotated), sliced(rec, x, x.numel - rotated)
    r = rope(rec, rot)
    out = rec.new(x.numel, r.dtype, r.requires_grad)
    rec.node(out, outputs=[(r.id, "g"), (passed.id, "g")])
    rec.free(r)
    return out


def phi3_mlp(rec: Recorder, spec: ModelSpec, sites, n: SymTensor) -> SymTensor:
    """Phi3MLP.forward: gate_up_proj, ``gate, up_states = up_states.chunk(2, dim=-1)`` (views; the split's
    backward concatenates both gradients into a new one once both have arrived), ``up_states *
    activation_fn(gate)``, down_proj. The view `gate` keeps gate_up_proj's output alive until the MLP returns."""
    i = spec.intermediate_size
    gu = sites.linear(rec, n, "mlp.gate_up_proj", spec.hidden_size, 2 * i)
    gate, up = rec.view(gu, gu.numel // 2), rec.view(gu, gu.numel // 2)
    rec.node(gate, [("new", "d", gu.nbytes)], [(gu.id, "d")])
    rec.node(up, hold=gate.id)  # its gradient waits for the gate's, then both go into the cat
    act = activation(rec, gate, spec.hidden_act, "mlp.activation_fn")
    p = mul(rec, up, act, "mlp.act_mul")
    rec.free(act)
    d = sites.linear(rec, p, "mlp.down_proj", i, spec.hidden_size)
    d = sites.adapt(rec, d, "mlp_out", "mlp.down_proj")
    rec.free(p, gu)  # the local `gate` (a view of gate_up_proj's output) lives until forward returns
    return d


def phi3_block(rec: Recorder, spec: ModelSpec, sites, x: SymTensor) -> SymTensor:
    """Phi3DecoderLayer: input_layernorm, qkv_proj sliced into q, k, v (views of one output: each slice's
    backward makes a gradient of the whole projection's size), viewed as heads, RoPE (phi3_rope), attention
    (a sliding window on every layer when the config has one), o_proj, resid_attn_dropout, the residual add;
    post_attention_layernorm, the MLP (phi3_mlp), resid_mlp_dropout, the residual add."""
    ctx = rec.ctx
    h = spec.hidden_size
    p_drop = config_dropout(spec, DROPOUT, "resid")
    n = rms_norm(rec, x, sites.norm_trains("input_layernorm"), "input_layernorm")
    qkv = sites.linear(rec, n, "self_attn.qkv_proj", h, spec.q_dim + 2 * spec.kv_dim)
    tok = qkv.numel // (spec.q_dim + 2 * spec.kv_dim)
    qs, ks, vs = sliced(rec, qkv, tok * spec.q_dim), sliced(rec, qkv, tok * spec.kv_dim), sliced(rec, qkv, tok * spec.kv_dim)
    q, k = heads_view(rec, qs, clone=True), heads_view(rec, ks, clone=True)
    v = heads_view(rec, vs, clone=ctx.attention == "eager")
    q, k = phi3_rope(rec, spec, q), phi3_rope(rec, spec, k)
    a = attention(rec, spec, q, k, v, config_dropout(spec, DROPOUT, "attn"), "self_attn.attention", replaced=(k,),
                  fp32_softmax=True, window=sites.window)
    if ctx.attention != "eager":
        # the cat left q contiguous as (b, heads, s, d), and SDPA's output takes q's layout: sdpa_attention_forward's
        # ``attn_output.transpose(1, 2).contiguous()`` copies it (Llama's RoPE output keeps the projection's layout,
        # where the copy is a no-op); CloneBackward hands the gradient on
        ac = clone(rec, a)
        rec.free(a)
        a = ac
    o = sites.linear(rec, a, "self_attn.o_proj", spec.q_dim, h)
    o = sites.adapt(rec, o, "attn_out", "self_attn.o_proj")
    rec.free(a, q, k, qkv, n)
    od = dropout(rec, o, p_drop, "resid_attn_dropout")
    if od is not o:
        rec.free(o)
    x2 = add(rec, x, od, x.dtype)
    rec.free(od)
    n2 = rms_norm(rec, x2, sites.norm_trains("post_attention_layernorm"), "post_attention_layernorm")
    d = phi3_mlp(rec, spec, sites, n2)
    rec.free(n2)
    dd = dropout(rec, d, p_drop, "resid_mlp_dropout")
    if dd is not d:
        rec.free(d)
    out = add(rec, x2, dd, x2.dtype)
    rec.free(dd, x2)
    return out


def phi3_buffer_bytes(spec: ModelSpec) -> int:
    """The rotary embedding's inv_freq and original_inv_freq (families.llama.rotary_buffer_bytes), and with LongRoPE
    (rope_scaling type "longrope": Phi-3-mini-128k, Phi-4-mini) the ``long_inv_freq`` that
    modeling_rope_utils.dynamic_rope_update's longrope_frequency_update computes at the first forward and keeps as
    a plain attribute: rope_dim / 2 more fp32 values, alive from then on (traced: Phi-4-mini LoRA b1 s2048
    checkpointed, fake, 192 B)."""
    rope = spec.hf_config.get("rope_parameters") or spec.hf_config.get("rope_scaling") or {}
    longrope = isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "longrope"
    return rotary_buffer_bytes(spec) + (spec.rope_dim // 2 * 4 if longrope else 0)


def _partial_rotary_factor(config: dict) -> float:
    """Phi3Config.convert_rope_params_to_dict: rope_parameters / rope_scaling's partial_rotary_factor, else the
    config's own, else 1.0."""
    rope_params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    value = rope_params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) if isinstance(
        rope_params, dict) else config.get("partial_rotary_factor", 1.0)
    return float(value if value is not None else 1.0)


def phi3_config(config: dict, common: dict, where: str, read_part=None) -> ModelSpec:
    """Phi3Config (configuration_phi3.py): GQA (num_key_value_heads, default the heads), head_dim (the modeling
    file reads ``getattr(config, "head_dim", hidden / heads)``), sliding_window (default none; every layer slides
    when set: Phi3Model.forward builds one create_sliding_window_causal_mask), tie_word_embeddings (false),
    the partial rotary factor (Phi-4-mini's 0.75: Phi3RotaryEmbedding.compute_default_rope_parameters' ``dim =
    int(head_dim * partial_rotary_factor)``, ModelSpec.rotary_dim)."""
    hidden, heads, layers, intermediate = encoder_sizes(config, where)
    kv_heads = config_kv_heads(config, heads, where)
    head_dim = config_head_dim(config, hidden, heads, where)
    factor = _partial_rotary_factor(config)
    if not 0.0 < factor <= 1.0 or int(head_dim * factor) % 2:
        raise InputError(f"{where}: partial_rotary_factor {factor} must be in (0, 1] and rotate an even number of "
                         f"the {head_dim} head dims")
    window = optional_window(config, None, where)
    return ModelSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * factor) if factor < 1.0 else 0,
        intermediate_size=intermediate,
        vocab_size=config_int(config, "vocab_size", where),
        tie_embeddings=config_bool(config, "tie_word_embeddings", False, where),
        hidden_act=config_str(config, "hidden_act", "silu", where),
        layer_windows=(window,) * layers if window else (),
        **common,
    )


# Dropout probabilities during training (Phi3Config: attention, and the residual dropouts after the attention
# and the MLP; embd_pdrop is read by no module of modeling_phi3.py).
DROPOUT = {"phi3": {"attn": ("attention_dropout", 0.0), "resid": ("resid_pdrop", 0.0)}}

# peft 0.21 has no phi3 entry in its target mappings: the record takes peft's llama choice on the fused modules
# that hold those projections (LoRA on qkv_proj for q_proj, v_proj; IA3 on qkv_proj and down_proj, down_proj
# feed-forward), which the harness passes to peft.
PHI3 = Family("phi3", "https://github.com/huggingface/transformers/blob/main/src/transformers/models/phi3/modeling_phi3.py",
              phi3_layout, phi3_block, DROPOUT["phi3"], ("qkv_proj",), ("qkv_proj", "down_proj"), ("down_proj",),
              architectures={"Phi3ForCausalLM": "causal_lm", "Phi3ForSequenceClassification": "seq_cls",
                             "Phi3Model": "base"},
              default_task="causal_lm", read_config=phi3_config, decoder=True, gated_mlp=True, final_norm="rms",
              buffer_bytes=phi3_buffer_bytes, rotary=True, passes_position_ids=True, prefix_kv_dim=True)
