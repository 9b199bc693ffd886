"""The report tables: trainable vs total against published typical ranges, storage vs tasks, the
memory breakdown, the 7B VLM memory breakdown recomputed; every number against the calculator or a
hand computation."""

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

import peftcalc
from peftcalc.api import plan_for
from peftcalc.errors import InputError
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.config import load_spec
from peftcalc.storage import storage
from reports.breakdown import STACK, breakdown_frame, gpu_lines
from reports.cli_api import trainable_table, vlm_table
from reports.storage_report import crossover, parse_tasks, storage_frame
from reports.trainable import (FROZEN_BACKBONE, FROZEN_BACKBONE_CLAIMS, FROZEN_BACKBONE_PEFT, METHOD_TABLE,
                               METHOD_TABLE_CLAIMS, METHOD_TABLE_VISUAL_ADAPTER, SOURCES, trainable_frame)
from reports.vlm import projector_params, vlm_frame

CONFIGS = Path(__file__).parents[1] / "peftcalc" / "configs"


# -- trainable vs total -------------------------------------------------------------------------


def test_trainable_numbers_are_the_calculators():
    df = trainable_frame("llama-2-7b", batch_size=2, seq_len=256)
    for r in df.to_dict("records"):
        if r["note"]:
            continue
        kw = {"rank": 16, "targets": "all-linear"} if "all-linear" in r["settings"] else {}
        e = peftcalc.estimate("llama-2-7b", method=r["method"], batch_size=2, seq_len=256, precision="bf16", **kw)
        assert (r["trainable"], r["total"], r["peak_bytes"]) == (e.params.trainable, e.params.total,
                                                                 e.memory.peak_bytes)
        assert r["trainable_pct"] == pytest.approx(100 * e.params.trainable / e.params.total)


def test_trainable_flags_by_hand():
    df = trainable_frame("llama-2-7b").set_index("settings")
    # LoRA r=8 on q,v: 32 layers x 2 modules x 8 x (4096 + 4096) = 4,194,304 -> 0.062%: inside 0.01-0.1%.
    lora = df.loc["r=8, q_proj,v_proj"]
    assert lora["trainable"] == 32 * 2 * 8 * (4096 + 4096)
    assert lora["outside_method_table"] == False  # noqa: E712
    # all-linear r=16: ~0.59%, outside the method table's LoRA range, inside the frozen-backbone "< 1%".
    al = df.loc["r=16, all-linear"]
    assert al["outside_method_table"] == True and al["outside_frozen_backbone"] == False  # noqa: E712
    # BitFit: Llama has no biases; the row says so instead of failing.
    assert df.loc["bias terms only", "note"].startswith("n/a")


def test_bitfit_on_bert_against_the_claimed_range():
    df = trainable_frame("bert-base").set_index("method")
    e = peftcalc.estimate("bert-base", method="bitfit")
    assert df.loc["bitfit", "trainable"] == e.params.trainable
    pct = 100 * e.params.trainable / e.params.total
    assert df.loc["bitfit", "outside_method_table"] == (not 0.09 <= pct <= 0.1)


def test_claims_name_their_source_and_match_their_text():
    """Every claim cites its public source (a row or list item of it) and its bounds are the numbers it quotes."""
    claims = [(METHOD_TABLE, c) for c in [*METHOD_TABLE_CLAIMS.values(), METHOD_TABLE_VISUAL_ADAPTER]]
    claims += [(FROZEN_BACKBONE, c) for c in [*FROZEN_BACKBONE_CLAIMS.values(), FROZEN_BACKBONE_PEFT]]
    for source, claim in claims:
        assert claim.cite.startswith(source + ", ") and source in SOURCES, claim
        numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", claim.text)]
        upper_only = claim.text.startswith(("<", "less than"))  # "< 0.1%", "< 1% to 5%": from 0
        assert claim.high_pct == numbers[-1], claim
        assert claim.low_pct == (0.0 if upper_only else numbers[0]), claim


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json", "table"])
def test_trainable_table_formats(fmt):
    out = trainable_table("bert-base", fmt, batch_size=1, seq_len=128)
    e = peftcalc.estimate("bert-base", method="lora", seq_len=128)
    if fmt == "csv":
        df = pd.read_csv(io.StringIO(out))
        assert int(df[df["method"] == "lora"]["trainable"].iloc[0]) == e.params.trainable
    elif fmt == "json":
        rows = json.loads(out)
        assert next(r for r in rows if r["method"] == "lora")["trainable"] == e.params.trainable
    else:
        assert f"{e.params.trainable:,}" in out and "claim [1]" in out and "claim [2]" in out
        assert '[1] Inferensys glossary, "Trainable Parameters"' in out
        assert '[2] Inferensys glossary, "Frozen Backbone"' in out
    with pytest.raises(InputError):
        trainable_table("bert-base", "xml")


