"""The traced estimate (``peftcalc estimate --trace``, measure.traced): a trace of the real model on fake tensors
reported in estimate's format, for modelled families and for families peftcalc does not model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from measure.traced import traced_estimate, traced_spec
from peftcalc.api import estimate
from peftcalc.cli import app
from peftcalc.errors import InputError
from peftcalc.settings import TrainingSettings
from peftcalc.traced import Trace, approximate_step_flops

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
# Falcon (transformers models/falcon/configuration_falcon.py): a family peftcalc does not model
TINY_FALCON = {"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512}
# T5 (transformers models/t5/configuration_t5.py; decoder_start_token_id as every published T5 config sets it)
TINY_T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 64, "d_ff": 128,
           "num_layers": 2, "num_heads": 4, "vocab_size": 512, "decoder_start_token_id": 0, "pad_token_id": 0}
SMALL = ["--method", "lora", "--precision", "fp32", "--batch-size", "2", "--seq-len", "32"]


@pytest.fixture
def configs(tmp_path):
    paths = {}
    for name, config in (("llama", TINY_LLAMA), ("falcon", TINY_FALCON)):
        paths[name] = tmp_path / f"tiny-{name}.json"
        paths[name].write_text(json.dumps(config))
    return paths


def _committed_row(model: str, method: str, **training) -> dict:
    """The committed harness row (reports/data/ci.jsonl, matrix ci: 2 steps on fake tensors) of `model` with
    `method` at its defaults, AdamW, sdpa, no checkpointing and the `training` settings given."""
    for line in (ROOT / "reports" / "data" / "ci.jsonl").read_text().splitlines():
        row = json.loads(line)
        s, t = row["settings"], row["settings"]["training"]
        m = s["method"]
        if (s["model"], s["device"], m["method"], m["rank"], m["targets"], m["dora"]) != (model, "fake", method, 8, None, False):
            continue
        if (t["optimizer"], t["attention"], t["grad_checkpointing"]) == ("adamw", "sdpa", False) and all(
                t[k] == v for k, v in training.items()) and s["steps"] == 2 and row["outcome"] == "ok":
            return row
    raise AssertionError(f"no committed fake row of {model} {method} {training}")


def test_modelled_trace_is_the_harness_row_and_the_cpu_estimate(configs):
    """--trace of tiny-llama LoRA fp32 reports the harness's fake row (the committed one, of the same config in
    measure/matrices/ci.toml) to the byte; peftcalc's --device cpu
    estimate of the same settings is equal to the byte too (its logits/loss buffers are the tracer's "other",
    reported as temporaries)."""
    result = runner.invoke(app, ["estimate", str(configs["llama"]), "--trace", "--format", "json", *SMALL])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    row = _committed_row("tiny-llama", "lora", batch_size=2, seq_len=32, precision="fp32")
    measured = row["measured"]
    assert d["estimated_by"] == "traced" and d["trace"]["steps"] == 2 and d["trace"]["seconds"] > 0
    assert d["memory"]["peak_bytes"] == measured["peak_bytes"] == 1_475_432
    assert d["memory"]["step1_peak_bytes"] == measured["step1_peak_bytes"]
    assert d["memory"]["peak_phase"] == measured["peak_phase"] == "backward"
    assert sum(d["memory"]["components"].values()) == d["memory"]["peak_bytes"]
    assert (d["params"]["total"], d["params"]["trainable"]) == (row["params"]["total"], row["params"]["trainable"])
    modelled = estimate(str(configs["llama"]), method="lora", precision="fp32", batch_size=2, seq_len=32,
                        device="cpu")
    assert modelled.estimated_by == "modelled" and modelled.trace is None
    plain = modelled.to_dict()  # the same JSON schema (README's table): the same keys, down to the GPU rows
    assert set(d) == set(plain) and set(d["memory"]) == set(plain["memory"]) and set(d["gpus"][0]) == set(plain["gpus"][0])
    assert set(d["trace"]) == {"seconds", "steps", "step_reported", "counts", "flops", "max_batch_size"}
    assert d["memory"]["peak_bytes"] == modelled.memory.peak_bytes
    assert d["memory"]["step1_peak_bytes"] == modelled.memory.step1_peak_bytes
    traced_parts, parts = d["memory"]["components"], dict(modelled.memory.components)
    for name in ("weights_frozen", "weights_trainable", "buffers", "gradients", "optimizer_states", "activations",
                 "inputs"):
        assert traced_parts[name] == parts[name], name
    assert traced_parts["temporaries"] == parts["logits_loss"] + parts["temporaries"]
    assert d["params"]["total"] == modelled.params.total and d["params"]["trainable"] == modelled.params.trainable
    assert d["storage"]["per_task_bytes"] == modelled.storage.per_task_bytes
    assert d["cost"]["flops_per_step"] == modelled.cost.flops_per_step


def _real_falcon_lora(config: dict):
    """The real tiny Falcon with peft LoRA (r 8, peft's default targets), random weights on the CPU."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("falcon", **{k: v for k, v in config.items() if k != "model_type"}))
    return base, peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))


