"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CombinationError", "FLAG_NAMES", "InputError", "as_flags", "read_text"]


class InputError(ValueError):
    """Bad input from the user: an unknown model, an impossible setting, a malformed config.

    `names`: the API parameters (keyword names of peftcalc.estimate, e.g. "batch_size") the message names
    as words of its own; the command line shows each as its flag ("--batch-size")."""

    def __init__(self, message: str = "", *, names: tuple = ()):
        super().__init__(message)
        self.names = tuple(names)


def read_text(path: str | os.PathLike, what: str) -> str:
    """A file's text, or InputError('cannot read <what> file ...') in one line."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"cannot read {what} file {path}: not UTF-8 text (a binary file?)") from None


# API parameters whose command-line spelling is not "--" + the name with dashes.
FLAG_NAMES = {"model": "MODEL"}


def as_flags(text: str, names) -> str:
    """`text` with each API parameter of `names` it mentions as a word shown as its command-line flag
    ("batch_size must be ..." -> "--batch-size must be ...")."""
    import re

    for name in names:
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w'./-]){re.escape(name)}(?![\w'-])", flag, text)
    return text


class CombinationError(InputError):
    """Settings each valid alone that cannot run together on this model (BitFit on a model without
    biases, prefix tuning with gradient checkpointing, a sequence beyond learned positions): a sweep
    keeps such a combination as a row with the reason instead of failing."""
