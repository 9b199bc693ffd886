"""Before and after the blocks: the embeddings' own ops, the final norm and the task head (as each ForXxx
class runs them), and which parameters outside the blocks train.
"""

from __future__ import annotations


from peftcalc.backward import GRAD, BackwardPeak, run_backward
from peftcalc.families import family
from peftcalc.layout import Layout
from peftcalc.methods.sites import HeadSites, head_linear, param_trains, trained_norm_params
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import tanh
from peftcalc.ops.norms import gemma_rms_norm, layer_norm, rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import cast, first_token, scale
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES
from peftcalc.spec import ModelSpec

__all__ = [
    "embeddings_forward",
    "final_norm",
    "has_final_norm",
    "head_backward",
    "fused_loss_head",
    "head_forward",
    "unsaved_model_output",
]


def embeddings_forward(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor) -> SymTensor:
    if spec.is_vision and rec.ctx.autocast and param_trains(plan, layout.embedding_path):
        # the patch embedding's Conv2d under autocast: convolution_backward's formula saves the input and
        # the weight whenever the node exists (any of them needs a gradient), here their bf16 copies
        image = spec.num_channels * spec.image_size ** 2
        rec.save_new(rec.ctx.batch * image, rec.ctx.autocast, "patch_embedding.input")
        rec.save_new(spec.hidden_size * image // spec.num_patches, rec.ctx.autocast, "patch_embedding.weight")
    hook = family(spec).embeddings
    return hook(rec, spec, layout, HeadSites(plan), x) if hook else x


def has_final_norm(spec: ModelSpec, layout: Layout) -> bool:
    """Whether the base model norms its last hidden state (CLIP's post_layernorm norms the pooled token only)."""
    return bool(layout.final_norm_path) and family(spec).final_norm != "pooled"


def final_norm(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor) -> SymTensor:
    """The base model's final norm on the last block's output (x itself where it has none)."""
    if not has_final_norm(spec, layout):
        return x
    norm_trains = param_trains(plan, layout.final_norm_path)
    if family(spec).final_norm in ("rms", "rms_weight_fp32"):
        return rms_norm(rec, x, norm_trains, "norm", weight_fp32=family(spec).final_norm == "rms_weight_fp32")
    if family(spec).final_norm == "gemma":
        return gemma_rms_norm(rec, x, norm_trains, "norm", spec.hidden_size)
    return layer_norm(rec, x, norm_trains, spec.hidden_size, layout.final_norm_path,
                      trained_norm_params(plan, layout.final_norm_path))


def head_forward(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor):
    """Final norm and task head (as each ForXxx class runs them); returns (logits numel, the final
    hidden state, the tensor whose gradient starts the head's backward: the logits, or the bare
    encoder's loss)."""
    ctx = rec.ctx
    h, tok, b = spec.hidden_size, ctx.tokens, ctx.batch
    x = final_norm(rec, spec, plan, layout, x)
    if spec.task == "causal_lm" and ctx.fused_loss == "trl":
        from peftcalc.sim.trl_head import trl_fused_head

        return tok * h, x, trl_fused_head(rec, spec, plan, layout, x)
    if spec.task == "causal_lm" and ctx.fused_loss:
        return tok * h, x, fused_loss_head(rec, spec, plan, layout, x)
    if spec.task == "causal_lm":
        tied = layout.head_tied_to_embedding and plan.embedding_trains  # its gradient waits for the lookup's
        logits = linear(rec, x, h, spec.vocab_size, param_trains(plan, "lm_head", True) or tied, "lm_head", grad_pending=tied)
        return tok * spec.vocab_size, x, _logit_softcap(rec, spec, _logits_scaled(rec, spec, logits))
    if spec.task == "masked_lm":  # the family's MLM head (Family.mlm_head)
        return tok * spec.vocab_size, x, family(spec).mlm_head(rec, spec, layout, HeadSites(plan), x)
    if spec.task == "seq_cls" and spec.is_decoder:  # score on every position, then gather the last
        scores = head_linear(rec, plan, x, "score", h, spec.num_labels, "score")
        # logits[arange(b), last_non_pad]: index's backward makes zeros like the scores and index_put
        logits = rec.new(b * spec.num_labels, scores.dtype, scores.requires_grad)
        rec.node(logits, [("new", "z", scores.nbytes), ("new", "d", scores.nbytes), ("free", "z")],
                 [(scores.id, "d")])
        return b * spec.num_labels, x, logits
    if spec.task == "seq_cls":  # an encoder's classification head (Family.seq_cls_head)
        return b * spec.num_labels, x, family(spec).seq_cls_head(rec, spec, HeadSites(plan), x)
    if spec.task == "image_cls":  # classifier(sequence_output[:, 0, :])
        logits = head_linear(rec, plan, first_token(rec, x, b), "classifier", h, spec.num_labels, "classifier")
        return b * spec.num_labels, x, logits
    # A bare encoder is trained here on last_hidden_state.float().pow(2).mean() (measure.run
    # forward_loss): pow saves its fp32 input; the backward expands the mean's gradient and makes
    # pow's grad * 2 x (x.pow(1) and 2 * _ as temporaries).
    x32 = cast(rec, x, "float32")
    loss = rec.new(1, "float32", x.requires_grad)
    if x.requires_grad:
        xs = rec.save(x32, "loss.pow_input")
        n = x32.nbytes
        sq = rec.new(x.numel, "float32", True)
        rec.node(sq, [("new", "t", n), ("new", "u", n), ("new", "d", n), ("free", "t"), ("free", "u")],
                 [(x32.id, "d")], [xs])
        rec.node(loss, [("new", "d", n)], [(sq.id, "d")])
    return 0, x, loss


def _logits_scaled(rec: Recorder, spec: ModelSpec, logits: SymTensor) -> SymTensor:
    """GraniteForCausalLM.forward's ``logits = logits / self.config.logits_scaling``: a second logits-sized tensor
    (lm_head's output dropped when `logits` is rebound); its backward divides the gradient (a new one)."""
    if not spec.logits_scaled:
        return logits
    out = scale(rec, logits)
    rec.free(logits)
    return out


def _logit_softcap(rec: Recorder, spec: ModelSpec, logits: SymTensor) -> SymTensor:
    """Gemma2ForCausalLM.forward's final soft-capping when final_logit_softcapping is set: ``logits = logits /
    cap; logits = torch.tanh(logits); logits = logits * cap``, three logits-sized tensors made one after the
    other (each input dropped when `logits` is rebound), tanh saving its output; each backward makes a new
    gradient."""
    if not spec.final_logit_softcap:
        return logits
    for step in ("divide", "tanh", "multiply"):
        out = tanh(rec, logits, "lm_head.softcap_tanh") if step == "tanh" else scale(rec, logits)
        rec.free(logits)
        logits = out
    return logits


def fused_loss_head(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor) -> SymTensor:
    """lm_head and cross-entropy in one autograd Function on the final hidden states x (t x h): no logits.
    Returns the tensor whose gradient starts the head's backward.

    liger: Liger Kernel ops/fused_linear_cross_entropy.py LigerFusedLinearCrossEntropyFunction (at
      linkedin/Liger-Kernel 00eba634), patched into LlamaForCausalLM.forward by apply_liger_kernel_to_llama
      (TRL use_liger_kernel): the forward computes grad_input (zeros_like(x)) and grad_weight (zeros_like of
      the lm_head weight, when it trains) and saves them (sim.loss.fused_loss_buffers counts them); the
      backward returns grad_input as x's gradient (here: the incoming gradient, t h bytes, handed on as is)
      and grad_weight as the weight's (a parameter gradient, already made).
    cce: Apple's Cut Cross-Entropy cut_cross_entropy/cce.py LinearCrossEntropyFunction (apple/ml-cross-entropy
      3a798378): the forward saves x (e), the lse (fp32 per valid token), the valid indices (int64) and
      logit_avg (fp32 per vocabulary entry); the backward (cce_backward.py cce_backward_kernel) sorts the
      vocabulary by logit_avg (argsort's int64 and its int32 copy), makes de = zeros_like(e), dc =
      zeros_like(c) when the weight trains, and int32 lock tables of ceil(n/128) x ceil(h/64) entries (n the
      valid tokens, or the vocabulary)."""
    ctx = rec.ctx
    h, tok, vocab = spec.hidden_size, ctx.tokens, spec.vocab_size
    tied = layout.head_tied_to_embedding and plan.embedding_trains
    weight_trains = param_trains(plan, "lm_head", True) or tied
    dw = [("pending" if tied else "param", vocab * h * DTYPE_BYTES[ctx.weight_dtype])] if weight_trains else []
    if ctx.fused_loss == "liger":
        root = rec.new(tok * h, x.dtype, x.requires_grad)  # its gradient: the saved grad_input
        rec.node(root, dw, [(x.id, GRAD)] if x.requires_grad else [])
        return root
    valid = tok - ctx.batch  # shift=1: the last position of each sequence predicts nothing
    saved = [rec.save(x, "loss.cce_hidden"), rec.save_new(valid, "float32", "loss.cce_lse"),
             rec.save_new(valid, "int64", "loss.cce_valids"), rec.save_new(vocab, "float32", "loss.cce_logit_avg")]
    root = rec.new(1, "float32", x.requires_grad or weight_trains)

    def locks(n: int) -> int:
        return -(-n // 128) * -(-h // 64) * 4

    steps = [("new", "order64", vocab * 8), ("new", "order", vocab * 4), ("free", "order64"),
             ("new", "de", x.nbytes), ("new", "del", locks(valid))]
    if weight_trains:
        steps += [("new", "dcl", locks(vocab))] + dw
    rec.node(root, steps, [(x.id, "de")] if x.requires_grad else [], saved)
    return root


def unsaved_model_output(rec: Recorder, hidden: SymTensor) -> int:
    """The base model's output (last_hidden_state: the final norm's output, or the last block's)
    stays alive until the loss is computed, because the ForXxx forward holds ``outputs`` (e.g.
    LlamaForCausalLM.forward: outputs = self.model(...); logits = self.lm_head(outputs.last_hidden_state);
    loss = self.loss_function(...)). Counted here when no op saved it (a frozen head, or autocast's
    head saving a cast copy); a saved one is already in the saved bytes."""
    storage = hidden.base if hidden.base is not None else hidden
    return 0 if storage.id in rec.device_saved() else storage.nbytes


def head_backward(rec: Recorder, start: int, root: SymTensor) -> BackwardPeak:
    """The head's backward replayed (peftcalc.backward) from the nodes recorded since `start`, with what
    the head ('post') saved, from the gradient of `root` (the logits, or the bare encoder's loss)."""
    post_saved = {tid: nbytes for tid, nbytes in rec.device_saved().items() if rec.saved[tid][0] == "post"}
    return run_backward(rec.nodes[start:], post_saved, {root.id: root.nbytes} if root.requires_grad else {},
                        in_place=rec.ctx.device == "cuda", accumulate=rec.ctx.accumulating).peak
