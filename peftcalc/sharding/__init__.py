"""Memory per GPU under data parallelism (TrainingSettings.sharding), rank by rank: each strategy rewrites
the one-GPU step's events (peftcalc.memory.step_events) for one rank. ``fsdp``: peftcalc.sharding.fsdp,
``hsdp`` (FSDP2 on a (replicas, gpus_per_node) mesh): peftcalc.sharding.fsdp over the shard group,
``ddp``: peftcalc.sharding.ddp, ``zero1``/``zero2``: peftcalc.sharding.zero, ``zero3``: peftcalc.sharding.zero3.

:func:`sharded_timeline` gives rank 0's peftcalc.memory.Timeline (what estimate reports) and every rank
whose bytes differ (the last rank holds fewer rows where a dim 0 does not divide by the ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from peftcalc.errors import CombinationError
from peftcalc.memory import COMPONENTS, Timeline, peak_event
from peftcalc.plan import Plan
from peftcalc.settings import TrainingSettings
from peftcalc.sharding.ddp import check_ddp, ddp_events
from peftcalc.sharding.fsdp import FSDP_COMPONENTS, check_fsdp, fsdp_events
from peftcalc.sharding.recipes import loop_recipes
from peftcalc.sharding.zero import ZERO_COMPONENTS, check_zero, zero_events
from peftcalc.sharding.zero3 import check_zero3, zero3_events

__all__ = ["RankMemory", "SHARDED_COMPONENTS", "check_sharding", "rank_memory", "sharded_timeline", "wrapping_text"]

SHARDED_COMPONENTS = COMPONENTS + FSDP_COMPONENTS + ("gradient_buckets",) + ZERO_COMPONENTS
EVENTS = {"fsdp": fsdp_events, "hsdp": fsdp_events, "ddp": ddp_events, "zero1": zero_events, "zero2": zero_events,
          "zero3": zero3_events}
FSDP2 = ("fsdp", "hsdp")
ZERO = ("zero1", "zero2")
# the losses each strategy's model covers: transformers' ForCausalLMLoss everywhere; torchtune's chunked
# cross-entropy (peftcalc.sharding.recipes.loss_outside_root) and TRL's fused head under FSDP2 and DDP
LOSSES = {"fsdp": ("hf", "chunked", "trl"), "hsdp": ("hf", "chunked", "trl"), "ddp": ("hf", "chunked", "trl")}
# transformers Trainer._inner_training_loop runs every micro-batch but the last under accelerate's
# Accelerator.no_sync, which under FSDP2 calls FSDPModule.set_requires_gradient_sync(False): each block keeps its
# unsharded gradients (FSDPParam.unsharded_accumulated_grad) to the last micro-batch, unless
# accelerator_config's gradient_accumulation_kwargs sets sync_each_batch
TRAINER_NO_SYNC = ("trainer_loop with grad_accum > 1 under sharding {sharding} is not modelled yet: the HF Trainer's "
                   "no_sync micro-batches (accelerate Accelerator.no_sync -> FSDP2 set_requires_gradient_sync(False)) "
                   "keep every block's unsharded gradients to the last micro-batch")


@dataclass(frozen=True)
class RankMemory:
    """One rank's step: its peak, the peak's phase and components, and step 1's peak."""

    rank: int
    peak_bytes: int
    peak_phase: str
    components: tuple
    step1_peak_bytes: int
    events: tuple


def check_sharding(plan: Plan, t: TrainingSettings) -> None:
    """CombinationError unless the strategy (and this calculator's model of it) runs `plan` under `t`."""
    loop = FSDP2 + ("ddp",)  # the strategies whose model covers the loop's recipes (ZeRO-1/2: all but keep_outputs)
    recipe = [name for name, bad in (("grad_accum", t.grad_accum != 1), ("keep_outputs", t.keep_outputs),
                                      ("max_grad_norm", t.max_grad_norm is not None), ("trainer_loop", t.trainer_loop))
              if bad and t.sharding not in loop + (ZERO if name != "keep_outputs" else ())]
    recipe += ["loss"] if t.loss not in LOSSES.get(t.sharding, ("hf",)) else []
    if recipe and t.sharding != "none":
        raise CombinationError(f"{recipe[0]} under sharding {t.sharding} is not modelled yet", names=(recipe[0], "sharding"))
    if t.trainer_loop and t.grad_accum > 1 and t.sharding in FSDP2:
        raise CombinationError(TRAINER_NO_SYNC.format(sharding=t.sharding), names=("trainer_loop", "grad_accum", "sharding"))
    if t.sharding in FSDP2:
        check_fsdp(plan, t)
    elif t.sharding == "ddp":
        check_ddp(plan, t)
    elif t.sharding == "zero3":
        check_zero3(plan, t)
    elif t.sharding.startswith("zero"):
        check_zero(plan, t)
    else:
        raise CombinationError(f"sharding {t.sharding} is not modelled yet (fsdp, hsdp, ddp, zero1, zero2 and zero3 are)", names=("sharding",))


