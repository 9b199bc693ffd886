"""Property tests (Hypothesis): invariants of the calculator over random valid settings, and "only
InputError escapes" over random invalid input (CLI arguments, config files, API keyword values).

Deterministic (derandomize=True) and small (max_examples per test below), so the file runs in a few
seconds and CI sees the same examples every run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import peftcalc  # noqa: E402
from peftcalc.config import load_spec, registry_names, spec_from_config  # noqa: E402
from peftcalc.errors import CombinationError, InputError  # noqa: E402
from peftcalc.methods import max_seq_len, methods_for  # noqa: E402
from peftcalc.api import method_settings, resolved_settings  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.json"))
CONFIG_DICTS = {p.stem: json.loads(p.read_text()) for p in CONFIG_FILES}

# Small and medium registry models (the calculator is analytic, but the big ones add nothing the
# medium ones of the same family do not cover), one per family and kind: encoder, decoder, vision,
# vision-language, BLIP-2.
SMALL_REGISTRY = [n for n in ("bert-base", "roberta-base", "gpt2", "gpt2-medium", "vit-b-16", "qwen2.5-0.5b",
                              "tinyllama-1.1b", "llama-3.2-1b", "clip-vit-l-14-vision", "llava-1.5-7b",
                              "blip2-opt-2.7b") if n in registry_names()]

PRECISIONS = ("fp32", "bf16", "amp-bf16", "fp16", "amp-fp16")


# PEFTCALC_PROPS_SCALE=50 multiplies every max_examples (a longer local or nightly exploration).
SCALE = max(1, int(os.environ.get("PEFTCALC_PROPS_SCALE", "1")))


def _props(n: int, shrink: bool = True, **kw):
    """Settings of one property; shrink=False for an expected failure (xfail): no time spent shrinking it."""
    if not shrink:
        kw["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], **kw)


_SPECS: dict = {}


def spec_of(key: str):
    """A registry name, or 'config:<stem>' for a tiny config in tests/peftcalc/configs (loaded once)."""
    if key not in _SPECS:
        if key.startswith("config:"):
            stem = key.split(":", 1)[1]
            _SPECS[key] = spec_from_config(CONFIG_DICTS[stem], name=stem)
        else:
            _SPECS[key] = load_spec(key)
    return _SPECS[key]


MODEL_KEYS = SMALL_REGISTRY + [f"config:{p.stem}" for p in CONFIG_FILES]


def seq_limit(spec, method: str) -> int:
    """The longest sequence the model takes with `method`'s default settings (2048 where no limit)."""
    try:
        s = resolved_settings(spec, method_settings(method))
    except InputError:
        return 2048
    limit = max_seq_len(spec, s)
    return min(limit, 2048) if limit else 2048


@st.composite
def valid_settings(draw, models=MODEL_KEYS, methods=None):
    """(model key, spec, estimate keyword arguments) over the valid ranges; a combination the calculator
    refuses is filtered by the tests (InputError -> assume(False))."""
    key = draw(st.sampled_from(models))
    spec = spec_of(key)
    choices = [m for m in methods_for(spec) if methods is None or m in methods]
    assume(choices)
    method = draw(st.sampled_from(choices))
    limit = seq_limit(spec, method)
    assume(limit >= 1)
    kw = dict(
        method=method,
        precision=draw(st.sampled_from(PRECISIONS)),
        batch_size=draw(st.integers(1, 8)),
        seq_len=draw(st.integers(min(16, limit), limit)),
        grad_checkpointing=draw(st.booleans()),
        attention=draw(st.sampled_from(("sdpa", "eager"))),
        device=draw(st.sampled_from(("cuda", "cpu"))),
    )
    return key, spec, kw


def estimate_or_skip(spec, **kw):
    try:
        return peftcalc.estimate(spec, **kw)
    except InputError:
        assume(False)


# ---------------------------------------------------------------------------------------------------
# Valid settings: invariants
# ---------------------------------------------------------------------------------------------------


