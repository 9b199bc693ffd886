"""transformers ``TrainingArguments`` keys (a JSON from ``args.to_json_string()``, and the Trainer keys TRL and
LLaMA-Factory configs share): batch, accumulation, precision, checkpointing, optimizer, clipping, Liger.

Defaults are TrainingArguments' (transformers 5.23 ``training_args.py``): per_device_train_batch_size 8,
gradient_accumulation_steps 1, bf16 / fp16 False, activation_checkpointing False, optim
"adamw_torch_fused" (torch >= 2.8), max_grad_norm 1.0, use_liger_kernel False. How the Trainer uses them:
``trainer.py`` (``Trainer.__init__``: ``activation_checkpointing_enable(kwargs or None, every_n_layers,
offload)``; ``modeling_utils.PreTrainedModel._activation_checkpointing_enable``: None means
``{"use_reentrant": False}``, a dict without the key leaves torch's default, reentrant).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.training_configs.common import Derived, Keys, attention_of, optimizer_of
from peftcalc.training_configs.distributed import read_deepspeed, read_fsdp

__all__ = ["TRAINER_DEFAULTS", "read_trainer_keys", "read_training_args"]

# TrainingArguments' defaults of the keys read here (transformers 5.23 training_args.py).
TRAINER_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "bf16": False,
                    "fp16": False, "gradient_checkpointing": False, "optim": "adamw_torch_fused",
                    "max_grad_norm": 1.0}


def read_trainer_keys(k: Keys, d: Derived, defaults: dict | None = None) -> None:
    """The TrainingArguments keys of `k` into `d` (`defaults`: the tool's own defaults of those keys, over
    TRAINER_DEFAULTS)."""
    dft = {**TRAINER_DEFAULTS, **(defaults or {})}
    d.want("trainer_loop", True, "Trainer")
    d.want("batch_size", k.int("per_device_train_batch_size", dft["per_device_train_batch_size"]),
           "per_device_train_batch_size")
    accum = k.int("gradient_accumulation_steps", dft["gradient_accumulation_steps"])
    d.want("grad_accum", accum, "gradient_accumulation_steps", "gradient accumulation" if accum > 1 else "")
    _precision(k, d, dft)
    _checkpointing(k, d, dft)
    optimizer_of(d, k.str("optim", dft["optim"]), "optim")
    if k.has("max_grad_norm"):
        norm = k.number("max_grad_norm")
        d.want("max_grad_norm", float(norm) if norm else None, "max_grad_norm", "gradient clipping")
    else:
        d.want("max_grad_norm", float(dft["max_grad_norm"]), "max_grad_norm")
    if k.bool("use_liger_kernel", False):
        d.want("loss", "liger", "use_liger_kernel", "Liger kernels")
    if k.bool("use_cpu", False):
        d.want("device", "cpu", "use_cpu")
    for key, what in (("torch_compile", "torch.compile"), ("auto_find_batch_size", "the batch size is found at "
                                                                                    "run time")):
        if k.bool(key, False):
            d.warn(f"{key}=true ({what})")
    if k.number("label_smoothing_factor", 0):
        d.warn(f"label_smoothing_factor={k.data['label_smoothing_factor']} (label smoothing's loss)")
    if k.number("neftune_noise_alpha", 0):
        d.warn(f"neftune_noise_alpha={k.data['neftune_noise_alpha']} (NEFTune's noisy embeddings)")
    _distributed(k, d)


def _precision(k: Keys, d: Derived, dft: dict) -> None:
    bf16, fp16 = k.bool("bf16", dft["bf16"]), k.bool("fp16", dft["fp16"])
    if bf16 is None:  # TRL: bf16 None means True unless fp16 is set (trl/trainer/base_config.py)
        bf16 = not fp16
    if bf16 and fp16:
        raise InputError(f"{d.path}: keys 'bf16' and 'fp16' are both true; a run uses one of them")
    d.amp = "bfloat16" if bf16 else "float16" if fp16 else None


def _checkpointing(k: Keys, d: Derived, dft: dict) -> None:
    on = k.bool("activation_checkpointing")
    key = "activation_checkpointing"
    if on is None:
        on, key = k.bool("gradient_checkpointing", dft["gradient_checkpointing"]), "gradient_checkpointing"
    kw_key = "activation_checkpointing_kwargs" if k.has("activation_checkpointing_kwargs") else \
        "gradient_checkpointing_kwargs"
    kwargs = dict(k.mapping(kw_key))
    d.want("grad_checkpointing", bool(on), key)
    if not on:
        return
    every = kwargs.pop("every_n_layers", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(f"{d.path}: key '{kw_key}' every_n_layers must be a positive integer, got {every!r}")
    d.want("checkpoint_every", every, kw_key)
    if kwargs.pop("offload", False):
        d.warn(f"{kw_key}.offload=true (saved activations held in host memory)")
    reentrant = kwargs.pop("use_reentrant", bool(kwargs))  # {} -> None -> non-reentrant; other keys: torch's True
    if not isinstance(reentrant, bool):
        raise InputError(f"{d.path}: key '{kw_key}' use_reentrant must be true or false, got {reentrant!r}")
    d.want("checkpoint_reentrant", reentrant, kw_key)


def _distributed(k: Keys, d: Derived) -> None:
    """DeepSpeed and FSDP keys (training_configs.distributed)."""
    if k.has("deepspeed"):
        read_deepspeed(k.data["deepspeed"], d)
    fsdp = k.data.get("fsdp")
    if fsdp not in (None, False, "", [], "false"):
        read_fsdp(fsdp, k.mapping("fsdp_config"), d)


def read_training_args(data: dict, path: str) -> Derived:
    """A TrainingArguments JSON: the Trainer's keys; the model and the sequence length come from the command
    line (the JSON names neither); the weights are loaded in the model config's dtype (transformers 5
    from_pretrained's default dtype "auto")."""
    d = Derived(tool="transformers TrainingArguments", path=path)
    k = Keys(data, path)
    read_trainer_keys(k, d)
    if k.has("attn_implementation"):
        attention_of(d, k.str("attn_implementation"), "attn_implementation")
    d.notes.append("model and sequence length from the command line")
    return d
