"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: an unknown model, an impossible setting, a malformed config."""


class MemoryNotModelled(InputError):
    """A model whose parameters are counted but whose memory, time and cost are not modelled: an error
    for the Python API and the other commands, a counts-only view for `peftcalc estimate`."""


def read_text(path: str | os.PathLike, what: str) -> str:
    """A file's text, or InputError('cannot read <what> file ...') in one line."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
