"""Step 3 of the model: bytes, and when they are alive.

A training step is a timeline of events (forward, the loss, the start of backward, each block's
backward from the top, the end of backward, the optimizer step). At each event the live bytes are a
sum of components; the peak is the largest event, and its name is the phase of the peak. Step 1
differs from the steady state only in that the optimizer states do not exist before its optimizer
step; the steady-state step is what the estimate reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from peftcalc.activations import ActivationProfile, activation_profile
from peftcalc.families import build_layout
from peftcalc.families.blip2 import blip2_image_tokens
from peftcalc.families.llava import VISION_TOWER
from peftcalc.model_states import (ModelStates, buffer_bytes, clip_grad_norm_bytes, cls_token_gradient_storage, gradient_free,
                                   group_dtype, model_states, tied_embedding_addends)
from peftcalc.offloading import offloaded_events
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.profile import engine_cast, stream_dtypes

__all__ = ["ALLOCATOR_SLACK_FRACTION", "COMPONENTS", "CUDA_CONTEXT_BYTES", "GradientArrival", "Timeline",
           "accumulating_step_events", "gradient_arrival", "input_bytes", "kept_output_bytes", "loop_events",
           "peak_event", "reserved_bytes", "step_events", "timeline"]


# Names of the components, in display order.
COMPONENTS = (
    "weights_frozen",
    "weights_trainable",
    "buffers",
    "gradients",
    "optimizer_states",
    "activations",
    "logits_loss",
    "temporaries",
    "inputs",
)

# What max_memory_allocated does not see but nvidia-smi does (sources in the functions below).
CUDA_CONTEXT_BYTES = 500 * 1024**2  # CUDA context + kernels with lazy loading (typical on H100, torch 2.x)
ALLOCATOR_SLACK_FRACTION = 0.05  # reserved / allocated of the caching allocator in steady training


@dataclass(frozen=True)
class Timeline:
    """Live bytes at each event of the steady-state step, and the components at the peak."""

    events: tuple  # (phase name, bytes)
    peak_bytes: int
    peak_phase: str
    components: tuple  # (component name, bytes) at the peak
    step1_peak_bytes: int
    # gradient accumulation: the micro-batch whose event is the peak (1, or 2: micro-batches 2..N are alike,
    # and a tie names the earliest), None when the peak is the optimizer step (or there is one micro-batch)
    peak_micro_batch: int | None = None


def _event(name: str, parts: dict) -> tuple[str, int, dict]:
    """(name, live bytes, parts): '_other' (bytes no component owns) counts with the temporaries; it is
    folded into them for the peak event only (_components), since no other event's parts are read."""
    return name, sum(parts.values()), parts


def _components(parts: dict) -> tuple:
    """(component, bytes) in COMPONENTS order, '_other' counted with the temporaries."""
    other = parts.get("_other", 0)
    return tuple((c, parts.get(c, 0) + (other if c == "temporaries" else 0)) for c in COMPONENTS)


def input_bytes(plan: Plan, t: TrainingSettings) -> int:
    """input_ids and labels (int64), or pixel_values in the weight dtype and int64 labels
    (measure.setup.make_batch)."""
    spec = plan.spec
    if spec.is_vlm or spec.is_blip2:
        # input_ids (= labels) over text + image tokens (BLIP-2: the num_query_tokens placeholders), pixel_values
        # in the weight dtype
        weight_dtype = stream_dtypes(plan, t)[0]
        image_tokens = spec.image_tokens if spec.is_vlm else blip2_image_tokens(spec)
        ids = t.batch_size * (t.seq_len + image_tokens) * 8
        return ids + t.batch_size * spec.num_channels * spec.image_size**2 * DTYPE_BYTES[weight_dtype]
    if spec.is_vision:
        weight_dtype = stream_dtypes(plan, t)[0]
        pixels = t.batch_size * spec.num_channels * spec.image_size**2 * DTYPE_BYTES[weight_dtype]
        return pixels + (8 * t.batch_size if spec.task == "image_cls" else 0)
    ids = t.batch_size * t.seq_len * 8
    if t.loss == "trl" and spec.task == "causal_lm":  # TRL SFTTrainer's batch: input_ids, labels, attention_mask
        return 3 * ids  # (trl/trainer/sft_trainer.py DataCollatorForLanguageModeling; measure.losses.trl_sft_batch)
    # the harness passes labels=input_ids for a causal LM (one tensor), a masked copy for MLM
    labels = ids if spec.task == "masked_lm" else (8 * t.batch_size if spec.task == "seq_cls" else 0)
    return ids + labels


