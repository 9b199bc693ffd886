"""The dense families of issue 12 (qwen3, olmo2, phi3, standalone opt) and the registry entries added with them, held
to the real transformers/peft models on the meta device, and the instruct/chat repo ids of the registry as
aliases of their base entries.

test_params.py counts every registry model against the real model for every method; this file adds the checks
particular to the new families (their norms' shapes, the config fields they read, the configs they refuse) and
the aliases."""

import pytest
import torch

from measure.build import build_base_model, build_model, count_params
from peftcalc.api import estimate
from peftcalc.config import load_spec, registry_aliases, registry_configs
from peftcalc.errors import InputError
from peftcalc.families import FAMILIES, build_layout
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.layout import param_names

NEW_ENTRIES = ["qwen3-0.6b", "qwen3-8b", "qwen3-32b", "mistral-nemo-12b", "mistral-7b-v0.3", "opt-1.3b", "olmo-2-7b",
               "phi-3-mini-4k", "phi-3-medium-4k", "phi-4", "phi-4-mini", "granite-3.3-8b",
               "smollm3-3b"]


@pytest.mark.parametrize("name", NEW_ENTRIES)
def test_layout_names_and_shapes_are_the_real_models(name):
    """Every parameter of the real model (meta device), by name and numel, is in the layout, and nothing else
    (tied weights once, as named_parameters() lists them)."""
    spec = load_spec(name)
    model = build_base_model(spec)
    real = {n: p.numel() for n, p in model.named_parameters()}
    ours = dict(pn for m in build_layout(spec).modules for pn in param_names(m))
    assert ours == real


@pytest.mark.parametrize("settings", [
    MethodSettings("lora", rank=16, targets="all-linear", dora=True),
    MethodSettings("ia3"),
    MethodSettings("prefix"),
], ids=lambda s: s.method)
@pytest.mark.parametrize("name", ["qwen3-0.6b", "opt-1.3b", "olmo-2-7b", "phi-3-mini-4k", "phi-4-mini", "granite-3.3-8b",
                                  "smollm3-3b"])
def test_method_counts_are_the_real_peft_models(name, settings):
    """Trainable and total counts of peft's models on the new families (their default IA3 targets, prefix
    tuning's key/value width), as test_params.py checks for every registry model."""
    spec = load_spec(name)
    plan = make_plan(spec, settings)
    assert (plan.total, plan.trainable) == count_params(build_model(spec, settings))


def test_qwen3_head_norms_are_over_head_dim():
    """Qwen3Attention's q_norm and k_norm are RMSNorms over head_dim (128 in every Qwen3 config): 2 x 128
    weights per layer, 28 layers in Qwen3-0.6B; OLMo 2's are over the whole projections (4096 each)."""
    qwen = build_layout(load_spec("qwen3-0.6b"))
    norms = [m for m in qwen.modules if m.path.endswith(("q_norm", "k_norm"))]
    assert len(norms) == 2 * 28 and {m.numel for m in norms} == {128}
    olmo = build_layout(load_spec("olmo-2-7b"))
    assert {m.numel for m in olmo.modules if m.path.endswith(("q_norm", "k_norm"))} == {4096}


def test_qwen3_0_6b_counts_by_hand():
    """Qwen3-0.6B (tied embeddings): 151,936 x 1,024 embeddings + 28 layers x (q 1,024 x 2,048, k and v
    1,024 x 1,024, o 2,048 x 1,024, MLP 3 x 1,024 x 3,072, q/k norms 2 x 128, two RMSNorms 2 x 1,024) + the
    final norm; LoRA r8 on q_proj, v_proj: 28 x 8 x ((1,024 + 2,048) + (1,024 + 1,024))."""
    layer = 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 3 * 1024 * 3072 + 2 * 128 + 2 * 1024
    plan = make_plan(load_spec("qwen3-0.6b"), MethodSettings("lora", rank=8))
    assert plan.total - plan.trainable == 151936 * 1024 + 28 * layer + 1024 == 596_049_920
    assert plan.trainable == 28 * 8 * (3072 + 2048) == 1_146_880


