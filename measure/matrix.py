"""Measurement matrices: TOML data files (``measure/matrices/*.toml``) expanded into runs, and
:func:`run_matrix`, which measures every run and appends one JSON line per run.

File format::

    description = "what the matrix is for"

    [defaults]            # any run key (below); applies to every grid
    device = "cpu"
    seq_len = 64

    [models.tiny-llama]   # a config.json as data (any key transformers' config takes);
    model_type = "llama"  # usable as model = "tiny-llama". Registry names need no entry.
    hidden_size = 64
    ...

    [[grid]]              # one cartesian product: every list-valued key is an axis
    model = ["tiny-llama", "llama-3.2-1b"]
    variant = [{method = "lora"}, {method = "lora", targets = "all-linear"}]  # tables: merged whole
    shape = [{batch_size = 1, seq_len = 4096}, {batch_size = 4, seq_len = 512}]  # a second table axis
    grad_checkpointing = [false, true]

Run keys: model, device (cuda|cpu|fake), steps, seed, prepare_kbit, the method keys of
peftcalc.methods.MethodSettings (method, rank, alpha, targets as "q_proj,v_proj" / "all-linear" /
"default", dora, double_quant, bottleneck, adapter_kind, num_virtual_tokens, trainable_layers) and
the training keys of peftcalc.settings.TrainingSettings (batch_size, seq_len, precision, optimizer,
grad_checkpointing, checkpoint_every, checkpoint_reentrant, attention). A key not in this list is an InputError naming the key and its
line. Combinations a method cannot run on (prefix on a masked LM, a sequence longer than the
model's positions) are left out and reported, not run.

This module owns the matrices and their result files, and sits on top of the harness: it measures each
run with :func:`measure.run.measure_one`, checks it with :func:`measure.setup.check_run` and keys and
writes its row with :mod:`measure.record`; none of those imports this module. A cuda row runs in a
subprocess, ``python -m measure.matrix ROW_JSON OUT_JSON`` (:func:`main`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from measure.record import environment, method_record, row_key, settings_record, to_json_line
from measure.run import measure_one
from measure.setup import check_run
from peftcalc.errors import InputError, read_text
from peftcalc.methods import MethodSettings, normalize_targets
from peftcalc.settings import TrainingSettings
from peftcalc.config import load_spec
from peftcalc.spec import ModelSpec

__all__ = [
    "BOOL_KEYS", "FLOAT_KEYS", "INT_KEYS", "MATRICES_DIR", "METHOD_KEYS", "ROW_KEYS", "ROW_TIMEOUT_S", "RUN_DEFAULTS",
    "RUN_KEYS", "STR_KEYS", "TABLE_AXES", "TOP_KEYS", "TRAINING_KEYS", "VARIANT", "Run", "append_row",
    "done_keys", "drop_torn_tail", "expand_matrix", "failed_row", "grid_rows", "line_of", "load_matrix", "main",
    "measure_in_process", "measure_in_subprocess", "progress_line", "run_from_request", "run_key", "run_matrix", "run_request",
    "to_run",
]

MATRICES_DIR = Path(__file__).parent / "matrices"
METHOD_KEYS = tuple(f.name for f in fields(MethodSettings))
TRAINING_KEYS = tuple(f.name for f in fields(TrainingSettings) if f.name != "device")
RUN_KEYS = ("model", "device", "steps", "seed", "prepare_kbit")
ROW_KEYS = RUN_KEYS + METHOD_KEYS + TRAINING_KEYS
TOP_KEYS = ("description", "defaults", "models", "grid")
VARIANT = "variant"
TABLE_AXES = (VARIANT, "shape")  # axes whose entries are tables of run keys, merged whole
RUN_DEFAULTS = {"device": "cpu", "steps": 3, "seed": 0, "prepare_kbit": False}
INT_KEYS = ("steps", "seed", "rank", "alpha", "bottleneck", "num_virtual_tokens", "trainable_layers",
            "batch_size", "seq_len", "vision_layers", "checkpoint_every", "grad_accum", "loss_chunks", "gpus",
            "gpus_per_node")
BOOL_KEYS = ("prepare_kbit", "dora", "double_quant", "grad_checkpointing", "checkpoint_reentrant", "keep_outputs",
             "offload_activations", "reshard_after_forward", "trainer_loop", "router_aux_loss")
STR_KEYS = ("model", "device", "method", "targets", "adapter_kind", "precision", "optimizer", "attention", "loss",
            "sharding", "offload", "routing", "experts")
FLOAT_KEYS = ("max_grad_norm",)
ROW_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Run:
    """One expanded matrix row: the model and every setting of :func:`measure.run.measure_one`."""

    spec: ModelSpec
    method: MethodSettings
    training: TrainingSettings
    device: str
    steps: int
    seed: int
    prepare_kbit: bool
    model_config: dict | None  # the [models.X] table, for subprocess runs; None for registry names

    @property
    def label(self) -> str:
        m, t = self.method, self.training
        ck = "+ckpt" if t.grad_checkpointing else ""
        ck += f"/{t.checkpoint_every}" if t.checkpoint_every != 1 else ""
        ck += "+reentrant" if t.checkpoint_reentrant else ""
        ck += f" {t.sharding}x{t.gpus}" if t.sharding != "none" else ""
        ck += "" if t.reshard_after_forward else "/keep"
        return f"{self.spec.name} {m.method} {t.precision} b{t.batch_size} s{t.seq_len}{ck} {t.optimizer} {self.device}"

    def request(self) -> dict:
        """This run as JSON data (what a subprocess needs to run it again)."""
        return {"model": self.model_config if self.model_config is not None else self.spec.name,
                "method": method_record(self.spec, self.method), "training": self.training.__dict__, "device": self.device,
                "steps": self.steps, "seed": self.seed, "prepare_kbit": self.prepare_kbit}


# -- parsing --------------------------------------------------------------------------------


def line_of(text: str, key: str, start: int = 0) -> int:
    """1-based line of the first `key = ...` (also inside an inline table) at or after line `start`."""
    pattern = re.compile(r"(^|[{,\s])" + re.escape(key) + r"\s*=")
    lines = text.splitlines()
    for i in range(start, len(lines)):
        if pattern.search(lines[i].split("#", 1)[0]):
            return i + 1
    return 0


def _unknown(path: str, text: str, key: str, allowed, where: str) -> InputError:
    line = line_of(text, key)
    at = f" line {line}" if line else ""
    return InputError(f"{path}:{at}: unknown key '{key}' in {where}; allowed: {', '.join(allowed)}")


def load_matrix(path: str | os.PathLike) -> dict:
    """Read and check a matrix file; unknown keys raise InputError naming the key and its line."""
    p = Path(path)
    if not p.exists() and (MATRICES_DIR / f"{path}.toml").exists():
        p = MATRICES_DIR / f"{path}.toml"
    text = read_text(p, "matrix")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"malformed matrix file {p}: {exc}") from None
    _check_keys(data, str(p), text)
    _check_values(data, str(p), text)
    return data


def _check_keys(data: dict, path: str, text: str) -> None:
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(path, text, key, TOP_KEYS, "the top level")
    for key in data.get("defaults", {}):
        if key not in ROW_KEYS:
            raise _unknown(path, text, key, ROW_KEYS, "[defaults]")
    grids = data.get("grid", [])
    if not isinstance(grids, list) or not grids:
        raise InputError(f"{path}: a matrix needs at least one [[grid]] table")
    for grid in grids:
        for key, value in grid.items():
            if key in TABLE_AXES:
                for table in _as_list(value):
                    if not isinstance(table, dict):
                        raise InputError(f"{path}: line {line_of(text, key)}: '{key}' entries must be tables")
                    for sub in table:
                        if sub not in ROW_KEYS:
                            raise _unknown(path, text, sub, ROW_KEYS, f"a {key} table")
            elif key not in ROW_KEYS:
                raise _unknown(path, text, key, ROW_KEYS + TABLE_AXES, "[[grid]]")


def _check_value(key: str, value, path: str, text: str) -> None:
    """Each run key's TOML type: integers, booleans, numbers or strings (INT_KEYS, BOOL_KEYS, FLOAT_KEYS,
    STR_KEYS)."""
    if key in INT_KEYS:
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif key in BOOL_KEYS:
        ok, kind = isinstance(value, bool), "true or false"
    elif key in FLOAT_KEYS:
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        line = line_of(text, key)
        raise InputError(f"{path}:{f' line {line}' if line else ''}: '{key}' must be {kind}, got {value!r}")


def _check_values(data: dict, path: str, text: str) -> None:
    tables = [data.get("defaults", {})]
    for grid in data["grid"]:
        for key, value in grid.items():
            if key in TABLE_AXES:
                tables.extend(_as_list(value))
            else:
                tables.extend({key: v} for v in _as_list(value))
    for table in tables:
        for key, value in table.items():
            _check_value(key, value, path, text)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def grid_rows(grid: dict, defaults: dict) -> list[dict]:
    """The cartesian product of a grid's list-valued keys, over `defaults`; variant tables merge."""
    axes = {k: _as_list(v) for k, v in grid.items()}
    names = list(axes)
    rows = []
    for combo in itertools.product(*(axes[n] for n in names)):
        row = dict(defaults)
        for name, value in zip(names, combo):
            if name in TABLE_AXES:
                row.update(value)
            else:
                row[name] = value
        rows.append(row)
    return rows


