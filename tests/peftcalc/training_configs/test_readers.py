"""Training configs in: each tool's example configs (tests/peftcalc/training_configs/configs/, written from the
tools' own examples and documentation) give exactly the settings, trainable count and peak of the hand-written
flags they mean; explicit flags override the file; the not-modelled keys are named in one warning line."""

import sys
from pathlib import Path

import pytest

from peftcalc.api import estimate
from peftcalc.settings import OPTIMIZERS
from peftcalc.training_configs import from_files

CONFIGS = Path(__file__).parent / "configs"

# The optimizer a name means once this peftcalc models it (recipes: adamw-fused, paged-adamw-8bit), else what
# it is estimated as meanwhile (named in the warning line).
FUSED = "adamw-fused" if "adamw-fused" in OPTIMIZERS else "adamw"
PAGED8 = "paged-adamw-8bit" if "paged-adamw-8bit" in OPTIMIZERS else "adamw-8bit"

ALL_PROJ = ("gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj")
# every tool here trains with a transformers Trainer (axolotl's is a subclass): trainer_loop
# and clips gradients (TrainingArguments max_grad_norm 1.0; axolotl leaves the Trainer's default)
CKPT = dict(grad_checkpointing=True, checkpoint_reentrant=False, trainer_loop=True, max_grad_norm=1.0)
CKPT_REENTRANT = dict(grad_checkpointing=True, checkpoint_reentrant=True, trainer_loop=True, max_grad_norm=1.0)

# file -> (model given on the command line or None, the hand-written flags it means, keys in the warning line)
CASES = {
    # axolotl: bf16 auto -> bf16 weights under bf16 autocast; gradient_checkpointing -> {"use_reentrant": False}
    "axolotl-lora-1b.yml": (None, dict(grad_accum=2, model="llama-3.2-1b", method="lora", rank=16, alpha=32, targets=ALL_PROJ,
                                       batch_size=2, seq_len=2048, precision="bf16", optimizer="adamw-8bit", **CKPT),
                            ("attn_implementation", "lora_dropout")),
    "axolotl-qlora-1b.yml": (None, dict(grad_accum=4, model="llama-3.2-1b", method="qlora", rank=32, alpha=16, targets="all-linear",
                                        double_quant=True, prepare_kbit=True, batch_size=2, seq_len=2048,
                                        precision="bf16", optimizer="adamw-8bit", attention="sdpa", **CKPT),
                             ("adapter=qlora",)),
    "axolotl-fft-8b.yaml": (None, dict(grad_accum=8, model="llama-3.1-8b", method="full", batch_size=1, seq_len=8192,
                                       precision="bf16", optimizer=PAGED8, **CKPT), ("attn_implementation",)),
    # TRL: dtype float32 (ModelConfig) under bf16 autocast (bf16 None -> True); batch 8 (TrainingArguments);
    # max_length 1024; gradient checkpointing on (_BaseConfig); SFTTrainer's fused LM head (loss trl) where it is
    # modelled (bf16 weights), else named in the warning line (autocast)
    "trl-example.yaml": (None, dict(grad_accum=1, model="qwen2.5-0.5b", method="full", batch_size=8, seq_len=1024,
                                    precision="amp-bf16", optimizer=FUSED, **CKPT), ("SFTTrainer's fused LM head",)),
    "trl-lora.yaml": (None, dict(grad_accum=2, model="qwen2.5-0.5b", method="lora", rank=32, alpha=16, targets="all-linear",
                                 batch_size=4, seq_len=2048, precision="bf16", optimizer=FUSED, loss="trl", **CKPT),
                      ()),
    "trl-qlora.yaml": (None, dict(grad_accum=1, model="llama-3.1-8b", method="qlora", rank=16, alpha=32, double_quant=True,
                                  prepare_kbit=False, batch_size=2, seq_len=1024, precision="bf16", optimizer=PAGED8,
                                  loss="trl", **CKPT), ("load_in_4bit",)),
    # LLaMA-Factory: lora_alpha = 2 x rank, lora_target all, cutoff_len, checkpointing on and reentrant; full
    # fine-tuning upcasts the weights to fp32 (amp-bf16)
    "llamafactory-lora-sft.yaml": (None, dict(grad_accum=8, model="qwen2.5-7b", method="lora", rank=8, alpha=16,
                                              targets="all-linear", batch_size=1, seq_len=2048, precision="bf16",
                                              optimizer=FUSED, **CKPT_REENTRANT), ()),
    "llamafactory-qlora-otfq.yaml": (None, dict(grad_accum=8, model="qwen2.5-7b", method="qlora", rank=8, alpha=16,
                                                targets="all-linear", double_quant=True, prepare_kbit=False,
                                                batch_size=1, seq_len=2048, precision="bf16", optimizer=FUSED,
                                                **CKPT_REENTRANT), ()),
    "llamafactory-full-sft.yaml": (None, dict(grad_accum=2, model="qwen2.5-0.5b", method="full", batch_size=1, seq_len=2048,
                                              precision="amp-bf16", optimizer=FUSED, **CKPT_REENTRANT), ()),
    # TrainingArguments JSON (args.to_json_string()): the model from the command line, weights in its config's
    # dtype (bf16 for Llama 3.2) under bf16 autocast, seq_len peftcalc's default
    "training-args.json": ("llama-3.2-1b", dict(grad_accum=4, model="llama-3.2-1b", batch_size=4, seq_len=512, precision="bf16",
                                                optimizer="adamw", **CKPT), ()),
}


