"""Bytes on disk per task, and for T tasks (the usual parameter-efficient fine-tuning storage argument:
one frozen base plus T small task files, against T full copies of the model).

File sizes follow the safetensors format exactly: an 8-byte header length, a compact JSON header
(padded with spaces to a multiple of 8) naming every tensor's dtype, shape and byte offsets, then the
raw data (safetensors/src/tensor.rs `serialize`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from peftcalc.families import build_layout
from peftcalc.methods import PEFT_METHODS
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES
from peftcalc.families import kept_in_fp32

__all__ = ["MXFP4_BLOCK", "SAFETENSORS_DTYPE", "Storage", "adapter_tensors", "full_model_bytes", "mxfp4_checkpoint_bytes",
           "mxfp4_quantized", "safetensors_size", "storage", "stored_dtype"]

SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "uint8": "U8"}

# MXFP4 (OCP Microscaling, FP4 E2M1 elements): 32 values share one E8M0 scale byte; two 4-bit values per byte
MXFP4_BLOCK = 32


def safetensors_size(tensors: list[tuple[str, tuple, str]], metadata: dict | None = None) -> int:
    """Exact size of a safetensors file holding (name, shape, dtype) tensors."""
    ordered = sorted(tensors, key=lambda x: (-DTYPE_BYTES[x[2]], x[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape, dtype in ordered:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


def adapter_tensors(plan: Plan, weight_dtype: str) -> list[tuple[str, tuple, str]]:
    """The tensors `save_pretrained` writes for the method: peft's get_peft_model_state_dict names
    (peft utils/save_and_load.py: adapter name removed, tuner keys under base_model.model., prompt
    embeddings as prompt_embeddings, modules_to_save copies under base_model.model. for tuners and
    base_model. for prompt learning); for other methods the trainable tensors, in the weight dtype (or fp32
    where from_pretrained keeps them so: stored_dtype)."""
    if plan.settings.method not in PEFT_METHODS:
        return [(g.name, g.shape, stored_dtype(plan, g.name, weight_dtype)) for g in plan.groups if g.trainable]
    prompt_learning = plan.settings.method in ("prefix", "prompt")
    head_prefix = "base_model." if prompt_learning else "base_model.model."
    layout = build_layout(plan.spec)
    embeddings = {m.path: m for m in layout.modules if m.kind == "embedding"}
    out = []
    for g in plan.groups:
        if g.origin in ("lora", "dora", "ia3"):
            out.append((f"base_model.model.{g.name}", g.shape, "float32"))
        elif g.origin in ("prefix", "prompt"):
            out.append((g.name, g.shape, "float32"))
        elif g.origin == "head_copy":
            out.append((head_prefix + g.name.split("#", 1)[0], g.shape, weight_dtype))
    for path in plan.targets:  # peft sets save_embedding_layers=True when an embedding is targeted
        if path in embeddings:
            out.append((f"base_model.model.{path}.base_layer.weight", embeddings[path].shape, weight_dtype))
    return out


@dataclass(frozen=True)
class Storage:
    per_task_bytes: int  # the file one task adds
    base_bytes: int  # the shared base model, stored once (0 for full fine-tuning)
    tasks: int

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + self.tasks * self.per_task_bytes


def stored_dtype(plan: Plan, name: str, weight_dtype: str) -> str:
    """The dtype a base parameter is saved in: the one it was loaded in, the weight dtype except where
    from_pretrained keeps it in fp32 (families.kept_in_fp32: BLIP-2's Q-Former and query tokens under fp16);
    save_pretrained and safetensors' save_file write tensors as they are."""
    return "float32" if kept_in_fp32(plan.spec, name, weight_dtype) else weight_dtype


def full_model_bytes(plan: Plan, weight_dtype: str) -> int:
    """model.safetensors of the base model in its dtype (tied weights stored once; see stored_dtype)."""
    tensors = [(g.name, g.shape, stored_dtype(plan, g.name, weight_dtype)) for g in plan.groups if g.origin == "base"]
    return safetensors_size(tensors, {"format": "pt"})


def storage(plan: Plan, weight_dtype: str, tasks: int) -> Storage:
    """One base + T adapters, or T full models for full fine-tuning."""
    if plan.settings.method == "full":
        return Storage(full_model_bytes(plan, weight_dtype), 0, tasks)
    per_task = safetensors_size(adapter_tensors(plan, weight_dtype), {"format": "pt"})
    return Storage(per_task, full_model_bytes(plan, weight_dtype), tasks)


def mxfp4_quantized(plan: Plan) -> bool:
    """Whether the model's config names an MXFP4 checkpoint (``quantization_config.quant_method == "mxfp4"``:
    openai/gpt-oss-20b and -120b)."""
    q = plan.spec.hf_config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def mxfp4_checkpoint_bytes(plan: Plan) -> int:
    """The checkpoint as published with its fused experts in MXFP4, one safetensors file: each (E, out, in) experts
    parameter as ``<name>_blocks`` uint8 (E, out, in / 32, 16), two 4-bit values a byte, and ``<name>_scales`` uint8
    (E, out, in / 32), one scale per 32 values (transformers integrations/mxfp4.py, the blocks/scales pairs it
    dequantizes with ``Mxfp4Config(dequantize=True)``); every other tensor bf16 (the config's modules_to_not_convert:
    attention, router, embeddings, head; the experts' biases, norms and sinks are not quantized either). The
    published files are this split into shards, each with its own header (a few KB more)."""
    layout = build_layout(plan.spec)
    experts = {m.path: m for m in layout.modules if m.role == "experts"}
    tensors = []
    for g in plan.groups:
        if g.origin != "base":
            continue
        m = experts.get(g.name)
        if m is None:
            tensors.append((g.name, g.shape, "bfloat16"))
            continue
        e, out_f, in_f = m.shape
        tensors.append((f"{g.name}_blocks", (e, out_f, in_f // MXFP4_BLOCK, MXFP4_BLOCK // 2), "uint8"))
        tensors.append((f"{g.name}_scales", (e, out_f, in_f // MXFP4_BLOCK), "uint8"))
    return safetensors_size(tensors, {"format": "pt"})
