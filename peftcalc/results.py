"""What `peftcalc.estimate` returns: the Estimate record and its parts (parameters, memory, GPU fits, cost,
storage), as frozen dataclasses whose `to_dict` is the JSON the CLI prints (README, "JSON schema")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from peftcalc.plan import MethodSettings
from peftcalc.settings import TrainingSettings

__all__ = ["Cost", "Estimate", "GpuFit", "Memory", "Params", "StorageInfo"]


@dataclass(frozen=True)
class Params:
    total: int
    trainable: int
    percent: float
    by_origin: dict


@dataclass(frozen=True)
class Memory:
    device: str
    peak_bytes: int  # max_memory_allocated-comparable peak of a steady-state step
    peak_phase: str
    components: dict  # name -> bytes at the peak (they sum to peak_bytes)
    step1_peak_bytes: int
    reserved_bytes: int  # + allocator slack + CUDA context (+ paged optimizer states): what nvidia-smi shows
    overhead: dict  # what reserved adds: cuda_context, allocator_slack, paged_optimizer_states
    events: dict  # phase -> live bytes
    # gradient accumulation: the micro-batch of the peak (1, or 2 for micro-batches 2..N), None when the peak
    # is the optimizer step or the step has one micro-batch
    peak_micro_batch: int | None = None
    # bitsandbytes paged optimizers: their states in CUDA unified memory (not in peak_bytes, in reserved_bytes)
    paged_bytes: int = 0
    # activation offloading (torch.autograd.graph.save_on_cpu(pin_memory=True)): the pinned host copies of the saved
    # activations at their largest (the end of the forward), in neither peak_bytes nor reserved_bytes
    host_bytes: int = 0
    # what the harness can only run on CUDA and no CPU trace has measured ("liger" and "cce" losses,
    # paged optimizers): "modelled, not traced"; else "traced"
    traced: str = "traced"
    # data parallelism (training.sharding): rank 0's figures above; here rank 0's and, when it differs, the last
    # rank's {rank, peak_bytes, peak_phase, components, step1_peak_bytes}; empty on one GPU
    ranks: tuple = ()


@dataclass(frozen=True)
class GpuFit:
    name: str
    memory_bytes: int
    fits: bool
    headroom_bytes: int
    max_batch_size: int | None  # None on a traced estimate (one batch size traced)
    step_seconds: float
    epoch_hours: float
    epoch_cost_usd: float
    price_per_hour: float


@dataclass(frozen=True)
class Cost:
    gpu: str
    mfu: float
    flops_per_step: float
    tokens_per_step: int
    step_seconds: float
    steps_per_epoch: int
    epoch_hours: float
    price_per_hour: float
    epoch_cost_usd: float
    dataset_tokens: int
    # data parallelism: the cards (flops_per_step is one rank's, tokens_per_step all ranks'; epoch_cost_usd is
    # for all of them), the bytes one rank sends per step and their seconds (peftcalc.sharding.comm)
    gpus: int = 1
    comm_bytes_per_step: int = 0
    comm_seconds: float = 0.0


@dataclass(frozen=True)
class StorageInfo:
    per_task_bytes: int
    base_bytes: int
    tasks: int
    total_bytes: int
    full_models_total_bytes: int  # T full fine-tuned copies, for comparison
    # the checkpoint as published where it is quantized (MXFP4: gpt-oss), and the same model in bf16 as the
    # fine-tuning recipes load it (0, 0 where the checkpoint is the model in its dtype)
    mxfp4_checkpoint_bytes: int = 0
    bf16_checkpoint_bytes: int = 0


@dataclass(frozen=True)
class Estimate:
    model: str
    architecture: str
    source: str
    method: MethodSettings
    training: TrainingSettings
    params: Params
    memory: Memory
    gpus: list
    cost: Cost | None
    storage: StorageInfo
    image_tokens: int = 0  # a VLM: tokens one image adds to the language model's sequence (BLIP-2: its queries)
    estimated_by: str = "modelled"  # "modelled" (this calculator) or "traced" (the harness on fake tensors)
    trace: dict | None = None  # a traced estimate: how it was traced (measure.traced.traced_estimate)
    gpus_auto: dict | None = None  # gpus="auto": {gpu, gpus, max_batch} (the fewest cards that fit)

    def to_dict(self) -> dict:
        """The JSON the CLI prints: tuples as lists, so the dict equals its own JSON round trip."""
        return _as_json(asdict(self))


def _as_json(x):
    """`x` with every tuple a list (dicts and lists walked)."""
    if isinstance(x, dict):
        return {k: _as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    return x
