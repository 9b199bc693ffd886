"""The Python API: `estimate(...)` returns a typed :class:`Estimate`; `sweep(...)` a DataFrame."""

from __future__ import annotations

import gc
import itertools
from dataclasses import fields, replace
from functools import lru_cache, wraps
from math import ceil

from peftcalc.activations import activation_profile
from peftcalc.checks import require_int, require_number
from peftcalc.errors import CombinationError, InputError
from peftcalc.families.blip2 import blip2_image_tokens
from peftcalc.hardware import (
    DEFAULT_MFU,
    GPU,
    find_gpu,
    gpu_catalog,
    max_batch_size,
    step_flops,
    step_seconds as micro_batch_seconds,
)
from peftcalc.memory import ALLOCATOR_SLACK_FRACTION, CUDA_CONTEXT_BYTES, reserved_bytes, timeline
from peftcalc.model_states import model_states
from peftcalc.offloading import check_offload
from peftcalc.methods import (MethodSettings, Plan, check_applies, check_combination, check_method_values, make_plan, methods_for, normalize_targets, prepare_kbit_default,
                              resolve_adapter_kind)
from peftcalc.settings import (DEFAULT_OPTIMIZER, PAGED_OPTIMIZERS, TrainingSettings, check_loss_applies,
                               check_training)
from peftcalc.sharding import sharded_timeline
from peftcalc.sharding.comm import communication, step_seconds_with_comm
from peftcalc.config import load_spec
from peftcalc.sim.profile import stream_dtypes
from peftcalc.spec import ModelSpec
from peftcalc.results import Cost, Estimate, GpuFit, Memory, Params, StorageInfo
from peftcalc.storage import full_model_bytes, mxfp4_checkpoint_bytes, mxfp4_quantized, storage

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_DATASET_TOKENS = 10_000_000
MIN_MFU = 0.001
METHOD_FIELDS = tuple(f.name for f in fields(MethodSettings))
TRAINING_FIELDS = tuple(f.name for f in fields(TrainingSettings))


def default_method(spec: ModelSpec) -> str:
    """The method when none is given: LoRA, or the model's only method where LoRA does not apply
    (BLIP-2: qformer)."""
    methods = methods_for(spec)
    return "lora" if "lora" in methods else methods[0]


def method_settings(method: str, sharding: str = "none", **kw) -> MethodSettings:
    """MethodSettings from the knobs given (None: the default, prepare_kbit's by the `sharding` it runs under:
    methods.prepare_kbit_default), each checked (methods.check_method_values)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.setdefault("prepare_kbit", prepare_kbit_default(method, sharding or "none"))
    if "targets" in kw:
        kw["targets"] = normalize_targets(kw["targets"])
    settings = MethodSettings(method=method, **kw)
    check_method_values(settings)
    return settings


def resolved_settings(spec: ModelSpec, settings: MethodSettings) -> MethodSettings:
    """The settings with the adapter kind a default means for this model (methods.resolve_adapter_kind)."""
    return replace(settings, adapter_kind=resolve_adapter_kind(spec, settings))


def _by_origin(plan: Plan) -> dict:
    out: dict = {}
    for g in plan.groups:
        key = g.origin
        row = out.setdefault(key, {"total": 0, "trainable": 0})
        row["total"] += g.numel
        row["trainable"] += g.numel if g.trainable else 0
    return out


def step_timeline(plan: Plan, t: TrainingSettings):
    """The step's peftcalc.memory.Timeline: one GPU's, or under a sharding rank 0's (peftcalc.sharding)."""
    if t.sharding == "none":
        return timeline(plan, t)
    return sharded_timeline(plan, t)[0]


def _linear_in_batch(plan: Plan, t: TrainingSettings) -> tuple[dict, dict]:
    """Intercept and slope (bytes per sample) of every event of the CUDA steady-state step."""
    one = dict(step_timeline(plan, replace(t, batch_size=1, device="cuda")).events)
    two = dict(step_timeline(plan, replace(t, batch_size=2, device="cuda")).events)
    slope = {k: two[k] - one[k] for k in one}
    intercept = {k: one[k] - slope[k] for k in one}
    return intercept, slope