def _split(flags: dict):
    flags = dict(flags)
    return flags.pop("model"), flags


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_config_equals_its_flags(name):
    """Same settings, same trainable count, same peak as the hand-written flags."""
    model, flags, warned = CASES[name]
    run = from_files(CONFIGS / name, given={"model": model} if model else {})
    by_config = estimate(run.model, **run.kwargs)
    by_flags = estimate(*_split(flags)[:1], **_split(flags)[1])
    assert by_config.model == by_flags.model
    assert by_config.method == by_flags.method
    assert by_config.training == by_flags.training
    assert by_config.params.trainable == by_flags.params.trainable
    assert by_config.memory.peak_bytes == by_flags.memory.peak_bytes
    warning = run.warning() or ""
    for key in warned:
        assert key in warning, warning
    assert run.header().startswith("read ") and str(CONFIGS / name) in run.header()


def test_flags_and_model_override_the_file():
    run = from_files(CONFIGS / "axolotl-lora-1b.yml",
                     given={"model": "llama-3.2-3b", "batch_size": 1, "rank": 4, "seq_len": 512})
    assert run.model == "llama-3.2-3b"
    assert (run.kwargs["batch_size"], run.kwargs["rank"], run.kwargs["seq_len"]) == (1, 4, 512)
    assert run.kwargs["alpha"] == 32 and run.kwargs["optimizer"] == "adamw-8bit"  # the rest stays the file's
    # another method drops the knobs it does not read
    full = from_files(CONFIGS / "axolotl-lora-1b.yml", given={"method": "full"})
    assert full.method == {"method": "full"}


