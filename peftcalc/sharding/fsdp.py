"""FSDP2 (torch.distributed.fsdp.fully_shard on every block, then on the root) on one rank: the one-GPU step's
events (peftcalc.memory.step_events) with the model's states sharded and FSDP2's buffers added.

What each event holds, from torch/distributed/fsdp/_fully_shard/ (torch 2.13):

- parameters: every group's padded shards (peftcalc.sharding.shards); the root group (embeddings, final
  norm, head) is unsharded from its pre-forward to its post-forward, where it is resharded like the blocks
  when reshard_after_forward is given to it too (as the harness, torchtitan and accelerate do; left out,
  _fsdp_state.py FSDPState._lazy_init keeps the root unsharded), and again from its pre-backward, a hook
  on the loss, to its post-backward: at that moment its all-gather output and its unsharded parameters are
  alive on top of everything the forward saved (``backward:unshard``);
- forward, implicit prefetch (_fsdp_param_group.py ``wait_for_unshard``): block i's all-gather output lives
  from its unshard until the next block's copy-out, the last one until the root's post-forward
  (_fsdp_state.py ``_post_forward``), so through the loss; block i's unsharded parameters from its copy-out
  to its post-forward reshard (kept, with reshard_after_forward off, to its post-backward);
- backward: the root's pre-backward (a hook on the loss) prefetches the last block's all-gather, each
  block's pre-backward copies out its own and prefetches the one below (``_backward_prefetch``); autograd's
  full gradients of a block live until its post-backward packs them into one reduce-scatter input
  (``foreach_reduce``), kept until the next group's post-backward (``reduce_scatter_max_input_buffers`` 1)
  and the last one until the final callback (``_root_post_backward_final_callback``); the output, of which
  the sharded gradients are views, lives to ``zero_grad``. The root's post-backward runs in that final
  callback, so the head's and the embeddings' full gradients live to the end of backward;
- optimizer: its states are ``zeros_like`` of the local (unpadded) shards; with max_grad_norm clip_grad_norm_
  runs before it on the sharded gradients (``optimizer:clip``).

Under mixed-bf16 (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` over fp32 parameters)
the step computes as a bf16 one (:func:`compute_view`), on fp32 shards, states and reduce-scatter buffers.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from math import ceil

from peftcalc.activations import activation_profile
from peftcalc.errors import CombinationError
from peftcalc.memory import gradient_arrival, step_events
from peftcalc.model_states import (clip_grad_norm_bytes, gradient_free, group_dtype, model_states, nf4_bytes,
                                   scalar_state_bytes)
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sharding.shards import GroupBytes, dim0, local_rows, padded_rows
from peftcalc.sim.profile import stream_dtypes

__all__ = ["FSDP_COMPONENTS", "check_fsdp", "fsdp_events", "group_bytes", "shard_world"]

ADAPTER_ORIGINS = ("lora", "dora", "ia3", "prefix", "prompt")  # peft's fp32 parameters (model_states.group_dtype)
FSDP_COMPONENTS = ("unsharded_params", "unsharded_gradients", "all_gather_buffers", "reduce_scatter_buffers")


def check_fsdp(plan: Plan, t: TrainingSettings) -> None:
    """CombinationError for what FSDP2 (or this model of it) does not run: several dtypes among a group's
    trainable parameters (_fsdp_param_group.py ``_init_mp_dtypes``: "FSDP expects uniform original parameter
    dtype", over the parameters that require grad; peft's fp32 adapters beside a frozen bf16 base pass), and
    what :func:`unmodelled` names."""
    weight_dtype = stream_dtypes(plan, t)[0]
    by_layer: dict = {}
    for g in plan.groups:
        if g.trainable:
            by_layer.setdefault(g.layer, set()).add(group_dtype(plan, g.origin, weight_dtype, g.name))
    if any(len(d) > 1 for d in by_layer.values()):
        raise CombinationError(f"FSDP2 needs one dtype for the trainable parameters of a sharded block, and "
                               f"{plan.settings.method} under {t.precision} mixes "
                               f"{' and '.join(sorted(set().union(*by_layer.values())))}", names=("sharding", "precision"))
    unsupported = unmodelled(plan, t)
    if unsupported:
        raise CombinationError(f"the FSDP2 model does not cover {unsupported[0]} yet", names=("sharding",))


# FSDP2's CPUOffloadPolicy, traced on the harness's CPU device mesh, copies nothing: the host-to-device copy of each
# shard before its all-gather (_fsdp_param.py ``all_gather_inputs``: ``.to(self.device)``) and the device-to-host
# copy of each sharded gradient (_fsdp_collectives.py ``foreach_reduce``: ``.to("cpu")``) are no-ops when the
# device is the CPU, so a fake-group trace cannot tell the host's bytes from the device's
OFFLOAD_UNTRACED = ("offload params (FSDP2 CPUOffloadPolicy: on a CPU device mesh its host-device copies are no-ops, "
                    "so the fake-group trace cannot separate host from device bytes)")


def unmodelled(plan: Plan, t: TrainingSettings) -> list:
    """What of `plan` under `t` this model of FSDP2 does not cover: QLoRA other than under bf16 (NF4 packed in
    bf16), with peft's prepare_model_for_kbit_training (TRL's SFTTrainer ``_prepare_peft_model`` skips it for a
    sharded QLoRA model, ``is_sharded_qlora``) or with DoRA; optimizers other than AdamW and SGD; offload; and
    under mixed-bf16 peft adapters other than LoRA's."""
    s, qlora = plan.settings, plan.settings.method == "qlora"
    adapters = any(g.origin in ADAPTER_ORIGINS for g in plan.groups)
    return [what for what, bad in (
        (f"qlora under {t.precision} (modelled under bf16: NF4 packed in bf16)", qlora and t.precision != "bf16"),
        ("qlora with prepare_model_for_kbit_training (TRL skips it for a sharded QLoRA model: --no-prepare-kbit)",
         qlora and s.prepare_kbit),
        ("qlora with dora", qlora and s.dora),
        (f"optimizer {t.optimizer}", t.optimizer not in ("adamw", "adamw-fused", "sgd")),
        (OFFLOAD_UNTRACED if t.offload == "params" else f"offload {t.offload}", t.offload != "none"),
        (f"{'dora' if s.dora else s.method} under mixed-bf16 (only LoRA's adapters are modelled in bf16)",
         t.precision == "mixed-bf16" and adapters and (s.method != "lora" or s.dora))) if bad]


