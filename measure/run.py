"""Measure the memory of real training steps: :func:`measure_one` builds a model, runs warm-up and
measured steps (forward with labels, backward, optimizer step, ``zero_grad(set_to_none=True)``) and
returns one JSON-serialisable row.

Devices:
  cuda  real weights on the GPU; peaks from ``torch.cuda.max_memory_allocated`` after
        ``reset_peak_memory_stats`` at each phase start (plus ``max_memory_reserved`` and step
        time); one extra step is traced by :class:`measure.tracer.StorageTracer` for the breakdown.
  cpu   real random weights on the CPU, traced by the StorageTracer.
  fake  the real module tree with fake-tensor parameters (:mod:`measure.fake`), traced the same way;
        no memory is used.

A step's peak is counted as ``max_memory_allocated`` counts it after ``reset_peak_memory_stats`` at
the step's start: every live tensor - parameters, optimizer state and inputs included.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import platform
import subprocess
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from measure.build import build_model, build_qlora_model, count_logical_params
from measure.tracer import StorageTracer, gradient_tensors, model_state_tensors, optimizer_state_tensors
from peftcalc.errors import InputError
from peftcalc.methods import PEFT_METHODS, MethodSettings, check_combination, make_plan, resolve_adapter_kind
from peftcalc.settings import TrainingSettings, check_training
from peftcalc.spec import ModelSpec, load_spec

DEVICES = ("cuda", "cpu", "fake")
PHASES = ("forward", "backward", "optimizer")
TOP_K = 8
REPO = Path(__file__).resolve().parent.parent

# What each task's loss is (the model's own loss where it has one).
LOSSES = {
    "causal_lm": "model loss, labels=input_ids (transformers ForCausalLMLoss: logits upcast to fp32, shift, cross-entropy)",
    "masked_lm": "model loss, labels=input_ids at a fixed random 15% of positions, -100 elsewhere",
    "seq_cls": "model loss, one integer label per sequence",
    "image_cls": "model loss, one integer label per image",
    "base": "last_hidden_state.float().pow(2).mean() (the bare encoder has no head and no loss)",
    "image_text_to_text": "model loss, labels=input_ids over image + text tokens (ForCausalLMLoss); one random "
                          "image per sample, its image_tokens placeholder ids first",
}


@dataclass(frozen=True)
class Policy:
    """How tensors are stored and computed: see peftcalc.settings.PRECISIONS."""

    dtype: torch.dtype  # storage dtype of the model's weights
    autocast: torch.dtype | None  # torch.autocast dtype around forward and loss, or None
    compute: torch.dtype  # dtype activations are computed in (bnb_4bit_compute_dtype for QLoRA)
    grad_scaler: bool  # torch.amp.GradScaler (amp-fp16 on cuda)


def precision_policy(training: TrainingSettings, device: str) -> Policy:
    """fp32/bf16/fp16: the model in that dtype; amp-*: fp32 weights and ``torch.autocast`` (torch.amp);
    amp-fp16 adds a GradScaler on cuda only (its inf check reads tensor values, which fake tensors
    lack, and CPU training has no fp16 underflow problem to fix)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    autocast = dtypes[training.autocast_dtype] if training.autocast_dtype else None
    return Policy(
        dtype=dtypes[training.weight_dtype],
        autocast=autocast,
        compute=dtypes[training.compute_dtype],
        grad_scaler=training.precision == "amp-fp16" and device == "cuda",
    )


# -- validation -----------------------------------------------------------------------------


def check_run(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str, steps: int) -> None:
    """Raise InputError (one line) for settings that cannot run, before anything is built."""
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose from {', '.join(DEVICES)}")
    if steps < 1:
        raise InputError(f"--steps must be a positive integer, got {steps}")
    check_training(replace(training, device="cuda" if device == "cuda" else "cpu"))
    make_plan(spec, method)
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or fake")
    check_combination(spec, method, training.seq_len, training.grad_checkpointing)


# -- building ---------------------------------------------------------------------------------


def build_for_device(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str,
                     policy: Policy, fake_mode=None, workdir: str | None = None, prepare_kbit: bool = False):
    """The model, with its method applied, on `device` (fake: under `fake_mode`)."""
    if device == "fake":
        from measure.fake import build_fake_model

        return build_fake_model(spec, method, fake_mode, policy.dtype, policy.compute, training.attention)
    torch_device = "cuda" if device == "cuda" else "cpu"
    if method.method == "qlora":
        return build_qlora_model(spec, method, workdir, dtype=policy.dtype, compute_dtype=policy.compute,
                                 device=torch_device, attention=training.attention, prepare_kbit=prepare_kbit)
    return build_model(spec, method, dtype=policy.dtype, device=torch_device, attention=training.attention)


