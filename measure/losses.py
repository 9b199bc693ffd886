"""The losses a recipe puts in place of the model's own (peftcalc.settings.LOSSES), run on the model's
logits by :func:`measure.setup.model_loss`: torchtune's chunked cross-entropy (:func:`chunked_cross_entropy`);
TRL SFTTrainer's loss (:func:`trl_sft_loss`: its fused LM head, which runs torch ops where there is no Triton, on
its collator's batch, :func:`trl_sft_batch`).

Liger Kernel's and Cut Cross-Entropy's fused losses run Triton kernels on CUDA only: the harness runs
them there (gpu matrix), not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "torchtune_shifted_labels"]

IGNORE_INDEX = -100


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


def trl_sft_batch(ids: torch.Tensor) -> dict:
    """The batch TRL's SFTTrainer trains on (trl/trainer/sft_trainer.py DataCollatorForLanguageModeling.torch_call,
    padding_free False): input_ids, labels (the input ids padded with -100: a tensor of their own, made by trl's
    ``pad``) and attention_mask (``torch.ones_like(ids)`` padded with 0), each (batch, seq) int64."""
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _fused_head_model(model):
    """The model TRL patches (SFTTrainer.__init__: ``add_fused_lm_head(model.get_base_model() if is_peft_model(model)
    else model, outputs=("log_probs", "entropy", "is_top1"))``), patched once."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
