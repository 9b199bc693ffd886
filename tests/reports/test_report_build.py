"""The whole report and the CI step: numbers in report.md and the CSVs trace back to the rows."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import peftcalc
from reports import ci_report
from reports.cli_api import build_report, error_summary_text

from rowkit import make_row, write_jsonl

CONFIGS = Path(__file__).parents[1] / "peftcalc" / "configs"
SMALL = dict(trainable_models=("gpt2",), storage_model="gpt2", tasks="1,10,100", breakdown_model="gpt2",
             batch_sizes=(1, 2))


@pytest.fixture(scope="module")
def real_cpu_row():
    """One real CPU training step of a 2-layer GPT-2 classifier, measured by the harness."""
    from measure.run import measure_one
    from peftcalc.methods import MethodSettings
    from peftcalc.settings import TrainingSettings

    config = json.loads((CONFIGS / "gpt2_cls.json").read_text())
    return measure_one(config, MethodSettings("lora"), TrainingSettings(batch_size=2, seq_len=16, precision="fp32"),
                       "cpu", steps=2)


def test_report_numbers_trace_to_rows(tmp_path, real_cpu_row):
    hand = make_row("gpt2", "cuda", measured=1_500_000_000, method="full", precision="bf16", key="gpu-row")
    data = write_jsonl(tmp_path / "gpu.jsonl", [hand])
    cpu = write_jsonl(tmp_path / "ci.jsonl", [real_cpu_row])
    summary = build_report([str(data), str(cpu)], str(tmp_path / "out"), **SMALL)
    out = tmp_path / "out"

    e = peftcalc.estimate("gpt2", method="full", seq_len=128, precision="bf16", device="cuda", optimizer="adamw")
    err = 100 * (e.memory.peak_bytes - 1_500_000_000) / 1_500_000_000
    table = {(r["source"], r["method"]): r for r in summary["error_table"]}
    assert table[("gpu", "full")]["n"] == 1
    assert table[("gpu", "full")]["worst_signed_pct"] == pytest.approx(err, abs=1e-3)
    assert summary["headline"] == "gpu"

    # The real row: same calculator, so the recomputed prediction is the one stored in the row, and the
    # config was found by its sha (a 2-layer GPT-2, not the registry's gpt2).
    rows = pd.read_csv(out / "rows.csv")
    real = rows[rows["source"] == "cpu"].iloc[0]
    assert real["predicted_peak_bytes"] == real_cpu_row["predicted"]["peak_bytes"]
    assert real["predicted_params_trainable"] == real_cpu_row["params"]["trainable"]
    meas = real_cpu_row["measured"]["peak_bytes"]
    assert real["error"] == pytest.approx((real_cpu_row["predicted"]["peak_bytes"] - meas) / meas)
    assert table[("cpu", "lora")]["worst_signed_pct"] == pytest.approx(100 * real["error"], abs=1e-3)

    md = (out / "report.md").read_text()
    assert md.index("Headline: GPU") < md.index("real CPU runs")
    assert f"{err:+.2f}" in md
    for name in ("predicted_vs_measured", "errors_by_method", "storage_vs_tasks", "breakdown", "breakdown_scaling"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").exists()
    assert "Recomputed with the calculator's llava-1.5-7b" in md and "vision-language issue" not in md
    # the claim sections name public sources, not internal documents
    assert "## 2. Trainable vs total parameters against published typical ranges" in md
    assert '[1] Inferensys glossary, "Trainable Parameters"' in md and "## 5. A 7B vision-language memory" in md
    assert "https://arxiv.org/abs/2301.12597" in md and (out / "vlm_7b_breakdown.csv").exists()
    assert "shared/" not in md and not re.search(r"(?i)\bseeds? 0\d\d", md)
    by_method = pd.read_csv(out / "errors_by_method.csv")
    assert set(by_method["source"]) == {"gpu", "cpu"}
    assert json.loads((out / "summary.json").read_text())["rows"] == 2
    assert "gpu" in error_summary_text(summary).splitlines()[4]


def test_ci_report_without_data(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    rc = ci_report.main(["--data-dir", str(empty), "--out", str(tmp_path / "r"), "--accuracy-only"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no committed data" in out and "nothing to compare" in out
    assert (tmp_path / "r" / "report.md").exists()


def test_ci_report_fails_above_the_bounds(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    e = peftcalc.estimate("gpt2", method="lora", seq_len=128, precision="amp-bf16", device="cpu")
    measured = int(e.memory.peak_bytes / 1.2)  # the calculator 20% over
    write_jsonl(data / "ci.jsonl", [make_row("gpt2", "fake", measured=measured)])
    bounds = tmp_path / "bounds.toml"
    bounds.write_text("[sources.fake]\nmedian_abs_pct = 25\nworst_abs_pct = 25\n")
    args = ["--data-dir", str(data), "--out", str(tmp_path / "r"), "--bounds", str(bounds), "--accuracy-only"]
    assert ci_report.main(args) == 0
    bounds.write_text("[sources.fake]\nmedian_abs_pct = 5\nworst_abs_pct = 25\n")
    assert ci_report.main(args) == 1
    out = capsys.readouterr().out
    assert "fake: median_abs error 20.00% > bound 5%" in out


def test_ci_report_extra_files_are_not_bounded(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    e = peftcalc.estimate("gpt2", method="lora", seq_len=128, precision="amp-bf16", device="cpu")
    write_jsonl(data / "ci.jsonl", [make_row("gpt2", "fake", measured=e.memory.peak_bytes)])
    extra = write_jsonl(tmp_path / "slice.jsonl", [make_row("gpt2", "fake", measured=e.memory.peak_bytes // 2,
                                                            key="bad")])
    bounds = tmp_path / "bounds.toml"
    bounds.write_text("[sources.fake]\nworst_abs_pct = 1\n")
    args = [str(extra), "--data-dir", str(data), "--out", str(tmp_path / "r"), "--bounds", str(bounds),
            "--accuracy-only"]
    assert ci_report.main(args) == 0


def test_committed_bounds_file_parses():
    from reports.accuracy import load_bounds

    b = load_bounds()
    assert set(b["sources"]) >= {"gpu", "cpu", "fake"}
