"""Every Family record of peftcalc.families.FAMILIES against the libraries it describes, installed here:
peft's default target modules (peft.utils.constants), the transformers configuration classes (dropout keys
and defaults, position tables), the transformers model classes and their Auto mappings, and the modeling
files the records cite.

A family's layout on a real config equals the real model's named_parameters() (names, shapes, counts):
tests/peftcalc/test_params.py holds every registry model and every config of tests/peftcalc/configs to
sum(p.numel()) of the model transformers and peft build (test_registry_counts_equal_real_models,
test_config_file_counts_equal_real_models), tests/peftcalc/test_vlm.py and test_blip2.py the LLaVA
and BLIP-2 parameter names; test_every_layout_is_held_to_a_real_model below checks that those suites reach
every family with a layout."""

import re
from pathlib import Path

import pytest
import transformers
from peft.utils import constants as peft_constants
from transformers.models.auto import modeling_auto

from peftcalc.config import load_spec, registry_names
from peftcalc.families import FAMILIES, SUPPORTED_MODEL_TYPES
from peftcalc.methods import methods_for

CONFIGS = Path(__file__).parents[1] / "configs"
LORA = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
IA3 = peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
IA3_FF = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
SOURCE = re.compile(r"https://github\.com/huggingface/transformers/blob/main/src/transformers/models/(\w+)/modeling_(\w+)\.py")

# the task names of the records (Family.architectures) -> transformers' Auto mapping of that task
TASK_MAPPINGS = {
    "base": modeling_auto.MODEL_MAPPING_NAMES,
    "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq_cls": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "masked_lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "image_cls": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "image_text_to_text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
}

# peft 0.21 has no entry for these; the records take peft's llama choice and the harness passes it to peft
# explicitly (peftcalc/families/vision.py, peftcalc/families/llava.py, peftcalc/families/olmo2.py)
NOT_IN_PEFT = ("vit", "clip_vision_model", "llava", "olmo2", "phi3", "granite", "smollm3")
# the module that holds each of llama's target projections where a family fuses them (Phi3Attention.qkv_proj)
FUSED = {"phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}}
# nor for these mixture-of-experts types: the records take the dense model's LoRA entry and no IA3 (the fused experts
# are no Linear modules) (peftcalc/families/qwen3_moe.py, peftcalc/families/qwen2_moe.py)
NOT_IN_PEFT_MOE = {"qwen3_moe": "qwen3", "qwen2_moe": "qwen2", "gpt_oss": "mixtral"}  # gpt_oss: q_proj, v_proj as Mixtral


def _source_dir(family) -> str:
    match = SOURCE.fullmatch(family.source)
    assert match and match.group(1) == match.group(2), family.source
    return match.group(1)


def _modeling_module(family):
    import importlib

    d = _source_dir(family)
    return importlib.import_module(f"transformers.models.{d}.modeling_{d}")


def _spec(model_type):
    """A spec of the family: a config of tests/peftcalc/configs, else the first registry model."""
    for path in sorted(CONFIGS.glob("*.json")):
        spec = load_spec(str(path))
        if spec.model_type == model_type:
            return spec
    return next(load_spec(n) for n in registry_names() if load_spec(n).model_type == model_type)


def test_the_registry_is_keyed_by_model_type():
    assert all(key == f.model_type for key, f in FAMILIES.items())
    assert all(transformers.AutoConfig.for_model(key).model_type == key for key in FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_source_is_the_modeling_file_of_the_model_type(model_type):
    """`source` is transformers' modeling file of that model type: the configuration class of the model type
    lives in the same models/<dir>/ package, and every class of `architectures` is defined in that file."""
    family = FAMILIES[model_type]
    d = _source_dir(family)
    assert type(transformers.AutoConfig.for_model(model_type)).__module__ == f"transformers.models.{d}.configuration_{d}"
    for arch in family.architectures:
        assert getattr(transformers, arch).__module__ == f"transformers.models.{d}.modeling_{d}"


@pytest.mark.parametrize("model_type", sorted(f for f in FAMILIES if FAMILIES[f].architectures))
def test_architectures_are_the_auto_classes_of_their_task(model_type):
    """Each model class of `architectures` is what transformers' Auto mapping of its task builds for the model
    type (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == 'LlamaForCausalLM', ...), and its config class is
    the model type's."""
    for arch, task in FAMILIES[model_type].architectures.items():
        names = TASK_MAPPINGS[task][model_type]
        assert arch in ((names,) if isinstance(names, str) else names)
        assert getattr(transformers, arch).config_class.model_type == model_type


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_dropout_keys_are_the_config_attributes_the_modeling_file_reads(model_type):
    """Family.dropout: where ('embd', 'attn', 'resid') -> (config key, default). The configuration class of
    the model type has that attribute with that default, and the modeling file reads it (``config.<key>``)."""
    family = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type)
    source = Path(_modeling_module(family).__file__).read_text()
    assert set(family.dropout) <= {"embd", "attn", "resid"}
    for where, (key, default) in family.dropout.items():
        assert getattr(config, key) == default, (where, key)
        assert re.search(rf"config\.{key}\b", source), (where, key)


@pytest.mark.parametrize("model_type", ["blip-2", "llava"])
def test_models_made_of_parts_take_their_dropout_from_the_parts(model_type):
    """Blip2Config and LlavaConfig set no dropout of their own (only their sub-configs do): their records have
    none, and their parts' records (BLIP-2's Q-Former and vision tower, the Llama text model) carry it."""
    config = transformers.AutoConfig.for_model(model_type).to_dict()
    assert not [k for k in config if "drop" in k]
    assert FAMILIES[model_type].dropout == {}
    for sub in ("vision_config", "qformer_config", "text_config"):
        if sub in config:
            assert FAMILIES[config[sub]["model_type"]].dropout


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) & set(LORA)))
def test_peft_targets_where_peft_has_an_entry(model_type):
    """lora_targets, ia3_targets and ia3_feedforward are peft's default target modules, where the record
    has them; the records without them (OPT, BLIP-2: peft has entries) describe models peftcalc runs no LoRA
    or IA3 on: BLIP-2 takes only its own methods, and OPT is a part of BLIP-2 with no config reader."""
    family = FAMILIES[model_type]
    if not family.lora_targets:
        assert not family.ia3_targets and not family.ia3_feedforward
        if family.read_config is None:
            assert model_type not in SUPPORTED_MODEL_TYPES
        else:
            assert {"lora", "qlora", "ia3"}.isdisjoint(methods_for(_spec(model_type)))
        return
    assert family.lora_targets == tuple(LORA[model_type])
    assert family.ia3_targets == tuple(IA3[model_type])
    assert family.ia3_feedforward == tuple(IA3_FF[model_type])
    assert {"lora", "ia3"} <= set(methods_for(_spec(model_type)))


