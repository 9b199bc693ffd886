"""axolotl YAML (``axolotl train FILE``).

Defaults (axolotl, ``src/axolotl/utils/schemas/``): training.py (micro_batch_size 1,
gradient_accumulation_steps 1, optimizer "adamw_torch_fused", max_grad_norm None: the Trainer's 1.0),
config.py (sequence_len 512, bf16 "auto": True on a GPU with bf16, gradient_checkpointing False,
sample_packing / pad_to_sequence_len None), peft.py (adapter None: full fine-tuning, load_in_4bit /
load_in_8bit False, lora_r / lora_alpha None: peft's 8 and 8, lora_dropout 0.0). How they are used:
``utils/config/__init__.py`` normalize_config (torch_dtype bfloat16 when bf16 or bfloat16, float16 when fp16,
float16 or load_in_8bit, else float32); ``core/builders/base.py`` _configure_gradient_checkpointing (kwargs
default {"use_reentrant": False}); ``loaders/model.py`` (bnb_4bit_use_double_quant True;
prepare_model_for_kbit_training on a 4/8-bit base with lora/qlora, patched by
``monkeypatch/peft/utils.py`` to leave embed_tokens and lm_head in 16 bits).
"""

from __future__ import annotations

from peftcalc.errors import InputError
from peftcalc.training_configs.common import Derived, Keys, attention_of, optimizer_of
from peftcalc.training_configs.distributed import read_deepspeed, read_fsdp

__all__ = ["AXOLOTL_KEYS", "read_axolotl"]

AXOLOTL_KEYS = ("base_model", "micro_batch_size", "sequence_len", "sample_packing", "lora_target_linear",
                "pad_to_sequence_len", "adapter")

LIGER = "axolotl.integrations.liger"
CCE = "axolotl.integrations.cut_cross_entropy"


def read_axolotl(data: dict, path: str) -> Derived:
    """An axolotl config: the model, the method (full, lora, qlora), and the training settings."""
    d = Derived(tool="axolotl", path=path)
    k = Keys(data, path)
    d.model = k.str("base_model")
    d.model_key = "base_model"
    d.want("trainer_loop", True, "Trainer")  # axolotl trains with a transformers Trainer subclass
    d.want("batch_size", k.int("micro_batch_size", 1), "micro_batch_size")
    accum = k.int("gradient_accumulation_steps", 1)
    d.want("grad_accum", accum, "gradient_accumulation_steps", "gradient accumulation" if accum > 1 else "")
    d.want("seq_len", k.int("sequence_len", 512), "sequence_len")
    packed = k.bool("sample_packing", False)
    padded = k.bool("pad_to_sequence_len", False)
    d.notes.append(f"sequence_len {d.training['seq_len']}" + (" (packed)" if packed else " (padded)" if padded else
                                                               " (batches are padded to their longest sequence: "
                                                               "an upper bound)"))
    _precision(k, d)
    _checkpointing(k, d)
    optimizer_of(d, k.str("optimizer", "adamw_torch_fused"), "optimizer")
    if k.has("max_grad_norm"):
        norm = k.number("max_grad_norm")
        d.want("max_grad_norm", float(norm) if norm else None, "max_grad_norm", "gradient clipping")
    else:
        d.want("max_grad_norm", 1.0, "max_grad_norm")
    _attention(k, d)
    _loss(k, d)
    _method(k, d)
    _not_modelled(k, d)
    return d


def _precision(k: Keys, d: Derived) -> None:
    bf16 = k.data.get("bf16", "auto")
    if bf16 == "auto":
        bf16 = True
        d.notes.append("bf16 auto: bf16 (a GPU with bf16)")
    elif not isinstance(bf16, bool):
        raise InputError(f"{d.path}: key 'bf16' must be true, false or auto, got {bf16!r}")
    fp16 = k.bool("fp16", False)
    if bf16 and fp16 and "bf16" in k.data:
        raise InputError(f"{d.path}: keys 'bf16' and 'fp16' are both true; a run uses one of them")
    if fp16:  # normalize_config: bf16 auto gives way to an explicit fp16
        bf16 = False
    d.amp = "bfloat16" if bf16 else "float16" if fp16 else None
    if bf16 or k.bool("bfloat16", False):
        d.weights = "bfloat16"
    elif fp16 or k.bool("float16", False) or k.bool("load_in_8bit", False):
        d.weights = "float16"
    else:
        d.weights = "float32"


def _checkpointing(k: Keys, d: Derived) -> None:
    value = k.data.get("gradient_checkpointing", False)
    if value in ("offload", "offload_disk"):
        d.warn(f"gradient_checkpointing={value} (checkpoints offloaded to host memory or disk)")
        value = True
    if value is None:
        value = False
    if not isinstance(value, bool):
        raise InputError(f"{d.path}: key 'gradient_checkpointing' must be true, false, offload or offload_disk, "
                         f"got {value!r}")
    d.want("grad_checkpointing", value, "gradient_checkpointing")
    if value:
        kwargs = k.mapping("gradient_checkpointing_kwargs") if k.has("gradient_checkpointing_kwargs") else \
            {"use_reentrant": False}
        reentrant = kwargs.get("use_reentrant", True)
        if not isinstance(reentrant, bool):
            raise InputError(f"{d.path}: key 'gradient_checkpointing_kwargs' use_reentrant must be true or false, "
                             f"got {reentrant!r}")
        d.want("checkpoint_reentrant", reentrant, "gradient_checkpointing_kwargs")
    offload = k.data.get("activation_offloading")
    if offload not in (None, False):
        d.warn(f"activation_offloading={offload} (activations offloaded to host memory)")