def to_run(row: dict, models: dict, device: str | None = None) -> Run:
    """Turn one expanded row into a Run (InputError if a setting is invalid)."""
    row = {**RUN_DEFAULTS, **row}
    if "model" not in row:
        raise InputError("a matrix row has no 'model'")
    name = row["model"]
    config = None
    if name in models:
        config = {**models[name], "_name_or_path": name}
    spec = load_spec(config if config is not None else name)
    method_kwargs = {k: row[k] for k in METHOD_KEYS if k in row}
    if "targets" in method_kwargs:
        targets = method_kwargs["targets"]
        method_kwargs["targets"] = None if targets in ("default", None) else normalize_targets(targets)
    training_kwargs = {k: row[k] for k in TRAINING_KEYS if k in row}
    return Run(spec=spec, method=MethodSettings(**method_kwargs), training=TrainingSettings(**training_kwargs),
               device=device or row["device"], steps=int(row["steps"]), seed=int(row["seed"]),
               prepare_kbit=bool(row["prepare_kbit"]), model_config=config)


def expand_matrix(data: dict, device: str | None = None) -> tuple[list[Run], list[tuple[dict, str]]]:
    """All runs of a loaded matrix, in file order, without duplicates; and the rows left out as
    inapplicable, each with the reason (the InputError message)."""
    models, defaults = data.get("models", {}), data.get("defaults", {})
    runs, left_out, seen = [], [], set()
    for grid in data["grid"]:
        for row in grid_rows(grid, defaults):
            try:
                run = to_run(row, models, device)
                check_run(run.spec, run.method, run.training, run.device, run.steps, here=False)
            except InputError as exc:
                left_out.append((row, str(exc)))
                continue
            key = row_key(settings_record(run.spec, run.method, run.training, run.device, run.steps,
                                          run.prepare_kbit, run.seed))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    return runs, left_out


