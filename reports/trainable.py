"""Trainable vs total parameters, method by method, for a real model, side by side with the
ranges the seeds claim (the method table of seed 004 and the frozen-backbone table of seed 000).

The claims are data (:data:`SEED_CLAIMS`), each with the seed file and line it was read from, so a
reader can check the quote. The seeds' numbers are claims to check, not truths (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc import estimate
from peftcalc.errors import InputError
from peftcalc.methods import methods_for
from peftcalc.spec import load_spec

SEED_004 = "shared/seeds/004_c97024b964fd67c6.txt"
SEED_000 = "shared/seeds/000_f0cc3f8ad105b85f.txt"


@dataclass(frozen=True)
class Claim:
    """A claimed range of the trainable fraction, in percent (low may be 0 for '< x%')."""

    text: str  # as the seed writes it
    low_pct: float
    high_pct: float
    cite: str  # seed file:line

    def contains(self, pct: float) -> bool:
        return self.low_pct <= pct <= self.high_pct


# Seed 004 "How PEFT Methods Define Trainable Parameters" ("Typical % of Params Trained" column).
SEED_004_CLAIMS = {
    "adapter": Claim("0.5% - 8%", 0.5, 8.0, f"{SEED_004}:89"),
    "lora": Claim("0.01% - 0.1%", 0.01, 0.1, f"{SEED_004}:99"),
    "prefix": Claim("< 0.1%", 0.0, 0.1, f"{SEED_004}:109"),
    "prompt": Claim("< 0.01%", 0.0, 0.01, f"{SEED_004}:119"),
    "bitfit": Claim("0.09% - 0.1%", 0.09, 0.1, f"{SEED_004}:129"),
    "ia3": Claim("~0.01% - 0.1%", 0.01, 0.1, f"{SEED_004}:137"),
    "qlora": Claim("0.01% - 0.1%", 0.01, 0.1, f"{SEED_004}:155"),
}
# Seed 004's "Visual / VL-Adapter" row: adapters in a vision encoder (ViT, CLIP).
SEED_004_VISUAL_ADAPTER = Claim("1% - 5%", 1.0, 5.0, f"{SEED_004}:145")
# Seed 000 "Frozen Backbone (PEFT) vs. Full Fine-Tuning", "Trainable Parameter Count" row, and the
# per-method figures of its "Parameter Efficiency" list.
SEED_000_CLAIMS = {
    "full": Claim("100%", 100.0, 100.0, f"{SEED_000}:101"),
    "adapter": Claim("0.5-8%", 0.5, 8.0, f"{SEED_000}:37"),
    "lora": Claim("less than 1%", 0.0, 1.0, f"{SEED_000}:38"),
    "qlora": Claim("less than 1%", 0.0, 1.0, f"{SEED_000}:38"),
}
SEED_000_PEFT = Claim("< 1% to 5%", 0.0, 5.0, f"{SEED_000}:99")  # any frozen-backbone method

# The rows of the table: every method at its defaults (peft's where peft has one), plus the
# all-linear LoRA/QLoRA most people use.
VARIANTS = [
    ("full", {}),
    ("frozen", {}),
    ("freeze", {}),
    ("lora", {}),
    ("lora", {"rank": 16, "targets": "all-linear"}),
    ("qlora", {}),
    ("qlora", {"rank": 16, "targets": "all-linear"}),
    ("adapter", {}),
    ("prefix", {}),
    ("prompt", {}),
    ("bitfit", {}),
    ("ia3", {}),
]


def describe(method: str, kw: dict, spec) -> str:
    """The method's knobs in words, with the defaults made explicit."""
    from peftcalc.methods import IA3_DEFAULT_TARGETS, LORA_DEFAULT_TARGETS

    if method in ("lora", "qlora"):
        family = spec.text.model_type if spec.is_vlm else spec.model_type  # LLaVA: LoRA on the language model
        targets = kw.get("targets") or ",".join(LORA_DEFAULT_TARGETS[family])
        return (f"r={kw.get('rank', 8)}, {targets}" + (", NF4 base" if method == "qlora" else "")
                + (" + projector" if spec.is_vlm else ""))
    if method == "projector":
        return "projector only (vision tower and language model frozen)"
    if method == "projector-llm":
        return "projector + language model"
    if method == "qformer":
        return "Q-Former, query tokens, language projection"
    if method == "adapter":
        from peftcalc.methods import MethodSettings, resolve_adapter_kind, resolve_bottleneck

        s = MethodSettings("adapter", **{k: v for k, v in kw.items() if k in ("adapter_kind", "bottleneck")})
        return f"{resolve_adapter_kind(spec, s)}, bottleneck {resolve_bottleneck(spec, s)}"
    if method in ("prefix", "prompt"):
        return f"{kw.get('num_virtual_tokens', 20)} virtual tokens"
    if method == "freeze":
        k = kw.get("trainable_layers") or max(1, spec.num_layers // 4)
        return f"top {k} of {spec.num_layers} blocks + norm + head"
    if method == "ia3":
        return ",".join(IA3_DEFAULT_TARGETS[spec.model_type][0])
    if method == "frozen":
        return "task head only (linear probe)"
    if method == "bitfit":
        return "bias terms only"
    return "every parameter"


def claims_for(method: str, spec) -> tuple[Claim | None, Claim | None]:
    """(seed 004 claim, seed 000 claim) for a method on this model."""
    c4 = SEED_004_CLAIMS.get(method)
    if method == "adapter" and spec.is_vision:
        c4 = SEED_004_VISUAL_ADAPTER
    c0 = SEED_000_CLAIMS.get(method)
    if c0 is None and method not in ("full", "frozen", "freeze"):
        c0 = SEED_000_PEFT
    return c4, c0


def _outside(claim: Claim | None, pct: float | None):
    if claim is None or pct is None:
        return None
    return not claim.contains(pct)


def _factor(claim: Claim | None, pct: float | None) -> str:
    """How far outside the claimed range: 'x3.2 above', 'x0.4 below' ('' when inside)."""
    if claim is None or pct is None or claim.contains(pct):
        return ""
    if pct > claim.high_pct:
        return f"{pct / claim.high_pct:.2g}x the upper end"
    if claim.low_pct > 0:
        return f"{pct / claim.low_pct:.2g}x the lower end"
    return ""


def trainable_frame(model, batch_size: int = 1, seq_len: int = 512, precision: str = "bf16",
                    optimizer: str = "adamw", grad_checkpointing: bool = False, device: str = "cuda",
                    variants=VARIANTS):
    """One row per method variant: trainable, total, %, peak memory at the stated setting, the seed
    claims and whether the real figure is outside them. A method the model cannot take (BitFit on a
    model without biases) gets a row saying why."""
    import pandas as pd

    spec = load_spec(model)
    if variants is VARIANTS and (spec.is_vlm or spec.model_type == "blip-2"):  # the stages they take
        variants = [(m, {}) for m in methods_for(spec)]
    rows = []
    for method, kw in variants:
        c4, c0 = claims_for(method, spec)
        base = {"model": spec.name, "method": method, "settings": describe(method, kw, spec)}
        try:
            e = estimate(spec, method=method, batch_size=batch_size, seq_len=seq_len, precision=precision,
                         optimizer=optimizer, grad_checkpointing=grad_checkpointing, device=device, **kw)
        except InputError as exc:
            rows.append({**base, "trainable": None, "total": None, "trainable_pct": None, "peak_bytes": None,
                         "peak_gib": None, "peak_phase": None,
                         "claim_004": c4.text if c4 else "", "outside_004": None, "claim_000": c0.text if c0 else "",
                         "outside_000": None, "how_far": "", "cite_004": c4.cite if c4 else "",
                         "cite_000": c0.cite if c0 else "", "note": f"n/a: {exc}"})
            continue
        pct = e.params.percent
        rows.append({
            **base,
            "trainable": e.params.trainable,
            "total": e.params.total,
            "trainable_pct": pct,
            "peak_bytes": e.memory.peak_bytes,
            "peak_gib": e.memory.peak_bytes / 1024**3,
            "peak_phase": e.memory.peak_phase,
            "claim_004": c4.text if c4 else "",
            "outside_004": _outside(c4, pct),
            "claim_000": c0.text if c0 else "",
            "outside_000": _outside(c0, pct),
            "how_far": _factor(c4, pct) or _factor(c0, pct),
            "cite_004": c4.cite if c4 else "",
            "cite_000": c0.cite if c0 else "",
            "note": "",
        })
    df = pd.DataFrame(rows)
    for col in ("trainable", "total", "peak_bytes"):
        df[col] = df[col].astype("Int64")
    df.attrs["setting"] = (f"{spec.name}, batch {batch_size}, seq {seq_len}, {precision}, {optimizer}"
                           f"{', grad checkpointing' if grad_checkpointing else ''}, peak = {device} "
                           f"{'max_memory_allocated' if device == 'cuda' else 'trace'} of a steady-state step")
    return df


def _flag(outside) -> str:
    if outside is None:
        return ""
    return "OUTSIDE" if outside else "inside"


def trainable_markdown_rows(df) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the human table (markdown and the terminal table)."""
    header = ["method", "settings", "trainable", "total", "trainable %", "peak (GiB)", "seed 004 claim", "vs 004",
              "seed 000 claim", "vs 000", "how far"]
    cells = []
    for r in df.to_dict("records"):
        if r["note"]:
            cells.append([r["method"], r["settings"], "-", "-", "-", "-", r["claim_004"], "", r["claim_000"], "",
                          r["note"]])
            continue
        cells.append([r["method"], r["settings"], f"{int(r['trainable']):,}", f"{int(r['total']):,}",
                      _pct(r["trainable_pct"]), f"{r['peak_gib']:.2f}", r["claim_004"] or "-",
                      _flag(r["outside_004"]), r["claim_000"] or "-", _flag(r["outside_000"]), r["how_far"]])
    return header, cells


def _pct(p: float) -> str:
    if p >= 1:
        return f"{p:.2f}%"
    if p >= 0.01:
        return f"{p:.3f}%"
    return f"{p:.4f}%"


def citations(df) -> list[str]:
    cites = {c for c in list(df["cite_004"]) + list(df["cite_000"]) if c}
    return sorted(cites, key=lambda c: (c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])))