def transformers_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_for_training(model, spec: ModelSpec, training: TrainingSettings) -> dict:
    """``model.train()``, ``use_cache=False``, and gradient checkpointing as transformers enables it:
    ``PreTrainedModel.activation_checkpointing_enable({'use_reentrant': R}, every_n_layers=N)``
    (``training.checkpoint_reentrant``, ``training.checkpoint_every``; with N = 1 and R = False what
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})`` does). It
    calls ``enable_input_require_grads`` on models whose main input is input_ids (and on LLaVA, every
    input embedding inside). Non-reentrant checkpointing keeps gradients flowing into frozen-embedding
    models without it (``_checkpoint_without_reentrant`` does not need an input that requires grad);
    reentrant checkpointing does (``CheckpointFunction`` runs the block under no_grad, so its output
    requires grad only through an input that does), so a vision model (ViT, CLIP: main input
    pixel_values, their blocks' input needs no gradient when the patch embeddings are frozen) then gets
    ``enable_input_require_grads`` too, as peft does for a model whose
    checkpointing is on when it is wrapped (``PeftModel._prepare_model_for_gradient_checkpointing``)
    and as ``prepare_model_for_kbit_training`` does under reentrant checkpointing (BLIP-2, main input
    pixel_values too, needs none: its Q-Former's input is the trainable query tokens). Decoder classifiers
    without a pad token get ``pad_token_id = vocab_size - 1`` so batch > 1 runs (the inputs never
    contain it)."""
    inner = transformers_model(model)
    inner.config.use_cache = False
    if spec.is_vlm:  # the language model reads text_config.use_cache (see measure.build.transformers_config)
        inner.config.text_config.use_cache = False
    notes = {}
    if spec.task == "seq_cls" and spec.is_decoder and inner.config.pad_token_id is None:
        inner.config.pad_token_id = spec.vocab_size - 1
        notes["pad_token_id_set"] = spec.vocab_size - 1
    if training.grad_checkpointing:
        inner.activation_checkpointing_enable({"use_reentrant": training.checkpoint_reentrant},
                                              every_n_layers=training.checkpoint_every)
        if training.checkpoint_reentrant and spec.is_vision:
            inner.enable_input_require_grads()
            notes["input_require_grads"] = True
    model.train()
    return notes


