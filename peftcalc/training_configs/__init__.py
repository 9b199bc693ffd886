"""Training configs in: an axolotl, TRL or LLaMA-Factory YAML, a transformers TrainingArguments JSON, a peft
adapter_config.json -> the model and the keywords of ``peftcalc.estimate`` (one reader per tool: axolotl.py,
trl.py, llamafactory.py, training_args.py, adapter_config.py; detect.py picks the reader from the keys).

:func:`from_files` merges them: the training config's settings, the adapter config's method over them, and
what the user gave explicitly (a model on the command line, every flag) over both. Pure Python (PyYAML for
YAML); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftcalc.config import load_spec
from peftcalc.errors import InputError
from peftcalc.methods import METHOD_KNOBS, applicable_knobs
from peftcalc.training_configs.adapter_config import PEFT_TYPES, read_adapter_config
from peftcalc.training_configs.common import TRAINING_FIELDS, Derived, load_file, precision_of
from peftcalc.training_configs.detect import detect_tool, read_config

__all__ = ["ConfigRun", "Derived", "PEFT_TYPES", "detect_tool", "from_files", "load_file", "precision_of",
           "read_adapter_config", "read_config"]

METHOD_KEYS = ("method",) + tuple(METHOD_KNOBS)


@dataclass
class ConfigRun:
    """The model and estimate's keywords a config (and an adapter config) give, after the user's own."""

    model: str
    method: dict
    training: dict
    derived: list = field(default_factory=list)  # the Derived of each file read
    given: tuple = ()  # the API names the user gave explicitly (they override the files)

    @property
    def kwargs(self) -> dict:
        return {**self.method, **self.training}

    def header(self) -> str:
        """One line: the tool(s) read and the settings derived."""
        tools = " + ".join(f"{d.tool} config {d.path}" for d in self.derived)
        m = self.method
        knobs = ", ".join(f"{k} {_text(v)}" for k, v in m.items() if k != "method" and v is not None)
        t = dict(self.training)
        parts = [f"model {self.model}", f"{m.get('method', 'lora')}" + (f" ({knobs})" if knobs else "")]
        if "batch_size" in t:
            accum = t.pop("grad_accum", 1)
            parts.append(f"batch {t.pop('batch_size')}" + (f" x {accum} accumulated" if accum != 1 else ""))
        if "seq_len" in t:
            parts.append(f"seq {t.pop('seq_len')}")
        parts += [_text(t.pop(name)) for name in ("precision", "optimizer") if name in t]
        if t.pop("grad_checkpointing", False):
            every = t.pop("checkpoint_every", 1)
            parts.append("checkpointing" + (" (reentrant)" if t.pop("checkpoint_reentrant", False) else "") +
                         (f" every {every} blocks" if every != 1 else ""))
        t.pop("checkpoint_reentrant", None), t.pop("checkpoint_every", None)
        if t.get("max_grad_norm"):
            parts.append(f"clip {t.pop('max_grad_norm')}")
        if t.pop("trainer_loop", False):
            parts.append("Trainer loop")
        parts += [f"{name.replace('_', ' ')} {_text(v)}" for name, v in t.items() if v is not None]
        notes = [n for d in self.derived for n in d.notes]
        line = f"read {tools}: " + ", ".join(parts)
        if notes:
            line += "; " + "; ".join(notes)
        if self.given:
            line += "; given explicitly: " + ", ".join(self.given)
        return line

    def warning(self) -> str | None:
        """One line naming the keys that would change memory but are not modelled (None: none)."""
        notes = [n for d in self.derived for n in d.not_modelled]
        if not notes:
            return None
        return "warning: not modelled (the estimate ignores them): " + "; ".join(notes)


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def from_files(config: str | None = None, adapter_config: str | None = None, given: dict | None = None) -> ConfigRun:
    """The model and keywords of the run `config` describes, with `adapter_config`'s method over its method and
    `given` (estimate's keyword names, `model` included: only what the user gave explicitly) over both."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    derived = [read_config(str(config))] if config is not None else []
    adapter = read_adapter_config(str(adapter_config)) if adapter_config is not None else None
    if adapter is not None:
        derived.append(adapter)
    model = _model(derived, given)
    spec = load_spec(model)
    method = _method(derived[0] if config is not None else None, adapter, given)
    training = {}
    if config is not None:
        d = derived[0]
        training = d.training_settings()
        training["precision"] = _sharded_precision(precision_of(d.weights, d.amp, spec.torch_dtype), d.training)
    training.update({k: v for k, v in given.items() if k in TRAINING_FIELDS or k not in METHOD_KEYS + ("model",)})
    _router_aux_loss(derived[0] if config is not None else None, spec, training)
    if training.get("loss") == "trl" and "loss" not in given:
        from peftcalc.training_configs.trl import trl_loss_unmodelled

        why = trl_loss_unmodelled(spec, training.get("precision", "bf16"))
        if why:
            training.pop("loss")
            derived[0].warn(f"SFTTrainer's fused LM head ({why}: not modelled yet; estimated as the model's own loss)")
    return ConfigRun(model=model, method=method, training=training, derived=derived,
                     given=tuple(k for k in given))


def _router_aux_loss(d: Derived | None, spec, training: dict) -> None:
    """The tool turns the model config's output_router_logits on for training (Derived.router_logits_for): the
    auxiliary load-balancing loss, where peftcalc models it with the rest of the run (settings
    router_aux_loss_unmodelled), else a warning."""
    if d is None or spec.model_type not in d.router_logits_for or "router_aux_loss" in training:
        return
    from peftcalc.settings import router_aux_loss_unmodelled

    why = router_aux_loss_unmodelled(training)
    if why:
        d.warn(f"{d.tool} sets output_router_logits: the auxiliary load-balancing loss ({why}: not modelled)")
    else:
        training["router_aux_loss"] = True
        d.notes.append("output_router_logits (the auxiliary load-balancing loss)")


def _sharded_precision(precision: str, candidates: dict) -> str:
    """Under DeepSpeed ZeRO with bf16 (its BF16_Optimizer keeps fp32 master weights, whatever dtype the model was
    loaded in) and under FSDP2 with bf16 autocast over fp32 weights (accelerate's MixedPrecisionPolicy), the
    precision is peftcalc's mixed-bf16, where this peftcalc has it."""
    from peftcalc.settings import PRECISIONS

    sharding = candidates.get("sharding", "none")
    if "mixed-bf16" not in PRECISIONS or "sharding" not in TRAINING_FIELDS:
        return precision
    if sharding.startswith("zero") and precision in ("bf16", "amp-bf16"):
        return "mixed-bf16"
    if sharding in ("fsdp", "hsdp") and precision == "amp-bf16":
        return "mixed-bf16"
    return precision


def _model(derived: list, given: dict) -> str:
    """The model given explicitly, else the first file's that names one (checked: a registry name, a hub id of
    one, or a local config.json or directory)."""
    if "model" in given:
        return given["model"]
    for d in derived:
        if d.model:
            try:
                load_spec(d.model)
            except InputError as exc:
                raise InputError(f"{d.path}: key '{d.model_key}': {exc}; or give the model on the command line "
                                 "(it overrides the file's)") from None
            return d.model
    raise InputError(f"{derived[0].path} names no model ({derived[0].tool}); give the model on the command line")


def _method(d: Derived | None, adapter: Derived | None, given: dict) -> dict:
    """The training config's method; an adapter config's method and knobs replace it (a LoRA adapter on a
    4-bit base stays QLoRA, with the base's quantization knobs); explicit keywords replace both. Knobs the
    final method does not read are dropped."""
    method = dict(d.method) if d is not None else {}
    if adapter is not None:
        keep = {k: v for k, v in method.items() if k in ("double_quant", "prepare_kbit")}
        qlora = method.get("method") == "qlora" and adapter.method["method"] == "lora"
        method = {**(keep if qlora else {}), **adapter.method}
        if qlora:
            method["method"] = "qlora"
    explicit = {k: v for k, v in given.items() if k in METHOD_KEYS}
    if "method" in explicit and explicit["method"] != method.get("method"):
        method = {k: v for k, v in method.items() if k in METHOD_KNOBS and explicit["method"] in METHOD_KNOBS[k]}
    method.update(explicit)
    name = method.get("method")
    knobs = {k: v for k, v in method.items() if k != "method" and v is not None}
    return ({"method": name} if name else {}) | (applicable_knobs(name, knobs) if name else knobs)
