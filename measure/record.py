"""What a row records besides the measurement: the settings (:func:`settings_record`,
:func:`method_record`) and their key (:func:`row_key`, :func:`config_sha`), the calculator's prediction
attached to the row (:func:`predict`), the environment it ran in (:func:`environment`), and the row as
a JSON line (:func:`to_json_line`) or as text (:func:`summarize`).

Owns the "record" part of :func:`measure.run.measure_one`; :mod:`measure.matrix` keys and writes its
rows with it. It imports nothing else from measure.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import torch

from peftcalc.methods import MethodSettings, applicable_knobs, resolve_adapter_kind
from peftcalc.settings import TrainingSettings
from peftcalc.spec import ModelSpec

__all__ = [
    "LATER_METHOD_FIELDS", "LATER_TRAINING_FIELDS", "REPO", "config_sha", "environment", "git_commit",
    "method_record", "predict", "row_key", "settings_record", "summarize", "to_json_line",
]

REPO = Path(__file__).resolve().parent.parent

# MethodSettings fields added after result files were first committed: recorded only when set, so
# the settings (and resume keys) of every earlier row stay what they were.
LATER_METHOD_FIELDS = ("vision_layers",)
# TrainingSettings fields added later, with their defaults: recorded only when they differ from them.
LATER_TRAINING_FIELDS = {"checkpoint_every": 1, "checkpoint_reentrant": False, "grad_accum": 1, "keep_outputs": False,
                         "loss": "hf", "loss_chunks": 8, "offload_activations": False, "max_grad_norm": None,
                         "trainer_loop": False, "gpus": 1, "gpus_per_node": 8, "sharding": "none",
                         "reshard_after_forward": True, "offload": "none",
                         "routing": "balanced", "experts": "grouped_mm", "router_aux_loss": False}


def method_record(spec: ModelSpec, method: MethodSettings) -> dict:
    """The method's settings as a row records them (and a subprocess request carries them): the adapter kind
    a default resolves to, lists for tuples, and without the fields added later when they hold their
    default (LATER_METHOD_FIELDS) or prepare_kbit, which travels as the run's qlora_prepare_kbit as it did
    before MethodSettings had the field, so the keys of earlier rows stay what they were."""
    m = asdict(method)
    del m["prepare_kbit"]
    m["adapter_kind"] = resolve_adapter_kind(spec, method)  # the kind the run uses (None means a default)
    if isinstance(m["targets"], tuple):
        m["targets"] = list(m["targets"])
    for name in LATER_METHOD_FIELDS:
        if m.get(name) == 0:
            del m[name]
    return m


def settings_record(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str,
                    steps: int, prepare_kbit: bool = False, seed: int = 0) -> dict:
    """Everything that decides a run, as plain data (also the input of :func:`row_key`)."""
    prepare_kbit = bool(prepare_kbit or method.prepare_kbit)
    t = asdict(replace(training, device="cuda" if device == "cuda" else "cpu"))
    for name, default in LATER_TRAINING_FIELDS.items():
        if t[name] == default:
            del t[name]
    return {
        "model": spec.name,
        "model_config_sha": config_sha(spec),
        "method": method_record(spec, method),
        "training": t,
        "device": device,
        "steps": steps,
        "seed": seed,
        "qlora_prepare_kbit": bool(prepare_kbit) if method.method == "qlora" else None,
    }


def config_sha(spec: ModelSpec) -> str:
    text = json.dumps({k: v for k, v in spec.hf_config.items() if not k.startswith("_")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def row_key(settings: dict) -> str:
    """A stable key for a run's settings (resume skips rows whose key is already written)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def predict(spec: ModelSpec, method: MethodSettings, training: TrainingSettings, device: str) -> dict:
    """The calculator's estimate for the same settings (device 'cuda' for cuda runs, 'cpu' for cpu
    and fake), or ``{"predicted": None, "predicted_error": why}`` when it is unavailable."""
    try:
        from peftcalc.api import estimate
    except ImportError as exc:
        return {"predicted": None, "predicted_error": f"peftcalc.api not importable: {exc}"}
    knobs = {k: v for k, v in asdict(method).items() if k != "method"}  # those its method reads: estimate refuses others
    kwargs = {"method": method.method, **applicable_knobs(method.method, knobs), **asdict(training),
              "device": "cuda" if device == "cuda" else "cpu"}
    try:
        result = estimate(spec, **kwargs)
        memory = result.memory
        predicted = {"peak_bytes": int(memory.peak_bytes),
                     "components": {k: int(v) for k, v in dict(memory.components).items()}}
        if getattr(memory, "host_bytes", 0):  # offload_activations: against measured.host_peak_bytes
            predicted["host_bytes"] = int(memory.host_bytes)
        for extra in ("peak_phase", "phase"):
            if getattr(memory, extra, None) is not None:
                predicted["peak_phase"] = str(getattr(memory, extra))
                break
        return {"predicted": predicted, "predicted_error": None}
    except Exception as exc:  # the calculator's failure must not lose the measurement
        return {"predicted": None, "predicted_error": f"{type(exc).__name__}: {exc}"}


