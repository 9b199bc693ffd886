"""Build the real model a spec and a method describe: transformers `from_config` (random weights,
no hub) plus the method applied for real (peft for LoRA/DoRA/IA3/prefix/prompt, requires_grad masks
for full/frozen/freeze/bitfit, the bottleneck adapters of :mod:`measure.adapters`).

QLoRA's NF4 base needs bitsandbytes and a saved checkpoint (see :func:`build_qlora_model`); on the
meta device a QLoRA model is built as the LoRA model on the unquantized base, which has the same
logical parameter counts.
"""

from __future__ import annotations

import contextlib
import re

import torch
import transformers

from measure.adapters import add_bottleneck_adapters
from measure.generic import apply_generic_method, is_unmodelled
from peftcalc.methods import (
    IA3_DEFAULT_TARGETS,
    LORA_DEFAULT_TARGETS,
    MethodSettings,
    default_trainable_layers,
    make_plan,
    peft_task_type,
    resolve_adapter_kind,
    resolve_bottleneck,
)
from peftcalc.errors import InputError
from peftcalc.families import attention_for
from peftcalc.spec import AUTO_CLASS, ModelSpec, transformers_config_kwargs

__all__ = [
    "DTYPES", "SEQ_CLS_HEADS", "VLM_TEXT_LINEARS", "apply_method", "build_base_model", "build_model",
    "build_qlora_model", "count_logical_params", "count_params", "head_skip_modules", "keep_in_fp32",
    "logical_numel", "peft_config", "qlora_quantization_config", "transformers_config", "vlm_lora_config",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformers_config(spec: ModelSpec, attention: str = "sdpa"):
    config = transformers.AutoConfig.for_model(spec.model_type, **transformers_config_kwargs(spec))
    config._attn_implementation = attention
    config.use_cache = False
    if spec.is_vlm:  # LlavaForConditionalGeneration passes use_cache=None: the language model reads its own
        config.text_config.use_cache = False  # (a DynamicCache would keep every layer's keys and values)
    return config


def build_base_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str = "meta",
                     attention: str = "sdpa"):
    """The transformers model class `spec.architecture` names, with random weights, with the attention
    implementation the calculator models for `attention` (peftcalc.families.attention_for: Gemma 2 runs eager)."""
    attention = attention_for(spec, attention)
    config = transformers_config(spec, attention)
    auto = getattr(transformers, AUTO_CLASS[spec.task])
    # meta and cuda: initialise on the device (random init of a 7B model on the CPU takes minutes)
    ctx = torch.device(device) if device == "meta" or str(device).startswith("cuda") else contextlib.nullcontext()
    with ctx:
        model = auto.from_config(config, dtype=dtype, attn_implementation=attention)
    keep_in_fp32(model, dtype)
    if device != "meta":
        model = model.to(device)
    return model


