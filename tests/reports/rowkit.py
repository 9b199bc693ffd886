"""Hand-made harness rows (the layout of measure.run.measure_one) for the report tests."""

import json

BASE_METHOD = {"method": "lora", "rank": 8, "alpha": None, "targets": None, "dora": False, "double_quant": True,
               "bottleneck": None, "adapter_kind": "houlsby", "num_virtual_tokens": 20, "trainable_layers": None}
BASE_TRAINING = {"batch_size": 1, "seq_len": 128, "precision": "amp-bf16", "optimizer": "adamw",
                 "grad_checkpointing": False, "attention": "sdpa", "device": "cpu"}


def make_row(model="gpt2", device="fake", measured=1_000_000, predicted=None, outcome="ok", key=None,
             categories=None, measured_phase="backward", predicted_components=None, predicted_phase=None,
             sha=None, step1=None, reserved=None, device_name=None, **method_or_training):
    """One result row as measure_one writes it; keyword arguments override method/training keys."""
    method = dict(BASE_METHOD)
    training = dict(BASE_TRAINING)
    for k, v in method_or_training.items():
        (method if k in method else training)[k] = v
    training["device"] = "cuda" if device == "cuda" else "cpu"
    settings = {"model": model, "method": method, "training": training, "device": device, "steps": 2, "seed": 0,
                "qlora_prepare_kbit": None}
    if sha is not None:
        settings["model_config_sha"] = sha
    row = {"key": key or f"{model}-{method['method']}-{device}-{measured}", "settings": settings, "outcome": outcome,
           "error": None if outcome == "ok" else "OutOfMemoryError: x",
           "params": {"total": 0, "trainable": 0},
           "measured": None if outcome != "ok" else {
               "source": "cuda_allocator" if device == "cuda" else "tracer",
               "peak_bytes": measured, "peak_phase": measured_phase,
               "step1_peak_bytes": step1 if step1 is not None else measured, "step1_peak_phase": measured_phase,
               "categories_at_peak": categories},
           "predicted": None if predicted is None else {"peak_bytes": predicted,
                                                        "components": predicted_components or {},
                                                        "peak_phase": predicted_phase or "backward:loss"},
           "environment": {"device_name": device_name or ("NVIDIA H100 80GB HBM3" if device == "cuda" else
                                                          "cpu (fake tensors)" if device == "fake" else "cpu (x86_64)")}}
    if reserved is not None:
        row["measured"]["reserved_peak_bytes"] = reserved
    return row


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
