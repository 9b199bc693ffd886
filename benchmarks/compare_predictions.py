"""Byte-identical check for refactors: every committed harness row's full prediction (parameters,
every memory component, every timeline event, step 1, reserved, GPU fits, time, cost, storage) and
the rows of the 10,000-configuration sweep, written to a JSON-lines snapshot that a later tree is
compared against.

    PYTHONPATH=. python benchmarks/compare_predictions.py write build/before.jsonl
    ... change the code ...
    PYTHONPATH=. python benchmarks/compare_predictions.py check build/before.jsonl

`check` recomputes the snapshot and prints the first differences; exit status 1 if any row differs. A
field the snapshot does not have (a new setting or figure added since it was written) is not a difference:
what is compared is every value the snapshot holds. The registry estimates pin the optimizer to `adamw`
(the foreach AdamW every snapshot was written with) so a change of the default optimizer is not one either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_FILES = ("ci.jsonl", "long.jsonl", "crossover.jsonl", "ckpt-modes.jsonl")


def row_predictions():
    """(key, prediction dict or error text) for every row of the committed data files."""
    from peftcalc.errors import InputError
    from reports.rows import config_index, predict_row, read_jsonl, resolve_spec

    index = config_index()
    for file, row in read_jsonl([REPO / "reports" / "data" / f for f in DATA_FILES]):
        key = f"{Path(file).name}:{json.dumps(row['settings'], sort_keys=True)}"
        spec, why = resolve_spec(row["settings"], index)
        if spec is None:
            yield key, {"unresolved": why}
            continue
        try:
            yield key, _figures(predict_row(spec, row["settings"]))
        except InputError as exc:
            yield key, {"error": str(exc)}


def sweep_rows():
    """The benchmark's 10,000-configuration sweep, one dict per row."""
    from benchmarks.bench_estimate import SWEEP_GRID
    import peftcalc

    df = peftcalc.sweep("llama-3.1-8b", **SWEEP_GRID, optimizer="adamw")  # the default the snapshot had
    for i, rec in enumerate(df.to_dict(orient="records")):
        yield f"sweep:{i}", rec


def _figures(e) -> dict:
    """An estimate's figures: its JSON without the labels that say how it was made (`estimated_by`, `trace`:
    the traced route's, added after the first snapshots), which are no prediction."""
    d = e.to_dict()
    for label in ("estimated_by", "trace"):
        d.pop(label, None)
    return d


def registry_estimates():
    """Every registry model x each of its methods x fp32/amp-bf16/bf16 x checkpointing off/on
    (reentrant every 2nd block too) x sdpa/eager x cuda/cpu, at batch 2 x 256 tokens."""
    import itertools

    from peftcalc import estimate
    from peftcalc.errors import InputError
    from peftcalc.methods import methods_for
    from peftcalc.config import load_spec, registry_names

    ckpts = ({}, {"grad_checkpointing": True}, {"grad_checkpointing": True, "checkpoint_every": 2,
                                                 "checkpoint_reentrant": True})
    for name in registry_names():
        spec = load_spec(name)
        for method, precision, ckpt, attention, device in itertools.product(
                methods_for(spec), ("fp32", "bf16", "amp-bf16"), ckpts, ("sdpa", "eager"), ("cuda", "cpu")):
            kw = dict(method=method, precision=precision, attention=attention, device=device, batch_size=2,
                      seq_len=256, **ckpt)
            key = f"registry:{name}:{json.dumps(kw, sort_keys=True)}"
            try:
                yield key, _figures(estimate(spec, **kw, optimizer="adamw"))
            except InputError as exc:
                yield key, {"error": str(exc)}


def snapshot():
    yield from row_predictions()
    yield from registry_estimates()
    yield from sweep_rows()


def _line(key, value) -> str:
    return json.dumps({"key": key, "value": value}, sort_keys=True, default=str)


def write(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as out:
        for key, value in snapshot():
            out.write(_line(key, value) + "\n")
            n += 1
    print(f"wrote {n:,} predictions to {path}")


def holds(before, after) -> bool:
    """Every value of `before` is in `after` unchanged (dicts compared key by key; `after` may have more)."""
    if isinstance(before, dict):
        return isinstance(after, dict) and all(k in after and holds(v, after[k]) for k, v in before.items())
    return before == after


def check(path: str) -> int:
    before = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        before[rec["key"]] = rec["value"]
    seen, differ = 0, []
    for key, value in snapshot():
        seen += 1
        if key not in before:
            continue  # a row the snapshot did not have (committed since): nothing to compare
        if not holds(before.pop(key), json.loads(_line(key, value))["value"]):
            differ.append(key)
    for key in differ[:10]:
        print(f"DIFFERS: {key[:200]}")
    for key in list(before)[:10]:
        print(f"MISSING: {key[:200]}")
    print(f"{seen:,} predictions compared: {len(differ)} differ, {len(before)} missing")
    return 1 if differ or before else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        sys.exit(check(sys.argv[2]))