def run_from_request(request: dict) -> Run:
    """Inverse of :meth:`Run.request`."""
    model = request["model"]
    models = {model["_name_or_path"]: model} if isinstance(model, dict) else {}
    name = model["_name_or_path"] if isinstance(model, dict) else model
    row = {"model": name, **request["method"], **request["training"], "device": request["device"],
           "steps": request["steps"], "seed": request["seed"], "prepare_kbit": request["prepare_kbit"]}
    return to_run(row, models)


# -- running --------------------------------------------------------------------------------


def run_key(run: Run) -> str:
    return row_key(settings_record(run.spec, run.method, run.training, run.device, run.steps, run.prepare_kbit, run.seed))


def done_keys(out_path: str | os.PathLike) -> set[str]:
    """Keys of the rows already in a results file (unreadable trailing lines are ignored: a run
    killed mid-write leaves at most one)."""
    keys = set()
    p = Path(out_path)
    if not p.exists():
        return keys
    for line in p.read_text().splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def run_request(request: dict) -> dict:
    """Measure one run given as :meth:`Run.request` data."""
    run = run_from_request(request)
    return measure_one(run.spec, run.method, run.training, run.device, run.steps,
                       prepare_kbit=run.prepare_kbit, seed=run.seed)


def measure_in_process(run: Run) -> dict:
    """Measure `run` here; any failure becomes the row's outcome, never an exception."""
    try:
        return measure_one(run.spec, run.method, run.training, run.device, run.steps,
                           prepare_kbit=run.prepare_kbit, seed=run.seed)
    except Exception as exc:  # validation errors of a single row
        return failed_row(run, f"{type(exc).__name__}: {exc}")


