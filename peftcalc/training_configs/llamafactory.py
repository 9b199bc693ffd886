"""LLaMA-Factory YAML (``llamafactory-cli train FILE``): its model, data and finetuning arguments beside the
transformers TrainingArguments keys (per_device_train_batch_size, bf16, optim, ...).

Defaults (LLaMA-Factory ``src/llamafactory/hparams/``): finetuning_args.py (finetuning_type "lora",
lora_rank 8, lora_alpha None: lora_rank x 2, lora_dropout 0.0, lora_target "all": every linear layer but
the output layer, use_dora False, freeze_trainable_layers 2, pure_bf16 False), model_args.py
(disable_gradient_checkpointing False: checkpointing is on, use_reentrant_gc True, quantization_bit None,
double_quantization True, flash_attn "auto", enable_liger_kernel False, upcast_layernorm False),
data_args.py (cutoff_len 2048, packing None: on for the pt stage only). How they are used:
``hparams/parser.py`` (compute_dtype bf16 / fp16 from bf16 / fp16 or pure_bf16; the model is loaded in it),
``model/model_utils/checkpointing.py`` prepare_model_for_training (gradient_checkpointing_enable with
{"use_reentrant": use_reentrant_gc}), ``model/adapter.py`` init_adapter (trainable parameters upcast to
fp32 unless pure_bf16: the whole model for full, the trainable blocks for freeze, the adapters for lora;
freeze trains the last freeze_trainable_layers blocks only).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.training_configs.common import Derived, Keys, attention_of
from peftcalc.training_configs.training_args import read_trainer_keys

__all__ = ["LLAMAFACTORY_KEYS", "read_llamafactory"]

LLAMAFACTORY_KEYS = ("finetuning_type", "stage", "cutoff_len", "lora_target", "lora_rank", "template",
                     "freeze_trainable_layers", "quantization_bit")

# LLaMA-Factory's flash_attn (model_args.py AttentionFunction) -> transformers attn_implementation
FLASH_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
              "fa3": "flash_attention_3"}


def read_llamafactory(data: dict, path: str) -> Derived:
    """A LLaMA-Factory config: the model, the method (full, freeze, lora, qlora), and the training settings."""
    d = Derived(tool="LLaMA-Factory", path=path)
    k = Keys(data, path)
    d.model = k.str("model_name_or_path")
    d.model_key = "model_name_or_path"
    read_trainer_keys(k, d)
    if k.bool("pure_bf16", False):
        d.amp = None
    d.want("seq_len", k.int("cutoff_len", 2048), "cutoff_len")
    packed = k.bool("packing", k.str("stage", "sft") == "pt") or k.bool("neat_packing", False)
    d.notes.append(f"cutoff_len {d.training['seq_len']}" + (" (packed)" if packed else
                                                             " (batches are padded to their longest sequence: an "
                                                             "upper bound)"))
    on = not k.bool("disable_gradient_checkpointing", False)
    d.want("grad_checkpointing", on, "disable_gradient_checkpointing")
    if on:
        d.want("checkpoint_reentrant", k.bool("use_reentrant_gc", True), "use_reentrant_gc")
    flash = k.str("flash_attn", "auto", choices=tuple(FLASH_ATTN))
    if FLASH_ATTN[flash]:
        attention_of(d, FLASH_ATTN[flash], "flash_attn")
    if k.bool("enable_liger_kernel", False):
        d.want("loss", "liger", "enable_liger_kernel", "Liger kernels")
    _method(k, d)
    # model/model_utils/moe.py configure_moe: setattr(config, "output_router_logits", is_trainable) for these
    d.router_logits_for = ("dbrx", "jamba", "jetmoe", "mixtral", "qwen2_moe")
    for key, what in (("upcast_layernorm", "norm weights upcast to fp32"), ("upcast_lmhead_output",
                                                                             "lm_head output upcast to fp32"),
                      ("use_unsloth_gc", "unsloth's offloaded checkpointing"), ("use_galore", "GaLore"),
                      ("use_badam", "BAdam"), ("use_apollo", "APOLLO"), ("use_adam_mini", "Adam-mini"),
                      ("shift_attn", "shift short attention")):
        if k.bool(key, False):
            d.warn(f"{key}=true ({what})")
    return d


def _weights(k: Keys, d: Derived, method: str) -> None:
    """The model is loaded in the compute dtype (bf16 / fp16 from the keys; without either, the model config's
    dtype); full fine-tuning upcasts every parameter to fp32 unless pure_bf16 (adapter.py
    _setup_full_tuning), which makes bf16: true fp32 weights under bf16 autocast."""
    if k.bool("pure_bf16", False):
        d.weights = "bfloat16"
    elif d.amp is not None:
        d.weights = "float32" if method == "full" else d.amp
    else:
        d.weights = "auto"


def _method(k: Keys, d: Derived) -> None:
    kind = k.str("finetuning_type", "lora", choices=("lora", "oft", "freeze", "full"))
    bits = k.int("quantization_bit")
    if bits is not None and kind != "lora":
        raise InputError(f"{d.path}: key 'quantization_bit' with finetuning_type: {kind}: a quantized model trains "
                         "through LoRA only")
    if kind == "oft":
        raise InputError(f"{d.path}: key 'finetuning_type' is 'oft'; peftcalc models lora, freeze and full")
    _weights(k, d, kind)
    if kind == "full":
        d.method = {"method": "full"}
        return
    if kind == "freeze":
        layers = k.int("freeze_trainable_layers", 2, minimum=-10**9)
        if layers < 1:
            raise InputError(f"{d.path}: key 'freeze_trainable_layers' is {layers}: training the first blocks is not "
                             "modelled (peftcalc's freeze trains the last ones)")
        d.method = {"method": "freeze", "trainable_layers": layers}
        d.warn("finetuning_type=freeze (LLaMA-Factory trains the last blocks only, upcast to fp32; peftcalc's freeze "
               "also trains the final norm and head, in the model's dtype)")
        return
    rank = k.int("lora_rank", 8)
    method = "qlora" if bits == 4 else "lora"
    d.method = {"method": method, "rank": rank, "alpha": k.int("lora_alpha", rank * 2),
                "dora": k.bool("use_dora", False) or None}
    targets = k.names("lora_target", ["all"])
    d.method["targets"] = "all-linear" if targets == ["all"] else targets
    if bits == 4:
        d.method.update(double_quant=k.bool("double_quantization", True), prepare_kbit=False)
    elif bits is not None:
        d.warn(f"quantization_bit={bits} (a {bits}-bit base; estimated with unquantized weights)")
    if k.number("lora_dropout", 0.0):
        d.warn(f"lora_dropout={k.data['lora_dropout']} (LoRA dropout's mask and dropped input)")
    if k.names("additional_target"):
        d.warn(f"additional_target={k.names('additional_target')} (trainable copies of whole modules)")
