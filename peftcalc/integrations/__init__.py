"""Integrations with training libraries: ``peftcalc.integrations.transformers.MemoryCallback`` (a
``transformers.TrainerCallback``). Importing this package imports nothing; its modules import torch and their
library, and ``peftcalc estimate`` never imports them."""

__all__: list = []
