"""DeepSpeed and FSDP keys of real example configs (tests/peftcalc/training_configs/configs/, written from the
tools' repositories: axolotl deepspeed_configs/zero3_bf16_cpuoffload_params.json and zero2.json,
examples/llama-3/fft-8b-liger-fsdp.yaml; LLaMA-Factory examples/deepspeed/ds_z3_config.json and
ds_z2_offload_config.json, examples/accelerate/fsdp_v2_offload_config.yaml's fsdp_config in a TrainingArguments
JSON) map to the sharding settings (peftcalc.settings SHARDINGS, OFFLOADS, reshard_after_forward); ZeRO,
which this peftcalc does not model yet, gives one clear line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftcalc.errors import InputError
from peftcalc.training_configs import from_files

CONFIGS = Path(__file__).parent / "configs"


def with_key(tmp_path, base: str, extra: str, name: str = "run.yaml") -> Path:
    """`base` (a config of CONFIGS) with `extra` lines appended, beside copies of the DeepSpeed JSONs."""
    for ds in CONFIGS.glob("*.json"):
        (tmp_path / ds.name).write_text(ds.read_text())
    path = tmp_path / name
    path.write_text((CONFIGS / base).read_text() + extra)
    return path


def sharding_of(run) -> tuple:
    t = run.training
    return t.get("sharding"), t.get("offload", "none"), t.get("reshard_after_forward", True), t.get("precision")


@pytest.mark.parametrize("base, ds, expected", [
    # axolotl bf16: true -> bf16; DeepSpeed bf16.enabled keeps fp32 master weights (BF16_Optimizer): mixed-bf16
    ("axolotl-lora-1b.yml", "axolotl-ds-zero3-bf16-cpuoffload-params.json", ("zero3", "params", True, "mixed-bf16")),
    ("axolotl-lora-1b.yml", "axolotl-ds-zero2.json", ("zero2", "optimizer", True, "mixed-bf16")),
    ("llamafactory-full-sft.yaml", "llamafactory-ds-z3-config.json", ("zero3", "none", True, "mixed-bf16")),
    ("llamafactory-full-sft.yaml", "llamafactory-ds-z2-offload-config.json", ("zero2", "optimizer", True,
                                                                                "mixed-bf16")),
])
def test_deepspeed_examples(tmp_path, base, ds, expected):
    """zero_optimization.stage -> zero1/2/3, offload_param / offload_optimizer device cpu -> offload params /
    optimizer, the settings ZeRO's estimate takes once it is modelled."""
    run = from_files(str(with_key(tmp_path, base, f"deepspeed: {ds}\n")))
    assert sharding_of(run) == expected
    assert any(f"ZeRO stage {expected[0][-1]}" in note for note in run.derived[0].notes)