def keep_in_fp32(model, dtype: torch.dtype) -> list[str]:
    """Cast the parameters and persistent buffers that ``from_pretrained(..., dtype=dtype)`` loads in fp32
    to fp32, as it does; ``from_config`` (which the harness uses: random weights, no checkpoint) applies
    no such plan. Returns the names cast.

    transformers 5.x modeling_utils.py ``PreTrainedModel._get_dtype_plan``: the model class's
    ``_keep_in_fp32_modules`` (gathered from the submodels by ``post_init``) only when dtype is float16,
    ``_keep_in_fp32_modules_strict`` when it is float16 or bfloat16; then
    core_model_loading.py ``convert_and_load_state_dict_in_model`` loads every state-dict key that
    the plan's patterns match (``build_glob_alternation(...).search(key)``: a substring search, '*' a
    wildcard) as fp32 (``_materialize_copy``: ``tensor.to(dtype)``, whatever the tensor's own dtype).
    Of the families peftcalc models only Blip2ForConditionalGeneration has a list (``["query_tokens",
    "qformer"]``, not strict): under fp16 its Q-Former and query tokens are fp32, under bf16 they are
    bf16 like the rest (checked by loading a saved tiny BLIP-2 both ways, transformers 5.23)."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype)
    if not plan:
        return []
    pattern, by_group, _ = build_glob_alternation(list(plan))
    cast = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        match = pattern.search(name)
        if match is None:
            continue
        target = plan[by_group[match.lastgroup]]
        if tensor.dtype != target:
            tensor.data = tensor.data.to(target)
            cast.append(name)
    return cast


def apply_method(model, spec: ModelSpec, settings: MethodSettings):
    """Make `model` train what `settings.method` trains; returns the (possibly peft-wrapped) model."""
    method = settings.method
    if method in ("lora", "qlora", "ia3", "prefix", "prompt"):
        return _apply_peft(model, spec, settings)
    if is_unmodelled(spec):  # no Family record: masks read from the model itself (measure.generic)
        return apply_generic_method(model, spec, settings)
    plan = make_plan(spec, settings)
    if method == "adapter":
        add_bottleneck_adapters(model, spec, resolve_adapter_kind(spec, settings), resolve_bottleneck(spec, settings))
    trainable = {g.name for g in plan.groups if g.trainable and g.origin == "base"}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable or ".adapter_" in name)
    return model


def _peft_targets(spec: ModelSpec, settings: MethodSettings):
    if settings.targets == "all-linear":
        return "all-linear"
    if settings.targets is not None:
        return list(settings.targets)
    if is_unmodelled(spec):  # peft's own default for the model_type (peft utils/constants.py mappings)
        return None
    defaults = IA3_DEFAULT_TARGETS[spec.model_type][0] if settings.method == "ia3" else LORA_DEFAULT_TARGETS[spec.model_type]
    return list(defaults)


def peft_config(spec: ModelSpec, settings: MethodSettings):
    import peft

    task = peft_task_type(spec)
    task_type = getattr(peft.TaskType, task) if task else None
    method = settings.method
    if spec.is_vlm:
        return vlm_lora_config(spec, settings)
    if method in ("lora", "qlora"):
        targets = _peft_targets(spec, settings)
        params = [t for t in targets if "experts." in t] if isinstance(targets, list) else []
        return peft.LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.rank,
            target_modules=[t for t in targets if t not in params] if params else targets,
            target_parameters=params or None,  # fused MoE experts: "mlp.experts.gate_up_proj", ...
            use_dora=settings.dora,
            lora_dropout=0.0,
            task_type=task_type,
        )
    if method == "ia3":
        targets = _peft_targets(spec, settings)
        if is_unmodelled(spec) and settings.targets is None:
            feedforward = None  # peft's own default feed-forward modules, with its default targets
        else:
            feedforward = list(IA3_DEFAULT_TARGETS[spec.model_type][1]) if settings.targets is None else []
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)
    return peft.PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)


# The language model's Linear names (LlamaDecoderLayer), what "all-linear" means on a VLM here.
VLM_TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def vlm_lora_config(spec: ModelSpec, settings: MethodSettings):
    """LoRA on a LLaVA model as its fine-tuning scripts set it up: adapters on the language model only
    (a regex, which peft matches with re.fullmatch against every module name, so the vision tower's
    q_proj/v_proj are left alone), and the projector trained whole through modules_to_save."""
    import peft

    if settings.targets == "all-linear":
        names = VLM_TEXT_LINEARS
    elif settings.targets is not None:
        names = tuple(settings.targets)
    else:
        names = LORA_DEFAULT_TARGETS[spec.model_type]
    pattern = r"model\.language_model\.(.*\.)?(" + "|".join(re.escape(n) for n in names) + ")"
    return peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.rank,
        target_modules=pattern,
        modules_to_save=["multi_modal_projector"],
        use_dora=settings.dora,
        lora_dropout=0.0,
    )


def _apply_peft(model, spec: ModelSpec, settings: MethodSettings):
    import peft

    try:
        model = peft.get_peft_model(model, peft_config(spec, settings))
    except ValueError as exc:  # peft has no default targets for the model_type (an unmodelled family)
        if not (is_unmodelled(spec) and settings.targets is None and "target_modules" in str(exc)):
            raise
        raise InputError(f"peft has no default {settings.method} target modules for model_type "
                         f"'{spec.model_type}'; name them with --targets (e.g. --targets q_proj,v_proj, "
                         "or all-linear)") from None
    if settings.vision_layers:  # unfrozen vision layers train in place (requires_grad), as the LLaVA scripts do
        trainable = {g.name for g in make_plan(spec, settings).groups if g.trainable and g.origin == "base"}
        for name, param in model.named_parameters():
            if name.removeprefix("base_model.model.") in trainable:
                param.requires_grad_(True)
    return model


def build_model(spec: ModelSpec, settings: MethodSettings, dtype: torch.dtype = torch.float32,
                device: str = "meta", attention: str = "sdpa"):
    """Base model + method, ready to train (QLoRA on meta/unquantized: see module docstring)."""
    if settings.method == "freeze":
        k = settings.trainable_layers if settings.trainable_layers is not None else default_trainable_layers(spec)
        assert 1 <= k <= spec.num_layers
    model = build_base_model(spec, dtype=dtype, device=device, attention=attention)
    return apply_method(model, spec, settings)


def count_params(model) -> tuple[int, int]:
    """(total, trainable) as sum(p.numel()) over model.parameters() (tied weights once)."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: ``numel()``, except for bitsandbytes 4-bit weights, which pack
    two values per uint8 element and keep the unpacked shape in ``quant_state.shape``
    (bitsandbytes nn/modules.py Params4bit)."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for d in state.shape:
            n *= int(d)
        return n
    return p.numel()