def traced_status(t: TrainingSettings) -> str:
    """Whether the harness's CPU traces hold the prediction ("traced") or only a CUDA run can
    ("modelled, not traced": the liger and cce losses run Triton kernels, paged optimizers CUDA unified
    memory)."""
    cuda_only = t.loss in ("liger", "cce") or t.optimizer in PAGED_OPTIMIZERS or (t.loss == "trl" and t.device == "cuda")
    return "modelled, not traced" if cuda_only else "traced"


def gpu_max_batch(plan: Plan, t: TrainingSettings, gpu: GPU) -> int:
    """Largest batch whose reserved memory (allocated peak x (1 + slack) + CUDA context + paged optimizer
    states) fits."""
    intercept, slope = _linear_in_batch(plan, t)
    paged = model_states(plan, t).paged_states
    usable = (gpu.memory_bytes - CUDA_CONTEXT_BYTES - paged) / (1 + ALLOCATOR_SLACK_FRACTION)
    return min(max_batch_size(intercept[k], slope[k], usable) for k in intercept)


def _tokens_per_sample(plan: Plan, t: TrainingSettings) -> int:
    spec = plan.spec
    if spec.is_vlm:  # the language model sees the text and one image's tokens
        return t.seq_len + spec.image_tokens
    if spec.is_blip2:  # and BLIP-2's the text and the query tokens
        return t.seq_len + blip2_image_tokens(spec)
    return spec.vision_seq_len if spec.is_vision else t.seq_len


def _cost_on(plan: Plan, t: TrainingSettings, gpu: GPU, mfu: float, dataset_tokens: int, price: float | None) -> Cost:
    """One optimizer step: grad_accum micro-batches of batch_size samples (their FLOPs and tokens; the
    optimizer's own element-wise work is not counted, see hardware.step_flops). Under data parallelism every
    rank's micro-batches per step, the step the longer of compute and communication (peftcalc.sharding.comm),
    the price of all the cards; flops_per_step is one rank's."""
    flops = t.grad_accum * step_flops(plan, t, _tokens_per_sample(plan, t)).total
    tokens_per_step = t.grad_accum * t.batch_size * _tokens_per_sample(plan, t)
    step_seconds = t.grad_accum * micro_batch_seconds(plan, t, gpu, mfu, _tokens_per_sample(plan, t))
    per_hour = gpu.price_per_hour if price is None else price
    if t.gpus == 1:
        steps = ceil(dataset_tokens / tokens_per_step)
        hours = steps * step_seconds / 3600
        return Cost(gpu.name, mfu, flops, tokens_per_step, step_seconds, steps, hours, per_hour, hours * per_hour,
                    dataset_tokens)
    comm = communication(plan, t)
    step_seconds, comm_seconds = step_seconds_with_comm(step_seconds, comm, gpu, t)
    tokens_per_step *= t.gpus
    steps = ceil(dataset_tokens / tokens_per_step)
    hours = steps * step_seconds / 3600
    return Cost(gpu.name, mfu, flops, tokens_per_step, step_seconds, steps, hours, per_hour,
                hours * per_hour * t.gpus, dataset_tokens, t.gpus, comm.total, comm_seconds)


