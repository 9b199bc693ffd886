"""What the text outputs say (a user's report): no time or cost presented as a plan on a card that does not fit,
a vision encoder's tokens in its header, plurals, task files named per method, one unit per column, compare's
notes and cost card."""

import json
import re

from typer.testing import CliRunner

from peftcalc.cli import app
from peftcalc.compare import compare_methods, render_compare
from peftcalc.crossover import crossover, render_crossover
from peftcalc.format import bytes_column, plural

runner = CliRunner()


def run(*args) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def gpu_table(text: str) -> dict:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GPU ") and "headroom" in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        name, rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        rows[name] = re.split(r"\s{2,}", rest)
    return rows


def test_a_card_that_does_not_fit_gets_no_time_or_cost_in_the_table():
    out = run("estimate", "llama-3.1-70b", "--method", "full", "--gpu", "3090")
    rows = gpu_table(out)
    # the default optimizer is the Trainer's fused AdamW; the foreach AdamW's step temporaries (--optimizer adamw)
    # need 690.43 GiB
    assert rows["RTX 3090"] == ["24.00 GiB", "no", "-528.45 GiB", "0", "-", "-", "-"]
    assert all(r[1] == "no" and r[-3:] == ["-", "-", "-"] for r in rows.values())
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("Time and cost on RTX 3090"))
    assert lines[i - 1].startswith("RTX 3090 (24.00 GiB) does not fit this setting (it needs 552.45 GiB)")
    foreach = run("estimate", "llama-3.1-70b", "--method", "full", "--gpu", "3090", "--optimizer", "adamw")
    assert "does not fit this setting (it needs 690.43 GiB)" in foreach
    # JSON keeps the numbers
    d = json.loads(run("estimate", "llama-3.1-70b", "--method", "full", "--gpu", "3090", "--format", "json"))
    g = next(g for g in d["gpus"] if g["name"] == "RTX 3090")
    assert not g["fits"] and g["step_seconds"] > 0 and g["epoch_cost_usd"] > 0


def test_cards_that_fit_keep_their_time_and_cost_and_no_misfit_line():
    out = run("estimate", "llama-3.2-1b")
    rows = gpu_table(out)
    assert all(r[1] == "yes" and r[-1].startswith("$") for r in rows.values())
    assert "does not fit" not in out


def test_markdown_gpu_table_has_no_time_on_a_card_that_does_not_fit():
    out = run("estimate", "llama-3.1-70b", "--method", "full", "--format", "markdown")
    assert "| RTX 3090 | no | 0 | - | - | - |" in out


def test_a_vision_encoder_header_shows_its_vision_tokens_not_seq_len():
    out = run("estimate", "vit-b-16", "--seq-len", "2048")
    assert out.splitlines()[1].startswith("batch 1 x 197 vision tokens (patches + class token), bf16")
    assert "2048" not in out.splitlines()[1]
    out = run("estimate", "clip-vit-l-14-336-vision", "--format", "markdown")
    assert "batch 1 x 577 vision tokens (patches + class token)" in out.splitlines()[0]
    assert run("estimate", "llama-3.2-1b").splitlines()[1].startswith("batch 1 x seq 512,")


def test_plurals():
    assert plural(1, "full fine-tuned copy", "full fine-tuned copies") == "1 full fine-tuned copy"
    assert plural(2, "full fine-tuned copy", "full fine-tuned copies") == "2 full fine-tuned copies"
    assert plural(1, "task") == "1 task" and plural(1000, "task") == "1,000 tasks"
    out = run("estimate", "llama-3.2-1b", "--method", "full")
    assert out.splitlines()[-1].endswith(re.search(r"; 1 full fine-tuned copy = .*", out).group(0))
    assert "1 task =" in out and "task(s)" not in out and "copies" not in out
    out = run("estimate", "llama-3.2-1b", "--tasks", "3")
    assert "3 tasks =" in out and "3 full fine-tuned copies =" in out and "+ 3 adapters)" in out


def test_frozen_and_freeze_store_task_files_not_adapters():
    for method in ("frozen", "freeze", "bitfit"):
        out = run("estimate", "gpt2", "--method", method, "--tasks", "2")
        assert "+ 2 task files)" in out.splitlines()[-1] and "adapter" not in out.splitlines()[-1]
    for method in ("lora", "adapter", "ia3"):
        assert "+ 1 adapter)" in run("estimate", "gpt2", "--method", method).splitlines()[-1]


def test_bytes_column_uses_one_unit():
    assert bytes_column([-7.24 * 1024**3, 300 * 1024**2]) == ["-7.24 GiB", "0.29 GiB"]
    assert bytes_column([2048, 100]) == ["2.00 KiB", "0.10 KiB"]
    assert bytes_column([10, -3]) == ["10 B", "-3 B"]


def test_crossover_scan_column_has_one_unit():
    r = crossover("tinyllama-1.1b", rank=64, targets="all-linear")
    text = render_crossover(r, "text")
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("seq len"))
    cells = [line.split()[-1] for line in lines[i + 2:i + 2 + len(r["scan"])]]
    units = {c for c in cells}
    assert units == {"GiB"}, cells
    assert lines[i + 2 + len(r["scan"]) - 1].split()[-2] == "0.25"  # 4,096: ~250 MiB, shown in GiB


def test_compare_puts_errors_in_a_note_and_costs_the_smallest_gpu():
    rows = compare_methods("llama-3.1-8b")
    text = render_compare(rows, "text")
    width = max(len(line) for line in text.splitlines()[:len(rows) + 2])
    assert width < 140
    header = text.splitlines()[0]
    assert "smallest GPU" in header and "epoch cost there" in header and header.rstrip().endswith("note")
    bitfit = next(line for line in text.splitlines() if line.startswith("bitfit"))
    assert bitfit.rstrip().endswith("[1]") and "needs bias" not in bitfit
    assert "[1] method 'bitfit' needs bias terms, and llama-3.1-8b has none" in text.splitlines()
    for r in rows:
        if "trainable" in r:
            line = next(line for line in text.splitlines() if line.startswith(r["method"] + " "))
            assert r["smallest_gpu"] in line and f"${r['smallest_gpu_epoch_cost_usd']:,.2f}" in line


def test_compare_one_note_for_one_reason():
    rows = compare_methods("bert-base")
    text = render_compare(rows, "text", flags=True)
    assert [line for line in text.splitlines() if line.startswith("[")] == [
        "[1] --seq-len 512 + 20 virtual tokens exceeds bert-base's 512 positions"]
    # the API's rows name the API parameter; only the command line's table shows it as a flag
    assert [r["note"] for r in rows if r["note"]] == ["seq_len 512 + 20 virtual tokens exceeds bert-base's 512 "
                                                      "positions"] * 2
    assert sum(line.rstrip().endswith("[1]") for line in text.splitlines()) == 2