@_props(40)
@given(valid_settings(), st.data())
def test_peak_never_falls_as_batch_or_sequence_grows(case, data):
    key, spec, kw = case
    base = estimate_or_skip(spec, **kw)
    limit = seq_limit(spec, kw["method"])
    bigger_batch = data.draw(st.integers(kw["batch_size"], 8), label="bigger batch")
    bigger_seq = data.draw(st.integers(kw["seq_len"], limit), label="bigger seq")
    for change in ({"batch_size": bigger_batch}, {"seq_len": bigger_seq}):
        try:
            grown = peftcalc.estimate(spec, **{**kw, **change})
        except CombinationError:
            continue  # e.g. a longer sequence past learned positions
        assert grown.memory.peak_bytes >= base.memory.peak_bytes, (key, kw, change)


@_props(40)
@given(valid_settings())
def test_memory_components_sum_to_the_peak(case):
    key, spec, kw = case
    est = estimate_or_skip(spec, **kw)
    assert all(isinstance(v, int) and v >= 0 for v in est.memory.components.values()), est.memory.components
    assert sum(est.memory.components.values()) == est.memory.peak_bytes, (key, kw)


@_props(30)
@given(valid_settings(methods=("lora", "full")))
def test_lora_trains_fewer_parameters_than_full(case):
    key, spec, kw = case
    assume("full" in methods_for(spec) and "lora" in methods_for(spec))
    kw = {k: v for k, v in kw.items() if k != "method"}
    full = estimate_or_skip(spec, method="full", **kw)
    lora = estimate_or_skip(spec, method="lora", **kw)
    assert lora.params.trainable < full.params.trainable, (key, kw)


@_props(40)
@given(valid_settings())
def test_trainable_never_exceeds_total(case):
    key, spec, kw = case
    est = estimate_or_skip(spec, **kw)
    p = est.params
    assert 0 <= p.trainable <= p.total, (key, kw, p.trainable, p.total)
    assert 0 <= p.percent <= 100


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _finite(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return x is None or isinstance(x, (str, int, bool))


@_props(30)
@given(valid_settings())
def test_to_dict_round_trips_through_json(case):
    key, spec, kw = case
    est = estimate_or_skip(spec, **kw)
    d = est.to_dict()
    assert _finite(d), (key, kw)
    assert json.loads(json.dumps(d, allow_nan=False)) == d, (key, kw)


@_props(20)
@given(valid_settings(), st.data())
def test_sweep_rows_equal_estimate(case, data):
    key, spec, kw = case
    limit = seq_limit(spec, kw["method"])
    batches = sorted(set(data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=2), label="batches")))
    seqs = sorted(set(data.draw(st.lists(st.integers(min(16, limit), limit), min_size=1, max_size=2),
                                label="seqs")))
    grid = {**kw, "batch_size": batches, "seq_len": seqs}
    try:
        df = peftcalc.sweep(spec, **grid)
    except InputError:
        df = None
    for row in (df.to_dict("records") if df is not None else [{"batch_size": b, "seq_len": s, "error": "raised"}
                                                              for b in batches for s in seqs]):
        one = {**kw, "batch_size": int(row["batch_size"]), "seq_len": int(row["seq_len"])}
        try:
            est = peftcalc.estimate(spec, **one)
        except InputError as exc:
            # what estimate refuses, the sweep refuses too: a row with the reason, or (a bad value) InputError
            assert row["error"] is not None, (key, one, str(exc))
            continue
        assert row["error"] is None, (key, one, row["error"])
        assert int(row["peak_bytes"]) == est.memory.peak_bytes, (key, one)
        assert int(row["params_trainable"]) == est.params.trainable, (key, one)
        assert int(row["params_total"]) == est.params.total, (key, one)


# ---------------------------------------------------------------------------------------------------
# Invalid input: only InputError escapes (the CLI: exit code 0 or 2, never a traceback)
# ---------------------------------------------------------------------------------------------------

from typer.testing import CliRunner  # noqa: E402

from peftcalc.cli import app  # noqa: E402

runner = CliRunner()

