"""Speed of the calculator: cold `peftcalc estimate` (a fresh process, as a user runs it) and a sweep
of 10,000 configurations through the Python API. Run with `make bench`.

Record (2-core machine shared with other work; the sweep alone, median of 5 runs of
`PYTHONPATH=. python -c "from benchmarks.bench_estimate import sweep_10k; print(sweep_10k())"`, alternating
the two trees, CPU seconds in brackets, which contention moves less than wall time):

- before the op-by-op block simulation and backward node replay: 3.4 s
- d297696 (simulation + replay): 7.7 s wall at the quietest (7.6 s CPU), 1,330 per second
- speed branch: 3.7 s wall at the quietest (3.6 s CPU), 2,700 per second; every row byte-identical.
  What changed: the sweep computes each distinct (method settings, training settings) once (a rank
  given to full/adapter/ia3 is never read: 5,200 computations for 10,000 rows); _run_blocks looks a
  block's simulation up by a layer-kind index instead of hashing LayerTraining and BlockSimulation
  per layer; step 1's peak comes from the steady-state events (one _step_events pass, was two).
  Where the rest goes (CPU s): 5,000 distinct block simulations 1.9 (forward record ~0.85, two
  backward replays each ~1.05), the per-configuration profile, head and step events 1.2, importing
  pandas 0.27, building rows and the DataFrame 0.2.
- speed2 branch, against main at 0b3be28 (which measured 3.8 s wall, 3.9 s CPU, median of 5 alternating
  runs with each step below): 2.6 s wall (2.7 s CPU), 3,900 per second; every row byte-identical, as are
  the rows of a representative set of sweeps and estimates (every method x checkpointing x fp32/bf16/
  amp-bf16/amp-fp16 x cuda/cpu x sdpa/eager on 14 models, tiny LLaVA and BLIP-2 among them) and the
  peaks, outgoing buffers and parameter gradients of every replay of those sweeps against main's
  backward.py. Step by step (wall, median): run_backward as one loop over plain locals (storages as
  [bytes, refs] lists) instead of the _Engine methods 3.46 s; a Node recorded as a plain tuple of its
  fields (no frozen-dataclass __init__ for 361,000 nodes) 3.25 s; a block's plain and checkpointed
  replays in one walk over its nodes (run_backward_both: the same nodes run and the gradient buffers
  go the same way in both; two saved sums, two peaks) 3.02 s; the cyclic garbage collector paused
  during the sweep (its passes over short-lived acyclic objects and the caches freed nothing) 2.59 s.
  Not taken: replaying each backward only when read keeps every block's nodes alive in the cache,
  which cost the collector more than the replays saved (most simulations serve both a checkpointed
  and a plain configuration); hand-written T.__init__ and Recorder.new and a tighter _run_blocks loop
  measured within noise. Where the rest goes (wall s, timed per function): 5,000 distinct block
  simulations 1.09 (forward record ~0.73, both replays 0.36), the head's forward, backward replay and
  final norm 0.28, the rest of the activation profile 0.2, step events 0.25, the rest of the
  timeline 0.17, importing pandas ~0.25, rows and the DataFrame ~0.1.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def cold_cli(args: list[str], runs: int = 5) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftcalc", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


SWEEP_GRID = dict(
    method=["full", "lora", "qlora", "adapter", "ia3"],
    rank=[4, 8, 16, 32, 64],
    batch_size=[1, 2, 4, 8, 16],
    seq_len=[128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    grad_checkpointing=[False, True],
    precision=["fp32", "bf16", "amp-bf16", "fp16", "amp-fp16"],
)


def sweep_10k() -> tuple[float, int]:
    import peftcalc

    start = time.perf_counter()
    df = peftcalc.sweep("llama-3.1-8b", **SWEEP_GRID)
    return time.perf_counter() - start, len(df)


def main() -> None:
    for args in (["estimate"], ["estimate", "llama-3.1-70b", "--method", "qlora", "--batch-size", "4",
                                "--seq-len", "4096", "--grad-checkpointing"]):
        t = cold_cli(args)
        print(f"cold `peftcalc {' '.join(args)}`: median {statistics.median(t):.3f} s, "
              f"min {min(t):.3f} s over {len(t)} runs")
    seconds, rows = sweep_10k()
    print(f"sweep of {rows:,} configurations (llama-3.1-8b): {seconds:.2f} s ({rows / seconds:,.0f} per second)")


if __name__ == "__main__":
    main()
