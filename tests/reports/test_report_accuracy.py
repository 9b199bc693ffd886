"""Error tables, the CI summary text and the bounds, on hand-made rows with known errors."""

import pytest

from reports.accuracy import check_bounds, component_table, error_summary_text, error_table, summarize, worst_rows
from reports.rows import load_rows

from rowkit import make_row, write_jsonl

# (device, method, measured, predicted): errors lora/fake +10%, -20%, +5%; full/fake -2%, +4%;
# lora/gpu +1%; one OOM row.
ROWS = [("fake", "lora", 1000, 1100), ("fake", "lora", 1000, 800), ("fake", "lora", 2000, 2100),
        ("fake", "full", 1000, 980), ("fake", "full", 500, 520), ("cuda", "lora", 1000, 1010)]


@pytest.fixture
def frame(tmp_path):
    rows = [make_row("gpt2", d, measured=m, predicted=p, method=meth, key=f"k{i}")
            for i, (d, meth, m, p) in enumerate(ROWS)]
    rows.append(make_row("gpt2", "fake", measured=1, predicted=1, outcome="oom", key="oom"))
    return load_rows([write_jsonl(tmp_path / "rows.jsonl", rows)], recompute=False)


def test_median_and_worst_per_method_by_hand(frame):
    t = error_table(frame).set_index(["source", "method"])
    lora = t.loc[("fake", "lora")]
    assert lora["n"] == 3
    assert lora["median_abs_pct"] == pytest.approx(10.0)
    assert lora["worst_abs_pct"] == pytest.approx(20.0)
    assert lora["worst_signed_pct"] == pytest.approx(-20.0)
    assert lora["median_signed_pct"] == pytest.approx(5.0)
    full = t.loc[("fake", "full")]
    assert full["n"] == 2 and full["median_abs_pct"] == pytest.approx(3.0) and full["worst_abs_pct"] == pytest.approx(4.0)
    gpu = t.loc[("gpu", "lora")]
    assert gpu["n"] == 1 and gpu["worst_signed_pct"] == pytest.approx(1.0)


def test_gpu_is_reported_first_and_apart(frame):
    t = error_table(frame, ("source",))
    assert list(t["source"]) == ["gpu", "fake"]
    assert t.iloc[1]["n"] == 5 and t.iloc[1]["median_abs_pct"] == pytest.approx(5.0)


def test_worst_rows_sorted_by_abs_error(frame):
    w = worst_rows(frame, 3)
    assert list(w["error_pct"].round(6)) == [-20.0, 10.0, 5.0]
    assert "settings" in w and "variant" in w


def test_summary_and_text(frame):
    s = summarize(frame)
    assert s["headline"] == "gpu"
    assert s["counts"]["fake"]["oom"] == 1 and s["counts"]["fake"]["rows"] == 6
    rec = {(r["source"], r["method"]): r for r in s["error_table"]}
    assert rec[("fake", "lora")]["worst_abs_pct"] == pytest.approx(20.0)
    text = error_summary_text(s)
    lines = text.splitlines()
    gpu_line = next(i for i, l in enumerate(lines) if l.startswith("gpu"))
    fake_line = next(i for i, l in enumerate(lines) if l.startswith("fake"))
    assert gpu_line < fake_line
    assert any(l.split()[:3] == ["fake", "lora", "3"] and "20.00" in l and "-20.00" in l for l in lines)
    assert any(l.split()[:3] == ["fake", "ALL", "5"] for l in lines)


def test_text_without_data():
    s = summarize(load_rows([]))
    assert "nothing to compare" in error_summary_text(s)


def test_text_notes_missing_gpu(tmp_path):
    df = load_rows([write_jsonl(tmp_path / "r.jsonl", [make_row(measured=10, predicted=11)])], recompute=False)
    assert "no GPU data committed" in error_summary_text(summarize(df))


