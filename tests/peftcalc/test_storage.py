"""Storage sizes equal the files save_pretrained really writes (tiny models with real weights)."""

import os
from pathlib import Path

import pytest
import torch

from measure.build import build_model
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.config import load_spec
from peftcalc.storage import full_model_bytes, safetensors_size, storage

CONFIGS = Path(__file__).parent / "configs"


@pytest.mark.parametrize("config,settings", [
    ("llama_cls.json", MethodSettings("lora", rank=4)),
    ("llama_cls.json", MethodSettings("lora", rank=4, targets=("q_proj", "embed_tokens"), dora=True)),
    ("mistral_hd.json", MethodSettings("lora", rank=2, targets="all-linear")),
    ("gpt2_cls.json", MethodSettings("ia3")),
    ("bert_cls.json", MethodSettings("ia3")),
    ("qwen2_cls.json", MethodSettings("prefix", num_virtual_tokens=5)),
    ("mistral_hd.json", MethodSettings("prompt", num_virtual_tokens=3)),
])
def test_peft_adapter_file_size(tmp_path, config, settings):
    spec = load_spec(str(CONFIGS / config))
    model = build_model(spec, settings, device="cpu")
    model.save_pretrained(tmp_path)
    real = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert storage(make_plan(spec, settings), "float32", 1).per_task_bytes == real


@pytest.mark.parametrize("config,dtype", [("gpt2_cls.json", torch.float32), ("llama_cls.json", torch.bfloat16),
                                          ("mistral_hd.json", torch.float32)])
def test_full_model_file_size(tmp_path, config, dtype):
    spec = load_spec(str(CONFIGS / config))
    model = build_model(spec, MethodSettings("full"), device="cpu", dtype=dtype)
    model.save_pretrained(tmp_path)
    real = sum(os.path.getsize(p) for p in tmp_path.glob("*.safetensors"))
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert full_model_bytes(make_plan(spec, MethodSettings("full")), name) == real


def test_safetensors_header_by_hand():
    """One F32 tensor 'a' of shape [2]: header {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} is
    52 characters, padded to 56; file = 8 + 56 + 8 bytes."""
    assert safetensors_size([("a", (2,), "float32")]) == 8 + 56 + 8


def test_storage_for_many_tasks_is_one_base_plus_adapters():
    spec = load_spec("llama-2-7b")
    lora = storage(make_plan(spec, MethodSettings("lora")), "float16", 100)
    full = storage(make_plan(spec, MethodSettings("full")), "float16", 100)
    assert lora.total_bytes == lora.base_bytes + 100 * lora.per_task_bytes
    assert full.total_bytes == 100 * full.per_task_bytes
    # 4,194,304 fp32 LoRA parameters = 16 MiB of data per task, against 12.55 GiB per full copy
    assert 4_194_304 * 4 < lora.per_task_bytes < 4_194_304 * 4 + 64 * 1024