# -- storage ------------------------------------------------------------------------------------


def test_crossover_by_hand():
    # base 10, task 1, full 10: 10 + T < 10 T  <=>  T > 10/9  ->  2
    assert crossover(10, 1, 10) == 2
    # base 100, task 60, full 100: 100 + 60 T < 100 T  <=>  T > 2.5  ->  3
    assert crossover(100, 60, 100) == 3
    # exactly equal at T = 2 (100 + 50*2 = 200 = 2*100) is not smaller: T = 3
    assert crossover(100, 50, 100) == 3
    assert crossover(100, 100, 100) is None


def test_parse_tasks():
    assert parse_tasks("1..5") == [1, 2, 3, 4, 5]
    assert parse_tasks("100,1,10") == [1, 10, 100]
    for bad in ("0..3", "a", ""):
        with pytest.raises(InputError):
            parse_tasks(bad)


def test_storage_frame_against_peftcalc_storage():
    spec = load_spec(str(CONFIGS / "llama_cls.json"))
    df = storage_frame(spec, "1,2,3,10")
    full_one = storage(make_plan(spec, MethodSettings("full")), "bfloat16", 1).per_task_bytes
    for r in df.to_dict("records"):
        s = storage(make_plan(spec, MethodSettings(r["method"])), "bfloat16", r["tasks"])
        assert r["total_bytes"] == s.total_bytes == r["base_bytes"] + r["tasks"] * r["per_task_bytes"]
        assert r["full_models_bytes"] == r["tasks"] * full_one
    # the stated crossover is the first T where one base + T files is smaller than T full models
    for m, t in df.attrs["crossover"].items():
        g = df[df["method"] == m]
        base, task = int(g["base_bytes"].iloc[0]), int(g["per_task_bytes"].iloc[0])
        brute = next((T for T in range(1, 1000) if base + T * task < T * full_one), None)
        assert t == brute, m


def test_storage_chart_writes_png_and_svg(tmp_path):
    from reports.cli_api import storage_chart

    s = storage_chart("gpt2", "1,10,100", str(tmp_path / "storage.png"))
    assert sorted(Path(f).suffix for f in s["files"]) == [".png", ".svg"]
    assert all(Path(f).stat().st_size > 1000 for f in s["files"])
    lora = s["methods"]["lora"]
    e = peftcalc.estimate("gpt2", method="lora", tasks=100)
    assert lora["total_bytes_at_100"] == e.storage.total_bytes
    assert s["methods"]["full"]["total_bytes_at_100"] == e.storage.full_models_total_bytes
    json.dumps(s)  # serialisable for the CLI


# -- breakdown -----------------------------------------------------------------------------------


def test_breakdown_components_sum_to_reserved():
    df = breakdown_frame("gpt2", [1, 4], seq_len=256, methods=("full", "lora", "bitfit"), seq_lens=[128, 512])
    assert set(df["sweep"]) == {"batch", "seq"}
    cards = sorted(peftcalc.hardware.gpu_catalog(), key=lambda g: g.memory_bytes)
    for r in df.to_dict("records"):
        e = peftcalc.estimate("gpt2", method=r["method"], batch_size=r["batch_size"], seq_len=r["seq_len"])
        assert sum(r[f"{k}_bytes"] for k in STACK) == r["reserved_bytes"] == e.memory.reserved_bytes
        assert r["weights_bytes"] == e.memory.components["weights_frozen"] + e.memory.components["weights_trainable"]
        assert r["peak_bytes"] == e.memory.peak_bytes
        assert r["smallest_gpu"] == next(g.name for g in cards if e.memory.reserved_bytes <= g.memory_bytes)


