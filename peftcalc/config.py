"""Reading a model: a registry name, a config.json (file or directory) or a config dict into a ModelSpec,
by the reader of its family (peftcalc.families: Family.read_config, Family.architectures).
"""

from __future__ import annotations

import difflib
import json
import os
from functools import lru_cache
from pathlib import Path

from peftcalc.errors import InputError, read_text
from peftcalc.families import FAMILIES, SUPPORTED_MODEL_TYPES
from peftcalc.spec import AUTO_CLASS, ModelSpec, config_int

__all__ = ["MODELS_DIR", "load_spec", "read_config_file", "registry_aliases", "registry_configs", "registry_names",
           "spec_from_config"]

MODELS_DIR = Path(__file__).parent / "data" / "models"


def spec_from_config(config: dict, name: str = "", where: str = "config") -> ModelSpec:
    """Normalise a Hugging Face config dict into a :class:`ModelSpec`: the fields every family shares
    (name, task and class from `architectures`, labels, dtype, the kind of model its Family record says),
    then the family's reader (Family.read_config), whose field names and defaults mirror its
    transformers configuration class."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: a config must be a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}; with "
            "the harness installed (pip install 'peftcalc[measure]'), `peftcalc estimate --trace` traces any "
            "transformers model on fake tensors"
        )
    family = FAMILIES[model_type]
    task, arch = _task_of(config, model_type, where)
    common = dict(
        name=name or config.get("_name_or_path") or model_type,
        model_type=model_type,
        task=task,
        architecture=arch,
        num_labels=_num_labels(config, where) if task in ("seq_cls", "image_cls") else 0,
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        source=config.get("_source", ""),
        hf_config=config,
        is_decoder=family.decoder,
        is_vision=family.vision,
        is_vlm=family.vlm,
        gated_mlp=family.gated_mlp,
    )
    return family.read_config(config, common, where, spec_from_config)


def _task_of(config: dict, model_type: str, where: str) -> tuple[str, str]:
    """(task, model class): the first of the config's `architectures`, one of the family's
    (Family.architectures), else the family's default task built by its Auto class."""
    family = FAMILIES[model_type]
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise InputError(f"{where}: 'architectures' must be a list of model class names, got {architectures!r}")
    if not architectures:
        return family.default_task, f"{AUTO_CLASS[family.default_task]}({model_type})"
    arch = architectures[0]
    if arch not in family.architectures:
        raise InputError(
            f"{where}: architecture '{arch}' is not supported for model_type '{model_type}'; "
            f"supported: {', '.join(sorted(family.architectures))}"
        )
    return family.architectures[arch], arch


def _num_labels(config: dict, where: str) -> int:
    """The classifier's outputs: the entries of `id2label`, else `num_labels` (default 2). An empty
    `id2label` without num_labels is an InputError: PretrainedConfig reads it as 0 labels, a classifier
    nothing trains."""
    id2label = config.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise InputError(f"{where}: 'id2label' must be an object (label index -> name), got {id2label!r}")
    if id2label:
        return len(id2label)
    if id2label is not None and "num_labels" not in config:
        raise InputError(f"{where}: 'id2label' is empty, so transformers builds a classifier with 0 labels; give "
                         "the labels (or num_labels)")
    return config_int({"num_labels": config.get("num_labels", 2)}, "num_labels", where)


@lru_cache(maxsize=None)
def registry_configs() -> dict[str, dict]:
    """Every registry entry: name -> its trimmed config.json (with `_source`)."""
    configs = {}
    for path in sorted(MODELS_DIR.glob("*.json")):
        configs[path.stem] = json.loads(path.read_text())
    return configs


def registry_names() -> list[str]:
    """The registry's model names (peftcalc models)."""
    return list(registry_configs())


@lru_cache(maxsize=None)
def registry_aliases() -> dict[str, str]:
    """Hugging Face repo ids (lower case) -> registry name."""
    return {alias: name for name, cfg in registry_configs().items() for alias in cfg.get("_aliases", [])}


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a config.json given as a file or as a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    text = read_text(p, "config")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed config file {p}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(config, dict):
        raise InputError(f"malformed config file {p}: expected a JSON object")
    return config


@lru_cache(maxsize=256)
def _load_registry_spec(name: str) -> ModelSpec:
    return spec_from_config(registry_configs()[name], name=name, where=name)


def load_spec(model: str | os.PathLike | ModelSpec | dict) -> ModelSpec:
    """A spec from a registry name, a path to a config.json (file or directory), or a config dict."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return spec_from_config(model)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise InputError(f"model must be a registry name, a Hugging Face repo id of one, a path to a config.json, "
                         f"a config dict or a ModelSpec, got {model!r}", names=("model",))
    key = model.strip().lower()
    key = registry_aliases().get(key, key)
    if key in registry_configs():
        return _load_registry_spec(key)
    if Path(model).exists() or model.endswith(".json"):
        return spec_from_config(read_config_file(model), name=str(model), where=str(model))
    raise InputError(f"unknown model '{model}'{_suggestion(key)}")


def _suggestion(key: str) -> str:
    """Close registry names, matching a Hugging Face repo id by its name part too."""
    candidates = {name: name for name in registry_names()}
    candidates.update({alias.rsplit("/", 1)[-1]: name for alias, name in registry_aliases().items()})
    close = difflib.get_close_matches(key.rsplit("/", 1)[-1], list(candidates), n=5, cutoff=0.5)
    names = list(dict.fromkeys(candidates[c] for c in close))[:3]
    if names:
        return f"; did you mean {', '.join(names)}?"
    hint = "; run `peftcalc models` for the list"
    if "/" in key:
        hint += ", or pass a local config.json (peftcalc reads no hub)"
    return hint
