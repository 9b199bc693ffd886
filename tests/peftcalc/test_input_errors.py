"""Bad input is one InputError naming the API parameter (API) or one line on stderr naming the flag with
exit code 2 (CLI): never a traceback, never a silently dropped setting or an absurd answer."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import peftcalc
from peftcalc.checks import MAX_TOKENS_PER_STEP
from peftcalc.crossover import crossover
from peftcalc.errors import InputError

CONFIGS = Path(__file__).parent / "configs"


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size="2"), "batch_size must be a positive integer, got '2' (str)"),
    (dict(seq_len=None), "seq_len must be a positive integer, got None"),
    (dict(batch_size=2.5), "batch_size must be a positive integer, got 2.5 (float)"),
    (dict(batch_size=True), "batch_size must be a positive integer, got True (bool)"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(targets=5), "targets must be comma-separated module names"),
    (dict(targets=["q_proj", 5]), "targets must be"),
    (dict(targets=""), "targets: empty"),
    (dict(targets=" , "), "targets: empty"),
    (dict(targets=[]), "targets: empty"),
    (dict(gpu="H100", price=float("nan")), "price must be a finite number >= 0 (USD per hour), got nan"),
    (dict(gpu="H100", price=float("inf")), "price must be a finite number >= 0 (USD per hour), got inf"),
    (dict(gpu="H100", price=-1.0), "price must be"),
    (dict(price=2.0), "price needs gpu"),
    (dict(gpu=5), "gpu must be a GPU name"),
    (dict(mfu=float("nan")), "mfu must be in [0.001, 1] (model FLOPs utilisation), got nan"),
    (dict(mfu=0), "mfu must be in [0.001, 1]"),
    (dict(alpha=-5), "alpha must be a positive number, got -5"),
    (dict(alpha=True), "alpha must be a positive number, got True"),
    (dict(rank=True), "rank must be a positive integer, got True (bool)"),
    (dict(rank=0), "rank must be a positive integer, got 0"),
    (dict(dora="yes"), "dora must be True or False"),
    (dict(tasks=1.5), "tasks must be a positive integer"),
    (dict(dataset_tokens="x"), "dataset_tokens must be a positive integer"),
    (dict(grad_checkpointing="yes"), "grad_checkpointing must be True or False"),
    (dict(grad_checkpointing=True, checkpoint_every=2.0), "checkpoint_every must be a positive integer"),
    (dict(precision=["bf16"]), "unknown precision"),
    (dict(method=7), "unknown method 7"),
    (dict(batch_size=10**20), "batch_size x seq_len must be at most 2,147,483,648 tokens per step"),
    (dict(seq_len=2**40), "batch_size x seq_len must be at most"),
    (dict(batch_size=2**22, seq_len=1024), "batch_size x seq_len must be at most"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_estimate_arguments_are_input_errors_naming_the_parameter(kw, message):
    with pytest.raises(InputError) as info:
        peftcalc.estimate("llama-3.2-1b", **kw)
    assert message in str(info.value)
    assert "--" not in str(info.value)  # API names, not CLI flags


@pytest.mark.parametrize("model", [None, 7, "", 3.5, ["gpt2"]])
def test_bad_model_argument_is_an_input_error(model):
    with pytest.raises(InputError, match="model must be a registry name"):
        peftcalc.estimate(model)


@pytest.mark.parametrize("method,knob,value", [
    ("full", "rank", 16),
    ("full", "rank", 8),  # given, even at the default, it is not read
    ("full", "dora", True),
    ("frozen", "alpha", 16),
    ("freeze", "rank", 4),
    ("bitfit", "targets", "q_proj"),
    ("adapter", "dora", True),
    ("prefix", "rank", 4),
    ("prompt", "alpha", 8),
    ("ia3", "rank", 4),
    ("lora", "trainable_layers", 2),
    ("full", "trainable_layers", 2),
    ("lora", "bottleneck", 8),
    ("lora", "adapter_kind", "pfeiffer"),
    ("full", "num_virtual_tokens", 5),
    ("lora", "num_virtual_tokens", 5),
    ("lora", "prepare_kbit", False),
    ("lora", "prepare_kbit", True),
    ("lora", "double_quant", False),
    ("full", "double_quant", True),
])
def test_a_knob_the_method_does_not_read_is_an_input_error(method, knob, value):
    with pytest.raises(InputError) as info:
        peftcalc.estimate("llama-3.2-1b", method=method, **{knob: value})
    assert f"{knob} applies to" in str(info.value) and f"method '{method}'" in str(info.value)


def test_vision_layers_is_refused_where_the_method_does_not_unfreeze_them():
    with pytest.raises(InputError, match="vision_layers applies to projector, projector-llm, lora; method 'adapter'"):
        peftcalc.estimate(str(CONFIGS / "llava_tiny.json"), method="adapter", vision_layers=1, seq_len=32)
    assert peftcalc.estimate(str(CONFIGS / "llava_tiny.json"), method="projector", vision_layers=1, seq_len=32)


def test_knobs_the_method_reads_and_valid_numbers_still_work():
    lora = peftcalc.estimate("llama-3.2-1b", method="lora", rank=16, alpha=32, dora=True, targets="q_proj,v_proj")
    assert lora.method.rank == 16 and lora.method.dora
    q = peftcalc.estimate("llama-3.2-1b", method="qlora", double_quant=False, prepare_kbit=False)
    assert not q.method.double_quant and not q.method.prepare_kbit
    assert peftcalc.estimate("llama-3.2-1b", method="adapter", bottleneck=8, adapter_kind="pfeiffer").params.trainable
    assert peftcalc.estimate("llama-3.2-1b", method="prompt", num_virtual_tokens=5).params.trainable == 5 * 2048
    assert peftcalc.estimate("llama-3.2-1b", method="freeze", trainable_layers=2).params.trainable
    assert peftcalc.estimate("llama-3.2-1b", method="ia3", targets="k_proj,v_proj").params.trainable
    e = peftcalc.estimate("llama-3.2-1b", batch_size=np.int64(2), seq_len=np.int64(256), gpu="H100", price=1.5)
    assert e.cost.price_per_hour == 1.5
    assert peftcalc.estimate("llama-3.2-1b", alpha=0.5).method.alpha == 0.5
    assert peftcalc.estimate(CONFIGS / "gpt2_base.json", seq_len=32).model.endswith("gpt2_base.json")  # a Path
    biggest = peftcalc.estimate("llama-3.2-1b", batch_size=1, seq_len=MAX_TOKENS_PER_STEP)
    assert biggest.memory.peak_bytes > 0


def test_sweep_and_compare_still_give_one_grid_of_knobs_to_every_method():
    """The applicability check is for a user's single estimate: a sweep's rank reaches full and adapter
    rows (api._memory_key), compare gives rank and targets to the methods that read them."""
    df = peftcalc.sweep("gpt2", method=["full", "lora", "adapter"], rank=[4, 16], seq_len=[64])
    assert len(df) == 6 and df["error"].isna().all()
    from peftcalc.compare import compare_methods

    rows = compare_methods("gpt2", rank=16, targets="c_attn", seq_len=64)
    assert {r["method"] for r in rows if "trainable" in r} >= {"full", "lora", "qlora", "adapter", "ia3"}


def test_crossover_refuses_a_knob_its_method_does_not_read():
    with pytest.raises(InputError, match="rank applies to lora, qlora; method 'ia3'"):
        crossover("gpt2", method="ia3", rank=4)


def test_sweep_empty_list_is_an_input_error():
    with pytest.raises(InputError, match="^batch_size: empty list$"):
        peftcalc.sweep("gpt2", batch_size=[])
    with pytest.raises(InputError, match="^model: empty list$"):
        peftcalc.sweep([], batch_size=[1])


def test_sweep_takes_a_list_of_models_with_a_model_column():
    both = peftcalc.sweep(["gpt2", "llama-3.2-1b"], method=["full", "lora"], batch_size=[1, 2], seq_len=[64])
    assert len(both) == 8 and list(both["model"].unique()) == ["gpt2", "llama-3.2-1b"]
    for name in ("gpt2", "llama-3.2-1b"):
        alone = peftcalc.sweep(name, method=["full", "lora"], batch_size=[1, 2], seq_len=[64])
        mine = both[both["model"] == name].reset_index(drop=True)
        assert mine.equals(alone), name


@pytest.mark.parametrize("values", [(1, 2), range(1, 3), (b for b in (1, 2)), np.array([1, 2]), {1: "a", 2: "b"}.keys()],
                         ids=["tuple", "range", "generator", "ndarray", "dict-keys"])
def test_sweep_takes_any_iterable_as_a_value(values):
    df = peftcalc.sweep("gpt2", batch_size=values, seq_len=[64])
    assert list(df["batch_size"]) == [1, 2] and df["error"].isna().all()


def test_sweep_targets_one_setting_or_a_list_of_settings():
    one = peftcalc.sweep("gpt2", targets=["c_attn", "c_proj"], seq_len=[64])
    assert len(one) == 1
    many = peftcalc.sweep("gpt2", targets=[None, ["c_attn", "c_fc"], "all-linear"], seq_len=[64])
    assert len(many) == 3 and many["params_trainable"].is_monotonic_increasing and many["params_trainable"].is_unique


def test_sweep_unknown_keyword_lists_the_valid_names():
    with pytest.raises(InputError) as info:
        peftcalc.sweep("gpt2", batch=[1, 2])
    text = str(info.value)
    assert "unknown argument(s) batch;" in text and "batch_size" in text and "seq_len" in text and "rank" in text
    with pytest.raises(InputError, match="no time, cost or storage"):
        peftcalc.sweep("gpt2", gpu=["H100"])  # a sweep row has no time or cost: not silently ignored


def test_sweep_bad_value_is_an_input_error_not_a_type_error():
    with pytest.raises(InputError, match="batch_size must be a positive integer, got '2'"):
        peftcalc.sweep("gpt2", batch_size=[1, "2"])


def _config(name: str, **changes) -> dict:
    return {**json.loads((CONFIGS / name).read_text()), **changes}


@pytest.mark.parametrize("name,key,value", [
    ("gpt2_base.json", "tie_word_embeddings", "yes"),
    ("gpt2_base.json", "tie_word_embeddings", 1),
    ("gpt2_base.json", "tie_word_embeddings", None),
    ("bert_base.json", "tie_word_embeddings", "false"),
    ("llama_base.json", "attention_bias", "no"),
    ("llama_base.json", "mlp_bias", 0),
    ("vit_base.json", "qkv_bias", "true"),
    ("llava_tiny.json", "tie_word_embeddings", "yes"),
    ("blip2_tiny.json", "use_decoder_only_language_model", "yes"),
])
def test_config_bool_fields_must_be_json_booleans(name, key, value):
    """transformers' config classes refuse them (StrictDataclassFieldValidationError: "expected bool")."""
    with pytest.raises(InputError, match=f"'{key}' must be true or false"):
        peftcalc.estimate(_config(name, **{key: value}), method="full" if "blip2" not in name else None, seq_len=32)


