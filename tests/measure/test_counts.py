"""The harness measures the model the calculator counts: for every run of the ci matrix, the model
built the way the harness builds it (on the meta device; QLoRA with bitsandbytes Linear4bit layers)
has the calculator's total and trainable parameter counts, and so does every recorded row."""

import json
from pathlib import Path

import pytest
import torch

from measure.build import count_logical_params
from measure.fake import build_meta_model
from measure.matrix import expand_matrix
from measure.setup import precision_policy
from peftcalc.methods import make_plan

RESULTS = Path(__file__).resolve().parents[2] / "reports" / "data" / "ci.jsonl"


def _unique_builds(ci_matrix):
    seen = {}
    for run in expand_matrix(ci_matrix)[0]:
        policy = precision_policy(run.training, run.device)
        seen.setdefault((run.spec, run.method, policy.dtype, policy.compute), run)
    return list(seen.items())


def test_every_ci_run_builds_with_the_calculators_counts(ci_matrix):
    builds = _unique_builds(ci_matrix)
    assert len(builds) > 100
    for (spec, method, dtype, compute), run in builds:
        plan = make_plan(spec, method)
        model = build_meta_model(spec, method, dtype, compute, run.training.attention)
        assert count_logical_params(model) == (plan.total, plan.trainable), (spec.name, method)


def test_qlora_meta_model_has_4bit_layers_where_the_plan_quantizes(tiny):
    import bitsandbytes as bnb

    run = tiny("tiny-llama", method="qlora", targets="all-linear")
    model = build_meta_model(run.spec, run.method, torch.bfloat16, torch.bfloat16)
    plan = make_plan(run.spec, run.method)
    quantized = {n.removeprefix("base_model.model.").replace(".base_layer", "")
                 for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {g.name.removesuffix(".weight") for g in plan.groups if g.quantized}


def test_recorded_ci_rows_have_the_calculators_counts(ci_matrix):
    if not RESULTS.exists():
        pytest.skip(f"{RESULTS} not written yet (run the ci matrix)")
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    runs = {}
    for (spec, method, _, _), run in _unique_builds(ci_matrix):
        runs[(spec.name, json.dumps(run.request()["method"], sort_keys=True))] = make_plan(spec, method)
    checked = 0
    for row in rows:
        if row["outcome"] != "ok":
            continue
        plan = runs.get((row["settings"]["model"], json.dumps(row["settings"]["method"], sort_keys=True)))
        assert plan is not None, f"row {row['key']} is not a run of the ci matrix"
        assert row["params"] == {"total": plan.total, "trainable": plan.trainable}, row["settings"]
        checked += 1
    assert checked > 100