def _attention(k: Keys, d: Derived) -> None:
    if k.has("attn_implementation"):
        attention_of(d, k.str("attn_implementation"), "attn_implementation")
    elif k.bool("flash_attention", False):
        attention_of(d, "flash_attention_2", "flash_attention")
    elif k.bool("xformers_attention", False):
        attention_of(d, "xformers", "xformers_attention")
    elif k.bool("eager_attention", False):
        attention_of(d, "eager", "eager_attention")
    elif k.bool("sdp_attention", False):
        attention_of(d, "sdpa", "sdp_attention")


def _loss(k: Keys, d: Derived) -> None:
    """The Liger plugin's fused linear cross-entropy, the Cut Cross-Entropy plugin, chunked cross-entropy."""
    plugins = k.names("plugins", [])
    if any(p.startswith(CCE) for p in plugins) and k.bool("cut_cross_entropy", True):
        d.want("loss", "cce", "plugins", "Cut Cross-Entropy")
    elif any(p.startswith(LIGER) for p in plugins) and k.bool("liger_fused_linear_cross_entropy", False):
        d.want("loss", "liger", "plugins", "Liger fused linear cross-entropy")
    elif k.bool("chunked_cross_entropy", False):
        d.want("loss", "chunked", "chunked_cross_entropy", "chunked cross-entropy")
        if k.has("chunked_cross_entropy_num_chunks"):
            d.want("loss_chunks", k.int("chunked_cross_entropy_num_chunks"), "chunked_cross_entropy_num_chunks",
                   "chunked cross-entropy")
    if any(p.startswith(LIGER) for p in plugins):
        kernels = [key for key in ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm",
                                   "liger_swiglu") if k.bool(key, False)]
        if kernels:
            d.warn(f"{', '.join(kernels)}=true (Liger's kernels inside the blocks)")


def _method(k: Keys, d: Derived) -> None:
    adapter = k.str("adapter")
    four, eight = k.bool("load_in_4bit", False), k.bool("load_in_8bit", False)
    if adapter not in (None, "lora", "qlora"):
        raise InputError(f"{d.path}: key 'adapter' is {adapter!r}; peftcalc models lora and qlora (none: full "
                         "fine-tuning)")
    if adapter == "lora" and four:
        raise InputError(f"{d.path}: keys 'load_in_4bit' and 'adapter: lora' contradict each other: a 4-bit base "
                         "trains with adapter: qlora")
    if adapter == "qlora" and not four:
        raise InputError(f"{d.path}: key 'adapter: qlora' needs load_in_4bit: true")
    if adapter is None:
        if four or eight:
            raise InputError(f"{d.path}: key '{'load_in_4bit' if four else 'load_in_8bit'}' without an adapter: a "
                             "quantized model trains through adapters only")
        d.method = {"method": "full"}
        if k.names("unfrozen_parameters"):
            d.warn(f"unfrozen_parameters={k.names('unfrozen_parameters')} (only some parameters train)")
        return
    d.method = {"method": adapter, "rank": k.int("lora_r", 8), "alpha": k.int("lora_alpha"),
                "dora": k.bool("peft_use_dora", False) or None}
    if k.bool("lora_target_linear", False):
        d.method["targets"] = "all-linear"
    elif k.names("lora_target_modules"):
        d.method["targets"] = k.names("lora_target_modules")
    if adapter == "qlora":
        quant = k.mapping("bnb_config_kwargs")
        d.method.update(double_quant=quant.get("bnb_4bit_use_double_quant", True) is True, prepare_kbit=True)
        d.warn("adapter=qlora (axolotl's prepare_model_for_kbit_training leaves embed_tokens and lm_head in 16 bits; "
               "estimated upcast to fp32)")
    if eight:
        d.warn("load_in_8bit=true (an 8-bit base; estimated with unquantized weights)")
    if k.number("lora_dropout", 0.0):
        d.warn(f"lora_dropout={k.data['lora_dropout']} (LoRA dropout's mask and dropped input)")
    if k.names("lora_modules_to_save"):
        d.warn(f"lora_modules_to_save={k.names('lora_modules_to_save')} (trainable copies of whole modules)")


def _not_modelled(k: Keys, d: Derived) -> None:
    if k.has("deepspeed"):
        read_deepspeed(k.data["deepspeed"], d)
    if k.data.get("fsdp") or k.data.get("fsdp_config"):
        # axolotl utils/schemas/config.py: fsdp_version None is FSDP1 (its fsdp_config may say version too)
        read_fsdp(k.data.get("fsdp") or "full_shard", k.mapping("fsdp_config"), d, version=k.data.get("fsdp_version"),
                  default_version=1)
    for key, what in (("torch_compile", "torch.compile"),
                      ("lora_mlp_kernel", "axolotl's LoRA kernels"), ("lora_qkv_kernel", "axolotl's LoRA kernels"),
                      ("lora_o_kernel", "axolotl's LoRA kernels"), ("relora", "ReLoRA"),
                      ("neftune_noise_alpha", "NEFTune's noisy embeddings")):
        value = k.data.get(key)
        if value not in (None, False, [], {}, ""):
            d.warn(f"{key}={'...' if isinstance(value, (dict, list)) else value} ({what})")