def shard_world(t: TrainingSettings) -> int:
    """The ranks a parameter is sharded over: all of them (fsdp), or under hsdp the shard group of one node's
    ``gpus_per_node`` (torch.distributed.fsdp fully_shard on a 2-D DeviceMesh (replicate, shard): sharded on the
    shard dimension, replicated on the other; the replicas all-reduce the reduce-scatter output in place,
    _fsdp_collectives.py ``foreach_reduce``, so a rank holds what an FSDP2 rank of the shard group holds)."""
    return min(t.gpus, t.gpus_per_node) if t.sharding == "hsdp" else t.gpus


def compute_view(t: TrainingSettings) -> TrainingSettings:
    """The one-GPU settings whose step FSDP2 computes: `t` itself, or under mixed-bf16 (MixedPrecisionPolicy
    param_dtype=bfloat16 over float32 parameters, no autocast) a bf16 step: FSDP2 all-gathers every parameter
    in bf16 (_fsdp_param.py ``init_dtype_attrs``, ``all_gather_inputs``), so forward and backward run on bf16
    weights and autograd's gradients of the unsharded parameters are bf16, as under precision bf16."""
    precision = "bf16" if t.precision == "mixed-bf16" else t.precision
    return replace(t, precision=precision, gpus=1, gpus_per_node=8, sharding="none", reshard_after_forward=True,
                   offload="none", grad_accum=1)


@lru_cache(maxsize=256)
def compute_plan(plan: Plan, precision: str) -> Plan:
    """The plan whose one-GPU step FSDP2 computes: `plan` itself, or under mixed-bf16 `plan` with bf16
    adapters. MixedPrecisionPolicy's param_dtype applies to every parameter of a group, frozen or trainable
    (_fsdp_param.py ``FSDPParam.init_dtype_attrs``; _fsdp_param_group.py ``_init_mp_dtypes`` asks one
    original dtype of the trainable ones only), so peft's fp32 adapters are all-gathered in bf16 beside the
    base, and peft's LoRA forward (tuners/lora/layer.py ``Linear.forward``, ``_cast_input_dtype`` to
    ``lora_A.weight.dtype``) computes them in bf16: their activations and autograd's gradients are bf16."""
    if precision != "mixed-bf16" or not any(g.origin in ADAPTER_ORIGINS for g in plan.groups):
        return plan
    return replace(plan, adapter_dtype="bfloat16")