def test_adapter_config_sets_the_method(tmp_path):
    """A peft adapter_config.json: LoRA with DoRA (its rank, alpha, targets) over the training config's LoRA; a
    LoRA adapter on the 4-bit base of a QLoRA config stays QLoRA; IA3, prefix and prompt."""
    lora = tmp_path / "adapter_config.json"
    lora.write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, "use_rslora": true, '
                    '"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "task_type": "CAUSAL_LM", '
                    '"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}')
    run = from_files(None, lora)
    assert run.model == "meta-llama/Llama-3.2-1B"
    assert run.method == {"method": "lora", "rank": 4, "alpha": 8, "dora": True, "targets": ["q_proj", "v_proj"]}
    both = from_files(CONFIGS / "axolotl-qlora-1b.yml", lora)
    assert both.method["method"] == "qlora" and both.method["rank"] == 4 and both.method["double_quant"] is True
    assert both.training["seq_len"] == 2048
    e = estimate(both.model, **both.kwargs)
    assert e.params.trainable == estimate("llama-3.2-1b", method="qlora", rank=4, dora=True,
                                          targets="q_proj,v_proj").params.trainable
    for text, method in (('{"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"]}', "ia3"),
                         ('{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 30}', "prefix"),
                         ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 10}', "prompt")):
        path = tmp_path / f"{method}.json"
        path.write_text(text)
        r = from_files(None, path, given={"model": "llama-3.2-1b"})
        assert r.method["method"] == method
        estimate(r.model, **r.kwargs)  # the calculator takes it


def test_precision_words(tmp_path):
    """axolotl fp16: true (bf16 auto gives way) loads fp16 weights under fp16 autocast: peftcalc's fp16; bf16:
    false, fp16: false: fp32; TRL dtype bfloat16 without bf16 / fp16 keys: bf16 weights under bf16 autocast."""
    cases = (("base_model: meta-llama/Llama-3.2-1B\nfp16: true\n", "fp16"),
             ("base_model: meta-llama/Llama-3.2-1B\nbf16: false\n", "fp32"),
             ("model_name_or_path: meta-llama/Llama-3.2-1B\ndtype: bfloat16\n", "bf16"),
             ("model_name_or_path: meta-llama/Llama-3.2-1B\nbf16: false\n", "fp32"))
    for i, (text, precision) in enumerate(cases):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert from_files(path).training["precision"] == precision, text


def cli(capsys, *args):
    """`peftcalc ARGS` in this process: (exit code, stdout, stderr)."""
    from peftcalc.cli import main

    argv = sys.argv
    sys.argv = ["peftcalc", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_config_output_is_the_flags_output(capsys):
    """`estimate --config FILE`: one line naming the tool and the settings, then exactly what the flags print;
    the warning line on stderr."""
    code, out, err = cli(capsys, "estimate", "--config", CONFIGS / "llamafactory-lora-sft.yaml")
    assert code == 0, err
    first, rest = out.split("\n", 1)
    assert first.startswith("read LLaMA-Factory config") and "rank 8, alpha 16" in first
    code, flags_out, _ = cli(capsys, "estimate", "qwen2.5-7b", "--rank", "8", "--alpha", "16", "--targets",
                             "all-linear", "-b", "1", "-s", "2048", "--precision", "bf16", "--optimizer", FUSED,
                             "--grad-checkpointing", "--checkpoint-reentrant", "--trainer-loop", "--grad-accum", "8",
                             "--max-grad-norm", "1")
    assert rest == flags_out
    assert err == "" or (err.count("\n") == 1 and err.startswith("warning: not modelled")), err


def test_cli_flag_overrides_config(capsys):
    code, out, _ = cli(capsys, "estimate", "--config", CONFIGS / "trl-lora.yaml", "-b", "1", "--format", "json")
    import json

    assert code == 0 and json.loads(out)["training"]["batch_size"] == 1


@pytest.mark.parametrize("command", ["compare", "crossover"])
def test_cli_other_commands_read_the_config(capsys, command):
    code, out, err = cli(capsys, command, "--config", CONFIGS / "trl-lora.yaml")
    assert code == 0, err
    assert out.startswith("read TRL config")


# Keys whose TrainingSettings field arrives with the recipes issue: mapped once the field exists, named in the
# warning line until then (never dropped).
RECIPE_KEYS = (
    ("axolotl-lora-1b.yml", "grad_accum", 2, "gradient_accumulation_steps=2"),
    ("training-args.json", "max_grad_norm", 1.0, "max_grad_norm=1.0"),
    ("llamafactory-lora-sft.yaml", "grad_accum", 8, "gradient_accumulation_steps=8"),
)


@pytest.mark.parametrize("name,field,value,note", RECIPE_KEYS)
def test_recipe_keys_mapped_or_named(name, field, value, note):
    from peftcalc.training_configs.common import TRAINING_FIELDS

    model = CASES[name][0]
    run = from_files(CONFIGS / name, given={"model": model} if model else {})
    if field in TRAINING_FIELDS:
        assert run.training[field] == value
        assert note not in (run.warning() or "")
    else:
        assert field not in run.training
        assert note in run.warning()


def test_sweep_config():
    """sweep(config=...): the config's settings under the grid's (a list sweeps it), the settings line in attrs."""
    pytest.importorskip("pandas")
    import peftcalc

    df = peftcalc.sweep(config=str(CONFIGS / "trl-lora.yaml"), batch_size=[1, 2])
    assert list(df["batch_size"]) == [1, 2] and set(df["seq_len"]) == {2048} and set(df["model"]) == {"qwen2.5-0.5b"}
    one = estimate("qwen2.5-0.5b", **{**from_files(CONFIGS / "trl-lora.yaml").kwargs, "batch_size": 2})
    assert df["peak_bytes"].iloc[1] == one.memory.peak_bytes
    assert df.attrs["config"].startswith("read TRL config")


def test_measure_config_runs_the_harness(capsys, tmp_path):
    """measure --config: the config's run on the harness (fake tensors), a local model directory as the model."""
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"], '
                                           '"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
                                           '"intermediate_size": 128, "vocab_size": 512}')
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {model_dir}\nuse_peft: true\nlora_r: 4\nlora_dropout: 0.0\n"
                   "max_length: 32\nper_device_train_batch_size: 2\nbf16: false\noptim: adamw_torch\n")
    code, out, err = cli(capsys, "measure", "--config", cfg, "--device", "fake", "--steps", "2")
    assert code == 0, err
    assert out.startswith("read TRL config") and "outcome ok" in out