@dataclass(frozen=True)
class GradientArrival:
    """Gradient bytes by when backward produces them: the head side (lm_head/classifier, final norm,
    and a tied embedding, which receives the head's gradient), each block, and the input side
    (untied embeddings, the norm on their output, prompt encoders), which arrive last.

    `head_pending` is the part of `head` that is no parameter's .grad until the end of backward: a
    head tied to the input embedding (GPT-2's lm_head, BERT's MLM decoder) is one parameter used twice,
    so its AccumulateGrad node has two dependencies and runs only once the lookup's gradient has
    arrived too (torch/csrc/autograd/engine.cpp Engine::evaluate_function keeps the head's gradient in
    the graph task's not_ready InputBuffer meanwhile; input_buffer.cpp InputBuffer::add sums the two,
    and AccumulateGrad makes the sum the .grad). Until then it is a gradient in flight, a temporary,
    as the harness's tracer counts it (measure/tracer.py: gradients are the parameters' .grad)."""

    head: int
    per_layer: tuple
    input_side: int
    head_pending: int = 0
    input_largest: int = 0  # the largest one parameter's gradient on the input side

    @property
    def total(self) -> int:
        return self.head + sum(self.per_layer) + self.input_side

    @property
    def head_accumulated(self) -> int:
        """The head side's gradients that are .grad as soon as they are made."""
        return self.head - self.head_pending


def gradient_arrival(plan: Plan, t: TrainingSettings) -> GradientArrival:
    return _gradient_arrival(plan, t.precision, engine_cast(t))


@lru_cache(maxsize=4096)
def _gradient_arrival(plan: Plan, precision: str, cast: bool = False) -> GradientArrival:
    layout = build_layout(plan.spec)
    weight_dtype = stream_dtypes(plan, TrainingSettings(precision=precision))[0]
    # the input side: embeddings, and a VLM's projector and vision tower (below the language model)
    input_prefixes = tuple(m.path for m in layout.modules if m.role in ("embed", "projector", "vision"))
    if plan.spec.is_vlm:  # and the adapters on its encoder layers' outputs (methods.vision_adapter_sites)
        input_prefixes += (VISION_TOWER,)
    input_prefixes += tuple(m.path for m in layout.modules if _embedding_norm(m))
    tied = layout.embedding_path if layout.head_tied_to_embedding else None
    input_prefixes = tuple(p for p in input_prefixes if p != tied)
    per = [0] * plan.spec.num_layers
    head = input_side = pending = largest = 0
    for g in plan.groups:
        if not g.trainable or g.name in gradient_free(plan):
            continue
        nbytes = g.numel * DTYPE_BYTES[group_dtype(plan, g.origin, weight_dtype, g.name, cast)]
        if g.layer is not None:
            per[g.layer] += nbytes
        elif g.origin in ("prefix", "prompt") or any(_under(g.name, p) for p in input_prefixes):
            input_side += nbytes
            largest = max(largest, nbytes)
        else:
            head += nbytes
            pending += nbytes if tied and _under(g.name, tied) else 0
    return GradientArrival(head, tuple(per), input_side, pending, largest)


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _embedding_norm(m) -> bool:
    """A norm outside the blocks that the forward applies to the embeddings before block 0, so its
    gradient arrives with theirs, after every block's: transformers modeling_bert.py (and
    modeling_roberta.py) BertEmbeddings.forward's LayerNorm, modeling_clip.py
    CLIPVisionTransformer.forward's pre_layrnorm."""
    parent = m.path.rsplit(".", 1)[0] if "." in m.path else ""
    return m.role == "norm" and m.layer is None and (parent.endswith("embeddings") or m.name == "pre_layrnorm")


def peak_event(events: list) -> tuple:
    """The largest event; on a tie the earliest one (events are in step order), the rule the harness
    uses too (measure.loop TracerMeter keeps a later phase's peak only when it is strictly larger,
    CudaMeter takes the first of equal phase peaks), so an exact tie names the same phase on both sides."""
    return max(events, key=lambda e: e[1])