BAD_NUMBERS = st.one_of(
    st.integers(-10, 0).map(str),
    st.integers(10**6, 10**30).map(str),
    st.sampled_from(["1.5", "-0.0", "2e3", "nan", "inf", "-inf", "abc", "", " ", "0x10", "1_000", "٣"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
GOOD_INTS = st.integers(1, 64).map(str)
NUMBER = st.one_of(GOOD_INTS, BAD_NUMBERS)
FLOAT_VALUE = st.one_of(st.sampled_from(["0.35", "1", "0.5", "2.5"]), BAD_NUMBERS)
NAME = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "-", "--", "LoRA", "all-linear", "q_proj,v_proj",
                                                        ",", "tpu", "fp8", "h100", "H100 80GB", "a100"]))


def _choice(*valid):
    return st.one_of(st.sampled_from(valid), NAME)


VALUED_FLAGS = {
    "--method": _choice("full", "frozen", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit",
                        "ia3", "projector", "projector-llm", "qformer"),
    "--rank": NUMBER, "--alpha": NUMBER, "--targets": NAME, "--bottleneck": NUMBER,
    "--adapter-kind": _choice("houlsby", "pfeiffer", "block"),
    "--num-virtual-tokens": NUMBER, "--trainable-layers": NUMBER, "--unfreeze-vision-layers": NUMBER,
    "--batch-size": NUMBER, "--seq-len": NUMBER, "--precision": _choice(*PRECISIONS),
    "--optimizer": _choice("adamw", "adamw-8bit", "sgd", "adafactor"), "--checkpoint-every": NUMBER,
    "--attention": _choice("sdpa", "eager"), "--device": _choice("cuda", "cpu"),
    "--gpu": _choice("RTX 4090", "A100 80GB", "H100 80GB", "L4"), "--price": FLOAT_VALUE, "--tasks": NUMBER,
    "--dataset-tokens": NUMBER, "--mfu": FLOAT_VALUE, "--format": _choice("json", "table", "csv", "markdown"),
}
SWITCHES = ["--dora", "--double-quant", "--no-double-quant", "--prepare-kbit", "--no-prepare-kbit",
            "--grad-checkpointing", "--checkpoint-reentrant"]
CLI_MODELS = st.one_of(st.sampled_from(["gpt2", "bert-base", "vit-b-16", "qwen2.5-0.5b", "llava-1.5-7b",
                                        "blip2-opt-2.7b"]),
                       st.sampled_from([str(p) for p in CONFIG_FILES]),
                       st.sampled_from(["", " ", "nope", "lama-2-7b", "/nonexistent/config.json", str(CONFIGS),
                                        "-", "--"]))


@st.composite
def cli_args(draw):
    args = ["estimate", draw(CLI_MODELS)]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            args.append(draw(st.sampled_from(SWITCHES)))
        else:
            flag = draw(st.sampled_from(sorted(VALUED_FLAGS)))
            args += [flag, draw(VALUED_FLAGS[flag])]
    return args


def cli_exit_code(args) -> tuple[int, str]:
    """The exit code `python -m peftcalc` gives (cli.main turns InputError into exit 2) and the output."""
    result = runner.invoke(app, args)
    exc = result.exception
    if isinstance(exc, InputError):
        return 2, result.output
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc  # the traceback a user would see
    return result.exit_code, result.output


@_props(100)
@given(cli_args())
def test_cli_estimate_bad_arguments_exit_0_or_2_without_traceback(args):
    code, output = cli_exit_code(args)
    event(f"exit {code}")
    assert code in (0, 2), (args, code, output)
    assert "Traceback" not in output, (args, output)


# Fields a config may lack that the readers look up (adding one replaces its default).
EXTRA_FIELDS = ("num_key_value_heads", "max_position_embeddings", "n_positions", "num_labels", "id2label",
                "torch_dtype", "dtype", "tie_word_embeddings", "vocab_size", "head_dim", "architectures",
                "model_type", "_name_or_path", "problem_type", "rope_scaling", "type_vocab_size", "bias")
# A depth drawn huge makes the calculator run for minutes: its time grows faster than linearly in the
# number of layers (llama_base with num_hidden_layers 1,000: 0.4 s; 10,000: 6.7 s; 100,000: over 50 s,
# and nothing bounds the field), so depth-like fields get values up to 200 here.
DEPTH_WORDS = ("layer", "frequency")