def test_blip2_sub_config_bool_fields_must_be_json_booleans():
    config = _config("blip2_tiny.json")
    config["text_config"] = {**config["text_config"], "enable_bias": "yes"}
    with pytest.raises(InputError, match="text_config: 'enable_bias' must be true or false"):
        peftcalc.estimate(config, seq_len=32)


def test_empty_id2label_is_an_input_error_unless_num_labels_is_given():
    """AutoConfig.for_model("bert", id2label={}).num_labels == 0 (transformers 5.23): no classifier to train."""
    with pytest.raises(InputError, match="'id2label' is empty"):
        peftcalc.estimate(_config("bert_cls.json", id2label={}), method="full", seq_len=32)
    three = peftcalc.estimate(_config("bert_cls.json", id2label={}, num_labels=3), method="full", seq_len=32)
    two = peftcalc.estimate(_config("bert_cls.json", id2label={"0": "a", "1": "b"}), method="full", seq_len=32)
    hidden = _config("bert_cls.json")["hidden_size"]
    assert three.params.total - two.params.total == hidden + 1  # one more label: a weight row and a bias
    with pytest.raises(InputError, match="'id2label' must be an object"):
        peftcalc.estimate(_config("bert_cls.json", id2label=[]), method="full", seq_len=32)
    with pytest.raises(InputError, match="'num_labels' must be a positive integer"):
        peftcalc.estimate({k: v for k, v in _config("bert_cls.json", num_labels="3").items() if k != "id2label"},
                          method="full", seq_len=32)


