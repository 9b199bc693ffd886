"""README.md shows what the program prints (tools/readme.py), and documents every JSON field it writes.

Runs only commands that need no torch (`python -m peftcalc estimate|compare|crossover|models|gpus|--help`)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_tool", ROOT / "tools" / "readme.py")
readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme)

# Settings whose JSON between them holds every key `estimate --format json` writes: a QLoRA LLM, a
# LLaVA projector (image tokens), BLIP-2, a sequence classifier (peft's head copy), full fine-tuning on
# CPU, and a model nothing fits (cost is null).
JSON_CASES = [
    "llama-3.1-8b --method qlora --rank 16 --batch-size 4 --seq-len 4096 --grad-checkpointing",
    "llava-1.5-7b --method projector",
    "blip2-opt-2.7b --precision fp16",
    "tests/peftcalc/configs/llama_cls.json --method lora --dora",
    "gpt2 --method full --device cpu",
    "llama-3.1-70b --method full --batch-size 8",
]
# Objects whose keys are data, not fields: not walked.
DATA_KEYED = {"memory.events"}


def test_readme_shows_what_the_program_prints():
    problems = readme.check()
    assert not problems, "README.md is stale; run `make readme`:\n" + "\n".join(problems)


def test_check_finds_a_stale_block_an_unmarked_block_and_an_unprinted_figure():
    text = ("<!-- peftcalc gpus -->\n```\n$ peftcalc gpus\nold\n```\n\nThe H100 has 79.65 GiB and the A100 1.5 GiB.\n\n"
            "```\nunmarked\n```\n\n<!-- illustrative -->\n```\npeftcalc measure x\n```\n")
    new, problems = readme.render(text, run=lambda cmd: "H100 80GB  79.65 GiB\n")
    assert "$ peftcalc gpus\nH100 80GB  79.65 GiB\n```" in new
    assert any("quotes 1.5" in p for p in problems) and not any("79.65" in p for p in problems)
    assert sum("without a marker" in p for p in problems) == 1
    with pytest.raises(readme.ReadmeError, match="illustrative"):
        readme.run_command("peftcalc measure llama-3.1-8b")


def _schema() -> dict[str, set[str]]:
    """README's JSON schema table: field path -> the backticked names in its meaning."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## JSON schema", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("field", "---"):
            continue
        names = set(re.findall(r"`([^`]+)`", cells[1]))
        for field in re.findall(r"`([^`]+)`", cells[0]):
            rows[field] = names
    return rows


def _key_paths(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else k
            yield path
            if path not in DATA_KEYED:
                yield from _key_paths(v, path)
    elif isinstance(obj, list):
        yield prefix + "[]"
        for v in obj:
            yield from _key_paths(v, prefix + "[]")


def _documented(path: str, schema: dict[str, set[str]]) -> bool:
    """A row names the path or a field inside it, or names an ancestor whose meaning names every key
    below it."""
    if any(f == path or f.startswith((path + ".", path + "[]")) for f in schema):
        return True
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        field = ".".join(parts[:i])
        if field in schema and all(p in schema[field] for p in parts[i:]):
            return True
    return False


@pytest.fixture(scope="module")
def json_outputs():
    return [json.loads(readme.run_command(f"peftcalc estimate {case} --format json")) for case in JSON_CASES]


def test_every_json_key_is_documented(json_outputs):
    schema = _schema()
    assert any(d["cost"] is None for d in json_outputs) and any(d["image_tokens"] for d in json_outputs)
    paths = {p for d in json_outputs for p in _key_paths(d)}
    undocumented = sorted(p for p in paths if not _documented(p, schema))
    assert not undocumented, f"README's JSON schema section does not document {undocumented}"


def test_every_documented_json_field_exists(json_outputs):
    paths = {p for d in json_outputs for p in _key_paths(d)}
    stale = sorted(f for f in _schema() if f not in paths)
    assert not stale, f"README's JSON schema section documents fields the JSON does not have: {stale}"