def test_deepspeed_and_fsdp_keys(tmp_path):
    """A DeepSpeed JSON (ZeRO-3, parameters offloaded, bf16) and FSDP options: the multi-GPU issue's sharding,
    offload and reshard_after_forward once this peftcalc has them (DeepSpeed bf16 keeps fp32 master weights:
    mixed-bf16), named in the warning line until then."""
    from peftcalc.training_configs.common import TRAINING_FIELDS

    (tmp_path / "ds_z3.json").write_text('{"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, '
                                         '"offload_param": {"device": "cpu"}}}')
    lf = tmp_path / "lf.yaml"
    lf.write_text((CONFIGS / "llamafactory-full-sft.yaml").read_text() + "deepspeed: ds_z3.json\n")
    ax = tmp_path / "ax.yaml"
    ax.write_text("base_model: meta-llama/Llama-3.2-1B\nfsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n"
                  "  fsdp_version: 2\n  reshard_after_forward: false\n")
    ds, fsdp = from_files(lf), from_files(ax)
    if "sharding" in TRAINING_FIELDS:
        assert (ds.training["sharding"], ds.training["offload"], ds.training["precision"]) == ("zero3", "params",
                                                                                               "mixed-bf16")
        assert (fsdp.training["sharding"], fsdp.training["reshard_after_forward"]) == ("fsdp", False)
    else:
        assert "DeepSpeed ZeRO stage 3" in ds.warning() and "ZeRO-Offload of the parameters" in ds.warning()
        assert "FSDP sharding" in fsdp.warning() and "reshard_after_forward" in fsdp.warning()
    missing = tmp_path / "missing.yaml"
    missing.write_text("base_model: meta-llama/Llama-3.2-1B\ndeepspeed: nowhere/ds.json\n")
    assert "DeepSpeed config file not found" in from_files(missing).warning()