def measure_in_subprocess(run: Run, timeout_s: int = ROW_TIMEOUT_S) -> dict:
    """Measure `run` in a fresh Python process (``python -m measure.matrix``), so that a crash, a
    leak or allocator fragmentation after an OOM cannot affect the next row."""
    with tempfile.TemporaryDirectory(prefix="peftcalc-row-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "row.json"
        req.write_text(json.dumps(run.request()))
        try:
            proc = subprocess.run([sys.executable, "-m", "measure.matrix", str(req), str(out)], cwd=_repo_root(),
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return failed_row(run, f"timeout: the row ran longer than {timeout_s} s")
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            return failed_row(run, f"subprocess exited with {proc.returncode}: {tail[0]}"[:500])
        return json.loads(out.read_text())


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def failed_row(run: Run, message: str) -> dict:
    """A row for a run that failed before measure_one could record it."""
    settings = settings_record(run.spec, run.method, run.training, run.device, run.steps, run.prepare_kbit, run.seed)
    return {"key": run_key(run), "settings": settings, "outcome": "error", "error": message,
            "params": None, "measured": None, "predicted": None, "environment": environment("cpu")}


def append_row(out, row: dict) -> None:
    out.write(to_json_line(row) + "\n")
    out.flush()
    os.fsync(out.fileno())


def drop_torn_tail(path: Path) -> bool:
    """A run killed mid-write leaves a last line that is not JSON (half a row): cut it off, so that
    the resumed sweep's rows (which measure that run again) follow complete lines only; a complete
    last line without its newline gets one. Returns whether a torn line was removed."""
    if not path.exists() or not path.stat().st_size:
        return False
    data = path.read_bytes()
    body = data.rstrip(b"\r\n\t ")
    start = body.rfind(b"\n") + 1  # the last non-blank line starts here (0: the file's only line)
    last = body[start:]
    try:
        json.loads(last)
    except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        with open(path, "r+b") as f:
            f.truncate(start)
        return True
    if not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return False


def run_matrix(matrix_path, out_path, device: str | None = None, limit: int | None = None,
               progress: bool = True, isolate: bool | None = None) -> dict:
    """Measure every run of a matrix file and append each row to `out_path` as soon as it is done.

    Rows already in `out_path` (same settings key) are skipped, so an interrupted run resumes.
    `device` overrides the matrix's devices; `limit` keeps the first `limit` runs of the matrix;
    `isolate` runs each row in a subprocess (default: for cuda rows only). An OOM or any error in
    one row is that row's outcome and never stops the others. Returns a summary."""
    if limit is not None and limit < 0:  # (runs[:-1] would silently run all but the last)
        raise InputError(f"--limit must be a non-negative integer, got {limit}")
    import torch

    runs, left_out = expand_matrix(load_matrix(matrix_path), device)
    if limit is not None:
        runs = runs[:limit]
    if any(r.device == "cuda" for r in runs) and not torch.cuda.is_available():
        raise InputError(f"{matrix_path} has cuda rows and torch sees no CUDA device; pass --device cpu or fake")
    done = done_keys(out_path)
    todo = [r for r in runs if run_key(r) not in done]
    counts = {"ok": 0, "oom": 0, "error": 0}
    started = time.perf_counter()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(Path(out_path))
    bar = _progress(todo, progress)
    with open(out_path, "a") as out:
        for i, run in enumerate(bar, 1):
            subprocess_row = isolate if isolate is not None else run.device == "cuda"
            row = measure_in_subprocess(run) if subprocess_row else measure_in_process(run)
            append_row(out, row)
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
            if isinstance(bar, _LabelledBar):
                bar.set_postfix(counts)
            elif progress:
                print(progress_line(i, len(todo), run, row), file=sys.stderr, flush=True)
        if isinstance(bar, _LabelledBar):
            bar.bar.close()
    return {"matrix": str(matrix_path), "out": str(out_path), "runs": len(runs), "skipped_done": len(runs) - len(todo),
            "ran": len(todo), **counts, "left_out": [{"row": row, "reason": why} for row, why in left_out],
            "seconds": round(time.perf_counter() - started, 1)}


def progress_line(i: int, n: int, run: Run, row: dict) -> str:
    """One finished row, for a log: '[12/24] tiny-llama lora fp32 b2 s32 adamw cpu: ok 1.2 MiB'."""
    outcome = row.get("outcome", "error")
    peak = (row.get("measured") or {}).get("peak_bytes")
    if outcome == "ok" and peak is not None:
        detail = " " + _size(peak)
    elif row.get("error"):
        detail = " (" + " ".join(str(row["error"]).split())[:120] + ")"
    else:
        detail = ""
    return f"[{i}/{n}] {run.label}: {outcome}{detail}"


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _progress(runs: list[Run], enabled: bool):
    """A tqdm bar on a terminal; in a log (not a terminal), the runs themselves: run_matrix prints
    one progress_line per finished row."""
    if not enabled or not sys.stderr.isatty():
        return runs
    from tqdm import tqdm

    bar = tqdm(runs, unit="run", dynamic_ncols=True)
    return _LabelledBar(bar)


class _LabelledBar:
    """tqdm over runs that shows the current run's label and the outcome counts."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __iter__(self):
        for run in self.bar:
            self.bar.set_description(run.label[:60])
            yield run

    def set_postfix(self, counts: dict) -> None:
        self.bar.set_postfix(counts)


def main(argv=None) -> int:
    """``python -m measure.matrix ROW_JSON OUT_JSON``: run one matrix row (:meth:`Run.request` data) in
    this process and write its result; used to isolate cuda rows in subprocesses."""
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    row = run_request(request)
    Path(args[1]).write_text(to_json_line(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
