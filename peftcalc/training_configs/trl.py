"""TRL's CLI YAML (``trl sft --config FILE``): SFTConfig keys (TrainingArguments plus max_length, packing,
activation_offloading, ...) and ModelConfig keys (model_name_or_path, dtype, use_peft, lora_*,
load_in_4bit, ...).

Defaults (TRL 1.16): ``trl/trainer/base_config.py`` _BaseConfig (gradient_checkpointing True; bf16 None,
read as True unless fp16 is set); ``trl/trainer/sft_config.py`` SFTConfig (max_length 1024, packing
False, activation_offloading False); ``trl/trainer/model_config.py`` ModelConfig (dtype "float32",
attn_implementation None, use_peft False, lora_r 16, lora_alpha 32, lora_dropout 0.05,
lora_target_modules None: peft's default for the model type, use_dora False, use_rslora False,
load_in_4bit / load_in_8bit False, use_bnb_nested_quant False). How they are used:
``trl/scripts/sft.py`` main (model_init_kwargs: dtype, attn_implementation), ``trl/trainer/utils.py``
get_peft_config / get_quantization_config, ``trl/trainer/sft_trainer.py`` SFTTrainer.__init__ (no
prepare_model_for_kbit_training; on a quantized model the trainable adapter weights are cast to bf16;
add_fused_lm_head: the loss is computed by TRL's fused LM head, in tiles, without the full logits).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.training_configs.common import Derived, Keys, attention_of
from peftcalc.training_configs.training_args import read_trainer_keys

__all__ = ["TRL_KEYS", "read_trl", "trl_loss_unmodelled"]

# Keys only TRL's SFTConfig / ModelConfig have (detect.py tells a TRL file from a bare TrainingArguments one).
TRL_KEYS = ("use_peft", "lora_r", "lora_target_modules", "lora_modules_to_save", "use_bnb_nested_quant",
            "max_length", "max_seq_length", "packing", "dataset_text_field", "dataset_name", "model_init_kwargs",
            "completion_only_loss", "assistant_only_loss", "padding_free", "activation_offloading", "lora_task_type")

# _BaseConfig / SFTConfig defaults that differ from TrainingArguments'
TRL_TRAINER_DEFAULTS = {"gradient_checkpointing": True, "bf16": None}


def read_trl(data: dict, path: str) -> Derived:
    """A TRL CLI config: the model, the method (full, lora, qlora), and the training settings."""
    d = Derived(tool="TRL", path=path)
    k = Keys(data, path)
    d.model = k.str("model_name_or_path")
    d.model_key = "model_name_or_path"
    read_trainer_keys(k, d, TRL_TRAINER_DEFAULTS)
    _sequence(k, d)
    _model_loading(k, d)
    _method(k, d)
    if k.bool("activation_offloading", False):
        d.warn("activation_offloading=true (activations offloaded to host memory)")
    if d.training.pop("loss", None) is not None:  # SFTTrainer turns Liger's fused linear cross-entropy off
        d.warn("use_liger_kernel=true (Liger's kernels inside the blocks; SFTTrainer keeps its fused LM head)")
    # SFTTrainer.compute_loss: TRL's fused LM head and the collator's batch (peftcalc.sim.trl_head); where it is
    # not modelled (trl_loss_unmodelled), peftcalc.training_configs.from_files falls back to the model's own loss
    d.want("loss", "trl", "SFTTrainer")
    return d


def trl_loss_unmodelled(spec, precision: str) -> str:
    """Why loss "trl" (TRL's fused LM head, peftcalc.sim.trl_head) cannot estimate this run, or "": under
    autocast (fp32 weights with bf16/fp16: ChunkedLogProbFunction casts each chunk of the hidden states and the
    weight) and with final_logit_softcapping (its tanh per tile) it is not modelled yet, and it replaces a causal
    language model's loss only."""
    from peftcalc.settings import PRECISIONS

    if spec.task != "causal_lm" or spec.is_vlm or spec.is_blip2:
        return f"a {spec.task} model"
    if PRECISIONS[precision][1]:
        return f"{precision}: autocast over fp32 weights"
    if spec.final_logit_softcap:
        return "final_logit_softcapping"
    return ""


def _sequence(k: Keys, d: Derived) -> None:
    key = "max_length" if "max_length" in k.data or "max_seq_length" not in k.data else "max_seq_length"
    if key in k.data and k.data[key] is None:
        d.warn(f"{key}=null (sequences are not truncated: the length is the data's; give --seq-len)")
        return
    d.want("seq_len", k.int(key, 1024), key)
    packed = k.bool("packing", False) or k.bool("padding_free", False)
    if packed:  # SFTTrainer.__init__: padding_free = padding_free or packing with the bfd strategies (the default)
        d.warn("packing/padding_free (SFTTrainer's padding-free batch: one row of batch x seq tokens with position_ids "
               "instead of the attention mask; estimated as batch rows of seq)")
    d.notes.append(f"{key} {d.training['seq_len']}" + (" (packed)" if packed else
                                                         " (batches are padded to their longest sequence: "
                                                         "an upper bound)"))


def _model_loading(k: Keys, d: Derived) -> None:
    """The dtype the weights are loaded in and the attention kernel: ModelConfig's dtype (torch_dtype in
    older TRL) and attn_implementation, or the same keys in model_init_kwargs."""
    init = k.mapping("model_init_kwargs")
    dtype_key = next((key for key in ("dtype", "torch_dtype") if k.has(key)), None)
    dtype = k.str(dtype_key) if dtype_key else init.get("dtype", init.get("torch_dtype", "float32"))
    if not isinstance(dtype, str):
        raise InputError(f"{d.path}: key 'dtype' must be a dtype name (float32, bfloat16, float16, auto), got "
                         f"{dtype!r}")
    d.weights = dtype
    attention = k.str("attn_implementation") or init.get("attn_implementation")
    if attention is not None:
        attention_of(d, attention, "attn_implementation")


def _method(k: Keys, d: Derived) -> None:
    use_peft = k.bool("use_peft", False)
    four, eight = k.bool("load_in_4bit", False), k.bool("load_in_8bit", False)
    if four and eight:
        raise InputError(f"{d.path}: keys 'load_in_4bit' and 'load_in_8bit' are both true; a model loads one way")
    if not use_peft:
        for key in ("load_in_4bit", "load_in_8bit"):
            if k.bool(key, False):
                raise InputError(f"{d.path}: key '{key}' without use_peft: a quantized model trains through "
                                 "adapters only (set use_peft: true)")
        d.method = {"method": "full"}
        return
    method = "qlora" if four else "lora"
    d.method = {"method": method, "rank": k.int("lora_r", 16), "alpha": k.int("lora_alpha", 32),
                "dora": k.bool("use_dora", False) or None}
    targets = k.names("lora_target_modules")
    if targets is not None:
        d.method["targets"] = "all-linear" if targets in (["all-linear"], ["all_linear"]) else targets
    if four:
        d.method.update(double_quant=k.bool("use_bnb_nested_quant", False), prepare_kbit=False)
        d.warn("load_in_4bit=true (SFTTrainer casts the trainable adapter weights of a quantized model to bf16; "
               "estimated in fp32)")
        storage = k.str("bnb_4bit_quant_storage")
        if storage not in (None, "uint8"):
            d.warn(f"bnb_4bit_quant_storage={storage} (4-bit weights stored as {storage})")
    if eight:
        d.warn("load_in_8bit=true (an 8-bit base; estimated with unquantized weights)")
    dropout = k.number("lora_dropout", 0.05)
    if dropout:
        d.warn(f"lora_dropout={dropout} (LoRA dropout's mask and dropped input{'' if 'lora_dropout' in k.data else ', TRL default'})")
    if k.names("lora_modules_to_save"):
        d.warn(f"lora_modules_to_save={k.names('lora_modules_to_save')} (trainable copies of whole modules)")