def make_optimizer(name: str, params):
    """torch AdamW (defaults: lr 1e-3, foreach on CUDA); SGD momentum 0.9; bitsandbytes AdamW8bit;
    transformers Adafactor with its defaults (lr=None, relative_step, scale_parameter, warmup_init
    off)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adamw-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=None)
    raise InputError(f"unknown optimizer '{name}'")


# -- batches and losses -----------------------------------------------------------------------


def make_batch(spec: ModelSpec, training: TrainingSettings, device: str, dtype: torch.dtype) -> dict:
    """Random inputs and labels of fixed shape for one step (create under the fake mode for fake)."""
    b, s = training.batch_size, training.seq_len
    if spec.is_vlm:
        # LLaVA: the processor expands <image> to image_tokens placeholder ids; they come first, the
        # text after them (random ids other than the placeholder); labels=input_ids (one tensor)
        image_id = image_token_id(spec)
        text = torch.randint(0, spec.vocab_size - 1, (b, s), device=device)
        text = torch.where(text >= image_id, text + 1, text)
        ids = torch.cat([torch.full((b, spec.image_tokens), image_id, device=device, dtype=text.dtype), text], dim=1)
        pixels = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, dtype=dtype, device=device)
        return {"input_ids": ids, "pixel_values": pixels, "labels": ids}
    if spec.model_type == "blip-2":
        # Blip2ForConditionalGeneration (transformers 5.x): the processor puts num_query_tokens placeholder
        # ids (image_token_index) before the text; masked_scatter replaces their embeddings with the
        # language projection's outputs, and the loss runs over logits[:, -labels.size(1):] (here all)
        image_id, queries = image_token_id(spec), dict(spec.blip2)["num_query_tokens"]
        text = torch.randint(0, spec.vocab_size - 1, (b, s), device=device)
        text = torch.where(text >= image_id, text + 1, text)
        ids = torch.cat([torch.full((b, queries), image_id, device=device, dtype=text.dtype), text], dim=1)
        pixels = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, dtype=dtype, device=device)
        return {"input_ids": ids, "pixel_values": pixels, "labels": ids}
    if spec.is_vision:
        pixels = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, dtype=dtype, device=device)
        batch = {"pixel_values": pixels}
        if spec.task == "image_cls":
            batch["labels"] = torch.randint(0, spec.num_labels, (b,), device=device)
        return batch
    high = spec.vocab_size - 1 if spec.task == "seq_cls" and spec.is_decoder else spec.vocab_size
    ids = torch.randint(0, high, (b, s), device=device)
    batch = {"input_ids": ids}
    if spec.task == "causal_lm":
        batch["labels"] = ids
    elif spec.task == "masked_lm":
        masked = torch.rand(b, s, device=device) < 0.15
        batch["labels"] = torch.where(masked, ids, torch.full_like(ids, -100))
    elif spec.task == "seq_cls":
        batch["labels"] = torch.randint(0, spec.num_labels, (b,), device=device)
    return batch


def image_token_id(spec: ModelSpec) -> int:
    """The placeholder id of an image token (LlavaConfig image_token_index, default 32000)."""
    return int(spec.hf_config.get("image_token_index", spec.hf_config.get("image_token_id", 32000)))


def forward_loss(model, spec: ModelSpec, batch: dict) -> torch.Tensor:
    """The loss of one forward pass (see LOSSES). The model outputs are dropped before backward, as
    in transformers ``Trainer.training_step`` (``compute_loss`` returns the loss only)."""
    outputs = model(**batch)
    if spec.task == "base":
        return outputs.last_hidden_state.float().pow(2).mean()
    return outputs.loss


def autocast_context(policy: Policy, device: str):
    if policy.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=policy.autocast)


# -- meters -----------------------------------------------------------------------------------


class TracerMeter:
    """Phase and step peaks from a StorageTracer (cpu, fake, and the extra traced cuda step)."""

    source = "tracer"

    def __init__(self, tracer: StorageTracer) -> None:
        self.tracer = tracer
        self.step_peaks: list[tuple[int, str]] = []  # (peak event, phase) per step

    def register(self, model, batch, optimizer=None) -> None:
        self.tracer.mark(model_state_tensors(model), "parameters")
        self.tracer.mark(gradient_tensors(model), "gradients")
        if optimizer is not None:
            self.tracer.mark(optimizer_state_tensors(optimizer), "optimizer_state")
        self.tracer.mark(batch, "inputs")

    def live_bytes(self) -> int:
        return self.tracer.live_bytes

    def start_step(self) -> None:
        self.tracer.reset_peak()
        self._phases: dict[str, dict] = {}
        self._peak = (-1, 0, "")

    @contextlib.contextmanager
    def phase(self, name: str):
        with self.tracer.phase(name) as stats:
            if name == "forward":
                with self.tracer.saving():
                    yield
            elif name == "backward":  # a checkpoint's recompute saves activations again
                with self.tracer.recomputing():
                    yield
            else:
                yield
        self._phases[name] = {"start_bytes": stats.start_bytes, "end_bytes": stats.end_bytes,
                              "peak_bytes": stats.peak_bytes, "_seq": stats.peak_seq}
        if stats.peak_bytes > self._peak[0]:  # strictly: on a tie the earlier phase is the peak's phase,
            # as in the calculator (peftcalc.memory.peak_event)
            self._peak = (stats.peak_bytes, stats.peak_seq, name)

    def mark_gradients(self, model) -> None:
        self.tracer.mark(gradient_tensors(model), "gradients")

    def mark_optimizer(self, optimizer) -> None:
        self.tracer.mark(optimizer_state_tensors(optimizer), "optimizer_state")

    def end_step(self) -> dict:
        peak, seq, phase = self._peak
        self.step_peaks.append((seq, phase))
        return {"peak_bytes": peak, "peak_phase": phase, "phases": self._phases}

    def details(self, steps: list[dict]) -> dict:
        """Categories at each step's peak and at each phase peak of the last step; top tensors and
        ops at the last step's peak. Called after the run, once every category is final."""
        t = self.tracer
        last_seq = self.step_peaks[-1][0]
        return {
            "categories_at_peak": t.breakdown(last_seq),
            "step1_categories_at_peak": t.breakdown(self.step_peaks[0][0]),
            "phase_categories": {name: t.breakdown(p["_seq"]) for name, p in steps[-1]["phases"].items()},
            "top_tensors": t.top_tensors(last_seq, TOP_K),
            "top_ops": t.top_ops(last_seq, TOP_K),
        }


