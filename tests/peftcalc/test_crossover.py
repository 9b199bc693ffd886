"""`peftcalc crossover` (peftcalc/crossover.py): where LoRA stops saving memory against full fine-tuning."""

import subprocess
import sys

import pytest

from peftcalc.crossover import crossover, first_crossing, scan_points
from peftcalc.errors import InputError


def test_peft_1514_crossover_is_where_the_traces_cross():
    """peft#1514: TinyLlama-1.1B, LoRA r=64 on every linear, against full fine-tuning, bf16, batch 1.
    Fake-tensor traces of the real model (reports/data/crossover.jsonl, from
    `run_matrix('crossover', 'reports/data/crossover.jsonl')`) give LoRA's peak minus full fine-tuning's:
    -1,763,556,948 B at 2,048 tokens, -243,228 B at 3,826 and +748,512 B at 3,827, so the traced
    crossover is 3,827 tokens. The calculator predicts for the device the traces ran on (`device="cpu"`)."""
    r = crossover("tinyllama-1.1b", method="lora", rank=64, targets="all-linear", training={"seq_len": 128, "device": "cpu"})
    assert r["trainable"] == 50_462_720  # the print_trainable_parameters figure
    assert r["crossover"] == 3827
    assert r["at"]["method_peak_bytes"] - r["at"]["against_peak_bytes"] == 748_512
    assert r["before"]["method_peak_bytes"] - r["before"]["against_peak_bytes"] == -243_228
    # the scan doubles from 128: the first non-negative gap is at 4,096 (+267,526,572 B traced)
    assert [s["seq_len"] for s in r["scan"]] == [128, 256, 512, 1024, 2048, 4096]
    assert r["scan"][-1]["gap_bytes"] == 267_526_572


def test_first_crossing_bisects_to_the_smallest_value():
    """gap(v) = 3v - 1000 first reaches 0 at v = 334 (3 x 333 = 999 < 1000 <= 1002)."""
    value, scanned = first_crossing(lambda v: 3 * v - 1000, 1, 4096)
    assert value == 334
    assert [v for v, _ in scanned] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert first_crossing(lambda v: -1, 1, 100)[0] is None
    assert first_crossing(lambda v: 0, 5, 100)[0] == 5
    assert scan_points(3, 20) == [3, 6, 12, 20]


def test_bad_axis_and_same_method_are_input_errors():
    with pytest.raises(InputError, match="seq-len or batch-size"):
        crossover("tinyllama-1.1b", over="tokens")
    with pytest.raises(InputError, match="both 'full'"):
        crossover("tinyllama-1.1b", method="full")


def test_cli_bad_axis_exits_2_with_one_line():
    p = subprocess.run([sys.executable, "-m", "peftcalc", "crossover", "tinyllama-1.1b", "--over", "tokens"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: --over must be seq-len or batch-size, got 'tokens'"]
