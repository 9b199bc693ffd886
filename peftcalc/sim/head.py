"""Before and after the blocks: the embeddings' own ops, the final norm and the task head (as each ForXxx
class runs them), and which parameters outside the blocks train.
"""

from __future__ import annotations

from functools import lru_cache

from peftcalc.backward import BackwardPeak, run_backward
from peftcalc.families import build_layout, dropout_p
from peftcalc.families.bert import mlm_decoder_bias
from peftcalc.layout import Layout
from peftcalc.methods.sites import site_linear
from peftcalc.ops.linear import linear
from peftcalc.ops.nonlinear import activation, tanh
from peftcalc.ops.norms import layer_norm, rms_norm
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.ops.tensor_ops import cast, dropout, first_token
from peftcalc.plan import Plan
from peftcalc.spec import ModelSpec

__all__ = [
    "biased_paths",
    "embeddings_forward",
    "final_norm",
    "has_final_norm",
    "head_backward",
    "head_forward",
    "head_linear",
    "param_trains",
    "quantized_paths",
    "trainable_names",
    "trained_norm_params",
    "unsaved_model_output",
]


@lru_cache(maxsize=1024)
def trainable_names(plan: Plan) -> frozenset:
    """Names of the trainable parameters outside the blocks (a modules_to_save copy counts as its
    original)."""
    return frozenset(g.name.split("#", 1)[0] for g in plan.groups if g.trainable and g.layer is None)


def trained_norm_params(plan: Plan, path: str) -> int:
    """How many of the weight and bias of the LayerNorm at `path` (outside the blocks) train (2 when
    neither does: layer_norm then makes no parameter gradient)."""
    names = trainable_names(plan)
    return ((f"{path}.weight" in names) + (f"{path}.bias" in names)) or 2


def param_trains(plan: Plan, path: str, weight_only: bool = False) -> bool:
    names = trainable_names(plan)
    if weight_only:
        return f"{path}.weight" in names or path in names
    return any(n == path or n.startswith(path + ".") for n in names)