@lru_cache(maxsize=4096)
def timeline(plan: Plan, t: TrainingSettings) -> Timeline:
    """Events of one training step; the steady state has optimizer states alive from the start."""
    events, first, steps = loop_events(plan, t)
    named = events if t.grad_accum == 1 else (
        [(f"micro-batch 1 {n}", b, p) for n, b, p in events[:first - steps]]
        + [(f"micro-batch 2-{t.grad_accum} {n}", b, p) for n, b, p in events[first - steps:-steps]] + list(events[-steps:]))
    name, total, parts = peak_event(events)
    micro_batch = None
    if t.grad_accum > 1 and not name.startswith("optimizer"):
        micro_batch = 1 if events.index(max(events, key=lambda e: e[1])) < first - steps else 2
    return Timeline(events=tuple((n, b) for n, b, _ in named), peak_bytes=total, peak_phase=name,
                    components=_components(parts), step1_peak_bytes=_step1_peak(list(events), model_states(plan, t)),
                    peak_micro_batch=micro_batch)


@lru_cache(maxsize=1024)
def loop_events(plan: Plan, t: TrainingSettings) -> tuple[tuple, int, int]:
    """The whole optimizer step of the loop `t` describes, on one GPU, as (events, how many of them micro-batch 1
    and the optimizer step make, how many the optimizer step makes): micro-batch 1's forward and backward, those
    of micro-batches 2..N under grad_accum (_accumulating_events), then clipping (max_grad_norm) and the
    optimizer step, with the outputs held through backward under keep_outputs (read only: the tuple is cached;
    what peftcalc.sharding.ddp adds its buckets to)."""
    ms, inputs, grads = model_states(plan, t), input_bytes(plan, t), gradient_arrival(plan, t)
    act = activation_profile(plan, replace(t, grad_accum=1))
    first = _clipped(t, ms, _kept_outputs(plan, t, act, _step_events(plan, t, act, ms, inputs, grads)))
    steps = 2 if t.max_grad_norm is not None else 1  # the optimizer step's events (clipping's first)
    if t.grad_accum == 1:
        return tuple(first), len(first), steps
    act = activation_profile(plan, replace(t, grad_accum=2))
    later = _kept_outputs(plan, t, act, _accumulating_events(plan, t, act, ms, inputs, grads))
    return tuple(first[:-steps] + later + first[-steps:]), len(first), steps


@lru_cache(maxsize=1024)
def step_events(plan: Plan, t: TrainingSettings) -> tuple:
    """The steady-state step's events as (phase, live bytes, {component: bytes}) for one GPU: what
    peftcalc.sharding rewrites rank by rank (read only: the tuple is cached)."""
    ms = model_states(plan, t)
    return tuple(_step_events(plan, t, activation_profile(plan, t), ms, input_bytes(plan, t), gradient_arrival(plan, t)))


@lru_cache(maxsize=1024)
def accumulating_step_events(plan: Plan, t: TrainingSettings) -> tuple:
    """The events of a micro-batch after the first of a gradient-accumulation step (`t.grad_accum` > 1) for one
    GPU, as step_events gives them: what peftcalc.sharding.zero rewrites for ZeRO-1 (read only: cached)."""
    act = activation_profile(plan, t)
    return tuple(_accumulating_events(plan, t, act, model_states(plan, t), input_bytes(plan, t), gradient_arrival(plan, t)))


def _clipped(t: TrainingSettings, ms: ModelStates, events: list) -> list:
    """TrainingSettings.max_grad_norm: torch.nn.utils.clip_grad_norm_ runs before the optimizer step, on
    the gradients of the last micro-batch (an event "optimizer:clip": the optimizer step's memory without
    its temporaries, with clipping's: model_states.clip_grad_norm_bytes); the total norm it returns is
    alive through the step."""
    if t.max_grad_norm is None:
        return events
    clip, total = clip_grad_norm_bytes(ms, t.device)
    *before, (name, _, parts) = events
    clipping = dict(parts, temporaries=clip)
    return before + [_event("optimizer:clip", clipping),
                     _event(name, dict(parts, temporaries=parts["temporaries"] + total))]


