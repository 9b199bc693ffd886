"""The step simulation: a family's blocks, the methods' ops and the model's head and loss run through the
Recorder, replayed backward, and summed into an ActivationProfile (peftcalc.activations is the entry).
"""

from __future__ import annotations

__all__ = [
]


