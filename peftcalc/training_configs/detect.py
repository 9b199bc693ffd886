"""Which tool a config file belongs to, from its keys: LLaMA-Factory (finetuning_type, cutoff_len, lora_rank,
...), axolotl (base_model, micro_batch_size, sequence_len, ...), TRL (model_name_or_path, use_peft,
max_length, ...), or a bare transformers TrainingArguments JSON (per_device_train_batch_size, optim, ...)."""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.training_configs.axolotl import AXOLOTL_KEYS, read_axolotl
from peftcalc.training_configs.common import Derived, load_file
from peftcalc.training_configs.llamafactory import LLAMAFACTORY_KEYS, read_llamafactory
from peftcalc.training_configs.training_args import read_training_args
from peftcalc.training_configs.trl import TRL_KEYS, read_trl

__all__ = ["TRAINING_ARGS_KEYS", "detect_tool", "read_config"]

TRAINING_ARGS_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "optim", "output_dir",
                      "learning_rate", "num_train_epochs", "bf16", "fp16", "gradient_checkpointing")

READERS = {"LLaMA-Factory": read_llamafactory, "axolotl": read_axolotl, "TRL": read_trl,
           "transformers TrainingArguments": read_training_args}


def detect_tool(data: dict, path: str) -> str:
    """The tool whose keys `data` has (InputError, one line, when none)."""
    if "peft_type" in data:
        raise InputError(f"{path} is a peft adapter_config.json (key 'peft_type'); give it with --adapter-config")
    for tool, keys in (("LLaMA-Factory", LLAMAFACTORY_KEYS), ("axolotl", AXOLOTL_KEYS)):
        if any(key in data for key in keys):
            return tool
    if "model_name_or_path" in data or any(key in data for key in TRL_KEYS):
        return "TRL"
    if any(key in data for key in TRAINING_ARGS_KEYS):
        return "transformers TrainingArguments"
    shown = ", ".join(sorted(map(str, data))[:6]) or "none"
    raise InputError(f"{path}: no recognised tool's keys (found {shown}); peftcalc reads axolotl (base_model), "
                     "TRL (model_name_or_path, use_peft), LLaMA-Factory (finetuning_type, cutoff_len) and "
                     "TrainingArguments JSON (per_device_train_batch_size)")


def read_config(path: str) -> Derived:
    """The settings a training config file derives, read by its tool's reader."""
    data = load_file(path)
    return READERS[detect_tool(data, path)](data, path)
