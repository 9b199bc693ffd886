"""The commands agree with each other: one --seq-len default, --method/-m on chart, --tasks forms on
storage, --format where the output is a table, one phase naming in `measure`, progress lines for a
matrix sweep in a log, and a resumed sweep that drops a torn last line."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from peftcalc.cli import app
from peftcalc.cli_options import measure_text

ROOT = Path(__file__).resolve().parents[2]
GOOD_ROWS = ROOT / "reports" / "data" / "ci.jsonl"
runner = CliRunner()

TINY_MATRIX = """
[models.t-llama]
model_type = "llama"
architectures = ["LlamaForCausalLM"]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 64
vocab_size = 128

[defaults]
device = "fake"
steps = 1
seq_len = 8

[[grid]]
model = "t-llama"
variant = [{method = "lora"}, {method = "full"}]
"""


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


# 1. --seq-len


def test_every_seq_len_defaults_to_512():
    defaults = {name: p.default for name, cmd in _commands().items() for p in cmd.params if p.name == "seq_len"}
    assert "crossover" in defaults and len(defaults) >= 5
    assert set(defaults.values()) == {512}, defaults
    assert "default 512" in _help("crossover")


def test_crossover_search_from_512_still_finds_the_crossing():
    result = runner.invoke(app, ["crossover", "tinyllama-1.1b", "--rank", "64", "--targets", "all-linear",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["start"] == 512 and r["crossover"] == 3827  # the README's number (peft#1514)
    assert r["scan"][0]["seq_len"] == 512


# 2. chart --method / -m


def test_chart_takes_method_repeated_or_comma_separated_and_methods_as_hidden_alias(monkeypatch, tmp_path):
    import reports.cli_api

    seen = []

    def fake_chart(model, batches, out, methods=None, **kw):
        seen.append(methods)
        return {"text": "ok"}

    monkeypatch.setattr(reports.cli_api, "breakdown_chart", fake_chart)
    out = str(tmp_path / "c.png")
    for args, expected in ((["-m", "lora", "-m", "full"], ["lora", "full"]),
                           (["--method", "lora,ia3"], ["lora", "ia3"]),
                           (["--methods", "lora,full"], ["lora", "full"]),
                           ([], None)):
        result = runner.invoke(app, ["chart", "gpt2", *args, "--out", out])
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected
    text = _help("chart")
    assert "--method" in text and "-m" in text and "--methods" not in text


# 3. and 4. storage --tasks and --format


def test_storage_tasks_help_names_every_form():
    text = _help("storage")
    assert "one number" in text and "1,10,100" in text and "1..100" in text
    assert "--format" in text and "table | json | csv | markdown" in text


def test_storage_accepts_a_single_number_and_a_list_with_each_format(tmp_path):
    pytest.importorskip("matplotlib")
    one = runner.invoke(app, ["storage", "gpt2", "--tasks", "5", "--format", "json", "--out", str(tmp_path / "a.png")])
    assert one.exit_code == 0, one.output
    rows = json.loads(one.stdout)
    assert rows and {"method", "per_task_bytes", "total_bytes_at_5"} <= set(rows[0])
    listed = runner.invoke(app, ["storage", "gpt2", "--tasks", "1,10,100", "--format", "csv",
                                 "--out", str(tmp_path / "b.png")])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[0].startswith("method,per_task_bytes")
    md = runner.invoke(app, ["storage", "gpt2", "--tasks", "1..10", "--format", "markdown",
                             "--out", str(tmp_path / "c.png")])
    assert md.exit_code == 0 and md.stdout.startswith("| method |"), md.output
    bad = runner.invoke(app, ["storage", "gpt2", "--format", "yaml", "--out", str(tmp_path / "d.png")])
    assert bad.exit_code != 0


def test_report_formats_the_error_summary(tmp_path):
    pytest.importorskip("matplotlib")
    result = subprocess.run([sys.executable, "-m", "peftcalc", "report", str(GOOD_ROWS), "--out",
                             str(tmp_path / "r"), "--format", "json"], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows and {"source", "method", "n", "median_abs_pct"} <= set(rows[0])
    assert any(r["method"] == "ALL" for r in rows)
    assert "wrote" in result.stderr
    assert "--format" in _help("report")


def test_chart_help_says_why_it_has_no_format():
    text = _help("chart")
    assert "no --format" in text and "compare --format" in text
    assert "format" not in {p.name for p in _commands()["chart"].params}


# 5. measure: one phase naming


def test_measure_text_names_measured_and_predicted_phases_alike():
    row = {"settings": {"model": "gpt2", "method": {"method": "lora"}, "device": "cpu"}, "outcome": "ok",
           "measured": {"peak_bytes": 2**20, "peak_phase": "backward", "step1_peak_bytes": 2**21,
                        "step1_peak_phase": "optimizer"},
           "predicted": {"peak_bytes": 2**20, "peak_phase": "backward:loss"}}
    lines = measure_text(row).splitlines()
    measured = next(x for x in lines if x.startswith("measured peak"))
    predicted = next(x for x in lines if x.startswith("predicted peak"))
    assert " in backward;" in measured and "in optimizer" in measured
    assert " in backward (at loss)" in predicted and "backward:loss" not in predicted


# 6. progress of a matrix sweep


def test_matrix_sweep_prints_one_line_per_row_when_stderr_is_not_a_terminal(tmp_path):
    pytest.importorskip("torch")
    matrix = tmp_path / "m.toml"
    matrix.write_text(textwrap.dedent(TINY_MATRIX))
    proc = subprocess.run([sys.executable, "-m", "peftcalc", "measure", "--matrix", str(matrix), "--out",
                           str(tmp_path / "o.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("[")]
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("[1/2] t-llama lora bf16 b1 s8 adamw-fused fake") and ": ok " in lines[0]
    assert lines[0].rstrip().endswith(("B", "KiB", "MiB", "GiB"))
    assert lines[1].startswith("[2/2] t-llama full")


def test_matrix_sweep_shows_a_bar_on_a_terminal(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    from measure.matrix import run_matrix

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    matrix = tmp_path / "m.toml"
    matrix.write_text(textwrap.dedent(TINY_MATRIX))
    summary = run_matrix(matrix, tmp_path / "o.jsonl")
    assert summary["ok"] == 2
    assert "[1/2]" not in err.getvalue() and "2/2" in err.getvalue()  # tqdm's counter, not the log lines


# 7. a torn last line is dropped on resume


def test_drop_torn_tail_cuts_half_a_line(tmp_path):
    from measure.matrix import drop_torn_tail

    p = tmp_path / "rows.jsonl"
    good = '{"key": "a"}\n{"key": "b"}\n'
    p.write_text(good + '{"key": "tr')
    assert drop_torn_tail(p) and p.read_text() == good
    assert not drop_torn_tail(p) and p.read_text() == good  # nothing more to drop
    p.write_text('{"key": "a"}\n{"key": "b"}')  # complete, only its newline missing: kept, closed
    assert not drop_torn_tail(p) and p.read_text() == good
    p.write_text('{"ke')  # the only line is torn
    assert drop_torn_tail(p) and p.read_text() == ""


def test_resumed_sweep_leaves_only_whole_lines(tmp_path):
    pytest.importorskip("torch")
    from measure.matrix import run_matrix

    matrix, out = tmp_path / "m.toml", tmp_path / "o.jsonl"
    matrix.write_text(textwrap.dedent(TINY_MATRIX))
    run_matrix(matrix, out, progress=False)
    first = out.read_text().splitlines()
    out.write_text(first[0] + "\n" + first[1][: len(first[1]) // 2])  # killed while writing row 2
    again = run_matrix(matrix, out, progress=False)
    assert (again["ran"], again["skipped_done"]) == (1, 1)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["key"] for x in lines)


def test_estimate_takes_the_devices_measure_takes_and_fake_is_the_cpu_figure():
    """measure runs on cuda | cpu | fake; estimate takes the same three. A fake-tensor trace counts what the
    CPU allocator would (the committed fake rows are predicted with device cpu), so fake answers cpu's figure."""
    from peftcalc import estimate

    fake, cpu = estimate("gpt2", device="fake"), estimate("gpt2", device="cpu")
    assert fake.memory.device == "cpu" and fake.memory.peak_bytes == cpu.memory.peak_bytes
    assert fake.memory.peak_bytes != estimate("gpt2", device="cuda").memory.peak_bytes
    r = runner.invoke(app, ["estimate", "gpt2", "--device", "fake", "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["memory"]["peak_bytes"] == cpu.memory.peak_bytes
    assert "cuda | cpu | fake" in " ".join(runner.invoke(app, ["estimate", "--help"]).stdout.split())


def test_vision_layers_is_one_name_in_the_api_and_on_the_command_line():
    """The API's vision_layers is --vision-layers (the old --unfreeze-vision-layers still works); an error
    names the API parameter in the API and the flag on the command line."""
    from peftcalc import estimate
    from peftcalc.errors import InputError

    a = runner.invoke(app, ["estimate", "llava-1.5-7b", "-m", "projector", "--vision-layers", "2", "-f", "json"])
    b = runner.invoke(app, ["estimate", "llava-1.5-7b", "-m", "projector", "--unfreeze-vision-layers", "2", "-f",
                            "json"])
    api = estimate("llava-1.5-7b", method="projector", vision_layers=2)
    assert json.loads(a.stdout)["params"]["trainable"] == json.loads(b.stdout)["params"]["trainable"] \
        == api.params.trainable
    with pytest.raises(InputError, match=r"^vision_layers applies to vision-language models"):
        estimate("gpt2", method="lora", vision_layers=1)
    p = subprocess.run([sys.executable, "-m", "peftcalc.cli", "estimate", "gpt2", "-m", "lora", "--vision-layers", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: --vision-layers applies to vision-language models; gpt2 is not one"


def test_api_errors_name_api_parameters_and_the_cli_shows_flags():
    """The older checks (rank, bottleneck, trainable layers, prefix length, crossover's limit) name the API
    parameter in the API's InputError and the flag in the CLI's one line."""
    from peftcalc import estimate
    from peftcalc.errors import InputError

    cases = [
        (dict(method="lora", rank=0), "rank must be a positive integer, got 0", ["-m", "lora", "--rank", "0"]),
        (dict(method="freeze", trainable_layers=13), "trainable_layers must be between 1 and the depth 12, got 13",
         ["-m", "freeze", "--trainable-layers", "13"]),
        (dict(method="prompt", num_virtual_tokens=0), "num_virtual_tokens must be a positive integer, got 0",
         ["-m", "prompt", "--num-virtual-tokens", "0"]),
        (dict(method="lora", prepare_kbit=True), "prepare_kbit applies to qlora", ["-m", "lora", "--prepare-kbit"]),
    ]
    for kw, api_text, flags in cases:
        with pytest.raises(InputError) as info:
            estimate("gpt2", **kw)
        assert str(info.value).startswith(api_text) and "--" not in str(info.value).split(";")[0]
        p = subprocess.run([sys.executable, "-m", "peftcalc.cli", "estimate", "gpt2", *flags],
                           capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith("error: --"), (flags, p.stderr)