def _json_values(depth_like: bool):
    big = 200 if depth_like else 10**30
    return st.one_of(
        st.none(), st.booleans(), st.text(max_size=8), st.integers(-(10**6), 0), st.integers(1, big),
        st.integers(1, 64).map(str), st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.integers(-2, 64), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(-2, 64), max_size=2),
    )


# Config fields read without a type/range check today (found by test_unvalidated_config_fields_...; one
# reproducer each in CONFIG_REPRODUCERS): any field with these names, and BLIP-2's sub-configs and query
# count. The property over the other fields must hold; the one over these held only once they were checked (each reproducer below was a crash).
UNVALIDATED_FIELDS = ("architectures", "id2label", "num_labels", "head_dim", "num_key_value_heads",
                      "type_vocab_size", "hidden_act", "num_channels")


def unvalidated(stem: str, sub: str | None, field: str) -> bool:
    return field in UNVALIDATED_FIELDS or (stem == "blip2_tiny" and (sub is not None or field == "num_query_tokens"))


# (config stem, sub-config, field, value) -> the non-InputError spec_from_config or estimate raises today.
CONFIG_REPRODUCERS = [
    ("llama_base", None, "architectures", 5),  # TypeError in spec_from_config (config._task_of)
    ("llama_base", None, "architectures", {"a": 1}),  # KeyError: 0
    ("gpt2_cls", None, "id2label", 2),  # TypeError: object of type 'int' has no len()
    ("llama_cls", None, "num_labels", None),  # TypeError: int() argument ... 'NoneType'
    ("llama_base", None, "head_dim", "34"),  # TypeError in estimate
    ("llama_base", None, "num_key_value_heads", "4"),  # TypeError in spec_from_config (families/llama.py)
    ("bert_base", None, "type_vocab_size", None),  # TypeError in spec_from_config (families/bert.py)
    ("llama_base", None, "hidden_act", [1]),  # TypeError in estimate: unhashable type: 'list'
    ("llava_tiny", "vision_config", "num_channels", "x"),  # ValueError in spec_from_config (families/vision.py)
    ("blip2_tiny", None, "num_query_tokens", None),  # TypeError in spec_from_config
    ("blip2_tiny", "text_config", "num_attention_heads", 0),  # ZeroDivisionError in spec_from_config (spec.py)
    ("blip2_tiny", "vision_config", "patch_size", 0),  # ZeroDivisionError in estimate (families/blip2.py)
    ("blip2_tiny", "qformer_config", "num_attention_heads", 0),  # ZeroDivisionError in estimate
    ("blip2_tiny", "qformer_config", "cross_attention_frequency", None),  # TypeError in estimate
    ("blip2_tiny", "vision_config", "intermediate_size", None),  # TypeError in estimate (layout.py)
    ("blip2_tiny", "text_config", "max_position_embeddings", 1e308),  # OverflowError in estimate (memory.py)
]


def broken_configs(only_unvalidated: bool):
    """(description, config): a tiny config from tests/peftcalc/configs with one field, top level or in a
    nested sub-config (vision_config, text_config, qformer_config), replaced by a random JSON value; the
    field among the unvalidated ones or among the others."""

    @st.composite
    def draw_config(draw):
        stem = draw(st.sampled_from(sorted(CONFIG_DICTS)))
        config = json.loads(json.dumps(CONFIG_DICTS[stem]))
        target, sub = config, None
        subs = [k for k, v in config.items() if isinstance(v, dict)]
        if subs and draw(st.booleans()):
            sub = draw(st.sampled_from(sorted(subs)))
            target = config[sub]
        fields = [f for f in sorted(set(target) | set(EXTRA_FIELDS)) if unvalidated(stem, sub, f) == only_unvalidated]
        assume(fields)
        field = draw(st.sampled_from(fields))
        target[field] = draw(_json_values(any(w in field for w in DEPTH_WORDS)))
        return f"{stem}:{sub + '.' if sub else ''}{field}={target[field]!r}", config

    return draw_config()