def estimate(
    model: str | ModelSpec | dict = DEFAULT_MODEL,
    *,
    method: str | None = None,
    rank: int | None = None,
    alpha: int | None = None,
    targets=None,
    dora: bool | None = None,
    double_quant: bool | None = None,
    bottleneck: int | None = None,
    adapter_kind: str | None = None,
    num_virtual_tokens: int | None = None,
    trainable_layers: int | None = None,
    vision_layers: int | None = None,
    prepare_kbit: bool | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "bf16",
    optimizer: str = DEFAULT_OPTIMIZER,
    grad_checkpointing: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
    checkpoint_every: int = 1,
    checkpoint_reentrant: bool = False,
    grad_accum: int = 1,
    keep_outputs: bool = False,
    loss: str = "hf",
    loss_chunks: int = 8,
    offload_activations: bool = False,
    max_grad_norm: float | None = None,
    trainer_loop: bool = False,
    gpus: int | str = 1,
    gpus_per_node: int = 8,
    sharding: str = "none",
    reshard_after_forward: bool = True,
    offload: str = "none",
    routing: str = "balanced",
    experts: str = "grouped_mm",
    router_aux_loss: bool = False,
    gpu: str | None = None,
    price: float | None = None,
    tasks: int = 1,
    dataset_tokens: int = DEFAULT_DATASET_TOKENS,
    mfu: float = DEFAULT_MFU,
) -> Estimate:
    """Parameters, memory, GPU fit, time, cost and storage of fine-tuning `model` one way (`method`:
    default_method when None). `prepare_kbit` None takes the method's default
    (methods.prepare_kbit_default: on for qlora, off for QLoRA under FSDP2 as TRL does)."""
    spec = load_spec(model)
    if router_aux_loss and not spec.num_experts:
        raise CombinationError(f"router_aux_loss: {spec.model_type} has no router (a mixture-of-experts model's "
                               "auxiliary load-balancing loss)", names=("router_aux_loss",))
    method = method or default_method(spec)
    knobs = dict(rank=rank, alpha=alpha, targets=targets, dora=dora, double_quant=double_quant, bottleneck=bottleneck,
                 adapter_kind=adapter_kind, num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers,
                 vision_layers=vision_layers, prepare_kbit=prepare_kbit)
    settings = method_settings(method, sharding, **knobs)
    check_applies(method, knobs)
    settings = resolved_settings(spec, settings)
    t = _checked_training(dict(batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
                               grad_checkpointing=grad_checkpointing, attention=attention, device=device,
                               checkpoint_every=checkpoint_every, checkpoint_reentrant=checkpoint_reentrant,
                               grad_accum=grad_accum, keep_outputs=keep_outputs, loss=loss, loss_chunks=loss_chunks,
                               offload_activations=offload_activations, max_grad_norm=max_grad_norm,
                               trainer_loop=trainer_loop, gpus=1 if gpus == "auto" else gpus,
                               gpus_per_node=gpus_per_node, sharding=sharding,
                               reshard_after_forward=reshard_after_forward, offload=offload,
                               routing=routing, experts=experts,
                               router_aux_loss=router_aux_loss or spec.output_router_logits))
    check_combination(spec, settings, seq_len, grad_checkpointing)
    check_loss_applies(spec, t, stream_dtypes(make_plan(spec, settings), t)[1])
    check_offload(make_plan(spec, settings), t)
    _check_cost_inputs(gpu, price, tasks, dataset_tokens, mfu)
    plan = make_plan(spec, settings)
    auto = None
    if gpus == "auto":
        t, auto = auto_gpus(plan, t, gpu or AUTO_GPU)
    memory = _memory(plan, t)
    fits = _gpu_fits(plan, t, memory.reserved_bytes, gpu, price, mfu, dataset_tokens)
    chosen = _choose_gpu(gpu, fits)
    cost = None
    if chosen is not None:
        cost = _cost_on(plan, t, chosen, mfu, dataset_tokens, price if gpu else None)
    weight_dtype = t.weight_dtype if method != "qlora" else t.compute_dtype
    return Estimate(
        model=spec.name,
        architecture=spec.architecture,
        source=spec.source,
        method=settings,
        training=t,
        params=Params(plan.total, plan.trainable, plan.trainable_percent, _by_origin(plan)),
        memory=memory,
        gpus=fits,
        cost=cost,
        storage=_storage_info(plan, weight_dtype, tasks),
        image_tokens=_tokens_per_sample(plan, t) - t.seq_len if spec.is_vlm or spec.is_blip2 else 0,
        gpus_auto=auto,
    )