def group_bytes(plan: Plan, t: TrainingSettings, world: int, rank: int) -> dict:
    """{layer index or None (the root): GroupBytes} on `rank` of `world`. Under mixed-bf16 the shards, the
    reduce-scatter buffers (reduce_dtype float32) and the optimizer's states are float32, the all-gather
    output, the unsharded parameters and autograd's full gradients bfloat16 (param_dtype)."""
    weight_dtype = stream_dtypes(plan, t)[0]
    compute_dtype = stream_dtypes(plan, compute_view(t))[0]
    computed = compute_plan(plan, t.precision)
    free = gradient_free(plan)
    out: dict = {}
    for g in plan.groups:
        gb = out.setdefault(g.layer, GroupBytes())
        nbytes = DTYPE_BYTES[group_dtype(plan, g.origin, weight_dtype, g.name)]
        unsharded_bytes = DTYPE_BYTES[group_dtype(computed, g.origin, compute_dtype, g.name)]
        d0, row = dim0(g.shape, g.numel)
        if g.quantized:  # NF4 codes packed in the weights' dtype, and the QuantState whole on every rank
            d0, row = packed_rows(g.numel, nbytes), 1
            gb.sharded_frozen += nf4_bytes(g.numel, plan.settings.double_quant) - ceil(g.numel / 2)
        shard = padded_rows(d0, world) * row * nbytes
        if g.trainable:
            gb.sharded_trainable += shard
        else:
            gb.sharded_frozen += shard
        # a view of its padded all-gather output (foreach_all_gather_copy_out)
        gb.unsharded += world * padded_rows(d0, world) * row * unsharded_bytes
        gb.all_gather += world * padded_rows(d0, world) * row * unsharded_bytes
        if g.trainable and g.name not in free:
            gb.unsharded_grads += g.numel * unsharded_bytes
            gb.sharded_grads += shard
            gb.reduce_scatter += world * shard
            gb.optimizer_numel += ((local_rows(d0, world, rank) * row, nbytes),)
    return out


def packed_rows(numel: int, storage_bytes: int) -> int:
    """Rows of a QLoRA weight packed for FSDP (bitsandbytes functional.quantize_4bit: a ((numel + 1) // (2 x
    itemsize), 1) tensor of ``quant_storage``; TRL, axolotl and Answer.AI's FSDP-QLoRA set it to the model's
    dtype, so fully_shard shards it on dim 0 like any weight and all-gathers it as that dtype). The QuantState
    (absmax, code tables) is no parameter: fully_shard leaves it on the Linear4bit module, whole on every rank,
    and bitsandbytes Linear4bit.forward hands it to the unsharded parameter
    (``fix_4bit_weight_quant_state_from_module``)."""
    return (numel + 1) // (2 * storage_bytes)


def _optimizer(groups: dict, t: TrainingSettings, order: list) -> tuple[int, int]:
    """(states, step temporaries) on this rank: AdamW's exp_avg and exp_avg_sq (SGD's momentum buffer) like
    each local shard, AdamW's 'step' (peftcalc.model_states.scalar_state_bytes: a 4-byte CPU tensor, or with
    fused=True a plain float32 tensor on the parameter's device, torch/optim/adam.py ``_init_group``); the
    temporaries as peftcalc.model_states.optimizer_temporaries counts them, over the local shards. Fused
    AdamW on DTensor parameters runs ``torch._fused_adamw_`` once on the local shards (DTensor's list-op
    strategy, torch/distributed/tensor/_ops/_pointwise_ops.py ``list_pointwise_strategy``), in place: no
    temporaries."""
    states = temps = prev = 0
    per_dtype: dict = {}
    adam = t.optimizer in ("adamw", "adamw-fused")
    for key in order:
        for numel, nbytes in groups[key].optimizer_numel:
            size = numel * nbytes
            states += (2 if adam else 1) * size + scalar_state_bytes(t)
            temps, prev = max(temps, 2 * size + prev), size
            per_dtype[nbytes] = per_dtype.get(nbytes, 0) + size
    if t.optimizer != "adamw":
        return states, 0
    return states, (temps if t.device == "cpu" else max(per_dtype.values(), default=0))