def embeddings_forward(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor) -> SymTensor:
    h = spec.hidden_size
    if spec.is_vision and rec.ctx.autocast and param_trains(plan, layout.embedding_path):
        # the patch embedding's Conv2d under autocast: convolution_backward's formula saves the input and
        # the weight whenever the node exists (any of them needs a gradient), here their bf16 copies
        image = spec.num_channels * spec.image_size ** 2
        rec.save_new(rec.ctx.batch * image, rec.ctx.autocast, "patch_embedding.input")
        rec.save_new(spec.hidden_size * image // spec.num_patches, rec.ctx.autocast, "patch_embedding.weight")
    if spec.model_type == "gpt2":
        return dropout(rec, x, dropout_p(spec, "embd"), "embeddings.dropout")
    if spec.model_type in ("bert", "roberta"):
        norm = f"{layout.embedding_path.rsplit('.', 1)[0]}.LayerNorm"
        x = layer_norm(rec, x, param_trains(plan, norm), h, "embeddings.LayerNorm", trained_norm_params(plan, norm))
        return dropout(rec, x, dropout_p(spec, "embd"), "embeddings.dropout")
    if spec.model_type == "clip_vision_model":
        return layer_norm(rec, x, param_trains(plan, "pre_layrnorm"), h, "pre_layrnorm",
                          trained_norm_params(plan, "pre_layrnorm"))
    return x


def head_linear(rec: Recorder, plan: Plan, x: SymTensor, path: str, in_f: int, out_f: int, tag: str,
                 trains: bool | None = None) -> SymTensor:
    """A head Linear: trainable (a modules_to_save copy, a trainable head), or a LoRA/DoRA target
    (all-linear takes the MLM transform's dense, BERT's pooler and ViT's classifier; DoRA subtracts the
    bias of one that has it, see dora_output)."""
    s = plan.settings
    lora = s.method in ("lora", "qlora") and path in plan.targets
    w = param_trains(plan, path, True) if trains is None else trains
    return site_linear(rec, x, in_f, out_f, w, tag, lora_rank=s.rank if lora else 0, dora=s.dora and lora,
                  quantized=path in quantized_paths(plan), bias=path in biased_paths(build_layout(plan.spec)),
                  bias_trains=f"{path}.bias" in trainable_names(plan))


@lru_cache(maxsize=256)
def biased_paths(layout: Layout) -> frozenset:
    """Paths of the model's modules that carry a bias."""
    return frozenset(m.path for m in layout.modules if m.bias)


@lru_cache(maxsize=1024)
def quantized_paths(plan: Plan) -> frozenset:
    """Module paths whose weight is NF4 (QLoRA: bitsandbytes Linear4bit, methods.lora.quantizable)."""
    return frozenset(g.name.rsplit(".", 1)[0] for g in plan.groups if g.quantized)


def has_final_norm(spec: ModelSpec, layout: Layout) -> bool:
    return bool(layout.final_norm_path) and spec.model_type != "clip_vision_model"  # CLIP norms only the pooled token


def final_norm(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor) -> SymTensor:
    """The base model's final norm on the last block's output (x itself where it has none)."""
    if not has_final_norm(spec, layout):
        return x
    norm_trains = param_trains(plan, layout.final_norm_path)
    if spec.model_type in ("llama", "mistral", "qwen2"):
        return rms_norm(rec, x, norm_trains, "norm")
    return layer_norm(rec, x, norm_trains, spec.hidden_size, layout.final_norm_path,
                      trained_norm_params(plan, layout.final_norm_path))


def head_forward(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor):
    """Final norm and task head (as each ForXxx class runs them); returns (logits numel, the final
    hidden state, the tensor whose gradient starts the head's backward: the logits, or the bare
    encoder's loss)."""
    ctx = rec.ctx
    h, tok, b = spec.hidden_size, ctx.tokens, ctx.batch
    x = final_norm(rec, spec, plan, layout, x)
    if spec.task == "causal_lm":
        tied = layout.head_tied_to_embedding and plan.embedding_trains  # its gradient waits for the lookup's
        logits = linear(rec, x, h, spec.vocab_size, param_trains(plan, "lm_head", True) or tied, "lm_head", grad_pending=tied)
        return tok * spec.vocab_size, x, logits
    if spec.task == "masked_lm":
        c = "cls.predictions" if spec.model_type == "bert" else "lm_head"
        dense = f"{c}.transform.dense" if spec.model_type == "bert" else f"{c}.dense"
        norm = f"{c}.transform.LayerNorm" if spec.model_type == "bert" else f"{c}.layer_norm"
        d = head_linear(rec, plan, x, dense, h, h, "mlm.dense")
        d = activation(rec, d, "gelu", "mlm.act")
        d = layer_norm(rec, d, param_trains(plan, norm), h, "mlm.layer_norm", trained_norm_params(plan, norm))
        tied = layout.head_tied_to_embedding and plan.embedding_trains  # its gradient waits for the lookup's
        logits = linear(rec, d, h, spec.vocab_size, param_trains(plan, f"{c}.decoder", True) or tied, "mlm.decoder",
                        grad_pending=tied, bias=True, bias_trains=param_trains(plan, mlm_decoder_bias(spec, layout)))
        return tok * spec.vocab_size, x, logits
    if spec.task == "seq_cls" and spec.is_decoder:  # score on every position, then gather the last
        scores = head_linear(rec, plan, x, "score", h, spec.num_labels, "score")
        # logits[arange(b), last_non_pad]: index's backward makes zeros like the scores and index_put
        logits = rec.new(b * spec.num_labels, scores.dtype, scores.requires_grad)
        rec.node(logits, [("new", "z", scores.nbytes), ("new", "d", scores.nbytes), ("free", "z")],
                 [(scores.id, "d")])
        return b * spec.num_labels, x, logits
    p = dropout_p(spec, "resid")
    if spec.task == "seq_cls" and spec.model_type == "bert":  # BertPooler, dropout, classifier
        pooled = head_linear(rec, plan, first_token(rec, x, b), "bert.pooler.dense", h, h, "pooler.dense")
        pooled = tanh(rec, pooled, "pooler.tanh")
        pooled = dropout(rec, pooled, p, "classifier.dropout")
        logits = head_linear(rec, plan, pooled, "classifier", h, spec.num_labels, "classifier")
        return b * spec.num_labels, x, logits
    if spec.task == "seq_cls":  # RobertaClassificationHead: dropout, dense, tanh, dropout, out_proj
        d = dropout(rec, first_token(rec, x, b), p, "classifier.dropout")
        d = head_linear(rec, plan, d, "classifier.dense", h, h, "classifier.dense")
        d = tanh(rec, d, "classifier.tanh")
        d = dropout(rec, d, p, "classifier.dropout2")
        logits = head_linear(rec, plan, d, "classifier.out_proj", h, spec.num_labels, "classifier.out_proj")
        return b * spec.num_labels, x, logits
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


def unsaved_model_output(rec: Recorder, hidden: SymTensor) -> int:
    """The base model's output (last_hidden_state: the final norm's output, or the last block's)
    stays alive until the loss is computed, because the ForXxx forward holds ``outputs`` (e.g.
    LlamaForCausalLM.forward: outputs = self.model(...); logits = self.lm_head(outputs.last_hidden_state);
    loss = self.loss_function(...)). Counted here when no op saved it (a frozen head, or autocast's
    head saving a cast copy); a saved one is already in the saved bytes."""
    storage = hidden.base if hidden.base is not None else hidden
    return 0 if storage.id in rec.saved else storage.nbytes


def head_backward(rec: Recorder, start: int, root: SymTensor) -> BackwardPeak:
    """The head's backward replayed (peftcalc.backward) from the nodes recorded since `start`, with what
    the head ('post') saved, from the gradient of `root` (the logits, or the bare encoder's loss)."""
    post_saved = {tid: nbytes for tid, (bucket, _t, nbytes) in rec.saved.items() if bucket == "post"}
    return run_backward(rec.nodes[start:], post_saved, {root.id: root.nbytes} if root.requires_grad else {},
                        in_place=rec.ctx.device == "cuda").peak
