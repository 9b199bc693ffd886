"""Activation offloading: the device's events of a step whose forward runs under
``torch.autograd.graph.save_on_cpu(pin_memory=True)`` (torch/autograd/graph.py), the loss included, the backward
outside it (its docstring's example; torchtune's and TRL's recipes).

save_on_cpu's pack_to_cpu makes a host copy of every saved variable (parameters and their views included, one
per save) and keeps no device tensor: a saved activation leaves the device when the forward drops its last
reference to it. Its unpack_from_cpu (``tensor.to(device)``) makes a device copy each time a node unpacks a saved
variable, alive while the node's formula runs. The simulation records both (peftcalc.ops.recorder's offload mode:
StepContext.offload): the blocks' and the head's forward peaks count no saved tensor, their backward replays a
copy per unpacked variable. Under gradient checkpointing (torch.utils.checkpoint, non-reentrant) the checkpoint's
hooks are innermost inside a block, so a block's recompute and backward are as without offloading; only the
checkpoints' inputs (_NoopSaveInputs) and what is saved outside the blocks go to the host, each input back on
the device (unpacked by the recompute) while its block's backward runs. The host copies' sum is the profile's
ActivationProfile.host_bytes, reported apart from the device peak (pinned host memory).
"""

from __future__ import annotations

from peftcalc.errors import CombinationError
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.profile import ActivationProfile, make_ctx, stream_dtype

__all__ = ["OFFLOAD_CHECKPOINTED_FAMILIES", "OFFLOAD_FAMILIES", "check_offload", "offloaded_events"]

# the model types whose every saved variable the simulation sizes (their blocks' RoPE saves included:
# families.llama's and families.qwen3's blocks); traced rows in measure/matrices/ci.toml and long.toml
OFFLOAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# of them, those whose checkpointed blocks' backward under offloading is held by traces (tiny-qwen3 LoRA with
# checkpointing peaks inside a block's backward, 10,240 B above the model: not modelled)
OFFLOAD_CHECKPOINTED_FAMILIES = ("llama", "mistral", "qwen2")


def check_offload(plan: Plan, t: TrainingSettings) -> None:
    """CombinationError for what offload_activations is not modelled with (one line naming it)."""
    if not t.offload_activations:
        return
    spec = plan.spec
    unmodelled = [
        (spec.model_type not in OFFLOAD_FAMILIES, f"model type {spec.model_type} (modelled: {', '.join(OFFLOAD_FAMILIES)})"),
        (spec.task != "causal_lm", f"task {spec.task} (modelled: causal_lm)"),
        (plan.settings.method not in ("full", "lora") or plan.settings.dora, f"method {plan.settings.method}"
         f"{' dora' if plan.settings.dora else ''} (modelled: full, lora)"),
        (t.precision not in ("fp32", "bf16", "amp-bf16"), f"precision {t.precision} (modelled: fp32, bf16, amp-bf16)"),
        (t.attention != "sdpa", f"attention {t.attention} (modelled: sdpa)"),
        (t.loss != "hf", f"loss {t.loss} (modelled: hf)"),
        (t.gpus != 1 or t.sharding != "none", f"sharding {t.sharding} on {t.gpus} GPUs (modelled: one GPU)"),
        (t.grad_accum != 1, f"grad_accum {t.grad_accum} (modelled: 1)"),
        (t.keep_outputs, "keep_outputs"),
        (t.trainer_loop, "trainer_loop"),
        (t.router_aux_loss, "router_aux_loss"),
        (t.grad_checkpointing and (t.checkpoint_reentrant or t.checkpoint_every != 1),
         "reentrant or partial gradient checkpointing (modelled: non-reentrant, every layer)"),
        (t.grad_checkpointing and spec.model_type not in OFFLOAD_CHECKPOINTED_FAMILIES,
         f"gradient checkpointing on model type {spec.model_type} (modelled: {', '.join(OFFLOAD_CHECKPOINTED_FAMILIES)})"),
    ]
    for bad, what in unmodelled:
        if bad:
            raise CombinationError(f"offload_activations with {what} is not modelled; the harness traces it "
                                   "(peftcalc measure, measure/offload.py)", names=("offload_activations",))


