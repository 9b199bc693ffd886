"""Models of a family peftcalc does not model analytically, before anything is built: whether a model argument
names one (:func:`unmodelled_config`), whether the harness that can trace it is installed
(:func:`harness_missing`, without importing it). ``peftcalc estimate`` traces such a model on fake tensors when
the harness is installed (measure.traced.traced_estimate); otherwise peftcalc.config.spec_from_config's error
names the supported model types and the --trace route.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from peftcalc.config import read_config_file, registry_aliases, registry_configs
from peftcalc.families import FAMILIES
from peftcalc.spec import ModelSpec

__all__ = ["HARNESS_MODULES", "harness_missing", "unmodelled_config"]

# What tracing needs (pyproject.toml's `measure` extra; bitsandbytes only for QLoRA).
HARNESS_MODULES = ("torch", "transformers", "peft")


def unmodelled_config(model) -> dict | None:
    """The config of `model` when it is a config.json (file or directory) or a config dict whose model_type
    peftcalc does not model (no Family record); None for anything else (a registry name, a ModelSpec, a
    modelled config, a name that is no file: load_spec says what is wrong with those)."""
    if isinstance(model, ModelSpec):
        return None
    if isinstance(model, dict):
        config = model
    else:
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) or not model.strip():
            return None
        key = model.strip().lower()
        if registry_aliases().get(key, key) in registry_configs():
            return None
        try:
            exists = Path(model).exists()
        except OSError:  # a name too long for a path
            return None
        if not exists:
            return None
        config = read_config_file(model)
    model_type = config.get("model_type")
    return config if isinstance(model_type, str) and model_type and model_type not in FAMILIES else None


def harness_missing() -> tuple[str, ...]:
    """The harness modules (HARNESS_MODULES) that cannot be found, without importing any of them."""
    missing = []
    for name in HARNESS_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
            found = False
        if not found:
            missing.append(name)
    return tuple(missing)