class CudaMeter:
    """Phase and step peaks from the CUDA caching allocator: ``reset_peak_memory_stats`` at each
    phase start, ``max_memory_allocated`` / ``max_memory_reserved`` at its end."""

    source = "cuda_allocator"

    def register(self, model, batch, optimizer=None) -> None:
        pass

    def live_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def start_step(self) -> None:
        self._phases = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        self._phases[name] = {"start_bytes": start, "end_bytes": torch.cuda.memory_allocated(),
                              "peak_bytes": torch.cuda.max_memory_allocated(),
                              "reserved_peak_bytes": torch.cuda.max_memory_reserved()}

    def mark_gradients(self, model) -> None:
        pass

    def mark_optimizer(self, optimizer) -> None:
        pass

    def end_step(self) -> dict:
        # max() keeps the first of equal peaks: the earlier phase, as peftcalc.memory.peak_event does
        name, peak = max(self._phases.items(), key=lambda kv: kv[1]["peak_bytes"])
        reserved = max(p["reserved_peak_bytes"] for p in self._phases.values())
        return {"peak_bytes": peak["peak_bytes"], "peak_phase": name, "reserved_peak_bytes": reserved,
                "phases": self._phases}


# -- the step -------------------------------------------------------------------------------


def train_step(model, spec, batch, optimizer, policy, device, meter, scaler=None) -> dict:
    """One training step in phases: forward (+loss), backward, optimizer step and zero_grad."""
    meter.start_step()
    start = time.perf_counter()
    with meter.phase("forward"):
        with autocast_context(policy, device):
            loss = forward_loss(model, spec, batch)
    with meter.phase("backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
        del loss
    meter.mark_gradients(model)
    with meter.phase("optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        meter.mark_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    summary = meter.end_step()
    summary["time_s"] = round(time.perf_counter() - start, 6)
    return summary


def run_steps(model, spec, batch, optimizer, policy, device, meter, steps: int, scaler=None) -> list[dict]:
    results = []
    for i in range(steps):
        summary = train_step(model, spec, batch, optimizer, policy, device, meter, scaler)
        results.append({"step": i + 1, **summary})
    return results


# -- the record -----------------------------------------------------------------------------


# MethodSettings fields added after result files were first committed: recorded only when set, so
# the settings (and resume keys) of every earlier row stay what they were.
LATER_METHOD_FIELDS = ("vision_layers",)
# TrainingSettings fields added later, with their defaults: recorded only when they differ from them.
LATER_TRAINING_FIELDS = {"checkpoint_every": 1, "checkpoint_reentrant": False}


def method_record(spec: ModelSpec, method: MethodSettings) -> dict:
    """The method's settings as a row records them (and a subprocess request carries them): the adapter kind
    a default resolves to, lists for tuples, and without the fields added later when they hold their
    default (LATER_METHOD_FIELDS) or prepare_kbit, which travels as the run's qlora_prepare_kbit as it did
    before MethodSettings had the field, so the keys of earlier rows stay what they were."""
    m = asdict(method)
    del m["prepare_kbit"]
    m["adapter_kind"] = resolve_adapter_kind(spec, method)  # the kind the run uses (None means a default)
    if isinstance(m["targets"], tuple):
        m["targets"] = list(m["targets"])
    for name in LATER_METHOD_FIELDS:
        if m.get(name) == 0:
            del m[name]
    return m


def settings_record(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str,
                    steps: int, prepare_kbit: bool = False, seed: int = 0) -> dict:
    """Everything that decides a run, as plain data (also the input of :func:`row_key`)."""
    prepare_kbit = bool(prepare_kbit or method.prepare_kbit)
    t = asdict(replace(training, device="cuda" if device == "cuda" else "cpu"))
    for name, default in LATER_TRAINING_FIELDS.items():
        if t[name] == default:
            del t[name]
    return {
        "model": spec.name,
        "model_config_sha": config_sha(spec),
        "method": method_record(spec, method),
        "training": t,
        "device": device,
        "steps": steps,
        "seed": seed,
        "qlora_prepare_kbit": bool(prepare_kbit) if method.method == "qlora" else None,
    }


def config_sha(spec: ModelSpec) -> str:
    text = json.dumps({k: v for k, v in spec.hf_config.items() if not k.startswith("_")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def row_key(settings: dict) -> str:
    """A stable key for a run's settings (resume skips rows whose key is already written)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def predict(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str) -> dict:
    """The calculator's estimate for the same settings (device 'cuda' for cuda runs, 'cpu' for cpu
    and fake), or ``{"predicted": None, "predicted_error": why}`` when it is unavailable."""
    try:
        from peftcalc.api import estimate
    except ImportError as exc:
        return {"predicted": None, "predicted_error": f"peftcalc.api not importable: {exc}"}
    kwargs = {**asdict(method), **asdict(training), "device": "cuda" if device == "cuda" else "cpu"}
    try:
        result = estimate(spec, **kwargs)
        memory = result.memory
        predicted = {"peak_bytes": int(memory.peak_bytes),
                     "components": {k: int(v) for k, v in dict(memory.components).items()}}
        for extra in ("peak_phase", "phase"):
            if getattr(memory, extra, None) is not None:
                predicted["peak_phase"] = str(getattr(memory, extra))
                break
        return {"predicted": predicted, "predicted_error": None}
    except Exception as exc:  # the calculator's failure must not lose the measurement
        return {"predicted": None, "predicted_error": f"{type(exc).__name__}: {exc}"}


@lru_cache(maxsize=None)
def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


@lru_cache(maxsize=None)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    """Where the row was measured: device name, library versions, git commit."""
    env = {**_versions(), "git_commit": git_commit(), "host_cpu": platform.machine(),
           "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, device_total_bytes=props.total_memory, cuda=torch.version.cuda,
                   driver=_nvidia_driver())
    else:
        env["device_name"] = "cpu (fake tensors)" if device == "fake" else f"cpu ({platform.processor() or platform.machine()})"
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def save_trainable(model, method: MethodSettings, workdir: str) -> dict:
    """Save what a user would keep after training: the peft adapter (``save_pretrained``:
    adapter_model.safetensors) or the trainable parameters (safetensors ``save_file``)."""
    out = Path(workdir) / "saved"
    if method.method in PEFT_METHODS:
        model.save_pretrained(out)
        path = out / "adapter_model.safetensors"
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        path = out / "trainable.safetensors"
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(path))
    return {"file": path.name, "bytes": path.stat().st_size}


# -- one run --------------------------------------------------------------------------------


def measure_one(spec: ModelSpec | str | dict, method_settings: MethodSettings, training_settings: TrainingSettings,
                device: str = "cuda", steps: int = 3, *, prepare_kbit: bool = False, seed: int = 0,
                trace_cuda: bool = True, predicted: bool = True) -> dict:
    """Measure `steps` training steps (step 1 and the last, steady-state step are reported apart)
    and return one JSON-serialisable row; see the module docstring. Bad settings raise InputError;
    anything that fails while running is recorded as the row's outcome ('oom' or 'error')."""
    spec = load_spec(spec)
    check_run(spec, method_settings, training_settings, device, steps)
    if method_settings.method == "qlora":  # the run key and the method's own setting mean the same
        method_settings = replace(method_settings, prepare_kbit=bool(prepare_kbit or method_settings.prepare_kbit))
    prepare_kbit = method_settings.prepare_kbit
    settings = settings_record(spec, method_settings, training_settings, device, steps, prepare_kbit, seed)
    row = {"key": row_key(settings), "settings": settings, "outcome": "ok", "error": None,
           "harness": {"loss": LOSSES[spec.task]}, "params": None, "measured": None}
    started = time.perf_counter()
    try:
        result = _execute(spec, method_settings, training_settings, device, steps, prepare_kbit, seed, trace_cuda)
        row["harness"].update(result.pop("harness_notes"))
        row.update(result)
    except Exception as exc:
        row["outcome"], row["error"] = classify_failure(exc)
        row["error_trace"] = traceback.format_exc(limit=-4)
    finally:
        free_memory()
    row["wall_time_s"] = round(time.perf_counter() - started, 3)
    if predicted:
        row.update(predict(spec, method_settings, training_settings, device))
    row["environment"] = environment(device)
    return row


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """('oom', message) for out-of-memory errors (CUDA or the CPU allocator), else ('error', message)."""
    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None),) if t is not None)
    text = str(exc).lower()
    if isinstance(exc, oom_types) or "out of memory" in text or "can't allocate memory" in text:
        return "oom", message
    return "error", message


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _execute(spec, method, training, device, steps, prepare_kbit, seed, trace_cuda) -> dict:
    torch.manual_seed(seed)
    policy = precision_policy(training, device)
    with tempfile.TemporaryDirectory(prefix="peftcalc-measure-") as workdir:
        if device == "fake":
            return _execute_fake(spec, method, training, steps, policy)
        return _execute_real(spec, method, training, device, steps, policy, workdir, prepare_kbit, trace_cuda)