def offloaded_events(plan: Plan, t: TrainingSettings, act: ActivationProfile, grads, base: dict, gradients: int,
                     tied: int) -> list:
    """(phase, {component: bytes}) of the step under save_on_cpu, from the forward to the end of backward:
    - the forward (the loss's peak): what the loss holds (sim.loss.loss_buffers: log_softmax's output is the
      loss's own until it returns), the model's output, and under checkpointing the checkpoints' keyword
      arguments (their RoPE cos/sin, ActivationProfile.pre, and positions) and the first block's input when a
      leaf holds it (ActivationProfile.offload_kept_input);
    - inside a block's forward: its own peak with nothing saved below (the profile's forward_block_live);
    - the loss's backward: nll_loss's and log_softmax's unpacked copies are the size of what they saved;
    - the head's and each block's backward: their replays, a device copy per unpacked variable among the
      buffers; under checkpointing a block's recompute and backward as without offloading, on its unpacked input;
    - the embeddings' backward: EmbeddingBackward's unpacked indices beside the gradient of their output.
    `base` holds the weights, inputs and optimizer states, `gradients` every trainable .grad, `tied` a tied
    embedding's two gradients summed (model_states.tied_embedding_addends)."""
    ckpt = t.grad_checkpointing
    # the checkpoints' keyword arguments hold the RoPE cos/sin (saved inside the blocks: activations, as the
    # harness's tracer counts them); the leaf, no longer saved by anything, is a temporary there
    kept = act.pre if ckpt else 0
    kwargs = act.checkpoint_kwargs + act.offload_kept_input
    held = kwargs + act.loss_scalars
    events = [("forward", dict(base, activations=kept + act.loss_saved, logits_loss=act.loss_forward_peak - act.loss_saved,
                               temporaries=(act.autocast_weight_cache if ckpt else act.forward_leaves) + act.model_output
                               + kwargs))]
    if ckpt:
        events.append(("forward:block", dict(base, activations=act.pre + act.forward_checkpoint_inputs,
                                             temporaries=act.forward_transient - act.forward_checkpoint_inputs)))
    else:
        events.append(("forward:block", dict(base, activations=0, temporaries=act.forward_block_live)))
    events.append(("backward:loss", dict(base, activations=kept + act.loss_saved_backward,
                                         logits_loss=act.loss_backward_peak - act.loss_saved_backward + act.loss_scalars,
                                         temporaries=kwargs)))
    hp = act.head_backward
    events.append(("backward:head", dict(base, activations=kept + hp.saved, gradients=min(hp.params, grads.head_accumulated),
                                         logits_loss=hp.buffers + act.loss_scalars, temporaries=kwargs)))
    arrived = grads.head_accumulated
    ctx = make_ctx(plan.spec, plan, t)
    block_input = ctx.tokens * plan.spec.hidden_size * DTYPE_BYTES[stream_dtype(ctx)]
    for i in reversed(range(plan.spec.num_layers)):
        if ckpt:
            if not act.per_layer[i] and not grads.per_layer[i]:
                continue
            peak = act.blocks[i].checkpointed_backward
            own = block_input if act.per_layer[i] and not (i == 0 and act.offload_kept_input) else 0
            parts = dict(base, activations=kept + own + peak.saved, gradients=arrived + peak.params,
                         temporaries=peak.buffers + grads.head_pending + held)
        else:
            lb = act.blocks[i].backward
            if not act.per_layer[i] and not grads.per_layer[i] and not lb.total:
                continue
            parts = dict(base, activations=lb.saved, gradients=arrived + min(lb.params, grads.per_layer[i]),
                         temporaries=lb.buffers + grads.head_pending + act.loss_scalars)
        events.append((f"backward:layer{i}", parts))
        arrived += grads.per_layer[i]
    unpacked = max(tied, act.embedding_grad + act.offload_lookup_copy)
    events.append(("backward:end", dict(base, activations=0, gradients=gradients,
                                        temporaries=unpacked + act.loss_scalars)))
    return events
