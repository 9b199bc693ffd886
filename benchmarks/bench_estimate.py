"""Speed of the calculator: cold `peftcalc estimate` (a fresh process, as a user runs it) and a sweep
of 10,000 configurations through the Python API. Run with `make bench`."""

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


def sweep_10k() -> tuple[float, int]:
    import peftcalc

    grid = dict(
        method=["full", "lora", "qlora", "adapter", "ia3"],
        rank=[4, 8, 16, 32, 64],
        batch_size=[1, 2, 4, 8, 16],
        seq_len=[128, 256, 512, 1024, 2048, 4096, 8192, 16384],
        grad_checkpointing=[False, True],
        precision=["fp32", "bf16", "amp-bf16", "fp16", "amp-fp16"],
    )
    start = time.perf_counter()
    df = peftcalc.sweep("llama-3.1-8b", **grid)
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