def fsdp_events(plan: Plan, t: TrainingSettings, rank: int = 0) -> list:
    """The step's events on `rank` as (phase, bytes, parts), one-GPU events rewritten (module docstring)."""
    world = shard_world(t)
    groups = group_bytes(plan, t, world, rank % world)
    root = groups.get(None, GroupBytes())
    layers = [groups.get(i, GroupBytes()) for i in range(plan.spec.num_layers)]
    order = [None] + list(range(plan.spec.num_layers))
    states, temps = _optimizer(groups, t, sorted(order, key=lambda k: -1 if k is None else k))
    frozen = sum(g.sharded_frozen for g in groups.values())
    trainable = sum(g.sharded_trainable for g in groups.values())
    one_gpu, computed = compute_view(t), compute_plan(plan, t.precision)
    arrival = gradient_arrival(computed, one_gpu)
    last = len(layers) - 1
    keep = not t.reshard_after_forward
    kept_blocks = sum(g.unsharded for g in layers) if keep else 0
    events = []
    for name, _, parts in step_events(computed, one_gpu):
        p = dict(parts, weights_frozen=frozen, weights_trainable=trainable)
        if "optimizer_states" in p:
            p["optimizer_states"] = states
        if name == "forward":
            p.update(unsharded_params=root.unsharded + kept_blocks, all_gather_buffers=layers[last].all_gather)
        elif name == "forward:block":
            current = kept_blocks or layers[last].unsharded
            p.update(unsharded_params=root.unsharded + current, all_gather_buffers=layers[last].all_gather)
        elif name in ("backward:loss", "backward:head"):
            p.update(unsharded_params=root.unsharded + kept_blocks,
                     all_gather_buffers=0 if keep else layers[last].all_gather)
            _split_gradients(p, [], [])
        elif name.startswith("backward:layer"):
            i = int(name.removeprefix("backward:layer"))
            above = range(i + 1, len(layers))
            _split_gradients(p, [layers[j] for j in above], [arrival.per_layer[j] for j in above])
            kept = sum(layers[j].unsharded for j in range(i + 1)) if keep else layers[i].unsharded
            p.update(unsharded_params=root.unsharded + kept,
                     all_gather_buffers=layers[i - 1].all_gather if i and not keep else 0,
                     reduce_scatter_buffers=layers[i + 1].reduce_scatter if i < last else 0)
        elif name == "backward:end":
            _split_gradients(p, layers, arrival.per_layer)
            p.update(unsharded_params=root.unsharded, reduce_scatter_buffers=layers[0].reduce_scatter)
        elif name == "optimizer":
            p["gradients"] = sum(g.sharded_grads for g in groups.values())
            if t.max_grad_norm is not None:
                events.append(_clip_event(p, plan, t))
            p["temporaries"] = temps + _clip_bytes(plan, t)[1]
        if name == "forward" and layers:
            events.append(_copy_out(p, root, layers, activation_profile(computed, one_gpu), computed, one_gpu, keep))
        if name == "backward:loss" and not keep:
            events.append(_root_unshard(p, root, activation_profile(computed, one_gpu), _labels_view(plan, t)))
        events.append((name, sum(p.values()), p))
        if name == "backward:end":
            last_grad = _last_root_gradient(computed, one_gpu) if world > 1 else 0
            events.append(_root_reduce(p, root, last_grad, activation_profile(computed, one_gpu).loss_scalars))
    return _accumulated(events, groups) if t.grad_accum > 1 else events