@pytest.mark.parametrize("args,message", [
    (["--price", "2"], "error: --price needs --gpu"),
    (["--targets", ""], "error: --targets: empty"),
    (["--method", "full", "--rank", "16"], "error: --rank applies to lora, qlora; method 'full' does not read it"),
    (["--method", "full", "--dora"], "error: --dora applies to lora, qlora; method 'full'"),
    (["--method", "bitfit", "--alpha", "4"], "error: --alpha applies to lora, qlora; method 'bitfit'"),
    (["--method", "lora", "--trainable-layers", "2"], "error: --trainable-layers applies to freeze; method 'lora'"),
    (["--method", "lora", "--bottleneck", "8"], "error: --bottleneck applies to adapter; method 'lora'"),
    (["--method", "lora", "--adapter-kind", "pfeiffer"], "error: --adapter-kind applies to adapter; method 'lora'"),
    (["--method", "full", "--num-virtual-tokens", "5"], "error: --num-virtual-tokens applies to prefix, prompt"),
    (["--method", "lora", "--no-prepare-kbit"], "error: --prepare-kbit applies to qlora; method 'lora'"),
    (["--method", "lora", "--no-double-quant"], "error: --double-quant applies to qlora; method 'lora'"),
    (["--batch-size", str(10**20)], "error: --batch-size x --seq-len must be at most 2,147,483,648 tokens per step"),
    (["--gpu", "H100", "--price", "nan"], "error: --price must be a finite number >= 0 (USD per hour), got nan"),
    (["--gpu", "H100", "--price", "inf"], "error: --price must be a finite number >= 0 (USD per hour), got inf"),
    (["--mfu", "nan"], "error: --mfu must be in [0.001, 1] (model FLOPs utilisation), got nan"),
    (["--alpha", "-5"], "error: --alpha must be a positive number, got -5"),
    (["--batch-size", "2.5"], "error: Invalid value for '--batch-size'"),
    (["--no-such-flag"], "error: No such option: --no-such-flag"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "peftcalc", "estimate", "gpt2", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_cli_flags_for_the_method_still_work():
    proc = subprocess.run([sys.executable, "-m", "peftcalc", "estimate", "gpt2", "--method", "qlora", "--rank", "4",
                           "--no-double-quant", "--no-prepare-kbit", "--gpu", "H100", "--price", "2",
                           "--format", "json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["method"]["double_quant"] is False and d["method"]["rank"] == 4 and d["cost"]["price_per_hour"] == 2
    assert not math.isnan(d["cost"]["epoch_cost_usd"])
