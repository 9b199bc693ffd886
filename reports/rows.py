"""Harness result rows (``measure.run.measure_one``, one JSON line per run) as a flat DataFrame,
with the prediction of the *current* calculator recomputed for every row.

A row names its model (``settings.model``) and the sha of its config (``settings.model_config_sha``,
:func:`config_sha` - the same hash as ``measure.record.config_sha``). Registry models resolve by name.
Tiny configs written inline in a matrix (``[models.tiny-llama]`` in ``measure/matrices/*.toml``) or in
a test's config file are found by that sha among the candidates :func:`config_index` collects, so
the report never silently predicts the real ``gpt2`` for a 2-layer config whose name is ``gpt2``.

No torch import: the report reads the rows, it does not run them.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from peftcalc.errors import InputError
from peftcalc.config import load_spec, registry_names, spec_from_config
from peftcalc.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
MATRICES_DIR = REPO / "measure" / "matrices"
TEST_CONFIGS_DIR = REPO / "tests" / "peftcalc" / "configs"

SOURCES = ("gpu", "cpu", "fake")  # report order: GPU data is the headline
# Predicted memory components -> the harness tracer's categories at the peak (measure/tracer.py),
# whose split is the definition: parameters are the parameters, buffers and quantization state;
# activations everything autograd saved (the loss's log_softmax output included, which the calculator
# counts in activations too); other the rest: the logits and loss gradients that are not saved
# (logits_loss) and every other temporary.
COMPONENT_MAP = {
    "weights": (("weights_frozen", "weights_trainable", "buffers", "unsharded_params"), ("parameters",)),
    "gradients": (("gradients",), ("gradients",)),
    "optimizer": (("optimizer_states",), ("optimizer_state",)),
    "activations": (("activations",), ("activations",)),
    "inputs": (("inputs",), ("inputs",)),
    # the data-parallel buffers (peftcalc.sharding) are what the tracer counts as other: FSDP2's all-gather and
    # reduce-scatter buffers and autograd's full gradients before their reduce-scatter, DDP's gradient buckets
    # (FSDP2's unsharded parameters are parameters to the harness's tracer, measure.dist.DistTracer), DeepSpeed
    # ZeRO's reduce bucket, fp32 master partition and gradient partition (no parameter's, no optimizer state)
    "other": (("logits_loss", "temporaries", "all_gather_buffers", "reduce_scatter_buffers", "unsharded_gradients",
               "gradient_buckets", "master_weights", "gradient_partition"), ("other",)),
}
ERROR_COMPONENTS = ("weights", "gradients", "optimizer", "activations", "inputs", "other")  # shares add up to the error


def source_of(device: str) -> str:
    """'gpu' for rows measured on cuda, else the harness device ('cpu' or 'fake')."""
    return "gpu" if device == "cuda" else device


def config_sha(config: dict) -> str:
    """The harness's config hash (measure.record.config_sha): sha256 of the sorted JSON of the
    config's keys that do not start with '_', first 12 hex digits."""
    text = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class ConfigIndex:
    """Candidate model configs, by sha and by name."""

    by_sha: dict = field(default_factory=dict)  # sha -> (name, config dict, registry entry?)
    by_name: dict = field(default_factory=dict)  # name -> config dict (not registry entries)

    def add(self, name: str, config: dict, registry: bool = False) -> None:
        self.by_sha.setdefault(config_sha(config), (name, config, registry))
        if not registry:
            self.by_name.setdefault(name, config)


