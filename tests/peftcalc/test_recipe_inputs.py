"""Bad recipe settings (issue 13: grad_accum, loss, loss_chunks, max_grad_norm, optimizer, keep_outputs):
one InputError naming the parameter (API), one line and exit code 2 (CLI), on estimate and sweep."""

import sys

import pytest

import peftcalc
from peftcalc.cli import main
from peftcalc.errors import CombinationError, InputError


@pytest.mark.parametrize("kw,message", [
    (dict(grad_accum=0), "grad_accum must be a positive integer, got 0"),
    (dict(grad_accum=-2), "grad_accum must be a positive integer, got -2"),
    (dict(grad_accum=2.0), "grad_accum must be a positive integer, got 2.0 (float)"),
    (dict(loss_chunks=0), "loss_chunks must be a positive integer, got 0"),
    (dict(max_grad_norm=0), "max_grad_norm must be a finite number > 0, got 0"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number > 0, got -1.0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number > 0, got nan"),
    (dict(optimizer="lion"), "unknown optimizer 'lion'"),
    (dict(loss="focal"), "unknown loss 'focal'"),
    (dict(keep_outputs="yes"), "keep_outputs must be True or False"),
    (dict(offload_activations=1), "offload_activations must be True or False"),
    (dict(offload_activations=True, keep_outputs=True), "offload_activations with keep_outputs is not modelled"),
    (dict(offload_activations=True, grad_accum=2), "offload_activations with grad_accum 2 (modelled: 1) is not modelled"),
    (dict(optimizer="paged-adamw-8bit", device="cpu"), "paging is CUDA-only"),
    (dict(optimizer="paged-adamw-32bit", device="cpu"), "paging is CUDA-only"),
    (dict(optimizer="paged-lion-8bit", device="cpu"), "paging is CUDA-only"),
    (dict(optimizer="paged-lion-32bit", device="cpu"), "paging is CUDA-only"),
    (dict(optimizer="lion-16bit"), "unknown optimizer 'lion-16bit'"),
    (dict(keep_outputs=True, loss="liger"), "keep_outputs keeps the logits, but loss liger returns none"),
    (dict(keep_outputs=True, loss="cce"), "loss cce returns none"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_recipe_arguments_are_input_errors(kw, message):
    with pytest.raises(InputError) as info:
        peftcalc.estimate("llama-3.2-1b", **kw)
    assert message in str(info.value)
    assert "--" not in str(info.value)


def test_a_loss_other_than_the_models_needs_a_causal_lm():
    with pytest.raises(CombinationError, match="loss chunked replaces a causal language model's cross-entropy"):
        peftcalc.estimate("bert-base", loss="chunked")
    with pytest.raises(CombinationError, match="vision-language"):
        peftcalc.estimate("llava-1.5-7b", loss="chunked")


def test_sweep_keeps_a_loss_that_does_not_apply_as_a_row_with_its_reason():
    df = peftcalc.sweep("bert-base", loss=["hf", "chunked"], seq_len=16)
    assert df["error"].isna().tolist() == [True, False]
    assert "replaces a causal language model's" in df["error"][1]


@pytest.mark.parametrize("args,message", [
    (["--grad-accum", "0"], "--grad-accum must be a positive integer, got 0"),
    (["--loss-chunks", "0"], "--loss-chunks must be a positive integer, got 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be a finite number > 0, got 0.0"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--loss", "focal"], "unknown loss 'focal'"),
    (["--optimizer", "paged-adamw-8bit", "--device", "cpu"], "paging is CUDA-only"),
    (["--optimizer", "paged-lion-8bit", "--device", "cpu"], "paging is CUDA-only"),
    (["--keep-outputs", "--loss", "liger"], "returns none"),
    (["--offload-activations", "--method", "qlora"], "--offload-activations with method qlora (modelled: full, lora) is not "
                                                     "modelled; the harness traces it"),
])
def test_cli_bad_recipe_flags_are_one_line_exit_2(args, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peftcalc", "estimate", "llama-3.2-1b", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