@pytest.mark.parametrize("model_type", NOT_IN_PEFT)
def test_peft_targets_where_peft_has_none(model_type):
    """peft has no default targets for vit (transformers 5 names), clip_vision_model, llava, olmo2, phi3, granite or
    smollm3: the records take peft's llama entries (the vision towers, OLMo 2, Phi-3, Granite and SmolLM3 for IA3
    too; LLaVA takes no IA3), on the fused module that holds those projections where the family fuses them (Phi-3's qkv_proj)."""
    family = FAMILIES[model_type]
    fused = FUSED.get(model_type, {})
    assert model_type not in LORA and model_type not in IA3 and model_type not in IA3_FF
    assert family.lora_targets == tuple(dict.fromkeys(fused.get(m, m) for m in LORA["llama"]))
    if family.vlm:
        assert not family.ia3_targets and "ia3" not in methods_for(_spec(model_type))
    else:
        # llama's IA3 entry with its MLP output named as the vision towers name it (down_proj -> fc2); OLMo 2
        # names it as Llama does
        rename = {"down_proj": "fc2"} if family.vision else fused
        assert family.ia3_targets == tuple(dict.fromkeys(rename.get(m, m) for m in IA3["llama"]))
        assert family.ia3_feedforward == tuple(rename.get(m, m) for m in IA3_FF["llama"])


@pytest.mark.parametrize("model_type", sorted(NOT_IN_PEFT_MOE))
def test_moe_targets_where_peft_has_none(model_type):
    family = FAMILIES[model_type]
    assert model_type not in LORA and model_type not in IA3
    assert family.lora_targets == tuple(LORA[NOT_IN_PEFT_MOE[model_type]]) and not family.ia3_targets


def test_every_family_with_targets_is_covered_above():
    """Every family is in peft's mapping or in NOT_IN_PEFT, or carries no targets at all."""
    for model_type, family in FAMILIES.items():
        assert (model_type in LORA or model_type in NOT_IN_PEFT or model_type in NOT_IN_PEFT_MOE
                or not (family.lora_targets or family.ia3_targets))


def _tiny_part(model_type):
    """The model of a record that is only a part of another (no config reader), from a tiny config."""
    import torch

    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                 max_position_embeddings=40)
    if model_type == "opt":
        config = transformers.AutoConfig.for_model("opt", ffn_dim=32, word_embed_proj_dim=16, **sizes)
        cls = transformers.OPTModel
    elif model_type == "blip_2_qformer":
        config = transformers.AutoConfig.for_model(model_type, intermediate_size=32, encoder_hidden_size=16, **sizes)
        cls = transformers.Blip2QFormerModel
    else:
        config = transformers.AutoConfig.for_model(model_type, intermediate_size=32, image_size=32, patch_size=8,
                                                   hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
        cls = transformers.Blip2VisionModel
    with torch.device("meta"):
        return cls(config), config


def _position_limit(config):
    """The sequence length a config bounds (its language model's for a composite model)."""
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_learned_positions_are_a_table_sized_by_the_config(model_type):
    """learned_positions: the model (built on the meta device) has a position-embedding table of the
    config's max_position_embeddings / n_positions rows (OPT's OPTLearnedPositionalEmbedding adds an offset
    of 2), which bounds the sequence; the rotary models, the vision towers (a patch-sized table) and the
    Q-Former (query tokens only) have none."""
    import torch

    from measure.build import build_base_model

    family = FAMILIES[model_type]
    if family.read_config is None:
        model, config = _tiny_part(model_type)
    else:
        model = build_base_model(_spec(model_type))
        config = model.config
    limit = _position_limit(config)
    tables = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
              and ("position" in name or name.endswith("wpe")) and limit and m.num_embeddings in (limit, limit + 2)]
    assert bool(tables) == family.learned_positions, tables


def test_every_layout_is_held_to_a_real_model():
    """test_params.py counts every registry model and every config file against the real model: together
    they have every model type whose record has a layout."""
    held = {load_spec(n).model_type for n in registry_names()}
    held |= {load_spec(str(p)).model_type for p in CONFIGS.glob("*.json")}
    assert {t for t, f in FAMILIES.items() if f.layout is not None} <= held