def _execute_fake(spec, method, training, steps, policy) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from measure.fake import real_cpu_kernel_dtypes, real_input_semantics

    fake_mode = FakeTensorMode()
    t0 = time.perf_counter()
    model = build_for_device(spec, method, training, "fake", policy, fake_mode)
    build_s = time.perf_counter() - t0
    with real_input_semantics(), real_cpu_kernel_dtypes():
        result = _with_tracer(model, spec, training, "fake", steps, policy, fake_mode)
    result["timing"] = {"build_s": round(build_s, 3), **result.pop("timing")}
    return result


def _execute_real(spec, method, training, device, steps, policy, workdir, prepare_kbit, trace_cuda) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # from_pretrained's bars would break the matrix's
    t0 = time.perf_counter()
    model = build_for_device(spec, method, training, device, policy, workdir=workdir, prepare_kbit=prepare_kbit)
    build_s = time.perf_counter() - t0
    if device == "cuda":
        result = _with_cuda(model, spec, training, steps, policy, trace_cuda)
    else:
        result = _with_tracer(model, spec, training, "cpu", steps, policy, contextlib.nullcontext())
        result["saved"] = save_trainable(model, method, workdir)
    result["timing"] = {"build_s": round(build_s, 3), **result.pop("timing")}
    return result


