"""What one run is built from, before any step runs: the check of a run's settings
(:func:`check_run`), the precision :class:`Policy`, the model on its device with its method applied
(:func:`build_for_device`) and prepared for training, the optimizer, the random batch and the loss.

Owns the "build" half of :func:`measure.run.measure_one`; :mod:`measure.build` and :mod:`measure.fake`
build the model itself, :mod:`measure.loop` runs the steps on what this module builds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from measure.build import build_model, build_qlora_model
from measure.routing import drive_routing
from peftcalc.errors import InputError
from peftcalc.methods import MethodSettings, check_combination, make_plan
from peftcalc.settings import TrainingSettings, check_loss_applies, check_training
from peftcalc.sim.profile import stream_dtypes
from peftcalc.spec import ModelSpec

__all__ = [
    "DEVICES", "LOSSES", "Policy", "autocast_context", "build_for_device", "check_run", "forward_loss",
    "image_token_id", "make_batch", "make_optimizer", "model_loss", "precision_policy", "prepare_for_training",
    "transformers_model",
]

DEVICES = ("cuda", "cpu", "fake")

# What each task's loss is (the model's own loss where it has one).
LOSSES = {
    "causal_lm": "model loss, labels=input_ids (transformers ForCausalLMLoss: logits upcast to fp32, shift, cross-entropy)",
    "masked_lm": "model loss, labels=input_ids at a fixed random 15% of positions, -100 elsewhere",
    "seq_cls": "model loss, one integer label per sequence",
    "image_cls": "model loss, one integer label per image",
    "base": "last_hidden_state.float().pow(2).mean() (the bare encoder has no head and no loss)",
    "seq2seq_lm": "model loss, labels=input_ids (the model shifts them right into decoder_input_ids; "
                  "encoder and decoder see the same length)",
    "image_text_to_text": "model loss, labels=input_ids over image + text tokens (ForCausalLMLoss); one random "
                          "image per sample, its image_tokens placeholder ids first",
}


@dataclass(frozen=True)
class Policy:
    """How tensors are stored and computed: see peftcalc.settings.PRECISIONS."""

    dtype: torch.dtype  # storage dtype of the model's weights
    autocast: torch.dtype | None  # torch.autocast dtype around forward and loss, or None
    compute: torch.dtype  # dtype activations are computed in (bnb_4bit_compute_dtype for QLoRA)
    grad_scaler: bool  # torch.amp.GradScaler (amp-fp16 on cuda)


def precision_policy(training: TrainingSettings, device: str) -> Policy:
    """fp32/bf16/fp16: the model in that dtype; amp-*: fp32 weights and ``torch.autocast`` (torch.amp);
    amp-fp16 adds a GradScaler on cuda only (its inf check reads tensor values, which fake tensors
    lack, and CPU training has no fp16 underflow problem to fix)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    # mixed-bf16: no autocast, the sharded engine casts the parameters (measure.dist.shard_fsdp2)
    autocast = dtypes[training.autocast_dtype] if training.autocast_dtype and training.precision != "mixed-bf16" else None
    return Policy(
        dtype=dtypes[training.weight_dtype],
        autocast=autocast,
        compute=dtypes[training.compute_dtype],
        grad_scaler=training.precision == "amp-fp16" and device == "cuda",
    )


# -- validation -----------------------------------------------------------------------------