def _kept_outputs(plan: Plan, t: TrainingSettings, act: ActivationProfile, events: list) -> list:
    """TrainingSettings.keep_outputs: the loop holds the model outputs through backward (``outputs =
    model(**batch); loss = outputs.loss; loss.backward()``, PEFT's examples and LitGPT; transformers
    Trainer.training_step keeps only the loss), so the logits (ModelOutput.logits, in the compute dtype),
    which otherwise go when the loss has been computed (nothing saves them: the loss's log_softmax saves
    its output), stay alive in every backward event; a bare encoder's outputs hold its last hidden state
    (BaseModelOutput.last_hidden_state: ActivationProfile.model_output, when nothing saved it); LLaVA's
    the projected image features too (LlavaCausalLMOutputWithPast.image_hidden_states: batch x image tokens
    x text hidden in the compute dtype, which masked_scatter does not save)."""
    if not t.keep_outputs:
        return events
    kept = kept_output_bytes(plan, t, act)
    return [_event(n, dict(p, logits_loss=p.get("logits_loss", 0) + kept)) if n.startswith("backward") else (n, b, p)
            for n, b, p in events]


def kept_output_bytes(plan: Plan, t: TrainingSettings, act: ActivationProfile) -> int:
    """What the outputs the loop keeps (TrainingSettings.keep_outputs, _kept_outputs) hold beyond what backward
    saves: the logits, a bare encoder's last hidden state, LLaVA's projected image features too."""
    kept = act.model_output if plan.spec.task == "base" else act.logits_bytes
    if plan.spec.is_vlm:
        kept += t.batch_size * plan.spec.image_tokens * plan.spec.text.hidden_size * DTYPE_BYTES[
            t.autocast_dtype or stream_dtypes(plan, t)[1]]
    return kept