def _estimate_config(config, where, precision, seq_len, grad_checkpointing):
    """spec_from_config, then estimate with up to three of the model's methods; InputError is fine."""
    try:
        spec = spec_from_config(config, name=where)
    except InputError:
        return
    event("config read")
    for method in methods_for(spec)[:3]:
        try:
            est = peftcalc.estimate(spec, method=method, seq_len=seq_len, precision=precision,
                                    grad_checkpointing=grad_checkpointing)
        except InputError:
            continue
        event("estimated")
        assert sum(est.memory.components.values()) == est.memory.peak_bytes


@_props(100)
@given(broken_configs(only_unvalidated=False), st.sampled_from(PRECISIONS), st.integers(1, 64), st.booleans())
def test_broken_config_raises_only_input_error(case, precision, seq_len, grad_checkpointing):
    where, config = case
    _estimate_config(config, where, precision, seq_len, grad_checkpointing)


@_props(40, shrink=False)
@given(broken_configs(only_unvalidated=True), st.sampled_from(PRECISIONS), st.integers(1, 64), st.booleans())
def test_unvalidated_config_fields_raise_only_input_error(case, precision, seq_len, grad_checkpointing):
    where, config = case
    _estimate_config(config, where, precision, seq_len, grad_checkpointing)


@pytest.mark.parametrize("stem,sub,field,value", CONFIG_REPRODUCERS,
                         ids=[f"{c[0]}-{c[1] + '.' if c[1] else ''}{c[2]}={c[3]!r}" for c in CONFIG_REPRODUCERS])
def test_config_reproducers_raise_input_error(stem, sub, field, value):
    config = json.loads(json.dumps(CONFIG_DICTS[stem]))
    (config[sub] if sub else config)[field] = value
    with pytest.raises(InputError):
        spec = spec_from_config(config, name=stem)
        peftcalc.estimate(spec, seq_len=16, method="full" if "full" in methods_for(spec) else None)


# ---------------------------------------------------------------------------------------------------
# Invalid API values: estimate(model, **{keyword: random value}) raises only InputError
# ---------------------------------------------------------------------------------------------------

import inspect  # noqa: E402

API_KEYWORDS = [p for p in inspect.signature(peftcalc.estimate).parameters if p != "model"]
API_VALUES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=6), st.integers(1, 64).map(str), st.integers(-5, 0),
    st.integers(1, 64), st.integers(10**6, 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(1, 8), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.sampled_from(["lora", "fp16", "q_proj", "", "H100 80GB", "all-linear"]),
)
API_MODELS = ["gpt2", "llama-3.2-1b", "bert-base", "vit-b-16", "llava-1.5-7b", "blip2-opt-2.7b"]
# The keywords whose values estimate passes on unchecked today: one reproducer each (gpt2 unless named).
API_REPRODUCERS = {
    "method": "method=[1] -> TypeError: unhashable type: 'list'",
    "rank": "rank={} -> TypeError: unhashable type: 'dict'",
    "alpha": "alpha=[1] -> TypeError: unhashable type: 'list'",
    "targets": "targets=5 (or False) -> TypeError: object is not iterable (methods.normalize_targets)",
    "dora": "dora={} -> TypeError: unhashable type: 'dict'",
    "double_quant": "double_quant=[1] -> TypeError: unhashable type: 'list'",
    "bottleneck": "bottleneck={} -> TypeError: unhashable type: 'dict'",
    "adapter_kind": "adapter_kind=[2] -> TypeError: unhashable type: 'list'",
    "num_virtual_tokens": "num_virtual_tokens=[1] -> TypeError: unhashable type: 'list'",
    "trainable_layers": "trainable_layers={} -> TypeError: unhashable type: 'dict'",
    "vision_layers": "vision_layers=[2] (llava-1.5-7b) -> TypeError: unhashable type: 'list'",
    "prepare_kbit": "prepare_kbit={} -> TypeError: unhashable type: 'dict'",
    "batch_size": "batch_size='2' -> TypeError: '<' not supported between 'str' and 'int' (settings.check_training)",
    "seq_len": "seq_len=None -> TypeError: '<' not supported between 'NoneType' and 'int' (settings.check_training)",
    "precision": "precision=[6] -> TypeError: unhashable type: 'list' (settings.check_training)",
    "optimizer": "optimizer={} -> TypeError: unhashable type: 'dict' (settings.check_training)",
    "grad_checkpointing": "grad_checkpointing={} -> TypeError: unhashable type: 'dict'",
    "checkpoint_reentrant": "checkpoint_reentrant=[] -> TypeError: unhashable type: 'list'",
    "gpu": "gpu=5 -> AttributeError: 'int' object has no attribute 'lower' (hardware.find_gpu)",
    "price": "price={} -> TypeError: '<' not supported between 'dict' and 'int'",
    "tasks": "tasks='2' -> TypeError: '<' not supported between 'str' and 'int'",
    "dataset_tokens": "dataset_tokens=None -> TypeError; dataset_tokens=inf -> OverflowError (api._cost_on)",
    "mfu": "mfu=None -> TypeError: '<' not supported between 'int' and 'NoneType'",
}