def test_phi3_counts_by_hand():
    """Phi-3-mini-4k (3.8B, Microsoft's model card): 32,064 x 3,072 embeddings and lm_head + 32 layers x
    (qkv_proj 3,072 x 9,216, o_proj 3,072 x 3,072, gate_up_proj 3,072 x 16,384, down_proj 8,192 x 3,072, two
    RMSNorms) + the final norm; LoRA r8 on the fused qkv_proj: 32 x 8 x (3,072 + 9,216). Phi-3-mini-4k slides
    every layer over 2,047 tokens; Phi-4 (model_type phi3) has no window."""
    layer = 3072 * 9216 + 3072 * 3072 + 3072 * 16384 + 8192 * 3072 + 2 * 3072
    plan = make_plan(load_spec("phi-3-mini-4k"), MethodSettings("lora", rank=8))
    assert plan.total - plan.trainable == 2 * 32064 * 3072 + 32 * layer + 3072 == 3_821_079_552
    assert plan.trainable == 32 * 8 * (3072 + 9216) == 3_145_728
    assert load_spec("phi-3-mini-4k").layer_windows == (2047,) * 32 and load_spec("phi-4").layer_windows == ()


def test_phi4_mini_partial_rotary():
    """Phi-4-mini (partial_rotary_factor 0.75, head_dim 3,072 / 24 = 128): RoPE on int(128 x 0.75) = 96 dims of
    each head, so the rotary embedding's inv_freq and original_inv_freq buffers hold 48 fp32 values each (the real
    model's, meta device), 48 more for LongRoPE; 3,836,021,760 parameters with the 200,064 x 3,072 embeddings tied: 32 layers x (qkv_proj
    3,072 x (3,072 + 2 x 1,024), o_proj 3,072 x 3,072, gate_up_proj 3,072 x 16,384, down_proj 8,192 x 3,072, two
    RMSNorms) + the final norm. A factor that leaves an odd number of rotated dims is refused."""
    spec = load_spec("phi-4-mini")
    assert (spec.head_dim, spec.rope_dim) == (128, 96)
    buffers = {n: b.numel() for n, b in build_base_model(spec).named_buffers()}
    assert buffers == {"model.rotary_emb.inv_freq": 48, "model.rotary_emb.original_inv_freq": 48}
    # and LongRoPE's long_inv_freq, kept after the first forward (traced: the long row's 192 B)
    assert FAMILIES["phi3"].buffer_bytes(spec) == 2 * 48 * 4 + 48 * 4
    layer = 3072 * 5120 + 3072 * 3072 + 3072 * 16384 + 8192 * 3072 + 2 * 3072
    assert make_plan(spec, MethodSettings("full")).total == 200064 * 3072 + 32 * layer + 3072 == 3_836_021_760
    config = {k: v for k, v in registry_configs()["phi-4"].items() if not k.startswith("_")}
    assert load_spec({**config, "partial_rotary_factor": 1.0}).rope_dim == 128
    with pytest.raises(InputError, match="partial_rotary_factor"):
        load_spec({**config, "partial_rotary_factor": 0.7})  # int(128 x 0.7) = 89


def test_granite_3_3_8b_counts_by_hand():
    """Granite-3.3-8B (tied embeddings): 49,159 x 4,096 + 40 layers x (q and o 4,096 x 4,096, k and v 4,096 x
    1,024, MLP 3 x 4,096 x 12,800, two RMSNorms) + the final norm = 8,170,864,640; LoRA r8 on q_proj and v_proj:
    40 x 8 x ((4,096 + 4,096) + (4,096 + 1,024)). The logits are divided by logits_scaling (16): a tensor of
    their own (ModelSpec.logits_scaled)."""
    spec = load_spec("granite-3.3-8b")
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12800 + 2 * 4096
    plan = make_plan(spec, MethodSettings("lora", rank=8))
    assert plan.total - plan.trainable == 49159 * 4096 + 40 * layer + 4096 == 8_170_864_640
    assert plan.trainable == 40 * 8 * (8192 + 5120) == 4_259_840
    assert spec.logits_scaled and spec.tie_embeddings


def test_smollm3_nope_layers_are_the_real_models():
    """SmolLM3-3B: no_rope_layers (1 = RoPE) is SmolLM3Attention.use_rope of each of the 36 layers of the real model
    (meta device): every fourth layer is NoPE; without the list, no_rope_layer_interval (default 4) makes the same
    one. 3,075,098,624 parameters: 128,256 x 2,048 tied embeddings + 36 x (q and o 2,048 x 2,048, k and v 2,048 x
    512, MLP 3 x 2,048 x 11,008, two RMSNorms) + the final norm."""
    spec = load_spec("smollm3-3b")
    real = tuple(bool(layer.self_attn.use_rope) for layer in build_base_model(spec).model.layers)
    assert spec.rope_layers == real and real.count(False) == 9 and not real[3] and real[4]
    config = {k: v for k, v in registry_configs()["smollm3-3b"].items() if not k.startswith("_")}
    config.pop("no_rope_layers")
    assert load_spec(config).rope_layers == real
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 11008 + 2 * 2048
    assert make_plan(spec, MethodSettings("full")).total == 128256 * 2048 + 36 * layer + 2048 == 3_075_098_624
    with pytest.raises(InputError, match="no_rope_layers"):
        load_spec({**config, "no_rope_layers": [1, 0]})


