"""TRL SFTTrainer's loss (loss "trl"): its fused LM head instead of the model's lm_head and ForCausalLMLoss.

TRL 1.16's SFTTrainer.__init__ (trl/trainer/sft_trainer.py) patches the causal LM with
``add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))`` (trl/trainer/utils.py), and
SFTTrainer.compute_loss runs ``model(**inputs, fused_lm_head=True)``: the backbone, then ``_fused_forward`` shifts
the last hidden state and the labels (``last_hidden_state[:, :-1]``, ``labels[:, 1:]``), and
trl/kernels/chunked_logprob.py ChunkedLogProbFunction computes each position's log-probability, entropy and
top-1 flag from ``hidden @ lm_head.weight.T`` in [TOKEN_CHUNK_SIZE x chunk_size] = [4096 x 32768] tiles of one
``mm_buf`` (no logits). On a device without Triton (the CPU, and the harness's fake tensors) every position is
scored, each tile folded by torch ops (``_forward_tile`` / ``_backward_tile``); on CUDA with Triton only the
positions whose label is not -100 (all of them in the batch modelled here), by kernels that allocate nothing.

The byte counts below replay those functions line by line (N the scored positions, H hidden, V vocabulary, c the
compute dtype's bytes, n x w a tile). Traced: the loss "trl" rows of measure/matrices/ci.toml (the harness runs
measure.losses.trl_sft_loss), tests/peftcalc/test_trl_loss.py and tests/peftcalc/integrations/
test_memory_callback.py (real SFTTrainer runs, to the byte).
"""

from __future__ import annotations

from peftcalc.layout import Layout
from peftcalc.methods.sites import param_trains
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES
from peftcalc.sim.loss import LossBuffers
from peftcalc.spec import ModelSpec

__all__ = ["TOKEN_CHUNK", "VOCAB_CHUNK", "trl_fused_head", "trl_loss_buffers", "trl_tiles"]