def _accumulating_events(plan: Plan, t: TrainingSettings, act: ActivationProfile, ms: ModelStates, inputs: int,
                         grads: GradientArrival) -> list:
    """The events of a micro-batch after the first of a gradient-accumulation step (the optimizer step
    left out): zero_grad(set_to_none=True) ran after the last optimizer step only, so every trainable
    parameter's .grad, made by micro-batch 1, is alive through forward and backward (HF Trainer
    _inner_training_loop calls optimizer.zero_grad after optimizer.step, once per
    gradient_accumulation_steps micro-batches; torchtune's recipes and Accelerate's accumulate() alike).
    Backward adds each new gradient into its .grad in place (`act` is the profile replayed with
    StepContext.accumulating: the new gradient is a buffer until its AccumulateGrad has run). At the
    embeddings' backward the new gradient of an input-side parameter (the token embedding's dense
    vocab x hidden one) is a temporary beside the gradient of their output; a tied embedding's two
    gradients are summed out of place (tied_embedding_addends) and the sum, a third vocab x hidden
    tensor, then added into the .grad."""
    held = grads.total + cls_token_gradient_storage(plan, t)
    none_yet = GradientArrival(grads.head_pending, (0,) * len(grads.per_layer), 0, grads.head_pending)
    events = _step_events(plan, t, act, ms, inputs, none_yet)[:-1]
    out = []
    for name, _, parts in events:
        if name == "backward:end":
            tied = tied_embedding_addends(plan, t)
            new_grad = max(tied + tied // 2, act.embedding_grad + grads.input_largest)
            parts = dict(parts, gradients=held, temporaries=parts["temporaries"] - max(tied, act.embedding_grad)
                         + new_grad)
        else:
            parts = dict(parts, gradients=parts.get("gradients", 0) + held)
        out.append(_event(name, parts))
    return out


def _step1_peak(events: list, ms: ModelStates) -> int:
    """The peak of step 1, which differs from the steady state only in that the optimizer states do not
    exist before its optimizer step (the last event): every earlier event holds ms.optimizer_states bytes
    fewer. The bitsandbytes quantization maps exist from the optimizer's construction in both (in step 1
    held by the optimizer alone, so counted with the temporaries, until a state references them)."""
    *before, (last, optimizer_total, _) = events
    assert last == "optimizer", last
    return max(max(b for _, b, _ in before) - ms.optimizer_states, optimizer_total)


def _step_events(plan: Plan, t: TrainingSettings, act: ActivationProfile, ms: ModelStates, inputs: int,
                 grads: GradientArrival) -> list:
    """forward -> loss -> backward from the head down the blocks -> end of backward -> optimizer step,
    in the steady state (the optimizer states alive throughout; step 1: _step1_peak).
    Without checkpointing every block's saved tensors are alive at the start of backward and block i's
    are freed after its backward; with checkpointing (torch.utils.checkpoint) only each checkpointed
    block's input is kept and block i's activations exist again while it is recomputed and run backward;
    the blocks checkpointing leaves unwrapped (TrainingSettings.checkpoint_every) keep what they save.
    What each block keeps (`kept_per_layer`) is its input where it is checkpointed and saves, else
    what it saves."""
    weights = {"weights_frozen": ms.weights_frozen, "weights_trainable": ms.weights_trainable,
               "buffers": buffer_bytes(plan.spec, t.weight_dtype)}
    maps_held = ms.maps_in_state  # in optimizer.state once the first step has made it
    base = dict(weights, inputs=inputs,
                optimizer_states=ms.optimizer_states + (ms.optimizer_maps if maps_held else 0))
    if not maps_held and ms.optimizer_maps:
        base["_other"] = ms.optimizer_maps  # alive, held by the optimizer only: counted with the temporaries
    if ms.optimizer_spare_maps:  # Lion's unsigned map on the CPU: the optimizer's alone, all along
        base["_other"] = base.get("_other", 0) + ms.optimizer_spare_maps
    if act.input_leaf:  # the hooked embedding output, held by its AccumulateGrad node to the end of backward
        base["_other"] = base.get("_other", 0) + act.input_leaf
    tied = tied_embedding_addends(plan, t)
    gradients = grads.total + cls_token_gradient_storage(plan, t)
    if t.offload_activations:  # save_on_cpu around the forward (peftcalc.offloading)
        return ([_event(n, p) for n, p in offloaded_events(plan, t, act, grads, base, gradients, tied)]
                + [_optimizer_event(weights, inputs, gradients, ms)])
    ckpt = t.grad_checkpointing
    wrapped = act.checkpointed if ckpt else (False,) * len(act.per_layer)
    saving = [i for i, a in enumerate(act.per_layer) if a]
    inputs_kept = [i for i in saving if wrapped[i]]
    kept_per_layer = {i: (act.checkpoint_inputs // len(inputs_kept) if wrapped[i] else act.per_layer[i])
                      for i in saving}
    remaining = act.pre + sum(kept_per_layer.values())
    # under checkpointing the autocast weight copies are not saved, only cached until the forward ends;
    # without it, what the blocks leave referenced (their cached copies no op saves among it)
    cache = act.autocast_weight_cache if ckpt else act.forward_leaves
    # what the loss saves (log_softmax's output, the shifted labels) is a saved activation like any other;
    # logits_loss is the rest of the loss buffers (the logits, their fp32 copy, the gradients); the model's
    # output, when no op saved it, is a temporary the ForXxx forward holds (ActivationProfile.model_output)
    events = [
        _event("forward", dict(base, activations=remaining + act.post + act.loss_saved,
                               logits_loss=act.loss_forward_peak - act.loss_saved,
                               temporaries=cache + act.model_output + act.checkpoint_kwargs)),
        _forward_block_event(act, base, wrapped, ckpt),
        _event("backward:loss", dict(base, activations=remaining + act.post + act.loss_saved_backward,
                                     logits_loss=act.loss_backward_peak - act.loss_saved_backward + act.loss_scalars,
                                     temporaries=act.checkpoint_kwargs)),
    ]
    if ckpt and all(wrapped):
        events += _checkpointed_backward(plan, act, grads, base, kept_per_layer, remaining, t.checkpoint_reentrant)
    elif ckpt:
        events += _partly_checkpointed_backward(plan, act, grads, base, kept_per_layer, remaining, wrapped,
                                                t.checkpoint_reentrant)
    else:
        events += _replayed_backward(plan, act, grads, base)
    # a reentrant checkpoint's function, keyword arguments included, is an attribute of its autograd node's
    # ctx (CheckpointFunction.forward: ctx.run_function), which lives as long as the graph: to the end of
    # backward (the harness, like Trainer, drops the loss after backward returns)
    kwargs_to_end = act.checkpoint_kwargs if ckpt and t.checkpoint_reentrant else 0
    events += [
        # the embeddings' backward: their parameters' gradients are made while the gradient of their output
        # is alive; a tied embedding's two gradients are then summed (tied_embedding_addends)
        _event("backward:end", dict(base, activations=_saved_at_embeddings_backward(act, tied), gradients=gradients,
                                    temporaries=max(tied, act.embedding_grad) + act.loss_scalars + kwargs_to_end)),
        _optimizer_event(weights, inputs, gradients, ms),
    ]
    return _with_router_gradients(plan, act, events, ckpt, stream_dtypes(plan, t)[1], t.batch_size)


def _optimizer_event(weights: dict, inputs: int, gradients: int, ms: ModelStates) -> tuple:
    """The optimizer step: the weights, every .grad, the states and the step's temporaries."""
    return _event("optimizer", dict(weights, inputs=inputs, gradients=gradients, temporaries=ms.optimizer_temporaries,
                                    optimizer_states=ms.optimizer_states + (ms.optimizer_maps if ms.maps_in_state else 0),
                                    _other=(0 if ms.maps_in_state else ms.optimizer_maps) + ms.optimizer_spare_maps))


def _with_router_gradients(plan: Plan, act: ActivationProfile, events: list, ckpt: bool, dtype: str,
                           batch: int) -> list:
    """Under output_router_logits (ActivationProfile.router_grads) the auxiliary load-balancing loss
    (transformers models/mixtral/modeling_mixtral.py load_balancing_loss_func, added to the loss by
    ``loss += router_aux_loss_coef * aux_loss``) is the younger branch of the loss's graph, so the engine runs its
    backward first: every layer's router-logits gradient is made before the cross-entropy's backward and waits in
    its router's node until that layer's backward (sim.blocks.simulate_block replays it as an incoming
    gradient). At the loss and the head all of them are pending, at block i those of the blocks below. The
    logits themselves are held from each layer's forward until the model's forward returns: without
    checkpointing among what the blocks leave referenced (ActivationProfile.forward_leaves), under it added here
    (at the loss, and inside the last block's forward those of the blocks below)."""
    if not any(act.router_logits):
        return events
    out = []
    for name, total, parts in events:
        pending = 0
        if ckpt and name == "forward":
            pending = sum(act.router_logits)
        elif ckpt and name == "forward:block":
            pending = sum(act.router_logits[:-1])
        elif name in ("backward:loss", "backward:head"):
            pending = sum(act.router_grads)
        elif name.startswith("backward:layer"):
            pending = sum(act.router_grads[:int(name[len("backward:layer"):])])
        out.append(_event(name, dict(parts, temporaries=parts.get("temporaries", 0) + pending)) if pending
                   else (name, total, parts))
        if name == "forward":
            out.append(_aux_loss_event(plan.spec, act, out[-1][2], dtype, batch))
    return out


def _aux_loss_event(spec, act: ActivationProfile, at_loss: dict, dtype: str, batch: int) -> tuple:
    """The auxiliary loss's forward, once ForCausalLMLoss has returned (the forward event `at_loss` less its fp32
    copy of the logits and its padded labels, sim.loss.loss_buffers): load_balancing_loss_func's loop
    (models/mixtral/modeling_mixtral.py, no attention mask: the harness passes none) keeps each layer's
    ``softmax(layer_gate)`` (in the logits' dtype; SoftmaxBackward saves it when the logits need a gradient) and
    two fp32 (E,) sums; in the last layer's iteration it peaks at the larger of
    - ``topk``: the new values (logits' dtype) and int64 indices made while ``_, selected_experts`` still hold the
      previous layer's;
    - ``routing_weights.float()`` (a (T, E) fp32 copy unless fp32 already) before ``.sum(dim=0)`` frees it;
    - ``selected_experts.reshape(-1).to(float32)`` (histc's input on the CPU, int32 on CUDA: 4 bytes either way)
      and histc's (E,) output."""
    d = DTYPE_BYTES[dtype]  # the router logits' dtype, the model logits' too (no autocast)
    experts, k = spec.num_experts, spec.experts_per_token
    last = act.router_logits[-1]
    tokens = last // d // experts
    values = tokens * k * (d + 8)
    sums = 2 * experts * 4
    softmax = sum(act.router_grads[:-1]) + last  # saved below, and the last layer's output
    peak = softmax + sums + max(values + (values if len(act.router_logits) > 1 else 0),
                                values + (last // d * 4 if d != 4 else 0) + experts * 4,
                                values + tokens * k * 4 + experts * 4)
    logits = act.logits_bytes // d
    upcast = logits * 4 if d != 4 else 0
    padded_labels = (logits // spec.vocab_size + batch) * 8
    return _event("forward:aux_loss", dict(at_loss, logits_loss=at_loss["logits_loss"] - upcast - padded_labels,
                                           temporaries=at_loss.get("temporaries", 0) + peak))


def _forward_block_event(act: ActivationProfile, base: dict, wrapped: tuple, ckpt: bool) -> tuple:
    """The largest peak inside a block's forward: under checkpointing the checkpointed forward's working
    set (ActivationProfile.forward_transient, on the checkpoints' inputs), without it the peak inside the
    block whose forward, on what the blocks below saved, is largest (forward_block_*); when only some
    blocks are checkpointed, the larger of the two, forward_block_* then being the unwrapped blocks'
    peak on what the blocks below keep (sim.blocks._mixed_blocks); on a tie the checkpointed one."""
    checkpointed = dict(base, activations=act.pre + act.forward_checkpoint_inputs,
                        temporaries=act.forward_transient - act.forward_checkpoint_inputs)
    unwrapped = dict(base, activations=act.forward_block_saved, temporaries=act.forward_block_live)
    if not ckpt:
        return _event("forward:block", unwrapped)
    if all(wrapped):
        return _event("forward:block", checkpointed)
    return peak_event([_event("forward:block", checkpointed), _event("forward:block", unwrapped)])


def _replayed_backward(plan: Plan, act: ActivationProfile, grads: GradientArrival, base: dict) -> list:
    """The head's and each block's backward, replayed node by node (peftcalc.backward, from the nodes
    the forward simulator recorded): at the peak inside block i the blocks below still hold everything
    they saved, block i what it has not released yet; the gradients of the head and the blocks above
    have arrived, and block i's made so far; the buffers are the gradients in flight."""
    below = act.pre + sum(act.per_layer)
    hp = act.head_backward
    # (a tied head's gradient, grads.head_pending, is among the head replay's buffers: a "pending" step)
    events = [_event("backward:head", dict(base, activations=below + hp.saved,
                                           gradients=min(hp.params, grads.head_accumulated),
                                           logits_loss=hp.buffers + act.loss_scalars))]
    arrived = grads.head_accumulated
    for i in reversed(range(plan.spec.num_layers)):
        below -= act.per_layer[i]
        lb = act.blocks[i].backward
        if not act.per_layer[i] and not grads.per_layer[i] and not lb.total:
            continue
        events.append(_event(f"backward:layer{i}", dict(base, activations=below + lb.saved,
                                                       gradients=arrived + min(lb.params, grads.per_layer[i]),
                                                       temporaries=lb.buffers + grads.head_pending + act.loss_scalars)))
        arrived += grads.per_layer[i]
    return events


def _checkpointed_backward(plan: Plan, act: ActivationProfile, grads: GradientArrival, base: dict,
                           kept_per_layer: dict, remaining: int, reentrant: bool = False) -> list:
    """Under checkpointing each block keeps only its input until its backward, when its
    forward is recomputed and its backward runs on the recomputed tensors (_checkpointed_block). A tied
    head's gradient waits for the lookup's all along, a temporary (GradientArrival.head_pending), and
    so do the checkpoints' keyword arguments (ActivationProfile.checkpoint_kwargs). A head with no logits whose
    backward is replayed (ActivationProfile.head_replayed: TRL's fused LM head) peaks as its replay says, as in
    _partly_checkpointed_backward."""
    hp = act.head_backward
    head = (dict(base, activations=remaining + hp.saved, gradients=min(hp.params, grads.head_accumulated),
                 logits_loss=hp.buffers + act.loss_scalars, temporaries=act.checkpoint_kwargs) if act.head_replayed else
            dict(base, activations=remaining + act.post, gradients=grads.head_accumulated,
                 logits_loss=act.logits_bytes + act.loss_scalars + grads.head_pending, temporaries=act.checkpoint_kwargs))
    events = [_event("backward:head", head)]
    arrived = grads.head_accumulated
    kwargs = act.checkpoint_kwargs
    releases = {} if reentrant else {layer: (pre, kw) for layer, pre, kw in act.type_releases}
    for i in reversed(range(plan.spec.num_layers)):
        if i in kept_per_layer or grads.per_layer[i]:
            block = _checkpointed_block(base, remaining, arrived, _checkpoint_peak(act, i, reentrant))
            events.append(_event(f"backward:layer{i}", dict(block, temporaries=block["temporaries"] + grads.head_pending
                                                            + kwargs + act.loss_scalars)))
            arrived += grads.per_layer[i]
            remaining -= kept_per_layer.get(i, 0)
        pre, kw = releases.get(i, (0, 0))  # the lowest layer of a type is done: its frame lets go of them
        remaining, kwargs = remaining - pre, kwargs - kw
    return events


def _checkpoint_peak(act: ActivationProfile, i: int, reentrant: bool):
    """The peak of checkpointed block i's backward: non-reentrant, the replay of its
    sim.blocks.BlockSimulation (checkpointed_backward); reentrant, sim.blocks.reentrant_block_peak's."""
    return act.reentrant_backward[i] if reentrant else act.blocks[i].checkpointed_backward


def _checkpointed_block(base: dict, remaining: int, arrived: int, peak) -> dict:
    """Live bytes at the peak of a checkpointed block's backward (torch.utils.checkpoint; `peak`: from
    _checkpoint_peak), node by node (replayed by peftcalc.backward), the recompute
    of its forward included (what it has saved into the checkpoint's frame, torch/utils/checkpoint.py
    _recomputation_hook.pack_hook, as activations; its other live tensors and the gradient buffers of that
    moment as temporaries). `remaining` holds
    the inputs the checkpoints keep, this block's included."""
    return dict(base, activations=remaining + peak.saved, gradients=arrived + peak.params, temporaries=peak.buffers)


def _saved_at_embeddings_backward(act: ActivationProfile, tied: int) -> int:
    """The saved tensors alive at the embeddings' backward (ActivationProfile.lookup_saved: the lookups'
    indices). When a tied embedding's two gradients are summed (tied_embedding_addends) there are
    none: the word embedding's lookup is the embeddings' first op (GPT2Model.forward's wte before wpe,
    BertEmbeddings / RobertaEmbeddings.forward's word_embeddings before token types and positions), so
    its EmbeddingBackward is the last node to run and every other lookup has released its indices (traced,
    fake tensors: bert-base full bf16 b1 s128, token_type_ids freed before the sum; gpt2 full bf16 b4 s128
    ckpt, position_ids freed before it)."""
    if act.lookup_saved is None:
        return act.pre
    return 0 if tied and tied >= act.embedding_grad else act.lookup_saved


def _partly_checkpointed_backward(plan: Plan, act: ActivationProfile, grads: GradientArrival, base: dict,
                                  kept_per_layer: dict, remaining: int, wrapped: tuple, reentrant: bool) -> list:
    """The head's and each block's backward when checkpointing wraps only some blocks (`wrapped`,
    transformers every_n_layers): the head's replayed as without checkpointing, an unwrapped block's too
    (_replayed_backward: what the blocks below keep, `remaining` less its own, and its replay), a wrapped
    one's as _checkpointed_backward's. The checkpoints' keyword arguments live until the lowest wrapped
    block's backward (non-reentrant: its frame's recompute_fn; reentrant: to the end, see _step_events).
    A VLM's language model may have no wrapped block at all (its vision layers take the wrapped indices)."""
    lowest = wrapped.index(True) if any(wrapped) else len(wrapped)
    hp = act.head_backward
    events = [_event("backward:head", dict(base, activations=remaining + hp.saved,
                                           gradients=min(hp.params, grads.head_accumulated),
                                           logits_loss=hp.buffers + act.loss_scalars,
                                           temporaries=act.checkpoint_kwargs))]
    arrived = grads.head_accumulated
    for i in reversed(range(plan.spec.num_layers)):
        kwargs = act.checkpoint_kwargs if reentrant or i >= lowest else 0
        if wrapped[i]:
            if i not in kept_per_layer and not grads.per_layer[i]:
                continue
            block = _checkpointed_block(base, remaining, arrived, _checkpoint_peak(act, i, reentrant))
        else:
            lb = act.blocks[i].backward
            if not act.per_layer[i] and not grads.per_layer[i] and not lb.total:
                continue
            block = dict(base, activations=remaining - kept_per_layer.get(i, 0) + lb.saved,
                         gradients=arrived + min(lb.params, grads.per_layer[i]), temporaries=lb.buffers)
        events.append(_event(f"backward:layer{i}", dict(block, temporaries=block["temporaries"] + grads.head_pending
                                                        + kwargs + act.loss_scalars)))
        arrived += grads.per_layer[i]
        remaining -= kept_per_layer.get(i, 0)
    return events


def reserved_bytes(peak_allocated: int) -> int:
    """What nvidia-smi shows: the allocated peak, plus the caching allocator's fragmentation slack
    (PyTorch CUDACachingAllocator rounds blocks and keeps freed segments), plus the CUDA context
    that max_memory_allocated does not count."""
    return int(peak_allocated * (1 + ALLOCATOR_SLACK_FRACTION)) + CUDA_CONTEXT_BYTES