@lru_cache(maxsize=None)
def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


@lru_cache(maxsize=None)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    """Where the row was measured: device name, library versions, git commit."""
    env = {**_versions(), "git_commit": git_commit(), "host_cpu": platform.machine(),
           "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, device_total_bytes=props.total_memory, cuda=torch.version.cuda,
                   driver=_nvidia_driver())
    else:
        env["device_name"] = "cpu (fake tensors)" if device == "fake" else f"cpu ({platform.processor() or platform.machine()})"
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def to_json_line(row: dict) -> str:
    return json.dumps(row, sort_keys=False, default=str)


def _gib(n) -> str:
    """Bytes in GiB, or MiB/KiB when smaller (tiny models)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} B"


def summarize(row: dict) -> str:
    """A few human-readable lines for one row (the text format of ``peftcalc measure``)."""
    s = row["settings"]
    t, m = s["training"], s["method"]
    ck = ", checkpointing" if t["grad_checkpointing"] else ""
    ck += f" every {t['checkpoint_every']} blocks" if t.get("checkpoint_every", 1) != 1 else ""
    ck += " (reentrant)" if t.get("checkpoint_reentrant") else ""
    head = (f"{s['model']} {m['method']} on {s['device']}: batch {t['batch_size']}, seq {t['seq_len']}, "
            f"{t['precision']}, {t['optimizer']}, {t['attention']}{ck}; {s['steps']} steps")
    if row["outcome"] != "ok":
        return f"{head}\n{row['outcome']}: {row['error']}"
    meas = row["measured"]
    lines = [head,
             f"params        {row['params']['total']:,} total, {row['params']['trainable']:,} trainable",
             f"peak          {_gib(meas['peak_bytes'])} in {meas['peak_phase']} (step 1: "
             f"{_gib(meas['step1_peak_bytes'])} in {meas['step1_peak_phase']}); source {meas['source']}"]
    if "reserved_peak_bytes" in meas:
        lines.append(f"reserved      {_gib(meas['reserved_peak_bytes'])}")
    predicted = row.get("predicted")
    if predicted:
        ratio = predicted["peak_bytes"] / meas["peak_bytes"] if meas["peak_bytes"] else float("nan")
        lines.append(f"predicted     {_gib(predicted['peak_bytes'])} ({ratio:.3f} x measured)")
        if predicted.get("host_bytes") and meas.get("host_peak_bytes"):
            lines.append(f"predicted host {_gib(predicted['host_bytes'])} (measured {_gib(meas['host_peak_bytes'])})")
    categories = meas.get("categories_at_peak") or (meas.get("tracer") or {}).get("categories_at_peak") or {}
    if categories:
        lines.append("at the peak   " + ", ".join(f"{k} {_gib(v)}" for k, v in categories.items() if v))
    top = meas.get("top_ops") or (meas.get("tracer") or {}).get("top_ops") or []
    for op in top[:5]:
        lines.append(f"  {op['op']:<34} {op['category']:<12} {op['phase']:<9} {_gib(op['bytes'])} x{op['count']}")
    return "\n".join(lines)
