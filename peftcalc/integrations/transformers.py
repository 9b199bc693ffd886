"""``MemoryCallback``: the estimate for a ``transformers.Trainer`` run (TRL's ``SFTTrainer`` too), and the run's
own measured memory beside it.

- on train begin: the settings are read from the Trainer's own model and arguments (the model's config, its
  peft config and quantization, the weights' dtype, ``TrainingArguments`` read as
  peftcalc.training_configs.training_args reads a TrainingArguments JSON) and the estimate is printed;
- each step: the peak of the step, from ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after
  ``reset_peak_memory_stats`` at the step's start (on CUDA), or from the harness's tracer
  (``measure.tracer.StorageTracer``, entered at the step's start: the parameters, gradients and optimizer
  state are registered then, the batch as it enters the model, every tensor made during the step counted) on
  a machine without CUDA; the phases are split where the model's forward returns and where the optimizer
  step starts;
- at the end (and on an out-of-memory error, through ``sys.excepthook``, or :meth:`MemoryCallback.report`):
  predicted vs measured with the component breakdown (the tracer's categories on CPU), and one harness-format
  JSON line (settings with the model's config inline, environment, measured, predicted) appended to the file
  given as ``out`` or in the ``PEFTCALC_MEMORY_JSONL`` environment variable, which ``peftcalc report`` reads.
"""

from __future__ import annotations

import os
import sys
import torch
from transformers import TrainerCallback

from peftcalc.errors import InputError
from peftcalc.training_configs.adapter_config import adapter_method
from peftcalc.training_configs.common import Derived, Keys, attention_of, precision_of
from peftcalc.training_configs.training_args import read_trainer_keys

__all__ = ["ENV_OUT", "MemoryCallback", "run_settings"]

ENV_OUT = "PEFTCALC_MEMORY_JSONL"
# the tensors of the harness's batch (measure.setup.make_batch): labels share input_ids' storage there; TRL's
# SFTTrainer adds its attention_mask (loss "trl": measure.losses.trl_sft_batch)
BATCH_KEYS = ("input_ids", "labels", "pixel_values")
TRL_BATCH_KEYS = BATCH_KEYS + ("attention_mask",)
PHASES = ("forward", "backward", "optimizer")


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weights_dtype(model) -> str:
    """The dtype of the model's (first) unquantized floating weight that does not train (a full fine-tune: the
    first weight)."""
    params = [p for p in _base_model(model).parameters() if p.is_floating_point()]
    frozen = [p for p in params if not p.requires_grad] or params
    return str(frozen[0].dtype).replace("torch.", "")


def _method(model, spec) -> Derived:
    """The method: the peft config of a PeftModel (a 4-bit base: qlora), else full fine-tuning when every
    parameter trains (InputError otherwise: a partial freeze is no method the callback can name)."""
    configs = getattr(model, "peft_config", None)
    if configs:
        d = adapter_method(configs[getattr(model, "active_adapter", "default")].to_dict(), "peft_config")
        base = _base_model(model)
        quant = getattr(base.config, "quantization_config", None)
        if getattr(base, "is_loaded_in_4bit", False) and d.method["method"] == "lora":
            d.method["method"] = "qlora"
            double = getattr(quant, "bnb_4bit_use_double_quant", None)
            if double is None and isinstance(quant, dict):
                double = quant.get("bnb_4bit_use_double_quant")
            embed = base.get_input_embeddings().weight
            d.method.update(double_quant=bool(double), prepare_kbit=embed.dtype == torch.float32)
        return d
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != total:
        raise InputError(f"MemoryCallback: {trainable:,} of {total:,} parameters train outside a peft adapter; the "
                         "callback names full fine-tuning and peft methods")
    return Derived(tool="model", path="model", method={"method": "full"})


def run_settings(model, args, seq_len: int) -> tuple:
    """(spec, MethodSettings, TrainingSettings, Derived of the arguments) of a Trainer's run."""
    from peftcalc.api import method_settings, resolved_settings
    from peftcalc.config import spec_from_config
    from peftcalc.settings import TrainingSettings, check_training

    base = _base_model(model)
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    spec = spec_from_config(config, name=config.get("_name_or_path") or config.get("model_type", "model"))
    m = _method(model, spec)
    settings = resolved_settings(spec, method_settings(**m.method))
    d = Derived(tool="TrainingArguments", path="TrainingArguments")
    read_trainer_keys(Keys(args.to_dict(), "TrainingArguments"), d)
    attention_of(d, getattr(base.config, "_attn_implementation", None) or "sdpa", "attn_implementation")
    d.weights = _weights_dtype(model)
    fields = d.training_settings()
    fields.update(seq_len=seq_len, precision=precision_of(d.weights, d.amp, spec.torch_dtype),
                  device="cuda" if next(model.parameters()).is_cuda else "cpu")
    if _fused_lm_head(base):  # TRL's SFTTrainer: its fused LM head and its collator's batch (peftcalc.sim.trl_head)
        from peftcalc.training_configs.trl import trl_loss_unmodelled

        why = trl_loss_unmodelled(spec, fields["precision"])
        if why:
            d.warn(f"TRL's fused LM head ({why}: not modelled yet; estimated as the model's own loss)")
        else:
            fields["loss"] = "trl"
    training = TrainingSettings(**fields)
    check_training(training)
    d.not_modelled.extend(n for n in m.not_modelled if n not in d.not_modelled)
    return spec, settings, training, d


