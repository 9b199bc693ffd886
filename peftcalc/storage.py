"""Bytes on disk per task, and for T tasks (the storage argument of the PEFT seed: one frozen base
plus T small task files, against T full copies of the model).

File sizes follow the safetensors format exactly: an 8-byte header length, a compact JSON header
(padded with spaces to a multiple of 8) naming every tensor's dtype, shape and byte offsets, then the
raw data (safetensors/src/tensor.rs `serialize`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from peftcalc.layout import LINEAR_KINDS, build_layout, param_names
from peftcalc.methods import Plan, SEQ_CLS_HEAD_NAMES, prompt_token_dim
from peftcalc.settings import DTYPE_BYTES

SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


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
    """The tensors `save_pretrained` writes for the method (peft's get_peft_model_state_dict names,
    with the adapter name removed; or the trainable tensors of a non-peft method)."""
    spec = plan.spec
    layout = build_layout(spec)
    mods = {m.path: m for m in layout.modules}
    s = plan.settings
    out: list[tuple[str, tuple, str]] = []
    if s.method in ("lora", "qlora"):
        for path in plan.targets:
            m = mods[path]
            if m.kind in LINEAR_KINDS:
                out.append((f"base_model.model.{path}.lora_A.weight", (s.rank, m.in_features), "float32"))
                out.append((f"base_model.model.{path}.lora_B.weight", (m.out_features, s.rank), "float32"))
                if s.dora:
                    out.append((f"base_model.model.{path}.lora_magnitude_vector", (m.out_features,), "float32"))
            else:
                num, dim = m.shape
                out.append((f"base_model.model.{path}.lora_embedding_A", (s.rank, num), "float32"))
                out.append((f"base_model.model.{path}.lora_embedding_B", (dim, s.rank), "float32"))
                if s.dora:
                    out.append((f"base_model.model.{path}.lora_magnitude_vector", (dim,), "float32"))
    elif s.method == "ia3":
        for path in plan.targets:
            m = mods[path]
            size = next(g.numel for g in plan.groups if g.name == f"{path}.ia3_l")
            shape = (1, size) if size == m.in_features and size != m.out_features else (size, 1)
            out.append((f"base_model.model.{path}.ia3_l", shape, "float32"))
    elif s.method in ("prefix", "prompt"):
        dim = prompt_token_dim(spec, s.method)
        width = spec.num_layers * 2 * dim if s.method == "prefix" else dim
        out.append(("prompt_embeddings", (s.num_virtual_tokens, width), "float32"))
    if s.method in ("lora", "qlora", "ia3", "prefix", "prompt"):
        for m in layout.modules:
            if any(m.path == h or m.path.startswith(h + ".") for h in SEQ_CLS_HEAD_NAMES) and spec.task == "seq_cls":
                for name, _ in param_names(m):
                    shape = (m.bias_numel,) if name.endswith(".bias") else m.shape
                    out.append((f"base_model.model.{name}", shape, weight_dtype))
        return out
    # Non-peft methods: the trainable tensors (for full fine-tuning, the whole model).
    trainable = {g.name for g in plan.groups if g.trainable}
    for m in layout.modules:
        for name, _ in param_names(m):
            if name in trainable:
                shape = (m.bias_numel,) if name.endswith(".bias") and m.kind != "param" else m.shape
                out.append((name, shape, weight_dtype))
    for g in plan.groups:
        if g.origin == "adapter":
            b = g.numel  # down (h->b) and up (b->h) with biases
            h = spec.hidden_size
            bottleneck = (b - h) // (2 * h + 1)
            base = g.name.replace(".adapter", ".adapter_bottleneck")
            out += [
                (f"{base}.down.weight", (bottleneck, h), weight_dtype),
                (f"{base}.down.bias", (bottleneck,), weight_dtype),
                (f"{base}.up.weight", (h, bottleneck), weight_dtype),
                (f"{base}.up.bias", (h,), weight_dtype),
            ]
    return out


@dataclass(frozen=True)
class Storage:
    per_task_bytes: int  # the file one task adds
    base_bytes: int  # the shared base model, stored once (0 for full fine-tuning)
    tasks: int

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + self.tasks * self.per_task_bytes


def full_model_bytes(plan: Plan, weight_dtype: str) -> int:
    """model.safetensors of the base model in its dtype (tied weights stored once)."""
    layout = build_layout(plan.spec)
    tensors = []
    for m in layout.modules:
        for name, _ in param_names(m):
            shape = (m.bias_numel,) if name.endswith(".bias") and m.kind != "param" else m.shape
            tensors.append((name, shape, weight_dtype))
    return safetensors_size(tensors, {"format": "pt"})


def storage(plan: Plan, weight_dtype: str, tasks: int) -> Storage:
    """One base + T adapters, or T full models for full fine-tuning."""
    if plan.settings.method == "full":
        return Storage(full_model_bytes(plan, weight_dtype), 0, tasks)
    per_task = safetensors_size(adapter_tensors(plan, weight_dtype), {"format": "pt"})
    return Storage(per_task, full_model_bytes(plan, weight_dtype), tasks)