def _api_case(keyword: str):
    marks = []
    # ids end in "-kw": the conftest skips every test whose keywords include "gpu" (the CUDA marker)
    return pytest.param(keyword, marks=marks, id=f"{keyword}-kw")


@pytest.mark.parametrize("keyword", [_api_case(k) for k in API_KEYWORDS])
@_props(15, shrink=False)
@given(model=st.sampled_from(API_MODELS), value=API_VALUES)
def test_api_bad_keyword_values_raise_only_input_error(keyword, model, value):
    base = {"seq_len": 64}
    try:
        peftcalc.estimate(model, **{**base, keyword: value})
    except InputError:
        pass


@pytest.mark.parametrize("keyword", sorted(API_REPRODUCERS), ids=[f"{k}-kw" for k in sorted(API_REPRODUCERS)])
def test_api_known_bad_values_raise_input_error(keyword):
    value = {"method": [1], "rank": {}, "alpha": [1], "targets": 5, "dora": {}, "double_quant": [1], "bottleneck": {},
             "adapter_kind": [2], "num_virtual_tokens": [1], "trainable_layers": {}, "vision_layers": [2],
             "prepare_kbit": {}, "batch_size": "2", "seq_len": None, "precision": [6], "optimizer": {},
             "grad_checkpointing": {}, "checkpoint_reentrant": [], "gpu": 5, "price": {}, "tasks": "2",
             "dataset_tokens": None, "mfu": None}[keyword]
    model = "llava-1.5-7b" if keyword == "vision_layers" else "gpt2"
    with pytest.raises(InputError):
        peftcalc.estimate(model, **{keyword: value})


# A number the API takes is finite in what it returns: price nan/inf, an mfu so small the step time
# overflows, or a nan setting stored as given make Estimate.to_dict() (and `--format json`) emit
# NaN/Infinity, which strict JSON parsers reject.
FINITE_REPRODUCERS = "estimate('gpt2', price=float('nan')) or estimate('gpt2', mfu=1e-320) -> to_dict() has NaN/inf"


@_props(60, shrink=False)
@given(keyword=st.sampled_from(["price", "mfu", "bottleneck", "rank", "alpha", "dataset_tokens", "num_virtual_tokens"]),
       value=st.floats(allow_nan=True, allow_infinity=True))
def test_api_numbers_give_finite_json_or_input_error(keyword, value):
    try:
        est = peftcalc.estimate("gpt2", seq_len=64, gpu="L4", **{keyword: value})
    except (InputError, TypeError, OverflowError):
        return  # InputError is right; TypeError/OverflowError are the type checks above
    json.dumps(est.to_dict(), allow_nan=False)


@pytest.mark.parametrize("flags", [["--price", "nan"], ["--price", "inf"], ["--mfu", "1e-320"]],
                         ids=["price-nan", "price-inf", "mfu-tiny"])
def test_cli_json_output_is_strict_json(flags):
    code, output = cli_exit_code(["estimate", "gpt2", "--gpu", "L4", "--format", "json", *flags])
    if code == 0:
        json.loads(output, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"not JSON: {c}")))
