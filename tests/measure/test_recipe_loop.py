"""The harness runs the recipe settings of issue 13 for real (measure.loop.train_step): N micro-batches with
their own phase peaks, the outputs kept through backward, clipping, torchtune's chunked loss, fused AdamW;
the calculator's prediction equals the trace to the byte. Paged optimizers are CUDA-only."""

import importlib.util

import pytest
import torch

from measure.losses import FUSED_LOSS_PACKAGES, chunked_cross_entropy, require_fused_loss
from measure.matrix import expand_matrix, load_matrix
from measure.run import measure_one
from measure.setup import check_run
from peftcalc.errors import InputError
from peftcalc.methods import MethodSettings
from peftcalc.settings import TrainingSettings


def test_a_recipe_step_is_traced_micro_batch_by_micro_batch(tiny):
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="bf16", optimizer="adamw-fused", grad_accum=2,
                         keep_outputs=True, max_grad_norm=1.0, loss="chunked", loss_chunks=3, device="cpu")
    row = measure_one(run.spec, run.method, t, device="fake", steps=2)
    assert row["outcome"] == "ok", row.get("error")
    m = row["measured"]
    assert set(m["steps"][-1]["phases"]) == {"forward@1", "backward@1", "forward@2", "backward@2", "optimizer"}
    phases = m["steps"][-1]["phases"]
    assert phases["forward@2"]["peak_bytes"] > phases["forward@1"]["peak_bytes"]  # every .grad alive
    assert row["predicted"]["peak_bytes"] == m["peak_bytes"]
    assert (row["predicted"]["peak_phase"].split(":")[0], m["peak_micro_batch"]) == (m["peak_phase"], 2)


def test_chunked_cross_entropy_is_the_full_one():
    logits, labels = torch.randn(2, 9, 11), torch.randint(0, 11, (2, 9))
    labels[0, 3] = -100
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(chunked_cross_entropy(logits, labels, 4), full)


def test_paged_optimizers_and_cuda_only_losses_are_refused_off_cuda(tiny):
    run = tiny("tiny-llama", method="lora")
    with pytest.raises(InputError, match="paging is CUDA-only"):
        check_run(run.spec, run.method, TrainingSettings(optimizer="paged-adamw-8bit", device="cpu"), "fake", 2)
    with pytest.raises(InputError, match=r"runs Triton kernels on CUDA only \(liger-kernel==0.8.5 has no CPU path\)"):
        check_run(run.spec, MethodSettings("lora"), TrainingSettings(loss="liger", device="cpu"), "cpu", 2)
    with pytest.raises(InputError, match=r"cut-cross-entropy==25.1.1 has no CPU path"):
        check_run(run.spec, MethodSettings("lora"), TrainingSettings(loss="cce", device="cpu"), "fake", 2)


@pytest.mark.parametrize("name,peak,step1", [("lion-8bit", 1_734_984, 1_567_816), ("lion-32bit", 2_124_104, 1_675_584)])
def test_bitsandbytes_lion_traced_on_fake_tensors(tiny, name, peak, step1):
    """bnb.optim.Lion(optim_bits=8|32), as transformers' lion_8bit / lion_32bit make it, traced on tiny-llama-gqa
    full fp32 (batch 2 x 32): the prediction is the trace (the committed ci rows, cpu and fake, are these)."""
    run = tiny("tiny-llama-gqa", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer=name, device="cpu")
    row = measure_one(run.spec, run.method, t, device="fake", steps=2)
    assert row["outcome"] == "ok", row.get("error")
    assert (row["measured"]["peak_bytes"], row["measured"]["step1_peak_bytes"]) == (peak, step1)
    assert row["predicted"]["peak_bytes"] == peak


@pytest.mark.parametrize("name", ["paged-lion-8bit", "paged-lion-32bit"])
def test_paged_lion_is_refused_off_cuda(tiny, name):
    run = tiny("tiny-llama", method="lora")
    with pytest.raises(InputError, match="paging is CUDA-only"):
        check_run(run.spec, run.method, TrainingSettings(optimizer=name, device="cpu"), "cpu", 2)


@pytest.mark.parametrize("loss,release", [("liger", "liger-kernel==0.8.5"), ("cce", "cut-cross-entropy==25.1.1")])
def test_a_fused_loss_on_cuda_needs_its_package(loss, release):
    module = FUSED_LOSS_PACKAGES[loss][0]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(InputError, match=f"loss {loss} needs {release}"):
        require_fused_loss(loss, "cuda", "llama")


def test_the_gpu_matrix_keeps_its_cuda_only_rows():
    """Expanded on a machine without CUDA or the fused losses' packages, gpu.toml keeps the rows only a GPU runs:
    the paged optimizers and Liger / Cut Cross-Entropy (checked for the settings alone, measure.setup.check_run
    here=False)."""
    runs, _ = expand_matrix(load_matrix("measure/matrices/gpu.toml"))
    paged = {r.training.optimizer for r in runs if r.training.optimizer.startswith("paged")}
    assert paged == {"paged-adamw-8bit", "paged-adamw-32bit", "paged-lion-8bit", "paged-lion-32bit"}
    fused = [(r.spec.name, r.method.method, r.training.loss) for r in runs if r.training.loss in ("liger", "cce")]
    assert len(fused) == 10 and ("llama-3.1-8b", "qlora", "cce") in fused and ("llama-3.2-1b", "full", "liger") in fused