def config_index(extra: dict | None = None, dirs=(TEST_CONFIGS_DIR,), matrices_dir: Path = MATRICES_DIR) -> ConfigIndex:
    """Every config a row can name: `extra` (name -> config dict), the ``[models.*]`` tables of the
    matrix files, the registry, and the ``*.json`` configs in `dirs`."""
    index = ConfigIndex()
    for name, config in (extra or {}).items():
        index.add(name, {**config, "_name_or_path": name})
    for path in sorted(Path(matrices_dir).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        for name, config in data.get("models", {}).items():
            index.add(name, {**config, "_name_or_path": name})
    for name in registry_names():
        index.add(name, load_spec(name).hf_config, registry=True)
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            try:
                config = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(config, dict) and "model_type" in config:
                index.add(config.get("_name_or_path") or config["model_type"], config)
    return index


def resolve_spec(settings: dict, index: ConfigIndex) -> tuple[ModelSpec | None, str]:
    """The spec a row was measured on, or (None, why). A row may carry its config inline
    (``settings.model_config``); else its sha picks the candidate; rows without a sha (hand-made)
    resolve by name."""
    name = settings.get("model", "")
    inline = settings.get("model_config")
    if isinstance(inline, dict):
        return spec_from_config({**inline, "_name_or_path": inline.get("_name_or_path", name)}), ""
    sha = settings.get("model_config_sha")
    if sha:
        hit = index.by_sha.get(sha)
        if hit is None:
            return None, f"no known config of '{name}' has sha {sha}"
        hit_name, config, registry = hit
        if registry:
            return load_spec(hit_name), ""
        return spec_from_config({**config, "_name_or_path": name or hit_name}), ""
    try:  # no sha (a hand-made row): the registry first, then a config of that name
        return load_spec(name), ""
    except InputError as exc:
        if name in index.by_name:
            return spec_from_config({**index.by_name[name], "_name_or_path": name}), ""
        return None, str(exc)


def read_jsonl(paths) -> list[tuple[str, dict]]:
    """(file, row) for every parseable line of the files (a torn last line is skipped)."""
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "settings" in row:
                out.append((str(path), row))
    return out


def predict_row(spec: ModelSpec, settings: dict):
    """The current calculator's Estimate for a row's settings: device 'cuda' for cuda rows and
    'cpu' for cpu and fake rows (what measure.record.predict asks), with prepare_kbit as the row ran it."""
    from peftcalc import estimate
    from peftcalc.methods import applicable_knobs

    method = dict(settings["method"])
    training = {k: v for k, v in settings["training"].items() if k != "device"}
    device = "cuda" if settings.get("device") == "cuda" else "cpu"
    name = method.pop("method")
    # the harness records prepare_model_for_kbit_training apart from the method (qlora_prepare_kbit:
    # true/false for qlora rows, null otherwise); the prediction mirrors what the row ran
    method["prepare_kbit"] = bool(settings.get("qlora_prepare_kbit"))
    if isinstance(method.get("targets"), list):
        method["targets"] = tuple(method["targets"])
    # a row records every knob; estimate refuses one its method does not read (the recorded defaults)
    return estimate(spec, method=name, **applicable_knobs(name, method), **training, device=device)


# predict_row's answers during one load_rows: a cpu row and its fake twin (and a rerun of the same settings) ask
# the same question, so it is computed once. Keyed by the spec object (the ConfigIndex keeps it alive) and the
# settings that reach predict_row; an error is kept and raised again.
_PREDICTIONS: dict = {}


def _predict_once(spec: ModelSpec, settings: dict):
    """predict_row(spec, settings), computed once per distinct question within a load_rows call."""
    asked = {k: v for k, v in settings.items() if k not in ("device", "key")}
    key = (id(spec), "cuda" if settings.get("device") == "cuda" else "cpu", json.dumps(asked, sort_keys=True, default=str))
    if key not in _PREDICTIONS:
        try:
            _PREDICTIONS[key] = predict_row(spec, settings)
        except Exception as exc:  # noqa: BLE001 - re-raised below, as predict_row raised it
            _PREDICTIONS[key] = exc
    answer = _PREDICTIONS[key]
    if isinstance(answer, Exception):
        raise answer
    return answer


def variant_label(method: dict) -> str:
    """'lora r8 q_proj,v_proj', 'adapter pfeiffer b8', ...: the knobs that matter for the method."""
    m = method.get("method", "?")
    bits = [m]
    if m in ("lora", "qlora"):
        targets = method.get("targets")
        t = ",".join(targets) if isinstance(targets, (list, tuple)) else (targets or "default")
        bits.append(f"r{method.get('rank', 8)} {t}")
        if method.get("dora"):
            bits.append("dora")
        if m == "qlora" and not method.get("double_quant", True):
            bits.append("no-dq")
        if m == "qlora" and method.get("prepare_kbit"):
            bits.append("prepare-kbit")
    elif m == "adapter":
        bits.append(method.get("adapter_kind", "houlsby"))
        if method.get("bottleneck"):
            bits.append(f"b{method['bottleneck']}")
    elif m in ("prefix", "prompt"):
        bits.append(f"v{method.get('num_virtual_tokens', 20)}")
    elif m == "freeze" and method.get("trainable_layers") is not None:
        bits.append(f"top{method['trainable_layers']}")
    return " ".join(bits)


def settings_label(training: dict) -> str:
    ck = " ckpt" if training.get("grad_checkpointing") else ""
    ck += f"/{training['checkpoint_every']}" if training.get("checkpoint_every", 1) != 1 else ""
    ck += " reentrant" if training.get("checkpoint_reentrant") else ""
    att = f" {training['attention']}" if training.get("attention", "sdpa") != "sdpa" else ""
    return (f"{training.get('precision')} b{training.get('batch_size')} s{training.get('seq_len')}"
            f"{ck}{att} {training.get('optimizer')}")


def signed_error(predicted, measured) -> float:
    """(predicted - measured) / measured; NaN when either is missing or measured is 0."""
    if predicted is None or measured is None or measured == 0:
        return math.nan
    try:
        if math.isnan(predicted) or math.isnan(measured):
            return math.nan
    except TypeError:
        return math.nan
    return (predicted - measured) / measured


def _component_sums(parts: dict | None, names) -> int | None:
    if not parts:
        return None
    return int(sum(parts.get(n, 0) for n in names))


def flatten(file: str, row: dict, index: ConfigIndex, recompute: bool = True) -> dict:
    """One report row: settings, measured and predicted peaks (current calculator, and the row's
    stored prediction), signed error, component bytes on both sides."""
    s = row["settings"]
    method, training = s.get("method", {}), s.get("training", {})
    measured = row.get("measured") or {}
    params = row.get("params") or {}
    env = row.get("environment") or {}
    stored = row.get("predicted") or {}
    out = {
        "key": row.get("key"),
        "file": file,
        "source": source_of(s.get("device", "")),
        "device_name": env.get("device_name", s.get("device", "")),
        "model": s.get("model"),
        "family": None,
        "method": method.get("method"),
        "variant": variant_label({**method, "prepare_kbit": s.get("qlora_prepare_kbit")}),
        "settings": settings_label(training),
        "precision": training.get("precision"),
        "batch_size": training.get("batch_size"),
        "seq_len": training.get("seq_len"),
        "grad_checkpointing": training.get("grad_checkpointing"),
        "attention": training.get("attention"),
        "optimizer": training.get("optimizer"),
        "outcome": row.get("outcome"),
        "params_total": params.get("total"),
        "params_trainable": params.get("trainable"),
        "measured_peak_bytes": measured.get("peak_bytes"),
        "measured_step1_peak_bytes": measured.get("step1_peak_bytes"),
        "measured_peak_phase": measured.get("peak_phase"),
        "measured_reserved_bytes": measured.get("reserved_peak_bytes"),
        "measured_host_bytes": measured.get("host_peak_bytes"),  # offload_activations: save_on_cpu's host copies
        "predicted_host_bytes": None,
        "stored_predicted_peak_bytes": stored.get("peak_bytes"),
        "predicted_peak_bytes": None,
        "predicted_step1_peak_bytes": None,
        "predicted_peak_phase": None,
        "predicted_reserved_bytes": None,
        "predicted_params_total": None,
        "predicted_params_trainable": None,
        "predicted_from": "none",
        "prediction_note": row.get("predicted_error") or "",
    }
    predicted_parts = stored.get("components")
    if recompute:
        spec, why = resolve_spec(s, index)
        if spec is not None:
            out["family"] = spec.model_type
            try:
                e = _predict_once(spec, s)
            except Exception as exc:  # a row the current calculator cannot predict is a finding
                out["prediction_note"] = f"{type(exc).__name__}: {exc}"
            else:
                out.update(predicted_peak_bytes=int(e.memory.peak_bytes),
                           predicted_step1_peak_bytes=int(e.memory.step1_peak_bytes),
                           predicted_peak_phase=e.memory.peak_phase,
                           predicted_reserved_bytes=_allocator_reserved(e),
                           predicted_params_total=int(e.params.total),
                           predicted_params_trainable=int(e.params.trainable),
                           predicted_from="current", prediction_note="",
                           predicted_host_bytes=int(e.memory.host_bytes) if e.memory.host_bytes else None)
                predicted_parts = dict(e.memory.components)
        else:
            out["prediction_note"] = why
    if out["predicted_from"] == "none" and stored.get("peak_bytes") is not None:
        out["predicted_peak_bytes"] = stored["peak_bytes"]
        out["predicted_peak_phase"] = stored.get("peak_phase")
        out["predicted_from"] = "stored"
    ok = out["outcome"] == "ok"
    out["error"] = signed_error(out["predicted_peak_bytes"], out["measured_peak_bytes"]) if ok else math.nan
    out["step1_error"] = signed_error(out["predicted_step1_peak_bytes"], out["measured_step1_peak_bytes"]) if ok else math.nan
    out["reserved_error"] = signed_error(out["predicted_reserved_bytes"], out["measured_reserved_bytes"]) if ok else math.nan
    out["stored_error"] = signed_error(out["stored_predicted_peak_bytes"], out["measured_peak_bytes"]) if ok else math.nan
    out["host_error"] = signed_error(out["predicted_host_bytes"], out["measured_host_bytes"]) if ok else math.nan
    # The breakdown: the tracer's categories (cuda rows: the traced extra step's). A component's
    # error is its share of the peak's error, (predicted_c - measured_c) / measured peak, and only
    # where both peaks fall in the same phase (else the two breakdowns describe different moments).
    cats = measured.get("categories_at_peak") or (measured.get("tracer") or {}).get("categories_at_peak")
    same_phase = phase_group(out["predicted_peak_phase"]) == phase_group(out["measured_peak_phase"])
    out["same_peak_phase"] = same_phase if out["predicted_peak_phase"] and out["measured_peak_phase"] else None
    for comp, (pred_names, meas_names) in COMPONENT_MAP.items():
        p = _component_sums(predicted_parts, pred_names)
        m = _component_sums(cats, meas_names)
        out[f"pred_{comp}"] = p
        out[f"meas_{comp}"] = m
        scored = ok and same_phase and p is not None and m is not None and out["measured_peak_bytes"]
        out[f"error_{comp}"] = (p - m) / out["measured_peak_bytes"] if scored else math.nan
    return out


def phase_group(phase: str | None) -> str | None:
    """'backward:layer3' -> 'backward': the calculator's events grouped as the harness's phases."""
    return phase.split(":", 1)[0] if phase else None


def _allocator_reserved(e) -> int | None:
    """What ``max_memory_reserved`` should read on cuda rows: the calculator's reserved memory less
    the CUDA context (which the caching allocator does not count). None for cpu predictions."""
    if e.memory.device != "cuda":
        return None
    return int(e.memory.reserved_bytes - e.memory.overhead.get("cuda_context", 0))


def load_rows(paths, recompute: bool = True, configs: dict | None = None, config_dirs=(TEST_CONFIGS_DIR,)):
    """Every row of the JSONL files as a DataFrame (see :func:`flatten`), ordered GPU, CPU, fake."""
    import pandas as pd

    index = config_index(configs, config_dirs)
    _PREDICTIONS.clear()
    try:
        records = [flatten(f, r, index, recompute) for f, r in read_jsonl(paths)]
    finally:
        _PREDICTIONS.clear()
    df = pd.DataFrame(records)
    if df.empty:
        return df
    df["source"] = pd.Categorical(df["source"], categories=list(SOURCES) + sorted(set(df["source"]) - set(SOURCES)),
                                  ordered=True)
    return df.sort_values(["source", "model", "method"], kind="stable").reset_index(drop=True)