def _accumulated(events: list, groups: dict) -> list:
    """TrainingSettings.grad_accum: micro-batch 1's events, then those of micro-batches 2..N, the optimizer's
    last. From micro-batch 2 on every group's sharded gradient (micro-batch 1's reduce-scatter output) is held
    (zero_grad runs after the optimizer step only) and each new reduce-scatter output is added into it in place
    (_fsdp_collectives.py ``foreach_reduce``: ``sharded_param.grad._local_tensor += new_sharded_grad``); autograd's
    gradients of the unsharded parameters are new in every micro-batch (FSDP2 hands them to the reduce-scatter
    and drops them), so the rest repeats micro-batch 1. This is a loop that reduce-scatters every micro-batch
    (torchtune's recipes, accelerate's ``sync_each_batch=True``; measure/loop.py train_step); the HF Trainer's
    ``no_sync`` micro-batches (FSDPModule.set_requires_gradient_sync(False): unsharded gradients kept in
    ``unsharded_accumulated_grad`` to the last micro-batch) are not modelled."""
    k = next(i for i, (name, _, _) in enumerate(events) if name.startswith("optimizer"))
    held = sum(g.sharded_grads for g in groups.values())
    later = []
    for name, _, p in events[:k]:
        q = dict(p, gradients=held)
        later.append((name, sum(q.values()), q))
    return events[:k] + later + events[k:]


def _clip_bytes(plan: Plan, t: TrainingSettings) -> tuple[int, int]:
    """TrainingSettings.max_grad_norm: (clip_grad_norm_'s peak extra bytes, the total norm it returns and the
    Trainer keeps through the optimizer step), peftcalc.model_states.clip_grad_norm_bytes over the sharded
    gradients: torch/nn/utils/clip_grad.py on DTensor gradients runs ``_foreach_norm`` on the local shards (one
    0-dim norm per gradient, in the gradients' dtype: the parameters' under mixed-bf16) and the in-place
    ``_foreach_mul_`` on them; (0, 0) without clipping."""
    if t.max_grad_norm is None:
        return 0, 0
    one_gpu = replace(t, gpus=1, gpus_per_node=8, sharding="none", reshard_after_forward=True, offload="none")
    return clip_grad_norm_bytes(model_states(plan, one_gpu), t.device)


def _clip_event(optimizer: dict, plan: Plan, t: TrainingSettings) -> tuple:
    """The clipping before the optimizer step (peftcalc.memory._clipped on one GPU): the step's memory without
    its temporaries, with clipping's."""
    p = dict(optimizer, temporaries=_clip_bytes(plan, t)[0])
    p.pop("_other", None)
    return "optimizer:clip", sum(p.values()), p