def check_run(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str, steps: int,
              here: bool = True) -> None:
    """Raise InputError (one line) for settings that cannot run, before anything is built. here=False: the
    settings alone, not whether this machine has what a cuda run needs (a CUDA device, a fused loss's package):
    a matrix expanded here for a GPU machine."""
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose from {', '.join(DEVICES)}")
    if steps < 1:
        raise InputError(f"--steps must be a positive integer, got {steps}")
    check_training(replace(training, device="cuda" if device == "cuda" else "cpu"))
    if training.trainer_loop and training.sharding not in ("fsdp", "hsdp", "ddp", "zero1", "zero2"):
        raise InputError("trainer_loop is a transformers Trainer's step: measure it in a real run with "
                         "peftcalc.integrations.transformers.MemoryCallback (the harness runs its own loop; "
                         "its fsdp, hsdp, ddp, zero1 and zero2 rows run the Trainer's loss handling)")
    make_plan(spec, method)
    if training.offload_activations and training.sharding != "none":  # (dist's loops run no offload hooks)
        raise InputError(f"offload_activations under sharding {training.sharding}: the harness offloads one GPU's "
                         "step only (measure/offload.py)")
    if training.sharding == "ddp" and device != "cpu":
        raise InputError("sharding ddp is traced on torch's fake process group with real tensors: use device cpu")
    if training.sharding not in ("none", "ddp") and device != "fake":
        raise InputError(f"sharding {training.sharding} is traced on torch's fake process group: use device fake")
    if here and device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or fake")
    check_combination(spec, method, training.seq_len, training.grad_checkpointing)
    check_loss_applies(spec, training, stream_dtypes(make_plan(spec, method), training)[1])
    if training.loss in ("liger", "cce"):
        from measure.losses import require_fused_loss

        require_fused_loss(training.loss, device, spec.model_type, packages=here)


# -- building ---------------------------------------------------------------------------------


def build_for_device(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str,
                     policy: Policy, fake_mode=None, workdir: str | None = None, prepare_kbit: bool = False):
    """The model, with its method applied, on `device` (fake: under `fake_mode`)."""
    if device == "fake":
        from measure.fake import build_fake_model

        return build_fake_model(spec, method, fake_mode, policy.dtype, policy.compute, training.attention)
    torch_device = "cuda" if device == "cuda" else "cpu"
    if method.method == "qlora":
        return build_qlora_model(spec, method, workdir, dtype=policy.dtype, compute_dtype=policy.compute,
                                 device=torch_device, attention=training.attention, prepare_kbit=prepare_kbit)
    return build_model(spec, method, dtype=policy.dtype, device=torch_device, attention=training.attention)


def transformers_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_for_training(model, spec: ModelSpec, training: TrainingSettings) -> dict:
    """``model.train()``, ``use_cache=False``, and gradient checkpointing as transformers enables it:
    ``PreTrainedModel.activation_checkpointing_enable({'use_reentrant': R}, every_n_layers=N)``
    (``training.checkpoint_reentrant``, ``training.checkpoint_every``; with N = 1 and R = False what
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})`` does). It
    calls ``enable_input_require_grads`` on models whose main input is input_ids (and on LLaVA, every
    input embedding inside). Non-reentrant checkpointing keeps gradients flowing into frozen-embedding
    models without it (``_checkpoint_without_reentrant`` does not need an input that requires grad);
    reentrant checkpointing does (``CheckpointFunction`` runs the block under no_grad, so its output
    requires grad only through an input that does), so a vision model (ViT, CLIP: main input
    pixel_values, their blocks' input needs no gradient when the patch embeddings are frozen) then gets
    ``enable_input_require_grads`` too, as peft does for a model whose
    checkpointing is on when it is wrapped (``PeftModel._prepare_model_for_gradient_checkpointing``)
    and as ``prepare_model_for_kbit_training`` does under reentrant checkpointing (BLIP-2, main input
    pixel_values too, needs none: its Q-Former's input is the trainable query tokens). Decoder classifiers
    without a pad token get ``pad_token_id = vocab_size - 1`` so batch > 1 runs (the inputs never
    contain it). A mixture-of-experts model's routers are driven to ``training.routing`` (measure.routing), its experts run
    ``training.experts`` (transformers' grouped_mm default, batched_mm or the module's eager loop)."""
    inner = transformers_model(model)
    inner.config.use_cache = False
    if spec.is_vlm:  # the language model reads text_config.use_cache (see measure.build.transformers_config)
        inner.config.text_config.use_cache = False
    notes = {}
    if spec.task == "seq_cls" and spec.is_decoder and inner.config.pad_token_id is None:
        inner.config.pad_token_id = spec.vocab_size - 1
        notes["pad_token_id_set"] = spec.vocab_size - 1
    if training.loss == "liger":  # TRL use_liger_kernel, the fused loss alone (measure.losses)
        from measure.losses import apply_liger_loss

        apply_liger_loss(inner)
        notes["liger_fused_linear_cross_entropy"] = True
    if training.grad_checkpointing:
        inner.activation_checkpointing_enable({"use_reentrant": training.checkpoint_reentrant},
                                              every_n_layers=training.checkpoint_every)
        if training.checkpoint_reentrant and spec.is_vision:
            inner.enable_input_require_grads()
            notes["input_require_grads"] = True
    if spec.num_experts:  # the routing the calculator is told (measure.routing)
        drive_routing(inner, spec.num_experts, training.routing)
        notes["routing"] = training.routing
        if training.experts != inner.config._experts_implementation:  # PreTrainedModel.set_experts_implementation
            inner.set_experts_implementation(training.experts)
            notes["experts"] = training.experts
        # the forward returns every router's logits and adds router_aux_loss_coef x load_balancing_loss_func
        # to the loss (models/mixtral/modeling_mixtral.py MixtralForCausalLM.forward and its kin)
        if training.router_aux_loss:
            inner.config.output_router_logits = True
            notes["output_router_logits"] = True
    model.train()
    return notes


