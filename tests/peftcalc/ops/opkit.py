"""Helpers of the op tests: a small StepContext, the backward replay of one recorded op from its output, and
a real CPU trace of the same torch code with the harness's StorageTracer (measure/tracer.py).

The three figures an op test compares, each counted the way the Recorder counts them:

- forward peak: the largest live bytes while the op runs, its inputs included (the tests make them with
  ``rec.new``; the trace makes them in ``make``), parameters excluded (the trace marks them first);
- saved bytes: what autograd holds for backward after the op (the tracer's 'activations': every tensor
  the saved_tensors_hooks pack hook sees, each storage once);
- backward peak: ``peftcalc.backward.run_backward`` from the op's output, whose incoming gradient is a
  new tensor like the output: the saved tensors, the gradient buffers and the parameter gradients. The
  trace gets the same incoming gradient from ``(out * ones).sum().backward()`` (MulBackward makes
  ``grad * ones``, a new tensor like `out`, and frees it with the op's first node); its peak, less what
  was live when backward started and the scalar seed ``backward()`` makes, plus the saved bytes (live
  then too, and counted by the replay), is the replay's figure as long as no saved tensor outlives its
  node in the trace only (a leaf input, which its AccumulateGrad node keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.backward import BackwardPeak, run_backward
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder, SymTensor

F32, BF16 = 4, 2


def context(**overrides) -> StepContext:
    """Batch 2 x 8 tokens, fp32 everywhere, no autocast, CPU, SDPA; `overrides` replace any field."""
    fields = dict(batch=2, seq=8, kv_seq=8, compute_dtype="float32", weight_dtype="float32", autocast=None,
                  adapter_dtype="float32", device="cpu", attention="sdpa")
    return StepContext(**{**fields, **overrides})


def replay_peak(rec: Recorder, out: SymTensor) -> BackwardPeak:
    """The peak of the backward replay of what `rec` recorded, from a new gradient like `out`."""
    return run_backward(rec.nodes, rec.saved_bytes(), {out.id: out.nbytes}, in_place=False).peak


@dataclass(frozen=True)
class Trace:
    forward_peak: int
    saved: int
    backward_peak: int  # 0 when not traced


def trace(fn, make, params=(), backward: bool = True) -> Trace:
    """Run ``fn(*make())`` on real CPU tensors under the StorageTracer (see the module docstring)."""
    import torch

    from measure.tracer import StorageTracer

    tracer = StorageTracer()
    with tracer:
        tracer.mark(list(params), "parameters")
        base = tracer.live_bytes
        with tracer.saving():
            inputs = make()
            tracer.reset_peak()
            with tracer.phase("forward") as forward:
                out = fn(*inputs)
            del inputs  # the graph holds what it needs
            saved = tracer.breakdown(tracer.seq)["activations"]
            backward_peak = 0
            if backward:
                with torch.no_grad():
                    ones = torch.ones_like(out)
                tracer.mark(ones, "inputs")
                loss = (out * ones).sum()
                with tracer.phase("backward") as phase:
                    loss.backward()
                backward_peak = phase.peak_bytes - phase.start_bytes - loss.element_size() + saved
    return Trace(forward.peak_bytes - base, saved, backward_peak)
