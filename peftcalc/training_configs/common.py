"""What every config reader shares: reading a file (YAML or JSON), typed look-ups that name the key on bad
input, the settings a reader derives (:class:`Derived`), and the mapping of the tools' optimizer, attention
and precision words onto peftcalc's.

A reader turns a tool's keys into candidate settings named as peftcalc's API names them (TrainingSettings
fields, MethodSettings knobs). A candidate whose field this version of peftcalc does not have, or whose value
it does not take, becomes a "not modelled" note instead: named in the one warning line, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from peftcalc.errors import InputError, read_text
from peftcalc.settings import ATTENTIONS, OPTIMIZERS, PRECISIONS, TrainingSettings

__all__ = ["Derived", "Keys", "TRAINING_FIELDS", "attention_of", "load_file", "optimizer_of", "precision_of"]

TRAINING_FIELDS = tuple(f.name for f in fields(TrainingSettings))


def load_file(path: str, what: str = "config") -> dict:
    """The mapping a YAML or JSON file holds (InputError, one line, for a missing, unreadable or malformed
    file, or one whose top level is not a mapping). JSON is read by json (its messages name line and
    column), anything else by PyYAML's safe loader."""
    text = read_text(path, what)
    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"malformed {what} file {path}: not JSON ({exc.msg} at line {exc.lineno} column "
                             f"{exc.colno})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "cannot be parsed"
            raise InputError(f"malformed {what} file {path}: not YAML ({problem}{where})") from None
    if not isinstance(data, dict):
        raise InputError(f"malformed {what} file {path}: expected a mapping of keys to values at the top level, "
                         f"got {type(data).__name__}")
    return data


class Keys:
    """Typed look-ups in one config's mapping; a value of the wrong type is an InputError naming the key."""

    def __init__(self, data: dict, path: str):
        self.data, self.path = data, path

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _bad(self, key: str, what: str) -> InputError:
        value = self.data[key]
        return InputError(f"{self.path}: key '{key}' must be {what}, got {value!r} ({type(value).__name__})")

    def bool(self, key: str, default=None):
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false"):  # argparse-style strings
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def int(self, key: str, default=None, minimum: int = 1):
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        return value

    def number(self, key: str, default=None):
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self._bad(key, "a number >= 0")
        return value

    def str(self, key: str, default=None, choices=None):
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._bad(key, f"one of {', '.join(map(str, choices))}" if choices else "a string")
        return value

    def names(self, key: str, default=None):
        """A list of module names, or one comma-separated string of them."""
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
            return sorted(value) if isinstance(value, set) else list(value)  # PeftConfig.to_dict() keeps sets
        raise self._bad(key, "a list of module names")

    def mapping(self, key: str) -> dict:
        """A nested mapping (a JSON string of one, as the tools' CLIs take it, too)."""
        value = self.data.get(key)
        if value is None:
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise self._bad(key, "a mapping") from None
        if not isinstance(value, dict):
            raise self._bad(key, "a mapping")
        return value


