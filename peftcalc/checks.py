"""Checks of one value a user gives (a keyword of peftcalc.estimate or sweep, a command-line flag): each
raises one InputError that names the parameter by its API name (the CLI shows the flag instead), so the
API and the CLI share one validation path.

Integers are Python ints or numpy integers (numbers.Integral), never bools; numbers are finite reals,
never bools.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from peftcalc.errors import InputError

__all__ = ["MAX_TOKENS_PER_STEP", "require_bool", "require_int", "require_number", "require_str"]

# The most tokens one micro-batch may hold (batch_size x seq_len): 2**31, far beyond what any GPU's
# memory takes for a transformer, and below where byte counts stop meaning anything.
MAX_TOKENS_PER_STEP = 2**31


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def require_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """`value`, which must be an integer in [minimum, maximum] (InputError naming `name` otherwise)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be {what}, got {_got(value)}", names=(name,))
    if value < minimum:
        raise InputError(f"{name} must be {what}, got {value}", names=(name,))
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum:,}, got {value:,}", names=(name,))
    return value


def require_number(name: str, value, low: float, high: float = math.inf, low_open: bool = False,
                   what: str = "") -> float:
    """`value`, which must be a finite real number in [low, high] ((low, high] when `low_open`)."""
    what = what or (f"in ({low:g}, {high:g}]" if low_open else f"a finite number >= {low:g}")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be {what}, got {_got(value)}", names=(name,))
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise InputError(f"{name} must be {what}, got {value}", names=(name,))
    return value


def require_bool(name: str, value) -> bool:
    """`value`, which must be True or False (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {_got(value)}", names=(name,))
    return value


def require_str(name: str, value, choices) -> str:
    """`value`, which must be one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        shown = repr(value) if isinstance(value, str) else _got(value)
        raise InputError(f"unknown {name.replace('_', ' ')} {shown}; choose from {', '.join(choices)}", names=())
    return value
