"""The operations of the op-by-op simulation: symbolic tensors, the Recorder, and one function per torch op
(or small op sequence) that records what it allocates, saves for backward and frees.

Nothing in ops/ names a model family or a fine-tuning method: the families' blocks (peftcalc.families)
call these ops, and the methods (peftcalc.methods) hook their own ops around a Linear's.
"""

from __future__ import annotations

__all__ = [
]


