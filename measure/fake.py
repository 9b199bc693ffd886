"""Models made of fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): the real module
tree, with every parameter and buffer a fake tensor on device 'cpu' that has shape, dtype and
storage size but no data. Nothing is allocated, so an 8B or 70B model traces in seconds.

Fake tensors on 'cuda' abort with the CPU build of torch, so the device is always 'cpu'.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from measure.build import apply_method, build_base_model, head_skip_modules, qlora_quantization_config
from measure.tracer import FakeScalars
from peftcalc.methods import MethodSettings
from peftcalc.spec import ModelSpec

__all__ = [
    "build_fake_model", "build_meta_model", "materialize_fake", "quantize_fake_nf4",
    "real_cpu_kernel_dtypes", "real_input_semantics", "replace_with_nf4",
]


def materialize_fake(model: nn.Module, fake_mode) -> nn.Module:
    """Replace every meta parameter and buffer by an empty fake tensor of the same shape and dtype.

    Mirrors ``nn.Module.to_empty(device='cpu')`` (``torch.empty_like`` per tensor), but keeps tied
    parameters tied (one fake tensor per original object) and leaves bitsandbytes 4-bit weights to
    :func:`quantize_fake_nf4`."""
    memo: dict[int, torch.Tensor] = {}
    with fake_mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not _is_bnb_4bit(module, name):
                    if id(p) not in memo:
                        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                   requires_grad=p.requires_grad)
                    module._parameters[name] = memo[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    if id(b) not in memo:
                        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
                    module._buffers[name] = memo[id(b)]
        _materialize_prompt_tokens(model)
    return model


def _materialize_prompt_tokens(model: nn.Module) -> None:
    """peft keeps the virtual-token ids of prefix/prompt tuning in a plain dict, not a buffer
    (peft_model.py PeftModel._setup_prompt_encoder: ``prompt_tokens[adapter] = torch.arange(...)``);
    they are rebuilt the same way as fake tensors. Call under the fake mode."""
    tokens = getattr(model, "prompt_tokens", None)
    if isinstance(tokens, dict):
        for name, t in tokens.items():
            tokens[name] = torch.arange(t.numel(), dtype=t.dtype, device="cpu").reshape(t.shape)


def _is_bnb_4bit(module: nn.Module, name: str) -> bool:
    """A bitsandbytes Linear4bit weight (peft's LoRA wrapper of the same class name is not one)."""
    return name == "weight" and _bnb_linear4bit_class() is not None and isinstance(module, _bnb_linear4bit_class())


def _bnb_linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


@contextlib.contextmanager
def _fake_bnb_code_tables():
    """bitsandbytes caches its quantization code tables in ``functional.name2qmap``; tables built
    under fake mode are fake and must not leak into later real runs."""
    import bitsandbytes.functional as F

    saved = dict(F.name2qmap)
    F.name2qmap.clear()
    try:
        yield
    finally:
        F.name2qmap.clear()
        F.name2qmap.update(saved)


def quantize_fake_nf4(model: nn.Module, fake_mode, dtype: torch.dtype) -> nn.Module:
    """Give every bitsandbytes Linear4bit a fake NF4 weight: a fake (out, in) weight in `dtype`
    goes through ``bitsandbytes.functional.quantize_4bit`` (whose ops have fake kernels), as
    ``Params4bit._quantize`` does when from_pretrained moves the weight to its device. The packed
    uint8 tensor becomes the parameter and the QuantState (absmax, code, nested state2) is attached
    as ``weight.quant_state``, with the attributes peft reads (compress_statistics, quant_type)."""
    import bitsandbytes.functional as F

    with _fake_bnb_code_tables(), fake_mode, FakeScalars():
        for module in model.modules():
            if not _is_bnb_4bit(module, "weight"):
                continue
            old = module.weight
            w = torch.empty(module.out_features, module.in_features, dtype=dtype, device="cpu")
            packed, state = F.quantize_4bit(w, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                            quant_type=old.quant_type, quant_storage=old.quant_storage)
            # keeping requires_grad fails as the real Params4bit does when peft marks a quantized
            # module trainable (modules_to_save): "only Tensors of floating point dtype can require gradients"
            weight = nn.Parameter(packed, requires_grad=old.requires_grad)
            for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
                setattr(weight, attr, getattr(old, attr))
            weight.quant_state, weight.bnb_quantized, weight.module = state, True, module
            module.weight = weight
            module.quant_state = state
    return model


def replace_with_nf4(model: nn.Module, settings: MethodSettings, compute_dtype: torch.dtype,
                     quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Swap Linear layers for bitsandbytes Linear4bit exactly as from_pretrained does with a 4-bit
    BitsAndBytesConfig (transformers quantizers/quantizer_bnb_4bit.py
    ``_process_model_before_weight_loading``: ``get_modules_to_not_convert`` then
    ``integrations.bitsandbytes.replace_with_bnb_linear``)."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    config = qlora_quantization_config(settings, compute_dtype, head_skip_modules(model), quant_storage)
    skip = Bnb4BitHfQuantizer.get_modules_to_not_convert(
        model, config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    model.is_loaded_in_4bit = True  # what peft checks to dispatch LoRA to lora.bnb.Linear4bit
    return model


def _unless_fake(mask):
    """None for a fake tensor (an all-ones padding mask in the harness), the mask otherwise."""
    from torch._subclasses.fake_tensor import FakeTensor

    return None if isinstance(mask, FakeTensor) else mask


@contextlib.contextmanager
def real_input_semantics():
    """Make transformers take the path the real inputs take when they are fake.

    ``transformers.masking_utils.find_packed_sequence_indices`` reads the position ids to detect
    packed sequences, but on fake tensors (``is_tracing``) it cannot, and returns an index tensor
    that makes every model build an explicit (b, 1, s, s) mask instead of using SDPA's ``is_causal``.
    The harness never packs sequences (position ids are ``arange``), for which the real function
    returns None; so does the patched one while this context is active.

    LLaVA's ``get_placeholder_mask`` checks that the image-token count equals the image features'
    (``torch_compilable_check`` on a tensor: ``.item()`` of a fake value, which has none); the
    harness's batches always agree, so the check is switched off the way transformers documents
    (``TRANSFORMERS_DISABLE_TORCH_CHECK=1``) while this context is active.

    Blip2ForConditionalGeneration passes ``attention_mask=torch.ones_like(input_ids)`` to its language
    model and an all-ones ``image_attention_mask`` to the Q-Former's cross-attention. On real inputs
    ``masking_utils.sdpa_mask`` sees no padding (``_ignore_causal_mask_sdpa`` /
    ``_ignore_bidirectional_mask_sdpa``: ``fast_all(padding_mask)``) and builds no mask; on fake ones it
    cannot read the values (``is_tracing``) and materialises a (b, 1, q, kv) mask, which SDPA turns into a
    float mask that every layer saves. The harness's 2D masks are always all ones (it never pads), so
    while this context is active a fake padding mask is read as the all-ones mask it is: the skip checks
    run as for ``padding_mask=None``, which they treat exactly as all ones."""
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    skip_causal, skip_bidirectional = masking._ignore_causal_mask_sdpa, masking._ignore_bidirectional_mask_sdpa
    masking._ignore_causal_mask_sdpa = lambda padding_mask, *args, **kwargs: skip_causal(
        _unless_fake(padding_mask), *args, **kwargs)
    masking._ignore_bidirectional_mask_sdpa = lambda padding_mask, *args, **kwargs: skip_bidirectional(
        _unless_fake(padding_mask), *args, **kwargs)
    previous_check = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original
        masking._ignore_causal_mask_sdpa, masking._ignore_bidirectional_mask_sdpa = skip_causal, skip_bidirectional
        if previous_check is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = previous_check


_REDUCED_FLOAT = (torch.bfloat16, torch.float16)


def _layer_norm_stats_dtype(input: torch.Tensor, weight, bias) -> torch.dtype:
    """The dtype of the mean and rstd that the CPU kernel of ``aten::native_layer_norm`` returns
    (aten/src/ATen/native/layer_norm.cpp ``layer_norm_cpu``: ``param_scalar_type(input, mixed_type)``
    with ``is_mixed_type`` from native/cpu/mixed_data_type.h): float32 when the input is bf16/fp16 and
    a defined weight or bias is float32 (the amp-bf16 case: a bf16 activation into an fp32 LayerNorm),
    the input's dtype otherwise."""
    params = [t for t in (weight, bias) if t is not None]
    mixed = input.dtype in _REDUCED_FLOAT and any(t.dtype == torch.float32 for t in params)
    return torch.float32 if mixed else input.dtype


def _native_layer_norm_cpu_dtypes(reference):
    """A fake rule for ``aten.native_layer_norm.default`` that runs torch's own rule (`reference`,
    torch/_refs/__init__.py ``native_layer_norm_fake`` -> ``native_layer_norm``) and gives mean and rstd
    the dtype of the real CPU kernel. The reference casts them to the input's dtype on 'cpu'
    (``if input.device.type in ["cpu", "mtia"]: mean = _maybe_convert_to_dtype(mean, input.dtype)``),
    which is wrong for a mixed-dtype call: real CPU returns float32 there (its stats are computed in
    float32 by ``_normalize`` before that cast, so the cast back only restores the kernel's dtype)."""

    def rule(fake_mode, func, input, normalized_shape, weight, bias, eps):
        out, mean, rstd = reference(fake_mode, func, input, normalized_shape, weight, bias, eps)
        dtype = _layer_norm_stats_dtype(input, weight, bias)
        return out, mean.to(dtype), rstd.to(dtype)

    return rule


def _grouped_mm_any_dtype(fake_mode, func, mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """A fake rule for ``aten._grouped_mm.default`` that takes any floating dtype: torch's meta rule
    (torch/_meta_registrations.py ``_meta_grouped_mm_common``) mirrors the CUDA fast path and refuses any dtype
    but bf16, while the CPU kernel computes fp32 and fp16 too (traced: a real fp32 CPU run of a tiny Mixtral).
    The output's shape is the meta rule's for bf16 copies of the inputs; its dtype `out_dtype` or mat_a's."""
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    if mat_a.dtype == torch.bfloat16:
        return NotImplemented  # torch's own rule answers

    def as_bf16(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=torch.bfloat16, device="meta")

    with in_kernel_invocation_manager(fake_mode):
        shape = func(as_bf16(mat_a), as_bf16(mat_b), offs=None if offs is None else torch.empty_like(offs, device="meta"),
                     bias=None if bias is None else as_bf16(bias)).shape
        out = torch.empty(shape, dtype=out_dtype or mat_a.dtype, device="meta")
    return FakeTensor(fake_mode, out, mat_a.fake_device)


@contextlib.contextmanager
def real_cpu_kernel_dtypes():
    """Make fake tensors get the dtypes the real CPU kernels give, where torch's fake rule differs.

    Only ``aten.native_layer_norm`` differs in the harness's runs (see
    :func:`_native_layer_norm_cpu_dtypes`): its fake rule in
    ``torch._subclasses.fake_impls.op_implementations_dict`` is swapped while this context is active.
    Its backward needs no rule: ``native_layer_norm_backward``'s fake outputs take the dtypes of
    grad_out, weight and bias, as the CPU kernel's do. FakeTensorMode's class-wide dispatch cache is
    cleared on entry and exit so that no output of the other rule is reused."""
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.aten.native_layer_norm.default
    reference = fake_impls.op_implementations_dict[op]
    fake_impls.op_implementations_dict[op] = _native_layer_norm_cpu_dtypes(reference)
    grouped = torch.ops.aten._grouped_mm.default
    grouped_before = fake_impls.op_implementations_dict.get(grouped)
    fake_impls.op_implementations_dict[grouped] = _grouped_mm_any_dtype
    FakeTensorMode.cache_clear()
    try:
        yield
    finally:
        fake_impls.op_implementations_dict[op] = reference
        if grouped_before is None:
            del fake_impls.op_implementations_dict[grouped]
        else:
            fake_impls.op_implementations_dict[grouped] = grouped_before
        FakeTensorMode.cache_clear()


def build_meta_model(spec: ModelSpec, settings: MethodSettings, dtype: torch.dtype = torch.float32,
                     compute_dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> nn.Module:
    """The model of :func:`measure.build.build_model` on the meta device; for QLoRA with the
    Linear layers from_pretrained would quantize swapped for bitsandbytes Linear4bit (still holding
    their unquantized meta weights, so parameter counts are the logical ones), then
    ``peft.prepare_model_for_kbit_training`` when `settings.prepare_kbit` (its fp32 casts of the
    other parameters work on meta tensors)."""
    model = build_base_model(spec, dtype=dtype, device="meta", attention=attention)
    if settings.method == "qlora":
        model = replace_with_nf4(model, settings, compute_dtype)
        if settings.prepare_kbit:  # as measure.build.build_qlora_model: before LoRA, no checkpointing
            import peft

            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with torch.device("meta"):
        return apply_method(model, spec, settings)


def build_fake_model(spec: ModelSpec, settings: MethodSettings, fake_mode, dtype: torch.dtype,
                     compute_dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
    """The model of :func:`measure.build.build_model` (QLoRA: of :func:`measure.build.build_qlora_model`,
    with ``prepare_model_for_kbit_training`` when `settings.prepare_kbit`): built and given its method on the meta device
    (peft casting fake adapter weights fails: ``_apply`` cannot swap fake tensors), then made fake."""
    model = build_meta_model(spec, settings, dtype, compute_dtype, attention)
    materialize_fake(model, fake_mode)
    if settings.method == "qlora":
        quantize_fake_nf4(model, fake_mode, dtype)
    return model
