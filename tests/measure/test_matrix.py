"""Matrix files: parsing errors name the key and its line, grids expand as cartesian products,
and run_matrix appends rows as they finish, resumes, and records failures as outcomes."""

import json
import textwrap

import pytest

import measure.run
from measure.matrix import ROW_KEYS, done_keys, expand_matrix, load_matrix, run_matrix
from peftcalc.errors import InputError
from peftcalc.methods import KNOWN_METHODS, METHODS
from peftcalc.families import SUPPORTED_MODEL_TYPES
from measure.losses import FUSED_LOSS_PACKAGES
from peftcalc.settings import LOSSES, OPTIMIZERS, PAGED_OPTIMIZERS

TINY = """
[models.t-llama]
model_type = "llama"
architectures = ["LlamaForCausalLM"]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 64
vocab_size = 128
"""


def _write(tmp_path, text, name="m.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("text,message", [
    ('colour = "red"\n[[grid]]\nmodel = "gpt2"\n', r"line 1: unknown key 'colour' in the top level"),
    ('[defaults]\nbatch = 4\n[[grid]]\nmodel = "gpt2"\n', r"line 2: unknown key 'batch' in \[defaults\]"),
    ('[[grid]]\nmodel = "gpt2"\n\nlearning_rate = [1, 2]\n', r"line 4: unknown key 'learning_rate' in \[\[grid\]\]"),
    ('[[grid]]\nmodel = "gpt2"\nvariant = [\n  {method = "lora"},\n  {method = "lora", rnak = 4},\n]\n',
     r"line 5: unknown key 'rnak' in a variant table"),
    ('[[grid]]\nmodel = "gpt2"\nrank = "8"\n', r"line 3: 'rank' must be an integer, got '8'"),
    ('[[grid]]\nmodel = "gpt2"\ngrad_checkpointing = [1]\n', r"line 3: 'grad_checkpointing' must be true or false"),
    ('[[grid]]\nmodel = "gpt2"\nvariant = ["lora"]\n', r"line 3: 'variant' entries must be tables"),
    ('[defaults]\nmodel = "gpt2"\n', r"needs at least one \[\[grid\]\] table"),
    ('[[grid]\nmodel = "gpt2"\n', r"malformed matrix file"),
])
def test_parse_errors_name_the_key_and_line(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_matrix(_write(tmp_path, text))


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read matrix file"):
        load_matrix(tmp_path / "nope.toml")


def test_grid_is_a_cartesian_product_with_merged_variants_and_left_out_rows(tmp_path):
    path = _write(tmp_path, TINY + """
    [defaults]
    device = "fake"
    seq_len = 16

    [[grid]]
    model = "t-llama"
    variant = [{method = "lora"}, {method = "lora", targets = "all-linear", rank = 4}, {method = "bitfit"}]
    precision = ["fp32", "bf16"]

    [[grid]]
    model = "t-llama"
    method = "lora"
    precision = "fp32"
    """)
    runs, left_out = expand_matrix(load_matrix(path))
    # 3 variants x 2 precisions, bitfit left out (llama has no biases), the last grid a duplicate
    assert [(r.method.method, r.method.targets, r.method.rank, r.training.precision) for r in runs] == [
        ("lora", None, 8, "fp32"), ("lora", None, 8, "bf16"),
        ("lora", "all-linear", 4, "fp32"), ("lora", "all-linear", 4, "bf16"),
    ]
    assert all(r.device == "fake" and r.training.seq_len == 16 for r in runs)
    assert len(left_out) == 2 and all("needs bias terms" in why for _, why in left_out)


def test_shape_is_a_second_table_axis(tmp_path):
    path = _write(tmp_path, TINY + """
    [[grid]]
    model = "t-llama"
    device = "fake"
    variant = [{method = "lora"}, {method = "full"}]
    shape = [{batch_size = 1, seq_len = 64}, {batch_size = 4, seq_len = 16}]
    """)
    runs, _ = expand_matrix(load_matrix(path))
    assert [(r.method.method, r.training.batch_size, r.training.seq_len) for r in runs] == [
        ("lora", 1, 64), ("lora", 4, 16), ("full", 1, 64), ("full", 4, 16)]
    with pytest.raises(InputError, match="unknown key 'batch' in a shape table"):
        load_matrix(_write(tmp_path, '[[grid]]\nmodel = "gpt2"\nshape = [{batch = 4}]\n'))


def test_long_matrix_spans_the_design_shapes():
    """DESIGN.md's validation matrix at real shapes: batch 1 and 4, sequences 128 to 4096, every method
    on the text families, checkpointing on and off, fp32/bf16/amp-bf16."""
    runs, _ = expand_matrix(load_matrix("long"))
    assert all(r.device == "fake" for r in runs)
    assert {r.training.batch_size for r in runs} == {1, 4}
    assert min(r.training.seq_len for r in runs) == 128 and max(r.training.seq_len for r in runs) >= 4096
    assert {r.method.method for r in runs} == set(METHODS)
    assert {r.spec.model_type for r in runs} >= {"qwen2", "llama", "gpt2", "bert", "mixtral", "qwen3_moe"}
    assert {r.training.precision for r in runs} == {"fp32", "bf16", "amp-bf16"}
    assert {r.training.grad_checkpointing for r in runs} == {False, True}


def test_ci_matrix_covers_every_method_and_family_on_cpu(ci_matrix):
    runs, _ = expand_matrix(ci_matrix)
    cpu = [r for r in runs if r.device == "cpu"]
    assert {r.method.method for r in cpu} == set(KNOWN_METHODS)
    assert {r.spec.model_type for r in cpu} == set(SUPPORTED_MODEL_TYPES)
    assert {r.training.precision for r in cpu} >= {"fp32", "bf16", "amp-bf16"}
    # every optimizer but the paged ones (CUDA unified memory: gpu.toml), and every loss that runs on the CPU
    assert {r.training.optimizer for r in cpu} == set(OPTIMIZERS) - set(PAGED_OPTIMIZERS)
    # (TRL's fused LM head is logitless but runs torch ops on the CPU; Liger and CCE are Triton only)
    assert {r.training.loss for r in cpu} == set(LOSSES) - set(FUSED_LOSS_PACKAGES)
    assert {r.training.grad_accum > 1 for r in cpu} == {False, True}
    assert {r.training.keep_outputs for r in cpu} == {False, True}
    assert {r.training.max_grad_norm is None for r in cpu} == {False, True}
    fake_big = {r.spec.name for r in runs if r.device == "fake" and not r.spec.name.startswith("tiny")}
    assert {"llama-3.2-1b", "qwen2.5-0.5b", "llama-3.1-8b"} <= fake_big
    assert all(r.spec.num_layers == 2 and r.spec.hidden_size == 64 for r in cpu)


def test_gpu_matrix_parses_and_covers_the_validation_matrix():
    runs, _ = expand_matrix(load_matrix("gpu"))
    assert all(r.device == "cuda" for r in runs)
    assert {r.method.method for r in runs} == set(KNOWN_METHODS)
    assert {r.training.precision for r in runs} >= {"fp32", "bf16", "amp-bf16"}
    assert {r.training.batch_size for r in runs} >= {1, 4}
    assert {r.training.grad_checkpointing for r in runs} == {False, True}
    assert min(r.training.seq_len for r in runs) == 128 and max(r.training.seq_len for r in runs) >= 4096
    assert {r.spec.model_type for r in runs} == set(SUPPORTED_MODEL_TYPES)


def test_gpu_quick_matrix_is_a_short_first_pass():
    """The matrix a 30-minute GPU lease starts with: every method but BitFit on one model, both mixed
    and pure bf16, checkpointing on and off, plus a row or more of each other text and vision family."""
    runs, left_out = expand_matrix(load_matrix("gpu-quick"))
    assert not left_out and 50 <= len(runs) <= 80
    assert all(r.device == "cuda" for r in runs)
    one_b = [r for r in runs if r.spec.name == "llama-3.2-1b"]
    assert {r.method.method for r in one_b} == set(METHODS) - {"bitfit"}
    assert {r.spec.model_type for r in runs} >= {"llama", "mistral", "qwen2", "gpt2", "bert", "vit"}
    assert {r.training.grad_checkpointing for r in one_b} == {False, True}


ROWS = TINY + """
[defaults]
device = "fake"
steps = 1
seq_len = 8

[[grid]]
model = "t-llama"
variant = [{method = "lora"}, {method = "full"}, {method = "ia3"}]
"""


def test_run_matrix_appends_resumes_and_records_failures(tmp_path, monkeypatch):
    path, out = _write(tmp_path, ROWS), tmp_path / "out" / "rows.jsonl"
    real_execute = measure.run.execute

    def flaky(spec, method, *args):
        if method.method == "full":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if method.method == "ia3":
            raise ValueError("boom")
        return real_execute(spec, method, *args)

    monkeypatch.setattr(measure.run, "execute", flaky)
    summary = run_matrix(path, out, progress=False)
    assert (summary["ran"], summary["ok"], summary["oom"], summary["error"]) == (3, 1, 1, 1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["ok", "oom", "error"]
    assert rows[2]["error"] == "ValueError: boom" and rows[0]["measured"]["peak_bytes"] > 0

    again = run_matrix(path, out, progress=False)
    assert (again["ran"], again["skipped_done"]) == (0, 3)

    # a run killed mid-write leaves a broken last line; the rows before it still count as done
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + '\n{"key": "trunc')
    monkeypatch.setattr(measure.run, "execute", real_execute)
    third = run_matrix(path, out, progress=False)
    assert (third["ran"], third["skipped_done"], third["ok"]) == (1, 2, 1)
    assert len(done_keys(out)) == 3


def test_run_matrix_limit_and_subprocess_isolation(tmp_path):
    path, out = _write(tmp_path, ROWS), tmp_path / "rows.jsonl"
    summary = run_matrix(path, out, limit=1, progress=False, isolate=True)
    assert (summary["runs"], summary["ran"], summary["ok"]) == (1, 1, 1)
    row = json.loads(out.read_text())
    assert row["settings"]["method"]["method"] == "lora" and row["settings"]["model"] == "t-llama"


def test_cuda_rows_need_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error on machines without CUDA")
    with pytest.raises(InputError, match="has cuda rows"):
        run_matrix(_write(tmp_path, ROWS.replace('device = "fake"', 'device = "cuda"')), tmp_path / "o.jsonl")


def test_row_keys_cover_method_and_training_settings():
    assert {"rank", "targets", "batch_size", "seq_len", "precision", "optimizer", "device"} <= set(ROW_KEYS)