def _gpu_fits(plan, t: TrainingSettings, reserved: int, gpu, price, mfu: float, dataset_tokens: int) -> list:
    """A GpuFit per card of the catalog: whether `reserved` bytes fit, the headroom, the largest batch, and time
    and cost (at `price` on the card `gpu` names, the catalog's price elsewhere)."""
    fits = []
    for g in gpu_catalog():
        c = _cost_on(plan, t, g, mfu, dataset_tokens, price if gpu and find_gpu(gpu).name == g.name else None)
        fits.append(GpuFit(g.name, g.memory_bytes, reserved <= g.memory_bytes, g.memory_bytes - reserved,
                           gpu_max_batch(plan, t, g), c.step_seconds, c.epoch_hours, c.epoch_cost_usd,
                           c.price_per_hour))
    return fits


def _storage_info(plan, weight_dtype: str, tasks: int) -> StorageInfo:
    """One base plus T task files against T full copies (what full fine-tuning stores); where the published
    checkpoint is MXFP4 (gpt-oss), its size beside the bf16 model the recipes load (peftcalc.storage)."""
    st = storage(plan, weight_dtype, tasks)
    full_total = tasks * full_model_bytes(plan, weight_dtype)
    quantized = (mxfp4_checkpoint_bytes(plan), full_model_bytes(plan, "bfloat16")) if mxfp4_quantized(plan) else (0, 0)
    return StorageInfo(st.per_task_bytes, st.base_bytes, tasks, st.total_bytes, full_total, *quantized)


AUTO_GPU = "H100 80GB"  # the card --gpus auto counts when --gpu names none
MAX_AUTO_GPUS = 16384


def auto_gpu_counts(t: TrainingSettings):
    """The GPU counts --gpus auto tries, fewest first: 1 to gpus_per_node, then whole nodes (HSDP needs whole
    nodes; a job of several nodes takes them whole)."""
    yield from range(1, t.gpus_per_node + 1)
    yield from range(2 * t.gpus_per_node, MAX_AUTO_GPUS + 1, t.gpus_per_node)


def auto_gpus(plan: Plan, t: TrainingSettings, gpu_name: str) -> tuple[TrainingSettings, dict]:
    """The fewest GPUs of `gpu_name` on which the per-GPU reserved memory (rank 0's, on cuda) fits, and the
    largest batch there; CombinationError when no count up to MAX_AUTO_GPUS fits (or one GPU does not and the
    sharding splits nothing)."""
    card = find_gpu(gpu_name)
    counts = [1] if t.sharding in ("none", "ddp") else auto_gpu_counts(t)
    for n in counts:
        trial = replace(t, gpus=n)
        if reserved_bytes(step_timeline(plan, replace(trial, device="cuda")).peak_bytes) <= card.memory_bytes:
            if t.sharding == "ddp":  # a replica per GPU: one fits, so the fewest is 1
                trial = replace(trial, gpus=1)
            return trial, {"gpu": card.name, "gpus": trial.gpus, "max_batch": gpu_max_batch(plan, trial, card)}
    if t.sharding in ("none", "ddp"):  # every GPU holds the whole step: more GPUs do not help
        raise CombinationError(f"one {card.name} does not hold this step and sharding {t.sharding} gives every GPU "
                               "all of it; use a sharding that splits the model (fsdp, hsdp, zero1, zero2)",
                               names=("gpus", "sharding"))
    raise CombinationError(f"no count of {card.name} up to {MAX_AUTO_GPUS:,} fits this setting; try "
                           "--grad-checkpointing, a smaller batch or another method", names=("gpus",))


def _rank_rows(plan: Plan, t: TrainingSettings) -> tuple:
    """Rank 0's and (where it differs) the last rank's figures under a sharding; () on one GPU."""
    if t.sharding == "none":
        return ()
    return tuple({"rank": r.rank, "peak_bytes": r.peak_bytes, "peak_phase": r.peak_phase,
                  "components": dict(r.components), "step1_peak_bytes": r.step1_peak_bytes}
                 for r in sharded_timeline(plan, t)[1])


