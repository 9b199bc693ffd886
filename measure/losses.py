"""The losses a recipe puts in place of the model's own (peftcalc.settings.LOSSES), run by
:func:`measure.setup.model_loss`: torchtune's chunked cross-entropy on the logits (:func:`chunked_cross_entropy`);
TRL SFTTrainer's loss (:func:`trl_sft_loss`: its fused LM head, which runs torch ops where there is no Triton, on
its collator's batch, :func:`trl_sft_batch`); and on CUDA the fused ones: Liger Kernel's (:func:`apply_liger_loss`,
the model's forward patched as TRL's use_liger_kernel does) and Cut Cross-Entropy's (:func:`cce_loss`).

Neither fused loss has a CPU path (checked with liger-kernel 0.8.5 and cut-cross-entropy 25.1.1, the PyPI
releases): liger_kernel/ops/fused_linear_cross_entropy.py imports triton at import time and runs Triton
kernels; cut_cross_entropy/linear_cross_entropy.py imports cce.py (Triton) on every platform but macOS, and its
other implementation, impl="torch_compile" (torch_compile.py), is another algorithm: ``e @ c.T`` and
``F.cross_entropy(logits.float(), ...)`` under torch.compile, the whole logits made. So the harness runs them
on CUDA only (measure/matrices/gpu.toml), and the calculator's figures for them are modelled, not traced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FUSED_LOSS_PACKAGES", "IGNORE_INDEX", "apply_liger_loss", "cce_loss", "chunked_cross_entropy",
           "require_fused_loss", "torchtune_shifted_labels", "trl_sft_batch", "trl_sft_loss"]

IGNORE_INDEX = -100
# the releases the fused losses are modelled from (peftcalc.sim.head.fused_loss_head) and run with
FUSED_LOSS_PACKAGES = {"liger": ("liger_kernel", "liger-kernel==0.8.5"),
                       "cce": ("cut_cross_entropy", "cut-cross-entropy==25.1.1")}


def torchtune_shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """torchtune recipes/full_finetune_single_device.py _loss_step: the labels shifted left by one, the
    last position ignored: ``torch.hstack((labels[..., 1:], self.ignore_labels_cache[: labels.shape[0]]))``
    (the cache, a (batch, 1) tensor of ignore_index, made here for the step)."""
    ignore = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    return torch.hstack((labels[..., 1:], ignore))


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_output_chunks: int) -> torch.Tensor:
    """torchtune modules/loss/ce_chunked_output_loss.py CEWithChunkedOutputLoss.forward on the logits in
    `num_output_chunks` chunks, each upcast to fp32 on its own (compute_cross_entropy:
    ``F.cross_entropy(logits.float(), labels, ignore_index, reduction="sum")``), the sums added and divided by
    the count of labels that are not ignored. torchtune's TransformerDecoder hands it the lm_head applied to
    each sequence chunk of the hidden states (contiguous chunks); an HF model returns the whole logits, so
    they are chunked here over the flattened tokens (``logits.reshape(-1, V).chunk(n)``, as LitGPT's
    chunked_cross_entropy splits them): contiguous views, the same bytes, where sequence chunks of a batch > 1
    would be strided and their ``reshape(-1, V)`` a copy of the logits."""
    total_elements = (labels != IGNORE_INDEX).sum()
    label_chunks = labels.reshape(-1).chunk(num_output_chunks)
    logit_chunks = logits.reshape(-1, logits.size(-1)).chunk(num_output_chunks)
    total_loss = 0.0
    for logits_chunk, labels_chunk in zip(logit_chunks, label_chunks):
        total_loss += F.cross_entropy(logits_chunk.float(), labels_chunk, ignore_index=IGNORE_INDEX, reduction="sum")
    return total_loss / total_elements


def require_fused_loss(loss: str, device: str, model_type: str, packages: bool = True) -> None:
    """InputError (one line) unless the fused loss `loss` (liger, cce) can run: on CUDA, and (packages) with its
    package importable here (and, for Liger, a model type it patches: without one _apply_liger_kernel_to_instance
    patches nothing and transformers' loss would run instead)."""
    from peftcalc.errors import InputError

    module, release = FUSED_LOSS_PACKAGES[loss]
    if device != "cuda":
        raise InputError(f"loss {loss} runs Triton kernels on CUDA only ({release} has no CPU path): trace it on "
                         "cuda (measure/matrices/gpu.toml); the estimate is modelled, not traced")
    if not packages:
        return
    try:
        __import__(module)
    except ImportError as e:
        raise InputError(f"loss {loss} needs {release} (pip install {release}): {e}") from None
    if loss == "liger":
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            raise InputError(f"loss liger: Liger Kernel patches no {model_type} model")


def apply_liger_loss(model) -> None:
    """Liger's fused linear cross-entropy in the transformers model's forward, nothing else of Liger's
    (``_apply_liger_kernel_to_instance(model, fused_linear_cross_entropy=True, rope=False, rms_norm=False,
    swiglu=False)``: e.g. apply_liger_kernel_to_llama sets ``model.forward = MethodType(llama_lce_forward,
    model)``, whose training forward runs LigerForCausalLMLoss on the hidden states and returns no logits)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=True, cross_entropy=False, rope=False,
                                    rms_norm=False, swiglu=False, geglu=False, layer_norm=False)


def cce_loss(causal_lm, batch: dict) -> torch.Tensor:
    """Cut Cross-Entropy on a causal language model (cut_cross_entropy.linear_cross_entropy, impl "cce",
    reduction "mean", shift=1: the hidden state at position i predicts label i + 1, as Unsloth and axolotl call
    it): the decoder's last hidden state and the lm_head weight, no logits."""
    from cut_cross_entropy import linear_cross_entropy

    batch = dict(batch)
    labels = batch.pop("labels")
    hidden = causal_lm.model(**batch).last_hidden_state
    return linear_cross_entropy(hidden, causal_lm.lm_head.weight, labels, shift=1)


def trl_sft_batch(ids: torch.Tensor) -> dict:
    """The batch TRL's SFTTrainer trains on (trl/trainer/sft_trainer.py DataCollatorForLanguageModeling.torch_call,
    padding_free False): input_ids, labels (the input ids padded with -100: a tensor of their own, made by trl's
    ``pad``) and attention_mask (``torch.ones_like(ids)`` padded with 0), each (batch, seq) int64."""
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _fused_head_model(model):
    """The model TRL patches (SFTTrainer.__init__: ``add_fused_lm_head(model.get_base_model() if is_peft_model(model)
    else model, outputs=("log_probs", "entropy", "is_top1"))``), patched once; under DistributedDataParallel the
    module it wraps (the Trainer patches the model before accelerate wraps it)."""
    from torch.nn.parallel import DistributedDataParallel
    from trl.trainer.utils import add_fused_lm_head

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not getattr(base, "_peftcalc_fused_lm_head", False):
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        base._peftcalc_fused_lm_head = True
    return model


def trl_sft_loss(model, batch: dict):
    """(loss, outputs) as TRL 1.16's SFTTrainer.compute_loss (trl/trainer/sft_trainer.py) computes them with its
    default loss (loss_type "nll", no compute_loss_func, no label smoothing) and no num_items_in_batch: the model
    runs with ``fused_lm_head=True`` (trl/trainer/utils.py add_fused_lm_head: the backbone, then
    trl/kernels/chunked_logprob.py ChunkedLogProbFunction on the hidden states of every position, no logits),
    ``per_token_loss = -outputs.log_probs``, the loss its sum over ``label_mask.sum().clamp(min=1)``; then the
    metrics it logs (entropy, mean token accuracy, the attention mask's token count), each read with ``.item()``."""
    outputs = _fused_head_model(model)(**batch, use_cache=False, fused_lm_head=True)
    per_token_loss = -outputs.log_probs
    num_tokens = outputs.label_mask.sum()
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    num_valid = outputs.label_mask.sum()
    entropy_sum = outputs.entropy.detach().sum()
    num_correct = outputs.is_top1.sum()
    (entropy_sum / num_valid).item()
    (num_correct / num_valid).item()
    batch["attention_mask"].sum().item()
    return loss, outputs