def _common(model, spec, training) -> tuple[dict, dict]:
    notes = prepare_for_training(model, spec, training)
    total, trainable = count_logical_params(model)
    return notes, {"total": total, "trainable": trainable}


def _with_tracer(model, spec, training, device, steps, policy, mode_ctx) -> dict:
    """Run the steps under a StorageTracer (inside `mode_ctx`: the FakeTensorMode for fake)."""
    notes, params = _common(model, spec, training)
    tracer = StorageTracer()
    meter = TracerMeter(tracer)
    t0 = time.perf_counter()
    with mode_ctx, tracer:
        tracer.mark(model_state_tensors(model), "parameters")
        model_bytes = tracer.live_bytes
        batch = make_batch(spec, training, "cpu", policy.dtype if policy.autocast is None else torch.float32)
        meter.register(model, batch)
        load_bytes = tracer.live_bytes
        optimizer = make_optimizer(training.optimizer, [p for p in model.parameters() if p.requires_grad])
        step_rows = run_steps(model, spec, batch, optimizer, policy, device, meter, steps)
    measured = _measured(step_rows, meter.source, model_bytes, load_bytes)
    measured.update(meter.details(step_rows))
    _drop_private(step_rows)
    return {"params": params, "measured": measured, "harness_notes": notes,
            "timing": {"steps_s": round(time.perf_counter() - t0, 3),
                       "step_time_s": [s["time_s"] for s in step_rows]}}