@dataclass
class Derived:
    """What one config file says about a run, in peftcalc's words.

    `model`: the model the config names (None: none; the command line must give one); `method`: estimate's
    method keywords; `training`: candidate TrainingSettings fields (resolved against the fields this
    version has by :meth:`training_settings`); `weights` / `amp`: the dtype the tool loads the weights in
    ("auto": the model config's) and the autocast dtype its Trainer runs under (None: none), resolved into
    a precision once the model is known (:func:`precision_of`); `sources`: field -> the key it came from;
    `not_modelled`: notes for the warning line."""

    tool: str
    path: str
    model: str | None = None
    model_key: str = ""
    method: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    weights: str = "auto"
    amp: str | None = None
    sources: dict = field(default_factory=dict)
    not_modelled: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # facts the settings line adds (packing, tool defaults)
    # model types whose config the tool sets output_router_logits on for training (TrainingSettings.router_aux_loss)
    router_logits_for: tuple = ()

    def want(self, name: str, value, key: str, when_absent: str = "") -> None:
        """A candidate TrainingSettings field `name` = `value` read from `key`; `when_absent`: the note for
        the warning line when this peftcalc has no such field (empty: the value changes nothing then)."""
        self.training[name] = value
        self.sources[name] = (key, when_absent)

    def warn(self, note: str) -> None:
        if note not in self.not_modelled:
            self.not_modelled.append(note)

    def training_settings(self) -> dict:
        """The candidate fields this peftcalc's TrainingSettings has; the others go to the warning line."""
        kept = {}
        for name, value in self.training.items():
            if name in TRAINING_FIELDS:
                kept[name] = value
            else:
                key, note = self.sources.get(name, (name, ""))
                if note:
                    self.warn(f"{key}={_shown(value)} ({note})")
        return kept


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# transformers TrainingArguments `optim` (training_args.py OptimizerNames) and the tools' spellings of it ->
# (peftcalc optimizer, the one to use while this peftcalc has no such optimizer).
OPTIMIZER_NAMES = {
    "adamw_torch": ("adamw", "adamw"),
    "adamw_hf": ("adamw", "adamw"),
    "adamw": ("adamw", "adamw"),
    "adamw_torch_fused": ("adamw-fused", "adamw"),
    "adamw_bnb_8bit": ("adamw-8bit", "adamw-8bit"),
    "adamw_8bit": ("adamw-8bit", "adamw-8bit"),
    "paged_adamw_8bit": ("paged-adamw-8bit", "adamw-8bit"),
    "paged_adamw_32bit": ("paged-adamw-32bit", "adamw"),
    "lion_8bit": ("lion-8bit", "adamw-8bit"),
    "lion_32bit": ("lion-32bit", "adamw"),
    "paged_lion_8bit": ("paged-lion-8bit", "adamw-8bit"),
    "paged_lion_32bit": ("paged-lion-32bit", "adamw"),
    "adafactor": ("adafactor", "adafactor"),
    "sgd": ("sgd", "sgd"),
}


def optimizer_of(d: Derived, name: str, key: str) -> None:
    """The optimizer a tool's name means. transformers' "sgd" is torch.optim.SGD without momentum unless
    optim_args says otherwise (trainer.py get_optimizer_cls_and_kwargs), while peftcalc's sgd keeps one
    momentum buffer: named in the warning line. A name peftcalc does not know is estimated as AdamW and
    named there too."""
    if not isinstance(name, str):
        raise InputError(f"{d.path}: key '{key}' must be an optimizer name, got {name!r}")
    wanted, fallback = OPTIMIZER_NAMES.get(name.lower(), (None, "adamw"))
    if wanted in OPTIMIZERS:
        d.want("optimizer", wanted, key)
    else:
        d.want("optimizer", fallback, key)
        d.warn(f"{key}={name} (estimated as {fallback})")
    if wanted == "sgd":
        d.warn(f"{key}=sgd (transformers' SGD keeps no momentum buffer unless optim_args sets momentum; "
               "estimated with one)")


def attention_of(d: Derived, name: str, key: str) -> None:
    """transformers' attn_implementation: eager, sdpa; the FlashAttention kernels save what sdpa's flash
    kernel saves (the output and the log-sum-exp), so they are estimated as sdpa and named in the warning
    line."""
    if not isinstance(name, str):
        raise InputError(f"{d.path}: key '{key}' must be an attention implementation name, got {name!r}")
    if name in ATTENTIONS:
        d.want("attention", name, key)
        return
    d.want("attention", "sdpa", key)
    d.warn(f"{key}={name} (estimated as sdpa)")


def precision_of(weights: str, amp: str | None, model_dtype: str) -> str:
    """peftcalc's precision for weights loaded in `weights` ("auto": the model config's `model_dtype`) under
    a Trainer's autocast `amp` (bf16=True: bfloat16, fp16=True: float16, else None). Half-precision weights
    under autocast of the same dtype are peftcalc's bf16 / fp16 (the autocast changes no Linear's dtype;
    fp32 weights under autocast are amp-bf16 / amp-fp16 (transformers Trainer: accelerate's autocast
    around compute_loss)."""
    dtype = model_dtype if weights == "auto" else weights
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float": "float32",
             "half": "float16"}.get(dtype, dtype)
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    if amp is None or dtype != "float32":
        precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    else:
        precision = "amp-bf16" if amp == "bfloat16" else "amp-fp16"
    assert precision in PRECISIONS
    return precision
