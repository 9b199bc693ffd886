"""peftcalc: memory, time and cost of fine-tuning a transformer, before you rent the GPU.

Importing this package never imports torch or transformers.
"""

__version__ = "0.1.0"
__all__ = ["Estimate", "estimate", "sweep"]


def __getattr__(name):
    # Lazy: `import peftcalc` stays cheap; pandas loads only for sweep().
    if name in ("estimate", "sweep", "Estimate"):
        from peftcalc import api

        return getattr(api, name)
    raise AttributeError(f"module 'peftcalc' has no attribute {name!r}")