def make_optimizer(name: str, params):
    """torch AdamW (defaults: lr 1e-3, foreach on CUDA), and fused (torch._fused_adamw_ has CUDA and CPU
    kernels, and a fake implementation for FakeTensorMode); SGD momentum 0.9; bitsandbytes AdamW8bit, the
    paged AdamWs and the Lions;
    transformers Adafactor with its defaults (lr=None, relative_step, scale_parameter, warmup_init
    off)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params)
    if name == "adamw-fused":  # transformers' adamw_torch_fused: AdamW(..., fused=True)
        return torch.optim.AdamW(params, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adamw-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params)
    if name in ("paged-adamw-8bit", "paged-adamw-32bit"):  # CUDA only (settings.check_training refuses cpu)
        import bitsandbytes as bnb

        return (bnb.optim.PagedAdamW8bit if name == "paged-adamw-8bit" else bnb.optim.PagedAdamW32bit)(params)
    if name in ("lion-8bit", "lion-32bit", "paged-lion-8bit", "paged-lion-32bit"):
        import bitsandbytes as bnb

        # transformers trainer_optimizer.py _get_bitsandbytes_optimizer: bnb.optim.Lion with the Trainer's
        # betas (adam_beta1, adam_beta2), optim_bits 8 or 32, is_paged (paged: CUDA only, see check_training)
        return bnb.optim.Lion(params, lr=1e-4, betas=(0.9, 0.999), optim_bits=8 if "8bit" in name else 32,
                              is_paged=name.startswith("paged"))
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=None)
    raise InputError(f"unknown optimizer '{name}'")


# -- batches and losses -----------------------------------------------------------------------


def make_batch(spec: ModelSpec, training: TrainingSettings, device: str, dtype: torch.dtype) -> dict:
    """Random inputs and labels of fixed shape for one step (create under the fake mode for fake)."""
    b, s = training.batch_size, training.seq_len
    if spec.is_vlm:
        # LLaVA: the processor expands <image> to image_tokens placeholder ids; they come first, the
        # text after them (random ids other than the placeholder); labels=input_ids (one tensor)
        image_id = image_token_id(spec)
        text = torch.randint(0, spec.vocab_size - 1, (b, s), device=device)
        text = torch.where(text >= image_id, text + 1, text)
        ids = torch.cat([torch.full((b, spec.image_tokens), image_id, device=device, dtype=text.dtype), text], dim=1)
        pixels = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, dtype=dtype, device=device)
        return {"input_ids": ids, "pixel_values": pixels, "labels": ids}
    if spec.model_type == "blip-2":
        # Blip2ForConditionalGeneration (transformers 5.x): the processor puts num_query_tokens placeholder
        # ids (image_token_index) before the text; masked_scatter replaces their embeddings with the
        # language projection's outputs, and the loss runs over logits[:, -labels.size(1):] (here all)
        image_id, queries = image_token_id(spec), dict(spec.blip2)["num_query_tokens"]
        text = torch.randint(0, spec.vocab_size - 1, (b, s), device=device)
        text = torch.where(text >= image_id, text + 1, text)
        ids = torch.cat([torch.full((b, queries), image_id, device=device, dtype=text.dtype), text], dim=1)
        pixels = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, dtype=dtype, device=device)
        return {"input_ids": ids, "pixel_values": pixels, "labels": ids}
    if spec.is_vision:
        pixels = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, dtype=dtype, device=device)
        batch = {"pixel_values": pixels}
        if spec.task == "image_cls":
            batch["labels"] = torch.randint(0, spec.num_labels, (b,), device=device)
        return batch
    high = spec.vocab_size - 1 if spec.task == "seq_cls" and spec.is_decoder else spec.vocab_size
    ids = torch.randint(0, high, (b, s), device=device)
    batch = {"input_ids": ids}
    if training.loss == "trl" and spec.task == "causal_lm":  # TRL SFTTrainer's collator (measure.losses)
        from measure.losses import trl_sft_batch

        return trl_sft_batch(ids)
    if spec.task in ("causal_lm", "seq2seq_lm"):
        batch["labels"] = ids
    elif spec.task == "masked_lm":
        masked = torch.rand(b, s, device=device) < 0.15
        batch["labels"] = torch.where(masked, ids, torch.full_like(ids, -100))
    elif spec.task == "seq_cls":
        batch["labels"] = torch.randint(0, spec.num_labels, (b,), device=device)
    return batch


def image_token_id(spec: ModelSpec) -> int:
    """The placeholder id of an image token (LlavaConfig image_token_index, default 32000)."""
    return int(spec.hf_config.get("image_token_index", spec.hf_config.get("image_token_id", 32000)))


def forward_loss(model, spec: ModelSpec, batch: dict) -> torch.Tensor:
    """The loss of one forward pass (see LOSSES). The model outputs are dropped before backward, as
    in transformers ``Trainer.training_step`` (``compute_loss`` returns the loss only)."""
    return model_loss(model, spec, batch)[0]


def model_loss(model, spec: ModelSpec, batch: dict, loss: str = "hf", loss_chunks: int = 8):
    """(the loss of one forward pass, the model outputs): a caller that keeps the outputs holds them through
    backward, as a hand-written loop does (``outputs = model(**batch); loss = outputs.loss;
    loss.backward()``: PEFT's examples, LitGPT); the Trainer drops them (forward_loss). loss "chunked": the
    model runs without labels and torchtune's chunked cross-entropy runs on its logits
    (measure.losses.chunked_cross_entropy, on torchtune's shifted labels), the logits dropped after it as
    torchtune's recipes do (``del logits``) unless the caller keeps the outputs."""
    if loss == "cce":  # (liger: the forward prepare_for_training patched returns the loss, no logits)
        from measure.losses import cce_loss

        return cce_loss(transformers_model(model), batch), None
    if loss == "trl":
        from measure.losses import trl_sft_loss

        return trl_sft_loss(model, batch)
    if loss == "chunked":
        from measure.losses import chunked_cross_entropy, torchtune_shifted_labels

        batch = dict(batch)  # torchtune _loss_step: labels popped, the model run, then the labels shifted
        labels = batch.pop("labels")
        outputs = model(**batch)
        value = chunked_cross_entropy(outputs.logits, torchtune_shifted_labels(labels), loss_chunks)
        return value, outputs
    outputs = model(**batch)
    value = outputs.last_hidden_state.float().pow(2).mean() if spec.task == "base" else outputs.loss
    return value, outputs


def autocast_context(policy: Policy, device: str):
    if policy.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=policy.autocast)