def _fused_lm_head(model) -> bool:
    """Whether TRL's add_fused_lm_head replaced the model's forward (SFTTrainer does on every model)."""
    forward = vars(model).get("forward")
    return getattr(getattr(forward, "__func__", None), "__code__", None) is not None and \
        forward.__func__.__code__.co_name == "_fused_forward"


class MemoryCallback(TrainerCallback):
    """Predicted vs measured memory of a Trainer run: see the module docstring. `out`: the JSON-lines file for
    the run's row (default: the PEFTCALC_MEMORY_JSONL environment variable; None: no file); `seq_len`: the
    sequence length to estimate for (default: the arguments' max_length, else the first batch's length);
    `echo`: where the text goes (print)."""

    def __init__(self, out: str | None = None, seq_len: int | None = None, echo=print):
        self.out = out if out is not None else os.environ.get(ENV_OUT)
        self.seq_len, self.echo = seq_len, echo
        self.steps: list[dict] = []
        self.estimate = self.spec = self.method = self.training = self.derived = None
        self._tracer = self._step = self._model = self._args = self._optimizer = self._device = None
        self._hooks: list = []
        self._saving = self._previous_hook = None
        self._reported = False

    # -- train begin: the estimate ------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._model, self._args, self._optimizer = model, args, optimizer
        seq_len = self.seq_len or getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
        if seq_len:
            self._predict(seq_len)
        else:
            self.echo("peftcalc: the estimate waits for the first batch (its length is the sequence length)")
        self._hooks = [model.register_forward_pre_hook(self._forward_begins, with_kwargs=True),
                       model.register_forward_hook(self._forward_ends)]
        previous = self._previous_hook = sys.excepthook

        def hook(kind, value, tb):
            if _is_oom(value) and not self._reported:
                self.report("oom", f"{kind.__name__}: {str(value).splitlines()[0] if str(value) else ''}")
            previous(kind, value, tb)

        sys.excepthook = hook

    def _predict(self, seq_len: int) -> None:
        from peftcalc.api import estimate
        from peftcalc.methods import applicable_knobs
        from dataclasses import asdict

        self.spec, self.method, self.training, self.derived = run_settings(self._model, self._args, seq_len)
        knobs = applicable_knobs(self.method.method, {k: v for k, v in asdict(self.method).items() if k != "method"})
        self.estimate = estimate(self.spec, method=self.method.method, **knobs, **asdict(self.training))
        self.echo(_estimate_text(self.estimate, self.derived))

    # -- each step: the measured peak ----------------------------------------------------------

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._optimizer = optimizer or self._optimizer
        self._step = {"phases": {}, "phase": "forward"}
        device = next(model.parameters()).device
        if device.type == "cuda":  # the model's own device (torch.cuda's functions default to the current one)
            self._device = device
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        from measure.tracer import gradient_tensors, model_state_tensors, optimizer_state_tensors

        self._tracer = _step_tracer()
        self._tracer.__enter__()
        self._tracer.mark(model_state_tensors(model), "parameters")
        self._tracer.mark(gradient_tensors(model), "gradients")
        if optimizer is not None:
            self._tracer.mark(optimizer_state_tensors(_inner(optimizer)), "optimizer_state")
        self._tracer.reset_peak()

    def _forward_begins(self, module, args, kwargs):
        if self._step is None or self._step["phase"] != "forward":
            return
        if self.estimate is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._predict(int(ids.shape[1]))
        if self._tracer is not None:
            # the batch (the Trainer's bookkeeping scalars, such as num_items_in_batch, made before the step, are
            # not counted, as nothing made before the step but the model state is)
            batch = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
            self._tracer.mark(batch, "inputs")
            self._saving = self._tracer.recomputing()
            self._saving.__enter__()
        known = TRL_BATCH_KEYS if self.training.loss == "trl" else BATCH_KEYS
        extra = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and k not in known]
        for key in extra:  # what the harness's batch (measure.setup.make_batch) does not hold
            note = f"{key} in the batch ({kwargs[key].numel() * kwargs[key].element_size():,} bytes; not in the estimate)"
            if note not in self.derived.not_modelled:
                self.derived.warn(note)
                self.echo(f"peftcalc: not modelled: {note}")

    def _forward_ends(self, module, args, output):
        if self._step is not None and self._step["phase"] == "forward":
            self._close_phase("forward")
            self._step["phase"] = "backward"

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._step is None:
            return
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None
        self._close_phase("backward")
        if self._tracer is not None:
            from measure.tracer import gradient_tensors

            self._tracer.mark(gradient_tensors(model), "gradients")
        self._step["phase"] = "optimizer"

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._step is None:
            return
        if self._tracer is not None and optimizer is not None:
            from measure.tracer import optimizer_state_tensors

            self._tracer.mark(optimizer_state_tensors(_inner(optimizer)), "optimizer_state")
        self._close_phase("optimizer")
        phases = self._step["phases"]
        name = max(phases, key=lambda n: phases[n]["peak_bytes"])  # the first of equal peaks
        row = {"step": len(self.steps) + 1, "peak_bytes": phases[name]["peak_bytes"], "peak_phase": name,
               "phases": {n: {"peak_bytes": p["peak_bytes"]} for n, p in phases.items()}}
        if self._tracer is not None:
            row["categories_at_peak"] = self._tracer.breakdown(phases[name]["seq"])
            self._tracer.__exit__(None, None, None)
            self._tracer = None
        else:
            row["reserved_peak_bytes"] = max(p["reserved_bytes"] for p in phases.values())
        self.steps.append(row)
        self._step = None

    def _close_phase(self, name: str) -> None:
        if self._tracer is not None:
            t = self._tracer
            self._step["phases"][name] = {"peak_bytes": t.peak_bytes, "seq": t.peak_seq}
            t.reset_peak()
            return
        torch.cuda.synchronize(self._device)
        self._step["phases"][name] = {"peak_bytes": torch.cuda.max_memory_allocated(self._device),
                                      "reserved_bytes": torch.cuda.max_memory_reserved(self._device)}
        torch.cuda.reset_peak_memory_stats(self._device)

    # -- the end: predicted vs measured, and the row -------------------------------------------

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._previous_hook is not None:  # the run ended without an uncaught error: the hook's job is done
            sys.excepthook, self._previous_hook = self._previous_hook, None
        if not self._reported:
            self.report()

    def report(self, outcome: str = "ok", error: str | None = None) -> dict | None:
        """Print predicted vs measured and write the row (also on an out-of-memory error); returns the row."""
        from peftcalc.integrations.memory_row import comparison_text, harness_row, write_row

        self._reported = True
        if self._tracer is not None:  # an error inside a step: the tracer is still entered
            self._tracer.__exit__(None, None, None)
            self._tracer = None
        if self.estimate is None:
            self.echo(f"peftcalc: no estimate ({outcome}{': ' + error if error else ''})")
            return None
        row = harness_row(self, outcome, error)
        self.echo(comparison_text(self.estimate, row, self.derived.not_modelled))
        if self.out:
            write_row(self.out, row)
            self.echo(f"peftcalc: wrote the run's row to {self.out}")
        return row