def test_breakdown_skips_methods_the_model_cannot_take(tmp_path):
    from reports.cli_api import breakdown_chart

    r = breakdown_chart("llama-3.2-1b", [1, 2], str(tmp_path / "b.png"), methods=("lora", "bitfit"), seq_lens=[256])
    assert "bitfit" in r["skipped"] and set(r["which_card"]) == {"lora"}
    assert len(r["files"]) == 4 and all(Path(f).exists() for f in r["files"])
    json.dumps(r)


def test_gpu_lines_group_near_equal_cards():
    lines = gpu_lines()
    assert [c for c, _ in lines] == sorted(c for c, _ in lines)
    assert any("H100" in name and "A100 80GB" in name for _, name in lines)


# -- the 7B VLM memory breakdown --------------------------------------------------------------


def test_vlm_table_is_the_calculators_llava():
    """Every recomputed row of the 7B VLM breakdown against peftcalc.estimate / plan counts of llava-1.5-7b."""
    assert projector_params() == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    df = vlm_frame().set_index("component")
    plan = plan_for("llava-1.5-7b", "projector")
    part = {k: sum(g.numel for g in plan.groups if g.name.startswith(pre)) for k, pre in (
        ("vision encoder", ("model.vision_tower.",)), ("projector", ("model.multi_modal_projector.",)),
        ("language model", ("model.language_model.", "lm_head.")))}
    assert part["projector"] == plan.trainable == df.loc["projector", "params"] == 20_979_712
    assert df.loc["vision encoder", "params"] == part["vision encoder"] == plan_for(
        "clip-vit-l-14-336-vision", "full").total == 303_507_456
    # Llama-2-7B plus 64 vocabulary rows (32,064) in embed_tokens and lm_head
    assert df.loc["language model", "params"] == part["language model"] == 6_738_415_616 + 2 * 64 * 4096
    assert df.loc["weights total", "params"] == plan.total == sum(part.values()) == 7_063_427_072
    assert df.loc["language model", "params_diff_pct"] == pytest.approx(100 * (part["language model"] - 7e9) / 7e9)
    for prec, nbytes in (("fp16", 2), ("fp32", 4)):
        e = peftcalc.estimate("llava-1.5-7b", method="projector", batch_size=4, seq_len=128, precision=prec)
        c = e.memory.components
        assert df.loc["weights total", f"{prec}_bytes"] == c["weights_frozen"] + c["weights_trainable"] \
            == nbytes * plan.total
        assert df.loc["gradients (trainable)", f"{prec}_bytes"] == nbytes * 20_979_712
        # AdamW's m and v, and fused AdamW's float32 'step' per parameter (4: the projector's two weights and
        # biases), a 512-byte CUDA block each
        assert df.loc["optimizer states (Adam)", f"{prec}_bytes"] == c["optimizer_states"] == \
            2 * nbytes * 20_979_712 + 4 * 512
        assert df.loc["activations (batch=4)", f"{prec}_bytes"] == c["activations"]
        assert df.loc["logits / loss buffers (not in the breakdown)", f"{prec}_bytes"] == c["logits_loss"]
        assert df.loc["total GPU memory", f"{prec}_bytes"] == e.memory.peak_bytes == sum(c.values())
        assert df.loc["total GPU memory, reserved (not in the breakdown)", f"{prec}_bytes"] == e.memory.reserved_bytes
        long = peftcalc.estimate("llava-1.5-7b", method="projector", batch_size=4, seq_len=512, precision=prec)
        assert df.loc["total GPU memory, 512 text tokens", f"{prec}_bytes"] == long.memory.peak_bytes
        assert df.loc["activations (batch=4), 512 text tokens", f"{prec}_bytes"] == long.memory.components["activations"]
        for label, vl, trainable in (("stage 2 (projector-llm)", None, 6_759_919_616),
                                     ("all unfrozen (projector-llm, vision layers 23)", 23, 7_049_632_768)):
            full = peftcalc.estimate("llava-1.5-7b", method="projector-llm", vision_layers=vl, batch_size=4,
                                     seq_len=128, precision=prec)
            assert full.params.trainable == trainable == df.loc[f"full FT: gradients, {label}", "params"]
            assert df.loc[f"full FT: gradients, {label}", f"{prec}_bytes"] == nbytes * trainable
            # m and v, and fused AdamW's float32 'step' per trainable tensor (a 512-byte CUDA block each)
            tensors = sum(g.trainable for g in plan_for("llava-1.5-7b", "projector-llm", vision_layers=vl).groups)
            assert df.loc[f"full FT: optimizer states, {label}", f"{prec}_bytes"] == 2 * nbytes * trainable + 512 * tensors
            assert df.loc[f"full FT: total, {label}", f"{prec}_bytes"] == full.memory.peak_bytes
    # the stage-1 activations: every one of the 32 frozen LLM blocks saves (the projector's gradient crosses them)
    assert df.loc["activations (batch=4)", "fp16_bytes"] > 32 * 4 * 704 * 4096 * 2
    assert df.loc["activations (batch=4)", "fp16_diff_pct"] == pytest.approx(
        100 * (df.loc["activations (batch=4)", "fp16_bytes"] - 6e9) / 6e9)
    assert df.loc["total GPU memory", "claimed_fp16_bytes"] == 21e9 and df.loc["total GPU memory", "claimed_fp32_bytes"] == 36e9
    t16 = df.loc["total GPU memory", "fp16_bytes"]
    s2 = df.loc["full FT: total, stage 2 (projector-llm)", "fp16_bytes"]
    assert df.attrs["savings_pct"]["stage 2 (projector-llm)"] == pytest.approx(100 * (1 - t16 / s2))
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in df.attrs["claims"]}
    assert verdicts["LLaVA-1.5 projector (MLP)"] == "checked: true"
    assert verdicts["GPU memory"] == "not checkable here"
    blip2 = next(c for c in df.attrs["claims"] if c["claim"].startswith("BLIP-2"))
    assert f"{plan_for('blip2-opt-2.7b', 'qformer').trainable:,}" in blip2["how"]
    assert "https://arxiv.org/abs/2301.12597" in blip2["source"]
    assert plan_for("blip2-opt-2.7b", "qformer").trainable == 107_130_880
    md = vlm_table("markdown")
    assert "vision-language issue" not in md and "20,979,712" in md and "128 text tokens" in md
    assert len(json.loads(vlm_table("json"))) == len(df)


def test_trainable_table_of_a_vlm_lists_its_stages():
    """A VLM's table has the stages it takes, with the counts test_vlm.py / test_blip2.py check against the
    real LlavaForConditionalGeneration / Blip2ForConditionalGeneration: llava-1.5-7b stage 1 trains the
    projector (1024 x 4096 + 4096 + 4096 x 4096 + 4096 = 20,979,712), LoRA r8 on q,v of the 32 Llama
    blocks adds 32 x 2 x 8 x (4096 + 4096) = 4,194,304 to it; blip2-opt-2.7b's qformer stage 107,130,880."""
    llava = trainable_frame("llava-1.5-7b").set_index("method")
    assert list(llava.index) == ["projector", "projector-llm", "lora", "adapter"]
    assert llava.loc["projector", "trainable"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    assert llava.loc["lora", "trainable"] == 20_979_712 + 32 * 2 * 8 * (4096 + 4096)
    assert llava.loc["lora", "settings"] == "r=8, q_proj,v_proj + projector"
    blip2 = trainable_frame("blip2-opt-2.7b").set_index("method")
    assert list(blip2.index) == ["qformer"] and blip2.loc["qformer", "trainable"] == 107_130_880
