"""The harness's checkpointing modes: activation_checkpointing_enable(every_n_layers=N) wraps the layers
peftcalc.checkpointing names, reentrant checkpointing reaches the adapters, and rows record the new
settings only when they are not the defaults (so every earlier row keeps its key)."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from measure.build import build_model
from measure.matrix import expand_matrix, load_matrix, run_key, to_run
from measure.record import settings_record
from measure.run import measure_one
from measure.setup import forward_loss, make_batch, prepare_for_training, transformers_model
from peftcalc.checkpointing import checkpointed_layers, checkpointing_layer_stacks
from peftcalc.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def modes():
    return load_matrix("ckpt-modes")


def _run(modes, model, method, **training):
    return to_run({"model": model, "method": method, "batch_size": 2, "seq_len": 32, "grad_checkpointing": True,
                   **training}, modes["models"])


@pytest.mark.parametrize("model,method,every", [("tiny-llava3", "lora", 2), ("tiny-llava3", "lora", 3),
                                                ("tiny-blip2", "qformer", 3), ("tiny-llama4", "lora", 3)])
def test_wrapped_layers_are_the_calculators(modes, model, method, every):
    from transformers.modeling_layers import GradientCheckpointingLayer

    run = _run(modes, model, method, checkpoint_every=every)
    model_ = build_model(run.spec, run.method, dtype=torch.float32, device="cpu", attention="sdpa")
    prepare_for_training(model_, run.spec, run.training)
    real = [m.gradient_checkpointing for m in transformers_model(model_).modules()
            if isinstance(m, GradientCheckpointingLayer)]
    calc = [f for part, _ in checkpointing_layer_stacks(run.spec)
            for f in checkpointed_layers(run.spec, run.training, part)]
    assert real == calc


def test_reentrant_checkpointing_reaches_a_vision_models_adapters(modes):
    """CheckpointFunction runs each ViT layer under no_grad: without an input that requires grad its
    output would not either and LoRA would get no gradient; the harness hooks the patch embeddings."""
    run = _run(modes, "tiny-vit4", "lora", checkpoint_reentrant=True)
    model = build_model(run.spec, run.method, dtype=torch.float32, device="cpu", attention="sdpa")
    notes = prepare_for_training(model, run.spec, run.training)
    assert notes["input_require_grads"]
    forward_loss(model, run.spec, make_batch(run.spec, run.training, "cpu", torch.float32)).backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_default_modes_keep_every_committed_rows_key():
    """The new training fields enter a row's settings only when not default, so each committed ci row's
    key is its settings' key as before (run_matrix('ci', copy of ci.jsonl) resumes all 1130 runs)."""
    ci = load_matrix("ci")
    runs, _ = expand_matrix(ci)
    done = {json.loads(line)["key"] for line in (REPO / "reports" / "data" / "ci.jsonl").read_text().splitlines()}
    assert all(run_key(r) in done for r in runs)


def test_new_modes_are_recorded(modes):
    run = _run(modes, "tiny-llama4", "lora", checkpoint_every=2, checkpoint_reentrant=True)
    t = settings_record(run.spec, run.method, run.training, "cpu", 2)["training"]
    assert t["checkpoint_every"] == 2 and t["checkpoint_reentrant"] is True
    plain = settings_record(run.spec, run.method, _run(modes, "tiny-llama4", "lora").training, "cpu", 2)["training"]
    assert "checkpoint_every" not in plain and "checkpoint_reentrant" not in plain


def test_matrix_checks_the_new_keys(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent('[[grid]]\nmodel = "gpt2"\ncheckpoint_every = "2"\n'))
    with pytest.raises(InputError, match="line 3: 'checkpoint_every' must be an integer"):
        load_matrix(path)
    path.write_text(textwrap.dedent('[[grid]]\nmodel = "gpt2"\ncheckpoint_reentrant = 1\n'))
    with pytest.raises(InputError, match="'checkpoint_reentrant' must be true or false"):
        load_matrix(path)


def test_every_second_block_measured_as_committed(modes):
    """tiny-llama4 LoRA fp32 b2 s64 every 2 blocks, a cpu row of reports/data/ckpt-modes.jsonl (key
    3d238083adf4e2d3): 2,807,688 bytes, as the calculator predicts."""
    run = to_run({**modes["defaults"], "model": "tiny-llama4", "method": "lora", "checkpoint_every": 2},
                 modes["models"])
    row = measure_one(run.spec, run.method, run.training, device=run.device, steps=run.steps)
    assert row["key"] == "3d238083adf4e2d3"
    assert row["measured"]["peak_bytes"] == row["predicted"]["peak_bytes"] == 2_807_688
