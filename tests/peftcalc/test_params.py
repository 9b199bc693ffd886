"""Parameter counts equal sum(p.numel()) of the real transformers / peft models, to the parameter.

Each model is built on the meta device from the same config (cheap even for 70B), the method is
applied for real (peft.get_peft_model, requires_grad masks, the harness's bottleneck adapters), and
its total and trainable counts are compared with the calculator's.
"""

from pathlib import Path

import pytest

from measure.build import build_model, count_params
from peftcalc.errors import InputError
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.config import load_spec, registry_names

CONFIGS = Path(__file__).parent / "configs"

# Every method, and the variants whose counts differ (targets, DoRA, rank, placements).
VARIANTS = [
    MethodSettings("full"),
    MethodSettings("frozen"),
    MethodSettings("freeze"),
    MethodSettings("freeze", trainable_layers=1),
    MethodSettings("lora"),
    MethodSettings("lora", rank=16, targets="all-linear"),
    MethodSettings("lora", rank=4, dora=True),
    MethodSettings("qlora", rank=16, targets="all-linear"),
    MethodSettings("adapter"),
    MethodSettings("adapter", adapter_kind="pfeiffer", bottleneck=32),
    MethodSettings("prefix"),
    MethodSettings("prompt", num_virtual_tokens=8),
    MethodSettings("bitfit"),
    MethodSettings("ia3"),
]


def _check(model_name, settings):
    spec = load_spec(model_name)
    try:
        plan = make_plan(spec, settings)
    except InputError:
        pytest.skip(f"{settings.method} does not apply to {spec.architecture}")
    # QLoRA's logical counts are LoRA's on the unquantized base (bitsandbytes packs two 4-bit
    # values per uint8 element, so numel() of a quantized model is not the logical count).
    built = settings if settings.method != "qlora" else MethodSettings(**{**settings.__dict__, "method": "lora"})
    total, trainable = count_params(build_model(spec, built))
    assert (plan.total, plan.trainable) == (total, trainable)


@pytest.mark.parametrize("settings", VARIANTS, ids=lambda s: f"{s.method}-{s.rank}-{s.targets}-{s.dora}-{s.adapter_kind}")
@pytest.mark.parametrize("model_name", registry_names())
def test_registry_counts_equal_real_models(model_name, settings):
    _check(model_name, settings)


@pytest.mark.parametrize("settings", VARIANTS + [
    MethodSettings("lora", targets=("q_proj", "embed_tokens"), dora=True),
    MethodSettings("ia3", targets=("query", "classifier")),
], ids=lambda s: f"{s.method}-{s.targets}-{s.dora}")
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_config_file_counts_equal_real_models(config, settings):
    spec = load_spec(str(CONFIGS / config))
    if settings.targets and settings.targets != "all-linear":
        try:
            make_plan(spec, settings)
        except InputError:
            pytest.skip("targets not in this family")
    _check(str(CONFIGS / config), settings)


def test_llama2_7b_counts_match_published_figures():
    """6,738,415,616 parameters (the Llama 2 paper's "7B"; HF model card) and peft's well-known
    4,194,304 trainable for LoRA r=8 on q_proj,v_proj: 32 layers x 2 modules x 8 x (4096 + 4096)."""
    spec = load_spec("llama-2-7b")
    plan = make_plan(spec, MethodSettings("lora", rank=8))
    assert plan.total - plan.trainable == 6_738_415_616
    assert plan.trainable == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
