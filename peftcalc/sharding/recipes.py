"""The training loop's own choices on one rank of a sharded step, applied to a strategy's events (FSDP2's,
peftcalc.sharding.fsdp; ZeRO's, peftcalc.sharding.zero), which rewrite the one-GPU step of transformers' loss
with the model's outputs dropped before backward. DDP's events start from the whole one-GPU loop
(peftcalc.memory.loop_events) and need none of this.

- keep_outputs: the loop holds the model outputs until backward returns (``outputs = model(**batch);
  outputs.loss.backward()``), so their logits (peftcalc.memory.kept_output_bytes) are alive at every backward
  event, FSDP2's root unshard and final reduce-scatter included (both run inside ``loss.backward()``).
- a loss computed outside the model (``loss chunked``: torchtune's chunked cross-entropy on the logits the model
  returns; measure.setup.model_loss): under FSDP2 the root module (embeddings, final norm, head) finishes its
  forward before the loss runs, and its pre-backward runs after the loss's backward (:func:`loss_outside_root`).
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.activations import activation_profile
from peftcalc.memory import kept_output_bytes
from peftcalc.plan import Plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding.fsdp import compute_view, group_bytes, shard_world
from peftcalc.sharding.shards import GroupBytes

__all__ = ["loss_outside_model", "loop_recipes"]


def loss_outside_model(plan: Plan, t: TrainingSettings) -> bool:
    """Whether the loss runs on the outputs after the model's forward has returned (torchtune's chunked
    cross-entropy: the model runs without labels), not inside it (transformers' ForCausalLMLoss, TRL's fused
    head, which add_fused_lm_head puts in the model's forward)."""
    return t.loss == "chunked" and plan.spec.task == "causal_lm"


def loop_recipes(plan: Plan, t: TrainingSettings, events: list, rank: int) -> list:
    """`events` (a strategy's, rank `rank`) with the loop's keep_outputs and, under FSDP2, a loss outside the
    model applied."""
    one_gpu = compute_view(t)
    if t.sharding in ("fsdp", "hsdp") and loss_outside_model(plan, t):
        events = loss_outside_root(plan, t, events, rank)
    if not t.keep_outputs:
        return events
    kept = kept_output_bytes(plan, one_gpu, activation_profile(plan, one_gpu))
    out = []
    for name, total, parts in events:
        if name.startswith("backward"):
            parts = dict(parts, logits_loss=parts.get("logits_loss", 0) + kept)
            total += kept
        out.append((name, total, parts))
    return out


def loss_outside_root(plan: Plan, t: TrainingSettings, events: list, rank: int) -> list:
    """FSDP2's root around a loss computed on the returned logits (torch/distributed/fsdp/_fully_shard/
    _fsdp_state.py, torch 2.13):

    - the root's ``_post_forward`` runs when the model returns, before the loss: it reshards the root's
      parameters (reshard_after_forward) and frees the last block's all-gather output
      (``self._comm_ctx.all_gather_state = None``), so the loss's forward (``forward``) runs without either; the
      largest moment with them is the head's matmul, its logits just made (``forward:head``);
    - ``_register_pre_backward_hook`` puts the root's pre-backward on the outputs (``t.register_hook``), so it runs
      when the logits' gradient is complete, after the loss's backward: during the loss's backward
      (``backward:loss``) the root is still resharded and nothing is all-gathered; its unshard
      (``backward:unshard``) then holds the all-gather output and the unsharded parameters beside the logits'
      gradient (SplitBackward0's cat of the chunks' gradients, which the head's backward starts from) and
      everything the forward saved but the loss's own (freed by its backward).

    With reshard_after_forward off the root stays unsharded (and its pre-backward gathers nothing), so only the
    last block's all-gather output is gone before the loss."""
    world = shard_world(t)
    groups = group_bytes(plan, t, world, rank % world)
    root = groups.get(None, GroupBytes())
    last = groups.get(plan.spec.num_layers - 1, GroupBytes())
    keep = not t.reshard_after_forward
    one_gpu = compute_view(t)
    act = activation_profile(plan, one_gpu)
    resharded = 0 if keep else root.unsharded
    out = []
    for name, total, parts in events:
        if name == "forward":
            out.append(_head_event(parts, plan, one_gpu, act, last.all_gather))
            parts = dict(parts, unsharded_params=parts["unsharded_params"] - resharded, all_gather_buffers=0)
        elif name == "backward:loss":
            parts = dict(parts, unsharded_params=parts["unsharded_params"] - resharded, all_gather_buffers=0)
        elif name == "backward:unshard":
            continue  # after the loss's backward (below)
        out.append((name, sum(parts.values()), parts))
        if name == "backward:loss" and not keep:
            out.append(_unshard_after_loss(parts, root, act))
    return out


def _head_event(forward: dict, plan: Plan, t: TrainingSettings, act, last_all_gather: int) -> tuple:
    """The head's matmul inside the root's forward: what the forward saved but the loss's (the head's input
    included), the new logits, the base model's output where nothing saves it (ActivationProfile.model_output of
    a loss inside the model: the same hidden state), with the root unsharded and the last block's all-gather
    output alive (the `forward` event's, before this module rewrites them)."""
    inside = activation_profile(plan, replace(t, loss="hf")).model_output
    p = dict(forward, activations=forward["activations"] - act.loss_saved, logits_loss=act.logits_bytes,
             temporaries=forward.get("temporaries", 0) + inside, all_gather_buffers=last_all_gather)
    return "forward:head", sum(p.values()), p


def _unshard_after_loss(loss: dict, root: GroupBytes, act) -> tuple:
    """The root's pre-backward once the logits' gradient is complete (`loss`: the backward:loss event, rewritten):
    the loss's saved tensors gone, the logits' gradient (in the logits' dtype) and the loss scalars alive, the
    root's all-gather output and its unsharded parameters."""
    p = dict(loss, activations=loss["activations"] - act.loss_saved_backward, logits_loss=act.logits_bytes + act.loss_scalars,
             unsharded_params=loss["unsharded_params"] + root.unsharded, all_gather_buffers=root.all_gather)
    return "backward:unshard", sum(p.values()), p