def _memory(plan: Plan, t: TrainingSettings) -> Memory:
    """The Memory of an estimate: the steady-state timeline on t.device, and what nvidia-smi shows from the
    CUDA one (reserved_bytes, plus a paged optimizer's unified memory)."""
    tl = step_timeline(plan, t)
    cuda_tl = tl if t.device == "cuda" else step_timeline(plan, replace(t, device="cuda"))
    paged = model_states(plan, t).paged_states
    reserved = reserved_bytes(cuda_tl.peak_bytes) + paged
    return Memory(
        device=t.device,
        peak_bytes=tl.peak_bytes,
        peak_phase=tl.peak_phase,
        components=dict(tl.components),
        step1_peak_bytes=tl.step1_peak_bytes,
        reserved_bytes=reserved,
        overhead={"cuda_context": CUDA_CONTEXT_BYTES,
                  "allocator_slack": reserved - paged - CUDA_CONTEXT_BYTES - cuda_tl.peak_bytes,
                  **({"paged_optimizer_states": paged} if paged else {})},
        events=dict(tl.events),
        peak_micro_batch=tl.peak_micro_batch,
        paged_bytes=paged,
        host_bytes=activation_profile(plan, t).host_bytes if t.offload_activations else 0,
        traced=traced_status(t),
        ranks=_rank_rows(plan, t),
    )


def _check_cost_inputs(gpu, price, tasks, dataset_tokens, mfu) -> None:
    """The arguments of estimate() for time, cost and storage (InputError naming the first bad one)."""
    require_int("tasks", tasks)
    require_int("dataset_tokens", dataset_tokens)
    # below 0.1% a GPU would do less than one thousandth of its peak: a typo, and the time can overflow
    require_number("mfu", mfu, MIN_MFU, 1, what=f"in [{MIN_MFU:g}, 1] (model FLOPs utilisation)")
    if gpu is not None:
        if not isinstance(gpu, str):
            raise InputError(f"gpu must be a GPU name (peftcalc gpus), got {gpu!r}", names=("gpu",))
        find_gpu(gpu)
    if price is not None:
        require_number("price", price, 0, what="a finite number >= 0 (USD per hour)")
        if gpu is None:  # the price replaces one GPU's; without a GPU named it would be dropped silently
            raise InputError("price needs gpu: it replaces the hourly rate of the GPU named", names=("price", "gpu"))


def _choose_gpu(name: str | None, fits: list) -> GPU | None:
    """The GPU asked for, else the one that fits at the lowest cost per epoch."""
    if name:
        return find_gpu(name)
    fitting = [f for f in fits if f.fits]
    if not fitting:
        return None
    best = min(fitting, key=lambda f: (f.epoch_cost_usd, f.epoch_hours))
    return find_gpu(best.name)