def _components(parts: dict) -> tuple:
    other = parts.get("_other", 0)
    return tuple((c, parts.get(c, 0) + (other if c == "temporaries" else 0)) for c in SHARDED_COMPONENTS)


@lru_cache(maxsize=1024)
def rank_memory(plan: Plan, t: TrainingSettings, rank: int) -> RankMemory:
    events = EVENTS[t.sharding](plan, t, rank)
    if t.sharding != "ddp":  # DDP's events are the whole one-GPU loop's (peftcalc.memory.loop_events)
        events = loop_recipes(plan, t, events, rank)
    name, total, parts = peak_event(events)
    states = events[-1][2].get("optimizer_states", 0)
    *before, last = events
    step1 = max(max(b for _, b, _ in before) - states, last[1])
    return RankMemory(rank, total, name, _components(parts), step1, tuple((n, b) for n, b, _ in events))


def sharded_timeline(plan: Plan, t: TrainingSettings) -> tuple[Timeline, tuple]:
    """Rank 0's Timeline, and the RankMemory of rank 0 and of the last rank when it differs."""
    check_sharding(plan, t)
    first = rank_memory(plan, t, 0)
    ranks = (first,)
    if t.gpus > 1:
        last = rank_memory(plan, t, t.gpus - 1)
        if last.peak_bytes != first.peak_bytes or last.components != first.components:
            ranks += (last,)
    return Timeline(first.events, first.peak_bytes, first.peak_phase, first.components, first.step1_peak_bytes,
                    peak_micro_batch=_peak_micro_batch(first, t)), ranks


def _peak_micro_batch(r: RankMemory, t: TrainingSettings) -> int | None:
    """Under grad_accum: 1 when the peak falls in micro-batch 1, 2 in the later ones (their events follow micro-batch
    1's, the optimizer's last: fsdp._accumulated; micro-batch 2 starts with the first forward event after a backward
    one: ZeRO-1's reduce events come after the last micro-batch only), None for a peak in the optimizer step or
    without accumulation."""
    if t.grad_accum == 1 or r.peak_phase.startswith("optimizer"):
        return None
    names = [n for n, _ in r.events]
    second = next(i for i in range(1, len(names)) if names[i].startswith("forward") and names[i - 1].startswith("backward"))
    return 1 if [b for _, b in r.events].index(r.peak_bytes) < second else 2


def wrapping_text(method: str, t: TrainingSettings) -> str:
    """How the model is assumed to be wrapped, one sentence for the estimate's output ('' on one GPU)."""
    if t.sharding == "ddp":
        return "DDP with its defaults (bucket_cap_mb 25, gradient_as_bucket_view off)" + (
            "; every micro-batch but the last under no_sync, as the HF Trainer runs them: the gradients accumulate in "
            ".grad, the buckets exist all along" if t.grad_accum > 1 else "")
    if t.sharding not in ("fsdp", "hsdp"):
        return ""
    text = ("FSDP2 wrapping assumed: fully_shard on every transformer block, then on the root (embeddings, final "
            "norm, head), as torchtitan and accelerate's TRANSFORMER_BASED_WRAP do")
    if t.sharding == "hsdp" and t.gpus > t.gpus_per_node:
        text += (f"; HSDP: sharded over each node's {t.gpus_per_node} GPUs, replicated over {t.gpus // t.gpus_per_node} "
                 "nodes (a (replicate, shard) DeviceMesh)")
    if t.precision == "mixed-bf16":
        text += "; float32 parameters under MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)"
        if method == "lora":
            text += ", which all-gathers the LoRA adapters in bfloat16 with the base: they compute in bfloat16"
    elif method in ("lora", "qlora") and t.precision in ("bf16", "fp16"):
        text += (f"; the LoRA adapters stay float32 beside the {t.precision} base (peft's autocast_adapter_dtype=True): "
                 "FSDP2 wants one dtype among a block's trainable parameters only and all-gathers both as bytes")
    if method == "qlora":
        text += ("; QLoRA's NF4 weights packed in bfloat16 (bnb_4bit_quant_storage=bfloat16, as TRL and axolotl load "
                 "them for FSDP) and sharded like any weight, each QuantState whole on every rank")
    if t.grad_accum > 1:
        text += ("; with gradient accumulation every micro-batch reduce-scatters and the sharded gradients accumulate "
                 "(torchtune's loop, accelerate's sync_each_batch=True); the HF Trainer's no_sync micro-batches, which "
                 "keep every block's unsharded gradients to the last one, are not modelled")
    return text
