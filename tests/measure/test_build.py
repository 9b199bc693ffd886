"""measure.build makes what from_pretrained would: the parameters a model class keeps in fp32
(`_keep_in_fp32_modules` under fp16, `_keep_in_fp32_modules_strict` under fp16 and bf16) are fp32 in the
harness's from_config builds too, on the CPU and on the meta device (which the fake-tensor path copies)."""

import pytest
import torch
import transformers

from measure.build import build_base_model
from peftcalc.families import ARCHITECTURE_TASKS, KEEP_IN_FP32_MODULES

TINY_MODELS = ["tiny-llama", "tiny-llama-cls", "tiny-mistral", "tiny-qwen2", "tiny-gpt2", "tiny-bert", "tiny-bert-cls",
               "tiny-roberta", "tiny-vit-cls", "tiny-clip-vision", "tiny-llava", "tiny-blip2"]


def _run(tiny, model):
    return tiny(model, method="qformer" if "blip2" in model else "full")


@pytest.mark.parametrize("model", TINY_MODELS)
def test_keep_in_fp32_table_is_the_model_classes(tiny, model):
    """peftcalc.spec.KEEP_IN_FP32_MODULES against transformers: the lists post_init gathers over the built
    model's submodels (a LLaVA's CLIP tower and Llama, a BLIP-2's EVA tower, Q-Former and OPT)."""
    spec = _run(tiny, model).spec
    built = build_base_model(spec, device="meta")
    assert type(built).__name__ == spec.architecture
    modules, strict = KEEP_IN_FP32_MODULES.get(spec.architecture, ((), ()))
    assert (set(built._keep_in_fp32_modules), set(built._keep_in_fp32_modules_strict)) == (set(modules), set(strict))


def test_every_architecture_without_an_entry_has_no_class_lists():
    for arch in ARCHITECTURE_TASKS:
        cls = getattr(transformers, arch)
        if arch not in KEEP_IN_FP32_MODULES:
            assert not cls._keep_in_fp32_modules and not cls._keep_in_fp32_modules_strict, arch
    assert transformers.Blip2ForConditionalGeneration._keep_in_fp32_modules == ["query_tokens", "qformer"]


@pytest.mark.parametrize("model", ["tiny-blip2", "tiny-llava"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_equal_from_pretrained(tiny, model, dtype, tmp_path):
    """A checkpoint saved in fp32 and loaded with from_pretrained(dtype=...) has, key by key, the dtypes of the
    harness's build (on the CPU and on meta): BLIP-2's Q-Former (31,808 parameters here) and query tokens
    (8 x 32) fp32 under fp16, bf16 under bf16; everything else in the requested dtype."""
    spec = _run(tiny, model).spec
    build_base_model(spec, device="cpu").save_pretrained(tmp_path)
    loaded = type(build_base_model(spec, device="meta")).from_pretrained(tmp_path, dtype=dtype)
    expected = {k: t.dtype for k, t in loaded.state_dict().items()}
    for device in ("cpu", "meta"):
        built = build_base_model(spec, dtype=dtype, device=device)
        assert {k: t.dtype for k, t in built.state_dict().items()} == expected
    fp32 = sum(p.numel() for p in loaded.parameters() if p.dtype == torch.float32)
    assert fp32 == (31_808 + 8 * 32 if model == "tiny-blip2" and dtype == torch.float16 else 0)


def test_qlora_keeps_a_biased_classifier_head_unquantized(tiny):
    """transformers keeps unquantized only the module of the model's last parameter; for BERT's
    classifier that is 'classifier.bias', so the default quantizes the classifier and peft's trainable
    copy of it fails ("only Tensors of floating point dtype can require gradients": the 7 tiny-bert-cls
    QLoRA rows of the ci matrix were errors). The harness names the head, as the working recipe does;
    causal LMs (lm_head) and Llama classifiers (score, no bias) keep the default."""
    from measure.build import head_skip_modules
    from peftcalc.config import load_spec

    def skip(name):
        return head_skip_modules(build_base_model(tiny(name, method="full").spec, device="meta"))

    assert "classifier" in skip("tiny-bert-cls")
    assert skip("tiny-llama-cls") is None and skip("tiny-llama") is None
    # RoBERTa's head's last parameter is classifier.out_proj.bias: the default keeps neither Linear
    roberta = load_spec({"model_type": "roberta", "architectures": ["RobertaForSequenceClassification"],
                         "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 66,
                         "num_labels": 3, "_name_or_path": "tiny-roberta-cls"})
    assert "classifier" in head_skip_modules(build_base_model(roberta, device="meta"))