def _copy_out(forward: dict, root: GroupBytes, layers: list, act, plan: Plan, t: TrainingSettings,
              keep: bool) -> tuple:
    """The largest of the blocks' pre-forward copy-outs: _fsdp_param_group.py ``wait_for_unshard`` keeps the
    previous group's all-gather result (``prev_all_gather_state``: the root's, embeddings and head, before block
    0; block i - 1's before block i) referenced until it returns, so two all-gather outputs and block i's
    unsharded parameters (copied into; with reshard_after_forward off every block's so far) are alive beside the
    root's unsharded parameters, on what the forward has kept so far: what the blocks share (ActivationProfile.pre:
    the rotary cos and sin), what blocks 0..i-1 keep (their saved tensors, or their checkpoints' inputs), block
    i's input (b x s x hidden in the compute dtype) and the position ids (s int64)."""
    hidden = t.batch_size * t.seq_len * plan.spec.hidden_size * DTYPE_BYTES[stream_dtypes(plan, t)[1]]
    wrapped = act.checkpointed if t.grad_checkpointing else (False,) * len(act.per_layer)
    inputs_kept = sum(1 for i, a in enumerate(act.per_layer) if a and wrapped[i])
    kept = [(act.checkpoint_inputs // inputs_kept if wrapped[i] else a) if a else 0 for i, a in enumerate(act.per_layer)]
    base = dict(forward, logits_loss=0, temporaries=hidden + 8 * t.seq_len)
    base.pop("_other", None)
    best = None
    for i, g in enumerate(layers):
        previous = root.all_gather if i == 0 else layers[i - 1].all_gather
        unsharded = sum(b.unsharded for b in layers[:i + 1]) if keep else g.unsharded
        p = dict(base, activations=act.pre + sum(kept[:i]), unsharded_params=root.unsharded + unsharded,
                 all_gather_buffers=previous + g.all_gather)
        if best is None or sum(p.values()) > sum(best.values()):
            best = p
    return "forward:copy-out", sum(best.values()), best


def _split_gradients(p: dict, reduced: list, their_bytes: list) -> None:
    """Split the one-GPU event's gradients: the `reduced` groups' are their sharded gradients (reduce-scatter
    outputs, ``gradients``) in place of their full bytes (`their_bytes`), the rest (the root's, the block in
    backward's) autograd's full gradients before their reduce-scatter (``unsharded_gradients``)."""
    p["unsharded_gradients"] = p.get("gradients", 0) - sum(their_bytes)
    p["gradients"] = sum(g.sharded_grads for g in reduced)


def _labels_view(plan: Plan, t: TrainingSettings) -> int:
    """What the saved shift_labels hold beyond their own b x s int64 at batch 1: transformers
    loss_utils.ForCausalLMLoss's ``pad(labels, (0, 1))[..., 1:].contiguous()`` of a (1, s + 1) tensor is
    already contiguous, so it stays a view of the padded labels' storage (one more int64)."""
    return 8 if plan.spec.task == "causal_lm" and t.batch_size == 1 else 0


def _root_unshard(loss: dict, root: GroupBytes, act, labels_view: int) -> tuple:
    """The root's pre-backward (resharded after forward): before the loss's backward runs, its all-gather
    output and its unsharded parameters (copied out of it) on what the forward left: every saved tensor,
    the loss's included (ActivationProfile.loss_saved, and `labels_view`), the loss and backward's ones_like
    gradient (loss_scalars), and what the base keeps (the checkpoints' keyword arguments)."""
    p = dict(loss, activations=loss["activations"] - act.loss_saved_backward + act.loss_saved + labels_view,
             logits_loss=act.loss_scalars, unsharded_params=root.unsharded, all_gather_buffers=root.all_gather,
             temporaries=act.checkpoint_kwargs)
    return "backward:unshard", sum(p.values()), p


def _last_root_gradient(plan: Plan, t: TrainingSettings) -> int:
    """The full gradient of the root group's last trainable parameter (module order: a causal LM's lm_head),
    in the compute dtype: _fsdp_collectives.py ``foreach_reduce``'s Shard(i > 0) check loop, ``for i,
    (fsdp_param, unsharded_grad) in enumerate(zip(fsdp_params, unsharded_grads))``, leaves its loop variable
    bound to the last gradient, so ``unsharded_grads.clear()`` after the copy-in frees every gradient but that
    one, which lives until foreach_reduce returns (over more than one rank: the loop runs if world_size > 1)."""
    dtype = stream_dtypes(plan, t)[0]
    free = gradient_free(plan)
    last = [g for g in plan.groups if g.layer is None and g.trainable and g.name not in free]
    return last[-1].numel * DTYPE_BYTES[group_dtype(plan, last[-1].origin, dtype, last[-1].name)] if last else 0


def _root_reduce(end: dict, root: GroupBytes, last_grad: int, loss_scalars: int) -> tuple:
    """The root's post-backward in the final callback (inside ``loss.backward()``: the loss and its ones_like
    gradient, `loss_scalars`, alive): its parameters resharded, the last block's reduce-scatter input released,
    then the larger of _fsdp_collectives.py ``foreach_reduce``'s two moments: the copy-in, its reduce-scatter
    input allocated while its full gradients (head, embeddings) are alive, and the reduce-scatter output
    allocated after ``unsharded_grads.clear()``, beside the input and the last parameter's full gradient
    (`last_grad`, :func:`_last_root_gradient`). The second is the larger where the full gradients are narrower
    than the reduce dtype (mixed-bf16: bf16 gradients, a float32 output)."""
    base = dict(end, unsharded_params=0, reduce_scatter_buffers=root.reduce_scatter, activations=0,
                temporaries=0, logits_loss=loss_scalars)
    base.pop("_other", None)  # the gradients: the root's full ones (head, embeddings) and the blocks' shards
    copy_in = dict(base)
    scatter = dict(base, unsharded_gradients=last_grad, gradients=end.get("gradients", 0) + root.sharded_grads)
    p = max(copy_in, scatter, key=lambda q: sum(q.values())) if root.reduce_scatter else copy_in
    return "backward:reduce", sum(p.values()), p