def _collector_paused(f):
    """Run `f` with Python's cyclic garbage collector paused (resumed as it was when `f` returns; a cycle
    made meanwhile is collected then). A sweep's simulations make millions of short-lived objects in no
    reference cycle, which reference counting frees; the collector's passes over them, the caches and
    pandas' modules as it is imported took ~0.35 s of the 10,000-configuration sweep
    (benchmarks/bench_estimate.py) and freed nothing."""

    @wraps(f)
    def paused(*args, **kwargs):
        collecting = gc.isenabled()
        gc.disable()
        try:
            return f(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()

    return paused


@_collector_paused
def sweep(model: str | ModelSpec | dict | list | None = None, *, config: str | None = None,
          adapter_config: str | None = None, **grid):
    """Estimate every combination of the settings given as lists; returns a pandas DataFrame with
    one row per combination (model, settings, parameter counts, peak, phase, components, reserved). Each
    argument takes one value or any iterable of values except a string (a list, tuple, range, generator);
    `model` too (the `model` column names each row's). `targets` takes one setting (a comma-separated
    string or a list of module names) or a list of such settings when any item is a list, a tuple or None.
    A combination that cannot run (BitFit on a model without biases, prefix tuning with checkpointing, a
    sequence beyond learned positions) keeps its row, with the reason in `error` and no figures;
    `error` is None on the others. A bad value (an unknown method or precision, an empty list, an
    unknown keyword) raises InputError."""
    import pandas as pd

    costs = sorted(k for k in grid if k in COST_FIELDS)
    if costs:
        raise InputError(f"sweep rows compute memory only (no time, cost or storage): {', '.join(costs)} "
                         "belong to estimate()", names=tuple(costs))
    unknown = sorted(k for k in grid if k not in SWEEP_FIELDS)
    if unknown:
        raise InputError(f"sweep() got unknown argument(s) {', '.join(unknown)}; valid: model, config, "
                         f"adapter_config, {', '.join(SWEEP_FIELDS)}")
    run = None
    if config is not None or adapter_config is not None:
        model, grid, run = _config_grid(model, config, adapter_config, grid)
    model = DEFAULT_MODEL if model is None else model
    keys = list(grid)
    values = [_grid_values(k, v) for k, v in grid.items()]
    rows = []
    for spec in [load_spec(m) for m in _grid_values("model", model)]:
        memo: dict = {}  # one model's: _sweep_row's keys do not name the model
        for combo in itertools.product(*values):
            kw = dict(zip(keys, combo))
            try:
                rows.append({**_sweep_row(spec, kw, memo), "error": None})
            except CombinationError as exc:
                rows.append({"model": spec.name, **kw, "error": str(exc)})
    df = pd.DataFrame(rows)
    if run is not None:  # the line naming the config's tool and settings, and what it does not model
        df.attrs.update(config=run.header(), not_modelled=run.warning())
    if df["error"].notna().any():  # byte counts stay integers beside the rows that have none
        counts = [c for c in df.columns if c.startswith(("params_", "mem_")) or c.endswith("_bytes")]
        df[counts] = df[counts].astype("Int64")
    return df


def _config_grid(model, config, adapter_config, grid: dict):
    """sweep(config=...): the model and settings a training config (and a peft adapter config) describe
    (peftcalc.training_configs.from_files), under `model` and every grid keyword given."""
    from peftcalc.training_configs import from_files

    single = model if isinstance(model, (str, ModelSpec, dict)) else None
    run = from_files(config, adapter_config, given={"model": single} if single is not None else {})
    base = {k: v for k, v in run.kwargs.items() if k in SWEEP_FIELDS and k not in grid}
    return (run.model if model is None else model), {**base, **grid}, run


# The keywords sweep() takes besides `model`: the knobs of MethodSettings and the TrainingSettings fields;
# estimate()'s time, cost and storage arguments, which a sweep row does not compute, are refused by name.
SWEEP_FIELDS = METHOD_FIELDS + TRAINING_FIELDS
COST_FIELDS = ("gpu", "price", "tasks", "dataset_tokens", "mfu")


def _grid_values(name: str, value) -> list:
    """The values one sweep argument takes: an iterable's items (a string, a dict or a ModelSpec is one
    value; targets: see sweep), or the one value; an empty iterable is an InputError."""
    if name == "targets":
        many = isinstance(value, (list, tuple)) and any(v is None or isinstance(v, (list, tuple)) for v in value)
    else:
        many = not isinstance(value, (str, bytes, dict, ModelSpec)) and hasattr(value, "__iter__")
    if not many:
        return [value]
    values = list(value)
    if not values:
        raise InputError(f"{name}: empty list", names=(name,))
    return values


# Methods whose memory reads MethodSettings.rank: their planner (methods.plan_lora) sizes the LoRA
# matrices with it, and the simulator (methods.sites.BlockSites.linear: `lora_rank=s.rank if name in lt.lora`, the head's LoRA
# targets) and the FLOPs (hardware.step_flops: `plan.targets if method in ("lora", "qlora")`) read it for
# LoRA layers only; compare.py drops it for the other methods too.
RANK_METHODS = ("lora", "qlora")


def _memory_key(settings: MethodSettings) -> MethodSettings:
    """The settings a sweep row's memory figures are computed from: a rank given to a method outside
    RANK_METHODS is never read, so such configurations share one computation
    (tests/peftcalc/test_api.py checks the figures do not move with it)."""
    if settings.method in RANK_METHODS:
        return settings
    return replace(settings, rank=MethodSettings.rank)


def _sweep_row(spec: ModelSpec, kw: dict, memo: dict | None = None) -> dict:
    """One row of a sweep: the memory model only (no GPU table, no storage), which is what makes
    thousands of configurations take seconds. `memo` (one sweep's, for one model): each distinct method and
    training settings built and checked once, and the figures of each distinct (settings as _memory_key has
    them, training settings) computed once."""
    memo = {} if memo is None else memo
    method = kw.get("method") or default_method(spec)
    method_kw = tuple((k, kw[k]) for k in METHOD_FIELDS if k in kw and k != "method")
    sharding = kw.get("sharding", "none")
    settings = _memoized(memo, ("settings", method, method_kw, sharding),
                         lambda: method_settings(method, sharding, **dict(method_kw)))
    training_kw = tuple((k, kw[k]) for k in TRAINING_FIELDS if k in kw)
    t = _memoized(memo, ("training", training_kw), lambda: _checked_training(dict(training_kw)))
    plan = make_plan(spec, settings)
    _memoized(memo, ("combination", settings, t.seq_len, t.grad_checkpointing),
              lambda: check_combination(spec, settings, t.seq_len, t.grad_checkpointing) or True)
    _memoized(memo, ("loss", t, settings), lambda: check_loss_applies(spec, t, stream_dtypes(plan, t)[1])
              or check_offload(plan, t) or True)
    figures = _memoized(memo, (_memory_key(settings), t), lambda: _sweep_figures(plan, t))
    return {"model": spec.name, **{k: kw[k] for k in kw}, "method": settings.method, **figures}


def _memoized(memo: dict, key: tuple, compute):
    """memo[key], computed (and checked: an InputError is raised every time, never stored) on first use; a
    key with an unhashable value (a list of targets) is computed every time. A sweep's rows share a few
    distinct method and training settings: each is built and validated once."""
    try:
        return memo[key]
    except KeyError:
        value = memo[key] = compute()
        return value
    except TypeError:
        return compute()


def _checked_training(kw: dict) -> TrainingSettings:
    """TrainingSettings from `kw`, checked (settings.check_training)."""
    t = TrainingSettings(**kw)
    check_training(t)
    return t


@lru_cache(maxsize=1024)
def _param_counts(plan: Plan) -> tuple[int, int]:
    """Plan.total and Plan.trainable (sums over the groups), once per plan."""
    return plan.total, plan.trainable


def _sweep_figures(plan: Plan, t: TrainingSettings) -> dict:
    """The computed columns of a sweep row."""
    tl = step_timeline(plan, t)
    cuda_peak = tl.peak_bytes if t.device == "cuda" else step_timeline(plan, replace(t, device="cuda")).peak_bytes
    total, trainable = _param_counts(plan)
    row = {"params_total": total, "params_trainable": trainable,
           "peak_bytes": tl.peak_bytes, "peak_phase": tl.peak_phase,
           "reserved_bytes": reserved_bytes(cuda_peak), "step1_peak_bytes": tl.step1_peak_bytes}
    row.update({f"mem_{k}": v for k, v in tl.components})
    if t.offload_activations:  # save_on_cpu's pinned host copies, apart from the device peak
        row["host_bytes"] = activation_profile(plan, t).host_bytes
    return row


def plan_for(model, method: str | None = None, **method_kw) -> Plan:
    """The parameter plan alone (used by the harness and reports; `method`: default_method when None)."""
    spec = load_spec(model)
    return make_plan(spec, method_settings(method or default_method(spec), **method_kw))


__all__ = ["estimate", "sweep", "Estimate", "plan_for", "model_states", "step_timeline"]