def test_zero_is_one_clear_line_until_modelled(tmp_path):
    """`peftcalc estimate --config` with a ZeRO-3 DeepSpeed JSON: exit 2 and one line saying what is not
    modelled yet (peftcalc.sharding models ddp and fsdp; ZeRO lands with the multi-GPU work)."""
    from peftcalc.settings import SHARDINGS

    assert "zero3" in SHARDINGS
    path = with_key(tmp_path, "axolotl-lora-1b.yml", "deepspeed: axolotl-ds-zero3-bf16-cpuoffload-params.json\n")
    proc = subprocess.run([sys.executable, "-m", "peftcalc", "estimate", "--config", str(path), "--gpus", "8"],
                          capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and "not modelled yet" in errors[0]


def test_axolotl_fsdp1_example(tmp_path):
    """axolotl's fft-8b-liger-fsdp FSDP keys: fsdp full_shard, fsdp_offload_params true, no fsdp_version (FSDP1,
    axolotl's default): sharding fsdp with its parameters offloaded, FSDP1 named in the warning line."""
    run = from_files(str(CONFIGS / "axolotl-fft-8b-fsdp1.yaml"))
    assert sharding_of(run)[:3] == ("fsdp", "params", True)
    assert "FSDP1" in run.warning()


def test_axolotl_fsdp2_example(tmp_path):
    """fsdp_version 2 with fsdp_config (offload_params false, reshard_after_forward true): FSDP2, no offload,
    nothing about FSDP1; and reshard_after_forward false where the file says so."""
    run = from_files(str(CONFIGS / "axolotl-lora-1b-fsdp2.yaml"))
    assert sharding_of(run)[:3] == ("fsdp", "none", True) and "FSDP1" not in (run.warning() or "")
    text = (CONFIGS / "axolotl-lora-1b-fsdp2.yaml").read_text().replace("reshard_after_forward: true",
                                                                         "reshard_after_forward: false")
    (tmp_path / "no-reshard.yaml").write_text(text)
    assert sharding_of(from_files(str(tmp_path / "no-reshard.yaml")))[:3] == ("fsdp", "none", False)


def test_training_args_with_accelerate_fsdp2_keys(tmp_path):
    """A TrainingArguments JSON whose fsdp_config holds accelerate's FSDP2 keys (LLaMA-Factory
    examples/accelerate/fsdp_v2_offload_config.yaml: fsdp_version 2, fsdp_offload_params, fsdp_reshard_after_forward;
    transformers strips the fsdp_ prefix) -> fsdp, offload params, reshard_after_forward false; the weights load in
    the model's bf16 ("auto"), so bf16."""
    args = json.loads((CONFIGS / "training-args.json").read_text())
    args.update(fsdp=True, fsdp_config={"fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": True,
                                        "fsdp_reshard_after_forward": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                                        "fsdp_version": 2})
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    run = from_files(str(path), given={"model": "llama-3.2-1b"})
    assert sharding_of(run) == ("fsdp", "params", False, "bf16")
    assert "FSDP1" not in (run.warning() or "")


def test_fsdp1_strategies(tmp_path):
    """FSDP1's sharding strategies (the legacy ``fsdp`` words and fsdp_config's sharding_strategy /
    reshard_after_forward strings): shard_grad_op keeps the parameters after forward, hybrid_shard is HSDP,
    no_shard is plain data parallelism (DDP)."""
    args = json.loads((CONFIGS / "training-args.json").read_text())
    cases = {("shard_grad_op auto_wrap", 1): ("fsdp", False), ("hybrid_shard", 1): ("hsdp", True),
             ("full_shard offload", 2): ("fsdp", True)}
    for (words, version), (sharding, reshard) in cases.items():
        args.update(fsdp=words, fsdp_config={"version": version})
        path = tmp_path / "args.json"
        path.write_text(json.dumps(args))
        run = from_files(str(path), given={"model": "llama-3.2-1b"})
        assert (run.training["sharding"], run.training["reshard_after_forward"]) == (sharding, reshard), words
    args.update(fsdp=True, fsdp_config={"version": 1, "sharding_strategy": "NO_SHARD"})
    path.write_text(json.dumps(args))
    assert from_files(str(path), given={"model": "llama-3.2-1b"}).training["sharding"] == "ddp"
    args.update(fsdp_config={"version": 3})
    path.write_text(json.dumps(args))
    with pytest.raises(InputError, match="fsdp_version"):
        from_files(str(path), given={"model": "llama-3.2-1b"})


def test_axolotl_fsdp2_config_estimates_as_its_flags(tmp_path):
    """axolotl's FSDP2 example at gradient_accumulation_steps 1 estimates under FSDP2 (the Trainer's step,
    trainer_loop, with its clipping): per GPU the peak, phase and components of the hand-written flags; the
    Trainer's loop holds one more float32 loss scalar through backward than a plain loop (accelerate
    Accelerator.backward's ``loss / gradient_accumulation_steps`` beside Trainer.training_step's own loss):
    4 bytes, at a backward peak."""
    from peftcalc.api import estimate

    text = (CONFIGS / "axolotl-lora-1b-fsdp2.yaml").read_text()
    path = tmp_path / "fsdp2.yaml"
    path.write_text(text.replace("gradient_accumulation_steps: 2", "gradient_accumulation_steps: 1"))
    run = from_files(str(path), given={"gpus": 8})
    by_config = estimate(run.model, **run.kwargs)
    flags = dict(method="lora", rank=16, alpha=32, targets="all-linear", batch_size=2, seq_len=2048, precision="bf16",
                 optimizer="adamw-fused", grad_checkpointing=True, checkpoint_reentrant=False, max_grad_norm=1.0,
                 sharding="fsdp", reshard_after_forward=True, gpus=8)
    by_flags = estimate("llama-3.2-1b", trainer_loop=True, **flags)
    assert (by_config.memory.peak_bytes, by_config.memory.peak_phase, by_config.memory.components) == \
        (by_flags.memory.peak_bytes, by_flags.memory.peak_phase, by_flags.memory.components)
    plain = estimate("llama-3.2-1b", trainer_loop=False, **flags).memory
    assert by_flags.memory.peak_phase.startswith("backward")
    assert by_flags.memory.peak_bytes - plain.peak_bytes == 4


def test_trainer_accumulation_under_fsdp2_is_one_clear_line():
    """The same example as written (gradient_accumulation_steps 2): the HF Trainer runs every micro-batch but the
    last under accelerate's no_sync (FSDP2 set_requires_gradient_sync(False): unsharded gradients kept to the last
    micro-batch), which the FSDP2 accumulation model (a reduce-scatter every micro-batch) does not cover: exit 2,
    one line naming it."""
    path = CONFIGS / "axolotl-lora-1b-fsdp2.yaml"
    proc = subprocess.run([sys.executable, "-m", "peftcalc", "estimate", "--config", str(path), "--gpus", "8"],
                          capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and "no_sync" in errors[0] and "grad-accum" in errors[0]
