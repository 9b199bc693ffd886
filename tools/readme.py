"""Keep README.md's command outputs produced by the program.

Every fenced block in README.md is preceded by an HTML comment that says what it is:

    <!-- peftcalc estimate llama-3.1-8b --method qlora -->      a command: the block below it is
    ```                                                          "$ <command>" and then the command's
    $ peftcalc estimate llama-3.1-8b --method qlora              output, re-run by this script
    ...
    ```

    <!-- illustrative -->                                        anything else (a command synopsis,
    ```                                                          code, a command that needs torch):
    peftcalc measure ...                                         shown as written, never run
    ```

`python tools/readme.py` (`make readme`) re-runs every marked command as `python -m peftcalc ...`
from the repository root with COLUMNS=100, NO_COLOR=1 and TERM=dumb, and rewrites its block;
`--check` rewrites nothing and exits 1 with a unified diff when README.md differs (tests/test_readme.py).
Only commands that need no torch run: estimate, compare, crossover, models, gpus and --help.
Trailing whitespace is stripped from each output line (so editors that strip it cannot break the check).

Check mode also fails on a fenced block without a marker, and on a figure in the paragraph right after
a command's block that the output does not print (a decimal such as 16.08, or a number with thousands
separators such as 3,827): prose that explains an output quotes the output.

The script imports nothing from peftcalc.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Subcommands that never import torch; anything else (measure, report, ...) must be illustrative.
RUNNABLE = ("estimate", "compare", "crossover", "models", "gpus", "--help")
ENV = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}

FENCE = re.compile(r"^```")
COMMAND_MARK = re.compile(r"^<!--\s*(peftcalc\b.*?)\s*-->\s*$")
ILLUSTRATIVE_MARK = re.compile(r"^<!--\s*illustrative\b.*-->\s*$")
# A figure: a decimal (not part of a name such as Llama-3.1), or an integer with thousands separators.
FIGURE = re.compile(r"(?<![\w.\-])(\d+\.\d+|\d{1,3}(?:,\d{3})+)(?![\w])")


class ReadmeError(Exception):
    pass


def run_command(command: str) -> str:
    """The output of one marked command (`peftcalc ...`), run as `python -m peftcalc ...`."""
    argv = shlex.split(command)
    if len(argv) < 2 or argv[0] != "peftcalc" or argv[1] not in RUNNABLE:
        raise ReadmeError(f"README marks {command!r} to run, but only `peftcalc {'|'.join(RUNNABLE)} ...` "
                          "run here (mark the block <!-- illustrative --> instead)")
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([sys.executable, "-m", "peftcalc", *argv[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReadmeError(f"`{command}` exited {proc.returncode}:\n{proc.stderr}")
    lines = [line.rstrip() for line in proc.stdout.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _paragraph_after(lines: list[str], i: int) -> str:
    """The paragraph starting at the first non-blank line from i (empty if a heading, a marker or a
    fence comes first)."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    para = []
    while i < len(lines) and lines[i].strip():
        if lines[i].startswith(("#", "<!--", "```", "|")):
            break
        para.append(lines[i])
        i += 1
    return "\n".join(para)


def render(text: str, run=run_command) -> tuple[str, list[str]]:
    """README text with every command block regenerated, and the problems check mode reports."""
    lines = text.split("\n")
    out: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        mark = COMMAND_MARK.match(line)
        if mark and i + 1 < len(lines) and FENCE.match(lines[i + 1]):
            command = mark.group(1)
            end = i + 2
            while end < len(lines) and not FENCE.match(lines[end]):
                end += 1
            if end == len(lines):
                raise ReadmeError(f"README.md line {i + 2}: unclosed fence")
            output = run(command)
            out += [line, lines[i + 1], f"$ {command}", *output.rstrip("\n").split("\n"), lines[end]]
            para = _paragraph_after(lines, end + 1)
            for fig in FIGURE.findall(para):
                if not re.search(rf"(?<![\d.,]){re.escape(fig)}(?![\d])", output):
                    problems.append(f"the paragraph after `{command}` quotes {fig}, which its output does not print")
            i = end + 1
            continue
        if FENCE.match(line):
            prev = out[-1] if out else ""
            if not ILLUSTRATIVE_MARK.match(prev):
                problems.append(f"README.md line {i + 1}: a fenced block without a marker "
                                "(<!-- peftcalc ... --> to generate it, <!-- illustrative --> if it is not output)")
            end = i + 1
            while end < len(lines) and not FENCE.match(lines[end]):
                end += 1
            out += lines[i:end + 1]
            i = end + 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out), problems


def check(path: Path = README) -> list[str]:
    """Problems with README.md as it is: a unified diff against the regenerated text, unmarked
    blocks, unprinted figures. Empty when it is up to date."""
    text = path.read_text()
    new, problems = render(text)
    if new != text:
        diff = difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                    "README.md", "README.md (regenerated: make readme)")
        problems.insert(0, "".join(diff))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if README.md is stale")
    parser.add_argument("path", nargs="?", type=Path, default=README)
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.path)
            for p in problems:
                print(p, file=sys.stderr)
            return 1 if problems else 0
        text = args.path.read_text()
        new, problems = render(text)
        if new != text:
            args.path.write_text(new)
            print(f"rewrote {args.path}")
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    except ReadmeError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