def test_bounds(frame):
    s = summarize(frame)
    assert check_bounds(s, {"sources": {"fake": {"median_abs_pct": 6, "worst_abs_pct": 21}}}) == []
    problems = check_bounds(s, {"sources": {"fake": {"median_abs_pct": 4, "worst_abs_pct": 21}}})
    assert len(problems) == 1 and problems[0].startswith("fake: median")
    # a per-method bound
    problems = check_bounds(s, {"sources": {"fake": {"worst_abs_pct": 25, "methods": {"full": {"worst_abs_pct": 3}}}}})
    assert problems == ["fake/full: worst_abs error 4.00% > bound 3% (n=2)"]
    # a source with no rows is not a violation
    assert check_bounds(s, {"sources": {"cpu": {"worst_abs_pct": 0}}}) == []


def test_bounds_count_rows_the_calculator_did_not_predict(tmp_path):
    row = make_row("unknown-model", "fake", measured=10, predicted=10, sha="ffffffffffff")
    s = summarize(load_rows([write_jsonl(tmp_path / "r.jsonl", [row])]))
    assert s["counts"]["fake"]["predicted_from_stored"] == 1
    assert check_bounds(s, {"sources": {"fake": {"max_unpredicted_rows": 0}}})
    assert not check_bounds(s, {"sources": {"fake": {"max_unpredicted_rows": 1}}})


def test_component_table(tmp_path):
    cats = {"parameters": 500, "gradients": 0, "optimizer_state": 200, "activations": 300, "inputs": 0, "other": 0}
    pred = {"weights_frozen": 500, "optimizer_states": 150, "activations": 330}
    rows = [make_row(measured=1000, predicted=980, categories=cats, predicted_components=pred, key="a"),
            make_row(measured=1000, predicted=980, categories=cats,
                     predicted_components={**pred, "activations": 250}, key="b")]
    df = load_rows([write_jsonl(tmp_path / "r.jsonl", rows)], recompute=False)
    t = component_table(df).set_index("component")
    assert t.loc["optimizer", "median_signed_pct"] == pytest.approx(-5.0)
    assert t.loc["activations", "worst_abs_pct"] == pytest.approx(5.0)
    assert t.loc["activations", "median_signed_pct"] == pytest.approx((3.0 - 5.0) / 2)


def test_phase_share_and_its_bound(tmp_path):
    # three fake rows measured in backward; the calculator names backward:layer3 (same group), forward, optimizer:
    # 1 of 3 right = 33.33%
    rows = [make_row(measured=100, predicted=100, predicted_phase=ph, key=f"p{i}")
            for i, ph in enumerate(["backward:layer3", "forward", "optimizer"])]
    s = summarize(load_rows([write_jsonl(tmp_path / "r.jsonl", rows)], recompute=False))
    assert s["phase"]["fake"] == {"n": 3, "right": 1, "right_pct": 33.33}
    assert "peak phase right: fake 1/3 (33.3%)" in error_summary_text(s)
    assert check_bounds(s, {"sources": {"fake": {"min_phase_right_pct": 95}}}) == [
        "fake: peak phase right in 33.33% of rows (1/3) < bound 95%"]
    assert not check_bounds(s, {"sources": {"fake": {"min_phase_right_pct": 33}}})


def test_component_bounds(tmp_path):
    # optimizer predicted 150 of a traced 200 in a 1000-byte peak: -5% of the peak
    cats = {"parameters": 500, "gradients": 0, "optimizer_state": 200, "activations": 300, "inputs": 0, "other": 0}
    pred = {"weights_frozen": 500, "optimizer_states": 150, "activations": 300}
    row = make_row(measured=1000, predicted=950, categories=cats, predicted_components=pred, key="c")
    s = summarize(load_rows([write_jsonl(tmp_path / "r.jsonl", [row])], recompute=False))
    bound = lambda pct: {"sources": {"fake": {"components": {"optimizer": {"worst_abs_pct": pct}}}}}
    assert check_bounds(s, bound(2)) == ["fake/optimizer component: worst_abs error 5.00% > bound 2% (n=1)"]
    assert not check_bounds(s, bound(5))