def test_unmodelled_family_is_traced_automatically(configs, tmp_path):
    """estimate of a Falcon config traces it, saying so on stderr; the counts are the real model's numel and
    the storage the files save_pretrained writes (adapter_model.safetensors, model.safetensors)."""
    result = runner.invoke(app, ["estimate", str(configs["falcon"]), "--format", "json", *SMALL])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("falcon is not modelled analytically; traced on fake tensors (")
    d = json.loads(result.stdout)
    torch.manual_seed(0)
    base, model = _real_falcon_lora(TINY_FALCON)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (d["params"]["total"], d["params"]["trainable"]) == (total, trainable) == (121_728, 2_560)
    assert d["estimated_by"] == "traced" and d["trace"]["flops"].startswith("approximate")
    assert sum(d["memory"]["components"].values()) == d["memory"]["peak_bytes"]
    assert d["memory"]["components"]["weights_trainable"] == 4 * trainable
    model.save_pretrained(tmp_path / "adapter")
    assert d["storage"]["per_task_bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert all(g["max_batch_size"] is None for g in d["gpus"])


def test_unmodelled_full_fine_tuning_counts_and_storage(configs, tmp_path):
    """Full fine-tuning of the tiny Falcon: every parameter trains, and the stored model is the file
    save_pretrained writes (tied embedding stored once)."""
    import transformers

    e = traced_estimate(str(configs["falcon"]), method="full", precision="fp32", batch_size=2, seq_len=32)
    config = transformers.AutoConfig.for_model("falcon", **{k: v for k, v in TINY_FALCON.items() if k != "model_type"})
    real = transformers.AutoModelForCausalLM.from_config(config)
    assert e.params.total == e.params.trainable == sum(p.numel() for p in real.parameters())
    real.save_pretrained(tmp_path / "full")
    assert e.storage.per_task_bytes == (tmp_path / "full" / "model.safetensors").stat().st_size
    # AdamW keeps two fp32 moments per parameter (and a step count per tensor) after step 1
    assert e.memory.components["optimizer_states"] >= 8 * e.params.total


def test_unmodelled_encoder_decoder(tmp_path):
    """T5 (an encoder-decoder: AutoModelForSeq2SeqLM, peft SEQ_2_SEQ_LM): LoRA's counts are the real model's;
    by hand: peft's T5 targets q and v in 6 attention modules (2 encoder self, 2 decoder self, 2 cross), each
    64 -> 4 heads x d_kv 64 = 256: A 8 x 64 + B 256 x 8, 12 times = 30,720."""
    import peft
    import transformers

    path = tmp_path / "t5.json"
    path.write_text(json.dumps(TINY_T5))
    e = traced_estimate(str(path), method="lora", precision="fp32", batch_size=1, seq_len=16)
    config = transformers.AutoConfig.for_model("t5", **{k: v for k, v in TINY_T5.items() if k != "model_type"})
    with torch.device("meta"):
        real = peft.get_peft_model(transformers.AutoModelForSeq2SeqLM.from_config(config),
                                   peft.LoraConfig(r=8, lora_alpha=16, task_type="SEQ_2_SEQ_LM"))
    assert e.params.total == sum(p.numel() for p in real.parameters())
    assert e.params.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad) == 12 * (8 * 64 + 256 * 8)
    assert e.architecture == "T5ForConditionalGeneration" and e.memory.peak_bytes > 0


def test_generic_flops_by_hand():
    """approximate_step_flops for M = 100,000 matmul parameters, 2,000 trainable, batch 2 x 32 tokens, hidden 64,
    2 layers: tokens 64; attention 4 x 2 x 32^2 x 64 x 2 = 1,048,576; forward 2 x 100,000 x 64 + attention =
    13,848,576; backward 2 x 2,000 x 64 + 2 x 100,000 x 64 + 2 x 1,048,576 = 15,153,152; total 29,001,728
    (with checkpointing the forward once more: 42,850,304; frozen: no input gradients, 14,104,576)."""
    trace = Trace(seconds=1.0, steps=2, peak_bytes=0, peak_phase="backward", step1_peak_bytes=0, categories={},
                  phase_peaks={}, params_total=120_000, params_trainable=2_000, by_origin={}, trainable_bytes=0,
                  buffer_bytes=0, matmul_params=100_000)
    spec = traced_spec(TINY_LLAMA)
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", device="cpu")
    assert approximate_step_flops(trace, t, spec, "lora") == 29_001_728
    ckpt = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", device="cpu", grad_checkpointing=True)
    assert approximate_step_flops(trace, ckpt, spec, "lora") == 42_850_304
    assert approximate_step_flops(trace, t, spec, "frozen") == 14_104_576


def test_unmodelled_errors_are_one_line(configs, tmp_path):
    """A method that needs peftcalc's blocks, and LoRA where peft has no default targets: InputErrors."""
    with pytest.raises(InputError, match="choose from full, frozen, bitfit, lora"):
        traced_estimate(str(configs["falcon"]), method="freeze", seq_len=32)
    starcoder = tmp_path / "starcoder2.json"
    starcoder.write_text(json.dumps({**TINY_FALCON, "model_type": "starcoder2", "architectures": ["Starcoder2ForCausalLM"],
                                     "intermediate_size": 128}))
    with pytest.raises(InputError, match="name them with --targets"):
        traced_estimate(str(starcoder), method="lora", seq_len=32)


def run_cli(*args, preamble=""):
    code = f"import sys\n{preamble}\nfrom peftcalc.cli import main\nsys.argv = ['peftcalc', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_unmodelled_without_the_harness_is_one_line(configs):
    """Without torch, an unmodelled family is one line naming the supported model types and the --trace route
    (exit 2), and --trace says which extra to install; a modelled config still never imports torch."""
    hidden = "sys.modules['torch'] = None"
    proc = run_cli("estimate", configs["falcon"], preamble=hidden)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "unsupported model_type 'falcon'; supported: llama" in lines[0]
    assert "--trace" in lines[0] and "pip install 'peftcalc[measure]'" in lines[0]
    proc = run_cli("estimate", configs["llama"], "--trace", preamble=hidden)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: peftcalc estimate needs torch, which is not installed: pip install 'peftcalc[measure]'")
    check = "import atexit\natexit.register(lambda: print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)))"
    proc = run_cli("estimate", configs["llama"], "--format", "csv", preamble=check)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr
