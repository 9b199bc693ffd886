"""The one error type the CLI turns into a one-line message and exit code 2."""


class InputError(ValueError):
    """Bad input from the user: an unknown model, an impossible setting, a malformed config."""
