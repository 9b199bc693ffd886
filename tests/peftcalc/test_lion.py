"""bitsandbytes Lion (transformers' lion_8bit, lion_32bit, paged_lion_8bit, paged_lion_32bit): one state, the
exp_avg (optim/optimizer.py Optimizer1State.init_state), against hand derivations; the traced rows of
measure/matrices/ci.toml hold the same figures to the byte."""

from math import ceil

import pytest

import peftcalc
from peftcalc.api import plan_for
from peftcalc.model_states import model_states
from peftcalc.settings import TrainingSettings
from peftcalc.training_configs.common import OPTIMIZER_NAMES

MODEL = "llama-3.2-1b"  # hidden 2048, 16 layers, intermediate 8192, 8 KV heads of 64, vocab 128,256, tied head
PARAMS = 1_235_814_400


def eight_bit(n: int) -> int:
    """Optimizer1State at optim_bits 8: uint8 state1 plus an fp32 absmax per 256 values, from 4096 elements."""
    return n + 4 * ceil(n / 256) if n >= 4096 else 4 * n


def test_lion_32bit_keeps_one_fp32_state_per_parameter():
    """get_state_buffer(p, dtype=torch.float32): fp32 whatever the parameter's dtype; state['step'] is an int."""
    ms = model_states(plan_for(MODEL, "full"), TrainingSettings(precision="bf16", optimizer="lion-32bit"))
    assert ms.optimizer_states == 4 * PARAMS == 4_943_257_600
    assert ms.optimizer_temporaries == 0 and ms.optimizer_maps == 0


def test_lion_8bit_state_by_hand():
    """Per layer q_proj, o_proj 2048 x 2048, k_proj, v_proj 512 x 2048, gate/up/down 2048 x 8192 (8-bit), two
    RMSNorm weights of 2048 (under min_8bit_size 4096: fp32); the embedding 128,256 x 2048 (8-bit), the final
    norm (fp32); the dynamic map referenced by every 8-bit state (qmap1), 256 fp32."""
    per_layer = (2 * eight_bit(2048 * 2048) + 2 * eight_bit(512 * 2048) + 3 * eight_bit(2048 * 8192)
                 + 2 * eight_bit(2048))
    expected = 16 * per_layer + eight_bit(128_256 * 2048) + eight_bit(2048)
    ms = model_states(plan_for(MODEL, "full"), TrainingSettings(precision="bf16", optimizer="lion-8bit"))
    assert ms.optimizer_states == expected == 1_255_325_696
    assert (ms.optimizer_maps, ms.maps_in_state, ms.optimizer_spare_maps) == (1024, True, 0)
    cpu = model_states(plan_for(MODEL, "full"), TrainingSettings(precision="bf16", optimizer="lion-8bit", device="cpu"))
    assert cpu.optimizer_spare_maps == 1024  # 'udynamic', made by fill_qmap, stays in name2qmap on the CPU


def test_lion_is_half_of_adamw_8bit():
    plan = plan_for(MODEL, "full")
    adam = model_states(plan, TrainingSettings(precision="bf16", optimizer="adamw-8bit"))
    lion = model_states(plan, TrainingSettings(precision="bf16", optimizer="lion-8bit"))
    assert adam.optimizer_states == 2 * lion.optimizer_states


@pytest.mark.parametrize("name,width", [("paged-lion-8bit", 1), ("paged-lion-32bit", 4)])
def test_paged_lion_pages_its_one_state(name, width):
    """get_state_buffer: parameters of 1e5 elements or more get an F.get_paged state1 (CUDA unified memory);
    every llama-3.2-1b tensor but the 2048-element norms is that large."""
    e = peftcalc.estimate(MODEL, method="full", precision="bf16", seq_len=128, optimizer=name)
    big = PARAMS - 33 * 2048
    assert e.memory.paged_bytes == width * big
    assert e.memory.traced == "modelled, not traced"


def test_transformers_names_map_to_the_lions():
    assert {k: v[0] for k, v in OPTIMIZER_NAMES.items() if "lion" in k} == {
        "lion_8bit": "lion-8bit", "lion_32bit": "lion-32bit", "paged_lion_8bit": "paged-lion-8bit",
        "paged_lion_32bit": "paged-lion-32bit"}



@pytest.mark.parametrize("optim,ours", [("lion_8bit", "lion-8bit"), ("lion_32bit", "lion-32bit"),
                                        ("paged_lion_8bit", "paged-lion-8bit"), ("paged_lion_32bit", "paged-lion-32bit")])
def test_a_training_arguments_file_with_a_lion_estimates_it(tmp_path, optim, ours):
    """TrainingArguments' optim names the Lion it means; no warning line (it is modelled)."""
    import json
    from pathlib import Path

    from peftcalc.training_configs import from_files

    args = json.loads((Path(__file__).parent / "training_configs" / "configs" / "training-args.json").read_text())
    path = tmp_path / "training-args.json"
    path.write_text(json.dumps({**args, "optim": optim}))
    run = from_files(path, given={"model": MODEL})
    assert run.kwargs["optimizer"] == ours
    assert optim not in (run.warning() or "")
    by_config = peftcalc.estimate(run.model, **run.kwargs)
    assert by_config.training.optimizer == ours
