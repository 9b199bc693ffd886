"""peftcalc: memory, time and cost of fine-tuning a transformer, before you rent the GPU.

Importing this package never imports torch or transformers.
"""

__version__ = "0.1.0"
__all__ = ["Estimate", "estimate", "sweep"]


def __getattr__(name):
    # Lazy: `import peftcalc` stays cheap; pandas loads only for sweep().
    if name in ("estimate", "Estimate"):
        from peftcalc import api

        return getattr(api, name)
    if name == "sweep":
        from peftcalc import api

        globals()["sweep"] = _needs_pandas(api.sweep)
        return globals()["sweep"]
    raise AttributeError(f"module 'peftcalc' has no attribute {name!r}")


def _needs_pandas(function):
    """`function`, raising ModuleNotFoundError that names the extra to install when pandas is missing
    (a `pip install peftcalc` without [reports])."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            import pandas  # noqa: F401
        except ImportError as exc:
            broken = exc.name and exc.name.split(".")[0] != "pandas"  # installed, but what it imports is not
            why = f"cannot be imported ({exc})" if broken else "is not installed"
            raise ModuleNotFoundError(f"peftcalc.{function.__name__} returns a pandas DataFrame and needs pandas, "
                                      f"which {why}: pip install 'peftcalc[reports]'", name="pandas") from None
        return function(*args, **kwargs)

    return wrapper