TOKEN_CHUNK = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
VOCAB_CHUNK = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE (add_fused_lm_head's chunk_size)


def scored_positions(ctx: StepContext) -> int:
    """N: the positions ChunkedLogProbFunction scores, batch x (seq - 1) (``last_hidden_state[:, :-1]``; on CUDA
    ``hidden_states[mask]``, the positions whose label is not -100: all of them here)."""
    return ctx.batch * (ctx.seq - 1)


def trl_tiles(n_positions: int, vocab: int) -> list[tuple[int, int]]:
    """(n, w) of each tile ChunkedLogProbFunction.forward/backward project: token chunks of TOKEN_CHUNK rows,
    each over vocabulary chunks of VOCAB_CHUNK columns (``tile = mm_buf[:n, : end - start]``)."""
    tokens = [min(TOKEN_CHUNK, n_positions - s) for s in range(0, n_positions, TOKEN_CHUNK)]
    widths = [min(VOCAB_CHUNK, vocab - s) for s in range(0, vocab, VOCAB_CHUNK)]
    return [(n, w) for n in tokens for w in widths]


def mm_buf_bytes(n_positions: int, c: int) -> int:
    """``mm_buf = torch.empty((min(N, TOKEN_CHUNK_SIZE), chunk_size), dtype=compute_dtype)``: a full-width
    buffer even when the vocabulary is narrower."""
    return min(n_positions, TOKEN_CHUNK) * VOCAB_CHUNK * c


class _Live:
    """A running count of live bytes and its peak: the replays below add and free named tensors in the order
    the TRL code makes and drops them."""

    def __init__(self) -> None:
        self.live, self.peak, self.held = 0, 0, {}

    def new(self, name: str, nbytes: int) -> None:
        self.held[name] = self.held.get(name, 0) + nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def free(self, *names: str) -> None:
        for name in names:
            self.live -= self.held.pop(name, 0)


def _forward_tile(m: _Live, n: int, w: int, c: int) -> None:
    """chunked_logprob.py _forward_tile (entropy and is_top1 asked for, no softcap, no mean logits): every
    local is dropped when it returns."""
    if c != 4:
        m.new("tile_f32", 4 * n * w)  # tile.float(), held as _torch_transform's argument
    m.new("z1", 4 * n * w)  # z * logit_scale
    m.new("z", 4 * n * w)  # z * inv_t
    m.free("z1", "tile_f32")
    m.new("local", 8 * n)  # targets - vocab_start
    m.new("arange", 8 * w)
    m.new("before", n * w)  # arange < local.unsqueeze(-1)
    m.free("arange")
    m.new("not", n * w)  # ~before_target
    m.new("masked", 4 * n * w)  # z.masked_fill(~before_target, -inf)
    m.free("not")
    m.new("amax", 4 * n)
    m.free("masked")
    m.new("maximum", 4 * n)  # torch.maximum(max_before_target, _), copied in place
    m.free("amax", "maximum")
    m.new("amax", 4 * n)  # new_m = torch.maximum(running_max, z.amax(-1))
    m.new("new_m", 4 * n)
    m.free("amax")
    m.new("sub", 4 * n)  # rescale = torch.exp(running_max - new_m)
    m.new("rescale", 4 * n)
    m.free("sub")
    m.new("sub", 4 * n * w)  # e = torch.exp(z - new_m.unsqueeze(-1))
    m.new("e", 4 * n * w)
    m.free("sub")
    m.new("sum", 4 * n)  # sum_exp.mul_(rescale).add_(e.sum(-1))
    m.free("sum")
    m.new("ez", 4 * n * w)  # x_sum_exp.mul_(rescale).add_((e * z).sum(-1))
    m.new("sum", 4 * n)
    m.free("ez", "sum")
    m.new("ge", n)  # in_tile = (local >= 0) & (local < n_cols)
    m.new("lt", n)
    m.new("in_tile", n)
    m.free("ge", "lt")
    m.new("clamp", 8 * n)  # z.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1))
    m.new("target_z", 4 * n)
    m.free("clamp")
    m.new("where", 4 * n)  # target_logit.copy_(torch.where(in_tile, target_z, target_logit))
    m.free("where", "z", "local", "before", "new_m", "rescale", "e", "in_tile", "target_z")


def _function_forward(m: _Live, n_positions: int, vocab: int, c: int) -> None:
    """ChunkedLogProbFunction.forward: seven fp32 per-position statistics and mm_buf, the tiles, then log_z
    (saved), log-probabilities, entropy (saved) and is_top1; the statistics and mm_buf die when it returns."""
    stats = ("running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "max_before_target", "target_logit")
    for name in stats:
        m.new(name, 4 * n_positions)
    m.new("mm_buf", mm_buf_bytes(n_positions, c))
    for n, w in trl_tiles(n_positions, vocab):
        _forward_tile(m, n, w, c)
    m.new("log", 4 * n_positions)  # log_z = running_max + torch.log(sum_exp)
    m.new("log_z", 4 * n_positions)
    m.free("log")
    m.new("logprobs", 4 * n_positions)
    m.new("div", 4 * n_positions)  # entropy = log_z - x_sum_exp / sum_exp
    m.new("entropy", 4 * n_positions)
    m.free("div")
    m.new("ge", n_positions)  # is_top1 = (target_logit >= running_max) & (target_logit > max_before_target)
    m.new("gt", n_positions)
    m.new("is_top1", n_positions)
    m.free("ge", "gt", "mm_buf", *stats)


def _triton_forward(m: _Live, n_positions: int, c: int) -> None:
    """ChunkedLogProbFunction.forward with Triton (CUDA): the same buffers, the tiles folded in place."""
    stats = ("running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "max_before_target", "target_logit")
    for name in stats:
        m.new(name, 4 * n_positions)
    m.new("mm_buf", mm_buf_bytes(n_positions, c))
    for name in ("log_z", "logprobs", "entropy"):
        m.new(name, 4 * n_positions)
    m.new("is_top1", n_positions)
    m.free("mm_buf", *stats)


def _fused_forward(m: _Live, ctx: StepContext, spec: ModelSpec, vocab: int) -> None:
    """trl/trainer/utils.py add_fused_lm_head's _fused_forward after the backbone, then SFTTrainer.compute_loss
    (no num_items_in_batch: the harness's step; its metrics read with .item()). The last hidden state is the
    model output (ActivationProfile.model_output), not counted here; the tensors ChunkedLogProbFunction saves
    (hidden, targets, log_z, entropy) are, and stay."""
    n, h, c = scored_positions(ctx), spec.hidden_size, DTYPE_BYTES[ctx.compute_dtype]
    cuda = ctx.device == "cuda"
    m.new("label_mask", n)  # mask = labels != -100 (returned as label_mask)
    if cuda:
        m.new("hidden", n * h * c)  # hidden_states[mask]
        m.new("targets", 8 * n)  # labels[mask]
        _triton_forward(m, n, c)
    else:
        if ctx.batch > 1:  # last_hidden_state[:, :-1].reshape(-1, H): a copy unless the batch is 1
            m.new("hidden", n * h * c)
        m.new("targets", 8 * n)  # labels.clamp(min=0).reshape(-1)
        _function_forward(m, n, vocab, c)
    # per_token = (x.view(mask.shape).masked_fill(~mask, 0) ...) on CPU; (x.new_zeros(mask.shape).masked_scatter(
    # mask, x) ...) on CUDA: log_probs and entropy keep their ~mask (saved) on CPU, is_top1's is dropped
    for name, size in (("log_probs", 4 * n), ("entropy_out", 4 * n), ("is_top1_out", n)):
        if cuda:
            m.new("zeros", size)
            m.new(name, size)
            m.free("zeros")
        else:
            m.new(name + "_not", n)
            m.new(name, size)
    m.free("is_top1_out_not", "logprobs", "is_top1")
    # loss = -log_probs.sum() / mask.sum().clamp(min=1)
    m.new("sum", 4)
    m.new("neg", 4)
    m.free("sum")
    m.new("count", 8)
    m.new("inner_clamp", 8)
    m.free("count")
    m.new("inner_loss", 4)
    m.free("neg")
    # SFTTrainer.compute_loss: per_token_loss = -outputs.log_probs; loss = per_token_loss.sum() / num_tokens ...
    m.new("per_token_loss", 4 * n)
    m.new("num_tokens", 8)
    m.new("sum", 4)
    m.new("clamp", 8)
    m.new("loss", 4)
    m.free("sum")
    for name, size in (("num_valid", 8), ("entropy_sum", 4), ("num_correct", 8), ("div", 4)):
        m.new(name, size)
    m.free("div")
    m.new("div", 4)
    m.free("div")
    m.new("tokens", 8)  # attention_mask.sum()
    m.free("tokens")


def trl_saved(ctx: StepContext, spec: ModelSpec) -> dict:
    """What ChunkedLogProbFunction saves (ctx.save_for_backward: hidden, weight, bias, targets, log_z, entropy),
    by name: the hidden states' copy (a view of the last hidden state when the batch is 1 on CPU), the targets
    (int64), log_z and the entropy (fp32)."""
    n, h, c = scored_positions(ctx), spec.hidden_size, DTYPE_BYTES[ctx.compute_dtype]
    copied = ctx.device == "cuda" or ctx.batch > 1
    return {"hidden": n * h * c if copied else 0, "targets": 8 * n, "log_z": 4 * n, "entropy": 4 * n}


def trl_loss_buffers(ctx: StepContext, spec: ModelSpec) -> LossBuffers:
    """The loss buffers of loss "trl" (see the module docstring), beside what the fused head saves (trl_saved,
    counted with the head: sim.trl_head.trl_fused_head).

    Forward: the largest live bytes of the replay of _fused_forward and compute_loss, less the saved tensors.
    Start of backward: log_probs' masked_fill keeps ~mask (N bool, saved); DivBackward0 makes the sum's gradient
    (a scalar) and releases its saved clamp, SumBackward0 expands it, NegBackward0 makes an N fp32 gradient,
    MaskedFillBackward0 another (the fused Function's incoming gradient), 9 N bytes with ~mask, before it
    releases ~mask; the loss and ones_like(loss): two fp32 scalars."""
    m = _Live()
    _fused_forward(m, ctx, spec, spec.vocab_size)
    saved = sum(trl_saved(ctx, spec).values())
    n = scored_positions(ctx)
    return LossBuffers(saved=0, saved_backward=n, backward_peak=9 * n, forward_peak=m.peak - saved, scalars=2 * 4)


def _backward_tile_peak(n: int, w: int) -> int:
    """chunked_logprob.py _backward_tile (the log-probabilities' gradient only: entropy is logged detached): y,
    z, log_p, p and grad (4 n w each), is_target (n w bool), then ``is_target.float()`` and
    ``_ - p`` beside them (the bf16 tile's fp32 copy is gone by then)."""
    return 7 * 4 * n * w + n * w


def _backward_steps(ctx: StepContext, spec: ModelSpec, hidden_grad: bool, weight_step: tuple | None) -> list:
    """ChunkedLogProbFunction.backward as node steps: fp32 grad_hidden (and grad_weight) zeros and mm_buf, the
    largest tile (CPU: _backward_tile's locals; bf16: _addmm_fp32's ``a.float()``/``b.float()`` copies after it;
    Triton: nothing), the returned ``.to(dtype)`` copies; the formula's mm_buf and fp32 accumulators die when it
    returns."""
    n_pos, h, vocab, c = scored_positions(ctx), spec.hidden_size, spec.vocab_size, DTYPE_BYTES[ctx.compute_dtype]
    wbytes = DTYPE_BYTES[ctx.weight_dtype]
    steps = []
    if hidden_grad:
        steps.append(("new", "gh32", n_pos * h * 4))
    if weight_step is not None:
        steps.append(("new", "gw32", vocab * h * 4) if wbytes != 4 else weight_step)
    steps.append(("new", "mm_buf", mm_buf_bytes(n_pos, c)))
    if ctx.device != "cuda":
        tile = max(_backward_tile_peak(n, w) for n, w in trl_tiles(n_pos, vocab))
        copies = max((4 * n * w + 4 * (w * h if hidden_grad else n * h)) if c != 4 else 0
                     for n, w in trl_tiles(n_pos, vocab))
        steps += [("new", "tile", max(tile, copies)), ("free", "tile")]
    if hidden_grad and c != 4:
        steps.append(("new", "gh", n_pos * h * c))
    if weight_step is not None and wbytes != 4:
        steps += [weight_step, ("free", "gw32")]
    steps += [("free", "mm_buf")]
    if hidden_grad and c != 4:
        steps.append(("free", "gh32"))
    return steps + [("returned",)]


def trl_fused_head(rec: Recorder, spec: ModelSpec, plan: Plan, layout: Layout, x: SymTensor) -> SymTensor:
    """The fused head on the final hidden states x (b x s x H): records what ChunkedLogProbFunction saves
    (trl_saved) and its backward (_backward_steps), and the slice's backward (SliceBackward0: a b x s x H
    gradient from the N x H one); returns the per-position log-probabilities (N fp32), whose gradient starts
    the head's backward (made by the loss's MaskedFillBackward0, trl_loss_buffers)."""
    ctx = rec.ctx
    n, h, c = scored_positions(ctx), spec.hidden_size, DTYPE_BYTES[ctx.compute_dtype]
    tied = layout.head_tied_to_embedding and plan.embedding_trains
    weight_trains = param_trains(plan, "lm_head", True) or tied
    weight_step = (("pending" if tied else "param", spec.vocab_size * h * DTYPE_BYTES[ctx.weight_dtype])
                   if weight_trains else None)
    hidden = rec.new(n * h, x.dtype, x.requires_grad)  # last_hidden_state[:, :-1].reshape(-1, H)
    if trl_saved(ctx, spec)["hidden"]:
        hidden_id = rec.save(hidden, "loss.trl_hidden")
    else:  # a view of x: x's storage is what the Function saves
        rec.free(hidden)
        hidden_id = rec.save(x, "loss.trl_hidden")
    # SliceBackward0 (CUDA: IndexBackward0) makes x's b x s x H gradient from the N x H one
    rec.node(hidden, [("new", "d", x.nbytes)], [(x.id, "d")])
    saved = [hidden_id, rec.save_new(n, "int64", "loss.trl_targets"), rec.save_new(n, "float32", "loss.trl_log_z"),
             rec.save_new(n, "float32", "loss.trl_entropy")]
    root = rec.new(n, "float32", x.requires_grad or weight_trains)
    out = "gh32" if c == 4 else "gh"
    rec.node(root, _backward_steps(ctx, spec, x.requires_grad, weight_step),
             [(hidden.id, out)] if x.requires_grad else [], saved)
    rec.free(root)
    return root