def _step_tracer():
    """A StorageTracer for one Trainer step: it counts the model state, the batch and what the step makes. A
    tensor the Trainer made before the step (its token count, which the loss divides by and autograd saves;
    its running loss, added to in place) is not counted, nor a view of one (the saved-tensor hook's detach):
    the harness has no such tensor, every tensor of its step is its own."""
    from measure.tracer import REGISTERED, StorageTracer
    from torch.utils._pytree import tree_flatten

    class StepTracer(StorageTracer):
        _before: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            storages = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs or {}))[0]
                        if isinstance(t, torch.Tensor)}
            self._before = storages - set(self.records)  # inputs made before the step
            return super().__torch_dispatch__(func, types, args, kwargs)

        def track(self, t, op, category="other"):
            if op != REGISTERED and t.untyped_storage()._cdata in self._before:
                return None  # an output sharing the storage of a tensor made before the step
            return super().track(t, op, category)

        def mark(self, tensors, category):
            if category == "activations":
                tensors = [t for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor)
                           and t.untyped_storage()._cdata in self.records]
            super().mark(tensors, category)

    return StepTracer()


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def _is_oom(exc) -> bool:
    """torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class), or an allocator's message."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _estimate_text(e, d: Derived) -> str:
    from peftcalc.format import gib

    t, m = e.training, e.method
    lines = [f"peftcalc estimate for this run: {e.model} {m.method}, batch {t.batch_size} x seq {t.seq_len}, "
             f"{t.precision}, {t.optimizer}" + (", gradient checkpointing" if t.grad_checkpointing else "") +
             f", device {t.device}: peak {gib(e.memory.peak_bytes)} ({e.memory.peak_bytes:,} bytes) in "
             f"{e.memory.peak_phase}; trainable {e.params.trainable:,} of {e.params.total:,}"]
    if d.not_modelled:
        lines.append("peftcalc: not modelled (the estimate ignores them): " + "; ".join(d.not_modelled))
    return "\n".join(lines)

