"""Bad input to the command line: one line on stderr, exit code 2, never a traceback or a silent wrong
answer (binary files, over-long names, outputs that cannot be written, out-of-range limits, missing
optional packages); full option names in the help at 80 columns; the measure command's device."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from peftcalc.cli import app

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).parent / "configs"
GOOD_ROWS = ROOT / "reports" / "data" / "ci.jsonl"
LONG_NAME = "a" * 300


def run_cli(*args, env=None, preamble=""):
    """`python -m peftcalc ARGS` (with `preamble` run first, e.g. to hide a package)."""
    code = f"import sys\n{preamble}\nfrom peftcalc.cli import main\nsys.argv = ['peftcalc', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(proc, message):
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.fixture
def files(tmp_path):
    """Paths of bad and good input files."""
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    binary = tmp_path / "ls"
    shutil.copy("/bin/ls", binary)
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"a": 1}\n[1, 2]\n')
    good = tmp_path / "good.jsonl"
    good.write_text("".join(GOOD_ROWS.read_text().splitlines(keepends=True)[:3]))
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text(good.read_text())
    unreadable.chmod(0)
    return {"png": png, "binary": binary, "a_file": a_file, "empty": empty, "wrong": wrong, "good": good,
            "unreadable": unreadable, "tmp": tmp_path}


CASES = {
    "estimate a binary file": (["estimate", "{binary}"], "not UTF-8 text"),
    "estimate a PNG": (["estimate", "{png}"], "not UTF-8 text"),
    "report a binary file": (["report", "{binary}", "--out", "{tmp}/r"], "is not a text file"),
    "300-character model name": (["estimate", LONG_NAME], "(300 characters): too long"),
    "300-character model name, table": (["table", LONG_NAME], "(300 characters): too long"),
    "300-character model name, measure": (["measure", LONG_NAME, "--device", "cpu"], "(300 characters): too long"),
    "300-character matrix name": (["measure", "--matrix", LONG_NAME, "--out", "{tmp}/m.jsonl"], "no matrix file"),
    "report --out naming a file": (["report", "{good}", "--out", "{a_file}"], "is a file; give a folder"),
    "measure --out in /proc": (["measure", "--matrix", "ci", "--out", "/proc/x.jsonl"], "cannot write --out"),
    "measure --out a folder": (["measure", "--matrix", "ci", "--out", "{tmp}"], "is a folder"),
    "storage --out in /proc": (["storage", "gpt2", "--out", "/proc/x.png"], "cannot write --out"),
    "chart --out in /proc": (["chart", "gpt2", "--out", "/proc/x.png"], "cannot write --out"),
    "report --out in /proc": (["report", "{good}", "--out", "/proc/x"], "cannot write --out"),
    "report --out under /proc": (["report", "{good}", "--out", "/proc/x/y"], "cannot create the folder"),
    "report an unreadable file": (["report", "{unreadable}", "--out", "{tmp}/r"], "cannot read result file"),
    "report a missing file": (["report", "{tmp}/none.jsonl", "--out", "{tmp}/r"], "no such result file"),
    "report an empty file": (["report", "{empty}", "--out", "{tmp}/r"], "empty.jsonl is empty"),
    "report a wrong-schema file": (["report", "{wrong}", "--out", "{tmp}/r"],
                                   "wrong.jsonl has no harness result rows (2 lines: 2 JSON without 'settings')"),
    "storage a billion tasks": (["storage", "llama-2-7b", "--tasks", "1..1000000000", "--out", "{tmp}/s.png"],
                                "has 1,000,000,000 task counts, more than 10,000"),
    "storage tasks from 0": (["storage", "llama-2-7b", "--tasks", "0..1000000000", "--out", "{tmp}/s.png"],
                             "--tasks must be positive integers"),
    "storage --out x.jpg": (["storage", "llama-2-7b", "--out", "{tmp}/x.jpg"], "unsupported suffix '.jpg'"),
    "chart --out x.pdf": (["chart", "gpt2", "--out", "{tmp}/x.pdf"], "unsupported suffix '.pdf'"),
    "measure --limit -1": (["measure", "--matrix", "ci", "--limit", "-1", "--out", "{tmp}/m.jsonl"],
                           "--limit must be a non-negative integer, got -1"),
    "crossover --limit 0": (["crossover", "gpt2", "--limit", "0"], "--limit must be a positive integer, got 0"),
    "crossover --limit -5": (["crossover", "gpt2", "--limit", "-5"], "--limit must be a positive integer"),
    "chart --methods lora,foo": (["chart", "gpt2", "--methods", "lora,foo", "--out", "{tmp}/c.png"],
                                 "--method: unknown method foo;"),
    "chart --methods bitfit on llama": (["chart", "llama-3.2-1b", "--methods", "bitfit", "--out", "{tmp}/c.png"],
                                        "method 'bitfit' needs bias terms, and llama-3.2-1b has none"),
    "chart --precision fp8": (["chart", "gpt2", "--precision", "fp8", "--out", "{tmp}/c.png"],
                              "unknown precision 'fp8'"),
    "measure one run with --out": (["measure", "gpt2", "--out", "{tmp}/m.jsonl"], "--out goes with --matrix"),
    "measure --device tpu": (["measure", "gpt2", "--device", "tpu"], "unknown device 'tpu'; choose from cuda, cpu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files):
    if case == "report an unreadable file" and os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode")
    args, message = CASES[case]
    proc = run_cli(*(a.format(**files) for a in args))
    assert_one_line_error(proc, message)
    assert not any(files["tmp"].glob("x.*")) and not (files["tmp"] / "r").exists()  # nothing written


def test_chart_names_the_methods_it_leaves_out(tmp_path):
    proc = run_cli("chart", "llama-3.2-1b", "--methods", "lora,bitfit", "--batch-size", "1", "--out", tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    assert "left out bitfit: method 'bitfit' needs bias terms, and llama-3.2-1b has none" in proc.stdout


def test_run_matrix_refuses_a_negative_limit(tmp_path):
    from measure.matrix import run_matrix
    from peftcalc.errors import InputError

    with pytest.raises(InputError, match="--limit must be a non-negative integer"):
        run_matrix("ci", tmp_path / "m.jsonl", limit=-1)
    assert not (tmp_path / "m.jsonl").exists()


def test_measure_device_is_checked_before_torch_is_imported():
    proc = run_cli("measure", "gpt2", "--device", "tpu", preamble="sys.modules['torch'] = None")
    assert_one_line_error(proc, "unknown device 'tpu'")


def test_report_warns_once_about_skipped_lines(files):
    corrupt = files["tmp"] / "corrupt.jsonl"
    corrupt.write_text(files["good"].read_text() + "{torn line\n" + '{"no": "settings"}\n')
    proc = run_cli("report", corrupt, "--out", files["tmp"] / "report")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"warning: skipped 2 of 5 lines (1 not JSON, 1 JSON without "
                                                f"'settings') of {corrupt}"]
    assert (files["tmp"] / "report" / "report.md").is_file()


MISSING_EXTRAS = [
    ("pandas", ["table", "gpt2"], "table", "reports"),
    ("pandas", ["storage", "gpt2", "--out", "{tmp}/s.png"], "storage", "reports"),
    ("matplotlib", ["chart", "gpt2", "--out", "{tmp}/c.png"], "chart", "reports"),
    ("pandas", ["report", "{good}", "--out", "{tmp}/r"], "report", "reports"),
    ("torch", ["measure", "gpt2", "--device", "cpu"], "measure", "measure"),
    ("transformers", ["measure", "--matrix", "ci", "--out", "{tmp}/m.jsonl"], "measure", "measure"),
]


@pytest.mark.parametrize("module,args,command,extra", MISSING_EXTRAS)
def test_missing_extra_names_the_extra(module, args, command, extra, files):
    proc = run_cli(*(a.format(**files) for a in args), preamble=f"sys.modules[{module!r}] = None")
    assert_one_line_error(proc, f"peftcalc {command} needs {module}, which is not installed: "
                                f"pip install 'peftcalc[{extra}]'")


def test_sweep_without_pandas_names_the_extra():
    code = ("import sys\nsys.modules['pandas'] = None\nimport peftcalc\n"
            "try:\n    peftcalc.sweep('gpt2')\nexcept ModuleNotFoundError as exc:\n    print(exc.name, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == ("pandas peftcalc.sweep returns a pandas DataFrame and needs pandas, which is not "
                           "installed: pip install 'peftcalc[reports]'")


def _commands():
    group = typer.main.get_command(app)
    return [(name, cmd) for name, cmd in group.commands.items()]


@pytest.mark.parametrize("name,command", _commands(), ids=[n for n, _ in _commands()])
def test_help_shows_every_option_name_whole_at_80_columns(name, command):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    words = set(result.stdout.replace(",", " ").replace("/", " ").split())
    names = [opt for param in command.params if not getattr(param, "hidden", False)  # (hidden: an old alias)
             for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")]
    assert names and all(opt in words for opt in names), [o for o in names if o not in words]
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) <= 80


def test_measure_defaults_to_cpu_without_cuda():
    import torch

    proc = run_cli("measure", CONFIGS / "llama_base.json", "--steps", "1", "--seq-len", "8", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["settings"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "gemm_4bit_forward" not in proc.stderr  # bitsandbytes' import-time notice is quieted
    help_text = CliRunner().invoke(app, ["measure", "--help"], terminal_width=200).stdout
    assert "cuda when torch sees a CUDA device, else cpu" in " ".join(help_text.split())


def test_only_the_bitsandbytes_cpu_kernel_notice_is_quieted():
    pytest.importorskip("bitsandbytes")
    code = ("import logging, measure, peft, bitsandbytes\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr.strip() == "another warning", proc.stderr