def test_mistral_reader_honours_head_dim():
    """Mistral-Nemo's head_dim is 128, not hidden / heads (5,120 / 32 = 160): q_proj is 5,120 -> 4,096."""
    spec = load_spec("mistral-nemo-12b")
    assert spec.head_dim == 128
    q = next(m for m in build_layout(spec).modules if m.path.endswith("layers.0.self_attn.q_proj"))
    assert q.shape == (32 * 128, 5120)


@pytest.mark.parametrize("change, message", [
    ({"word_embed_proj_dim": 512}, "word_embed_proj_dim"),
    ({"do_layer_norm_before": False}, "do_layer_norm_before"),
    ({"enable_bias": False}, "without biases"),
    ({"layerdrop": 0.1}, "layerdrop"),
])
def test_opt_shapes_the_layout_does_not_mirror_are_refused(change, message):
    """OPT-350m's project_in/project_out and post-LayerNorm blocks, bias-free OPT and LayerDrop: one clear line."""
    config = {k: v for k, v in registry_configs()["opt-1.3b"].items() if not k.startswith("_")}
    with pytest.raises(InputError, match=message):
        load_spec({**config, **change})


def test_qwen3_reads_sliding_windows_as_qwen2_does():
    """Qwen3Config.__post_init__ is Qwen2Config's: no window unless use_sliding_window, then the layers from
    max_window_layers up slide (transformers builds both masks: Qwen3Model.forward's causal_mask_mapping)."""
    config = {k: v for k, v in registry_configs()["qwen3-0.6b"].items() if not k.startswith("_")}
    assert load_spec(config).layer_windows == ()
    spec = load_spec({**config, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20})
    assert spec.layer_windows == (0,) * 20 + (4096,) * 8


# The instruct/chat repo ids users type, each of which must resolve to its base entry (same architecture and
# sizes: the published config.json files differ only in tokens and generation settings).
INSTRUCT_IDS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/Llama-2-70b-chat-hf": "llama-2-70b",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "Qwen/Qwen3-8B-Base": "qwen3-8b",
    "Qwen/Qwen3-0.6B-Base": "qwen3-0.6b",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistral-7b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b-v0.3",
    "mistralai/Mistral-Nemo-Instruct-2407": "mistral-nemo-12b",
    "allenai/OLMo-2-1124-7B-Instruct": "olmo-2-7b",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "tinyllama-1.1b",
    "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini-4k",
    "microsoft/Phi-3-medium-4k-instruct": "phi-3-medium-4k",
    "microsoft/phi-4": "phi-4",
}


@pytest.mark.parametrize("repo_id", sorted(INSTRUCT_IDS))
def test_instruct_ids_resolve_to_their_base_entry(repo_id):
    assert registry_aliases()[repo_id.lower()] == INSTRUCT_IDS[repo_id]
    assert load_spec(repo_id) == load_spec(INSTRUCT_IDS[repo_id])


@pytest.mark.parametrize("alias", sorted(registry_aliases()))
def test_every_alias_gives_its_entrys_numbers(alias):
    """An alias and its entry give the same estimate (counts and peak), whatever the letter case."""
    name = registry_aliases()[alias]
    a = estimate(alias.upper(), batch_size=1, seq_len=256)
    b = estimate(name, batch_size=1, seq_len=256)
    assert (a.params, a.memory) == (b.params, b.memory)


def test_aliases_are_unique_and_lower_case():
    seen = [a for cfg in registry_configs().values() for a in cfg.get("_aliases", [])]
    assert len(seen) == len(set(seen)) and all(a == a.lower() for a in seen)


def test_meta_device_is_used():
    """The counts above come from meta-device models (no weights are allocated)."""
    assert next(build_base_model(load_spec("qwen3-0.6b")).parameters()).device == torch.device("meta")