def count_logical_params(model) -> tuple[int, int]:
    """(total, trainable) like :func:`count_params`, with 4-bit weights at their logical size."""
    total = trainable = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


SEQ_CLS_HEADS = ("classifier", "score")  # peft PeftModelForSequenceClassification's modules_to_save


def head_skip_modules(model) -> list[str] | None:
    """``llm_int8_skip_modules`` for a sequence classifier whose head the default would quantize, else None.
    transformers keeps unquantized the module of the model's last parameter (quantizers/base.py
    get_keys_to_not_convert: ``list(model.named_parameters())[-1][0]`` minus ".weight"), so a classifier
    whose last parameter is a bias ("classifier.bias": BERT; "classifier.out_proj.bias": RoBERTa) becomes
    Linear4bit, and peft's trainable copy of it fails (``requires_grad_`` on a 4-bit weight: "only
    Tensors of floating point dtype can require gradients", traced on tiny-bert-cls). The working
    recipe names the head: the default keys plus the head, as the list replaces the default."""
    from transformers.quantizers.base import get_keys_to_not_convert

    names = {n for n, _ in model.named_children()}
    heads = [h for h in SEQ_CLS_HEADS if h in names]
    if not heads:
        return None
    default = get_keys_to_not_convert(model)
    if all(h in default for h in heads):  # the head module itself is kept (Llama's bias-free score)
        return None
    return sorted(set(default) | set(heads))


def qlora_quantization_config(settings: MethodSettings, compute_dtype: torch.dtype, skip_modules=None,
                              quant_storage: torch.dtype = torch.uint8):
    """The BitsAndBytesConfig of the QLoRA recipe (Dettmers et al. 2023, section 3): NF4 storage,
    double quantization as `settings.double_quant`, computation in `compute_dtype`; `skip_modules`:
    head_skip_modules' list for a classifier the default would quantize; `quant_storage` the packed weights'
    dtype (bnb_4bit_quant_storage: uint8, or under FSDP the model's dtype, so that FSDP shards them as
    ordinary tensors of that dtype, as TRL, axolotl and Answer.AI's FSDP-QLoRA set it)."""
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=skip_modules,
    )


def build_qlora_model(spec: ModelSpec, settings: MethodSettings, checkpoint_dir: str,
                      dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.bfloat16,
                      device: str = "cpu", attention: str = "sdpa", prepare_kbit: bool = False):
    """QLoRA as users build it: a random-weights checkpoint of the base model is saved to
    `checkpoint_dir` (``save_pretrained``) and reloaded through ``from_pretrained(...,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` (transformers
    quantizers/quantizer_bnb_4bit.py: every Linear except the output embedding becomes a
    bitsandbytes Linear4bit); then ``peft.prepare_model_for_kbit_training`` if `prepare_kbit`
    (it upcasts the non-quantized fp16/bf16 parameters to fp32) and LoRA."""
    base = build_base_model(spec, dtype=dtype, device=device, attention=attention)
    skip = head_skip_modules(base)
    base.save_pretrained(checkpoint_dir)
    del base
    auto = getattr(transformers, AUTO_CLASS[spec.task])
    model = auto.from_pretrained(
        checkpoint_dir,
        quantization_config=qlora_quantization_config(settings, compute_dtype, skip),
        dtype=dtype,
        device_map={"": device},
        attn_implementation=attention_for(spec, attention),
    )
    model.config.use_cache = False
    if prepare_kbit:
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_method(model, spec, settings)