def _with_cuda(model, spec, training, steps, policy, trace_cuda) -> dict:
    """Run the steps measured by the CUDA allocator; then one more step traced for the breakdown."""
    notes, params = _common(model, spec, training)
    meter = CudaMeter()
    model_bytes = meter.live_bytes()
    batch = make_batch(spec, training, "cuda", policy.dtype if policy.autocast is None else torch.float32)
    load_bytes = meter.live_bytes()
    optimizer = make_optimizer(training.optimizer, [p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cuda") if policy.grad_scaler else None
    t0 = time.perf_counter()
    step_rows = run_steps(model, spec, batch, optimizer, policy, "cuda", meter, steps, scaler)
    measured = _measured(step_rows, meter.source, model_bytes, load_bytes)
    measured["reserved_peak_bytes"] = step_rows[-1]["reserved_peak_bytes"]
    measured["step1_reserved_peak_bytes"] = step_rows[0]["reserved_peak_bytes"]
    timing = {"steps_s": round(time.perf_counter() - t0, 3), "step_time_s": [s["time_s"] for s in step_rows]}
    if trace_cuda:
        measured["tracer"] = _trace_one_cuda_step(model, spec, batch, optimizer, policy, scaler)
    return {"params": params, "measured": measured, "harness_notes": notes, "timing": timing}


def _trace_one_cuda_step(model, spec, batch, optimizer, policy, scaler) -> dict:
    tracer = StorageTracer()
    meter = TracerMeter(tracer)
    with tracer:
        meter.register(model, batch, optimizer)
        rows = run_steps(model, spec, batch, optimizer, policy, "cuda", meter, 1, scaler)
    details = meter.details(rows)
    details.pop("step1_categories_at_peak")
    _drop_private(rows)
    return {"peak_bytes": rows[0]["peak_bytes"], "peak_phase": rows[0]["peak_phase"],
            "phases": rows[0]["phases"], **details}


def _measured(step_rows: list[dict], source: str, model_bytes: int, load_bytes: int) -> dict:
    first, last = step_rows[0], step_rows[-1]
    return {
        "source": source,
        "peak_bytes": last["peak_bytes"],
        "peak_phase": last["peak_phase"],
        "step1_peak_bytes": first["peak_bytes"],
        "step1_peak_phase": first["peak_phase"],
        "model_bytes": model_bytes,
        "load_bytes": load_bytes,
        "steps": step_rows,
    }


def _drop_private(step_rows: list[dict]) -> None:
    for row in step_rows:
        for phase in row["phases"].values():
            phase.pop("_seq", None)


def to_json_line(row: dict) -> str:
    return json.dumps(row, sort_keys=False, default=str)


def _gib(n) -> str:
    """Bytes in GiB, or MiB/KiB when smaller (tiny models)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} B"


def summarize(row: dict) -> str:
    """A few human-readable lines for one row (the text format of ``peftcalc measure``)."""
    s = row["settings"]
    t, m = s["training"], s["method"]
    ck = ", checkpointing" if t["grad_checkpointing"] else ""
    ck += f" every {t['checkpoint_every']} blocks" if t.get("checkpoint_every", 1) != 1 else ""
    ck += " (reentrant)" if t.get("checkpoint_reentrant") else ""
    head = (f"{s['model']} {m['method']} on {s['device']}: batch {t['batch_size']}, seq {t['seq_len']}, "
            f"{t['precision']}, {t['optimizer']}, {t['attention']}{ck}; {s['steps']} steps")
    if row["outcome"] != "ok":
        return f"{head}\n{row['outcome']}: {row['error']}"
    meas = row["measured"]
    lines = [head,
             f"params        {row['params']['total']:,} total, {row['params']['trainable']:,} trainable",
             f"peak          {_gib(meas['peak_bytes'])} in {meas['peak_phase']} (step 1: "
             f"{_gib(meas['step1_peak_bytes'])} in {meas['step1_peak_phase']}); source {meas['source']}"]
    if "reserved_peak_bytes" in meas:
        lines.append(f"reserved      {_gib(meas['reserved_peak_bytes'])}")
    predicted = row.get("predicted")
    if predicted:
        ratio = predicted["peak_bytes"] / meas["peak_bytes"] if meas["peak_bytes"] else float("nan")
        lines.append(f"predicted     {_gib(predicted['peak_bytes'])} ({ratio:.3f} x measured)")
    categories = meas.get("categories_at_peak") or (meas.get("tracer") or {}).get("categories_at_peak") or {}
    if categories:
        lines.append("at the peak   " + ", ".join(f"{k} {_gib(v)}" for k, v in categories.items() if v))
    top = meas.get("top_ops") or (meas.get("tracer") or {}).get("top_ops") or []
    for op in top[:5]:
        lines.append(f"  {op['op']:<34} {op['category']:<12} {op['phase']:<9} {_gib(op['bytes'])} x{op['count']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m measure.run ROW_JSON OUT_JSON``: run one matrix row (see measure.matrix) in this
    process and write its result; used to isolate cuda rows in subprocesses."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    from measure.matrix import run_request

    row = run_request(request)
    Path(args[1]).write_text(to_json_line(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
